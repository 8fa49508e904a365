"""A writer process for the concurrency and crash tests (run as a script, not collected).

    python ledger_worker.py URL COUNT CONCURRENCY TAG

Appends COUNT records through one LedgerWriter with CONCURRENCY coroutines and prints
"ack SEQ ID" for every append that has returned, flushed at once, so that a parent that kills
this process knows exactly which appends were acknowledged.
"""

from __future__ import annotations

import asyncio
import sys

from audit.db import make_engine
from audit.writer import LedgerWriter


async def main(url: str, count: int, concurrency: int, tag: str) -> None:
    engine = make_engine(url)
    try:
        async with LedgerWriter(engine) as writer:

            async def appender(k: int) -> None:
                for i in range(k, count, concurrency):
                    entry = await writer.append(
                        kind="inference",
                        principal=f"{tag}-{k}",
                        payload={
                            "purpose": "test",
                            "n": i,
                            "usage": {"e": {"tokens": 1, "weight": 0.5}},
                        },
                    )
                    sys.stdout.write(f"ack {entry.seq} {entry.id}\n")
                    sys.stdout.flush()

            await asyncio.gather(*(appender(k) for k in range(concurrency)))
    finally:
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
