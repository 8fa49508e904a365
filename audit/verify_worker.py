"""The part of `audit.verify` that runs in worker processes: one chunk of records, checked.

`audit.verify.verify(..., workers=N)` splits the records into chunks that start at multiples of
a power of two, so the Merkle subtrees of a chunk are the same whether it is hashed alone or
as part of the whole tree. A worker opens its own connection, reads its chunk in pages and
checks what one chunk can tell about itself: seqs dense, each prev_hash the previous hash,
each hash the hash of the stored contents (computed here, never by the database), time not
running backwards. It returns what the parent needs to stitch the chunks together and to check
checkpoints: the first record's prev_hash and time, the last hash and time, the Merkle
subtree roots of the chunk, and for every record that is (or should be) a checkpoint record,
its kind, payload and the chunk's subtree roots before it. On the first fault it stops and says
so, without wording it: the parent then checks from the chunk's start the reference way,
which finds and words the first fault exactly as a single process would.

Imports only the standard library and `audit.canonical` (and asyncpg for PostgreSQL), so a
worker starts quickly.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.canonical import RECORD_DOMAIN, stored_record_hash

CHECKPOINT = "checkpoint"  # audit.ledger.CHECKPOINT (not imported: it pulls in SQLAlchemy)

_PG_PAGE_SQL = (
    "SELECT seq, id, kind, at, principal, payload, prev_hash, hash FROM ledger_records "
    "WHERE seq > $1 AND seq <= $2 ORDER BY seq"
)
_SQLITE_PAGE_SQL = _PG_PAGE_SQL.replace("$1", "?").replace("$2", "?")
_PG_SIZES_SQL = "SELECT size FROM ledger_checkpoints WHERE size >= $1 AND size < $2"
_SQLITE_SIZES_SQL = _PG_SIZES_SQL.replace("$1", "?").replace("$2", "?")


@dataclass(frozen=True, slots=True)
class Chunk:
    """Records lo+1..hi. `nodes`: the Merkle frontier nodes before lo+1 when lo is not a
    multiple of the chunk's power of two (the first chunk of a `--from-seq` run), else ()."""

    backend: str  # "sqlite" (target: a file path) or "postgresql" (target: an asyncpg DSN)
    target: str
    lo: int
    hi: int
    page: int
    nodes: tuple[bytes, ...] = ()
    pins: tuple[int, ...] = ()  # sizes of checkpoints kept outside the database, in the chunk


@dataclass(slots=True)
class ChunkResult:
    ok: bool  # False: a fault somewhere in the chunk (or it could not be read)
    first_prev: str = ""
    first_at: str = ""
    last_hash: str = ""
    last_at: str = ""
    last_prev: str = ""
    nodes: list[bytes] = field(default_factory=list)  # frontier nodes after the chunk
    # (seq, kind, payload, frontier nodes before the record) for each checkpoint record
    events: list[tuple[int, str, str, list[bytes]]] = field(default_factory=list)


class _Fault(Exception):
    pass


def check_chunk(chunk: Chunk) -> ChunkResult:
    """Check one chunk (runs in a worker process)."""
    try:
        if chunk.backend == "sqlite":
            return _check_sqlite(chunk)
        return asyncio.run(_check_pg(chunk))
    except _Fault:
        return ChunkResult(False)


def _check_sqlite(chunk: Chunk) -> ChunkResult:
    db = sqlite3.connect(f"{Path(chunk.target).resolve().as_uri()}?mode=ro", uri=True)
    try:
        sizes = {r[0] for r in db.execute(_SQLITE_SIZES_SQL, (chunk.lo, chunk.hi))}
        sizes.update(chunk.pins)
        scan = _Scan(chunk, sizes)
        for after in range(chunk.lo, chunk.hi, chunk.page):
            until = min(after + chunk.page, chunk.hi)
            scan.page(db.execute(_SQLITE_PAGE_SQL, (after, until)).fetchall(), until)
        return scan.result()
    finally:
        db.close()


async def _check_pg(chunk: Chunk) -> ChunkResult:
    import asyncpg

    conn = await asyncpg.connect(chunk.target)
    try:
        sizes = {r[0] for r in await conn.fetch(_PG_SIZES_SQL, chunk.lo, chunk.hi)}
        sizes.update(chunk.pins)
        scan = _Scan(chunk, sizes)
        after = chunk.lo
        pending = asyncio.ensure_future(
            conn.fetch(_PG_PAGE_SQL, after, min(after + chunk.page, chunk.hi))
        )
        while after < chunk.hi:
            until = min(after + chunk.page, chunk.hi)
            rows = await pending
            if until < chunk.hi:  # the next page is read while this one is checked
                pending = asyncio.ensure_future(
                    conn.fetch(_PG_PAGE_SQL, until, min(until + chunk.page, chunk.hi))
                )
            try:
                scan.page(rows, until)
            except _Fault:
                if until < chunk.hi:
                    pending.cancel()
                    await asyncio.gather(pending, return_exceptions=True)
                raise
            after = until
        return scan.result()
    finally:
        await conn.close()


class _Scan:
    """The checks of `audit.verify._Run._scan`, on one chunk; any fault raises _Fault."""

    def __init__(self, chunk: Chunk, sizes: set[int]) -> None:
        self.sizes = sizes
        self.expected = chunk.lo + 1
        self.nodes = list(chunk.nodes)
        # the frontier's size, counted from the chunk's power-of-two start
        self.size = chunk.lo if chunk.nodes else 0
        self.out = ChunkResult(True)
        self.prev: str | None = None
        self.prev_at = ""
        self.before = ""
        self.hi = chunk.hi

    def page(self, rows: Any, until: int) -> None:
        sha = hashlib.sha256
        unhex = bytes.fromhex
        domain = RECORD_DOMAIN
        nodes, size, sizes, events = self.nodes, self.size, self.sizes, self.out.events
        prev, prev_at, expected, before = self.prev, self.prev_at, self.expected, self.before
        if prev is None and rows:
            self.out.first_prev = prev = str(rows[0][6])
            self.out.first_at = prev_at = str(rows[0][3])
        for seq, rid, kind, at, principal, payload, prev_hash, digest in rows:
            if seq != expected or prev_hash != prev:
                raise _Fault
            fields = f"{rid}{kind}{at}{principal or ''}"
            if '"' in fields or "\\" in fields or not fields.isprintable():
                computed = stored_record_hash(prev_hash, seq, rid, kind, at, principal, payload)
            else:
                p = "null" if principal is None else f'"{principal}"'
                computed = sha(
                    f'{domain}{prev}{{"at":"{at}","id":"{rid}","kind":"{kind}",'
                    f'"payload":{payload},"principal":{p},"seq":{seq}}}'.encode()
                ).hexdigest()
            if computed != digest or at < prev_at:
                raise _Fault
            if kind == CHECKPOINT or seq - 1 in sizes:
                events.append((seq, kind, payload, list(nodes)))
            h = sha(b"\x00" + unhex(digest)).digest()
            s = size
            while s & 1:
                h = sha(b"\x01" + nodes.pop() + h).digest()
                s >>= 1
            nodes.append(h)
            size += 1
            before, prev, prev_at = prev_hash, digest, at
            expected += 1
        if expected <= until:  # the page came back short
            raise _Fault
        self.size, self.prev, self.prev_at, self.expected, self.before = (
            size,
            prev,
            prev_at,
            expected,
            before,
        )

    def result(self) -> ChunkResult:
        if self.expected <= self.hi or self.prev is None:
            raise _Fault
        out = self.out
        out.last_hash, out.last_at, out.last_prev, out.nodes = (
            self.prev,
            self.prev_at,
            self.before,
            self.nodes,
        )
        return out


# --- the worker process (`audit.verify.worker_command`: `python -I -c …`) ---
#
# Chunks arrive on stdin and results leave on stdout, each as a 4-byte big-endian length and a
# pickle (between processes of this same code only). A plain interpreter running this module
# starts in a fraction of the time a multiprocessing child does, which re-imports the parent's
# main module (for the CLI or a benchmark: SQLAlchemy and all).


def _serve() -> None:
    import pickle
    import sys

    read, write = sys.stdin.buffer.read, sys.stdout.buffer
    while True:
        head = read(4)
        if len(head) < 4:
            return
        chunk = pickle.loads(read(int.from_bytes(head, "big")))
        try:
            result = check_chunk(chunk)
        except Exception:  # e.g. no connection: the parent checks the chunk itself
            result = ChunkResult(False)
        data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        write.write(len(data).to_bytes(4, "big") + data)
        write.flush()


if __name__ == "__main__":
    # Through the module's own name, so the results pickle as audit.verify_worker.ChunkResult.
    from audit.verify_worker import _serve as serve

    serve()
