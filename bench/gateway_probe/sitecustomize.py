"""A timing probe for `flexgate serve` (bench only; bench/gateway.py --breakdown).

On PYTHONPATH with GATEWAY_PROBE=FILE, the server appends one JSON line per inference request
to FILE: the wall time spent in the handler and, inside it and in the authentication
middleware, awaiting each step (auth, the policy-version read, the rate limiter, the engine,
the ledger record). The gateway is patched when `gateway.app` is first imported, after
`flexgate serve` has set up the worker's environment (prometheus' multiprocess folder must be
set before the gateway's modules load). Never installed; the gateway itself knows nothing of it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import time
from typing import Any

OUT = os.environ.get("GATEWAY_PROBE")
_rows: dict[int, dict[str, float]] = {}


def _task() -> int:
    return id(asyncio.current_task())


def _timed(owner: Any, name: str, label: str) -> None:
    inner = getattr(owner, name)

    @functools.wraps(inner)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await inner(*args, **kwargs)
        finally:
            row = _rows.setdefault(_task(), {})
            row[label] = row.get(label, 0.0) + (time.perf_counter() - t0) * 1e3

    setattr(owner, name, timed)


def _patch() -> None:
    import gateway.auth as auth
    import gateway.controllers.openai as controllers
    import gateway.inference.handlers as handlers
    import gateway.inference.run as run
    import gateway.limits as limits
    import gateway.versions as versions

    _timed(auth.BearerAuthMiddleware, "authenticate_request", "auth")
    _timed(versions.VersionReads, "current", "version_read")
    _timed(limits.Limiter, "admit", "limiter")
    _timed(run.Run, "collect", "engine")
    _timed(run.Run, "finish", "ledger")
    inner = handlers.serve

    @functools.wraps(inner)
    async def serve(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await inner(*args, **kwargs)
        finally:
            row = _rows.pop(_task(), {})
            row["handler"] = (time.perf_counter() - t0) * 1e3
            assert OUT is not None
            with open(OUT, "a") as fh:  # noqa: ASYNC230 (one short line, after the reply)
                fh.write(json.dumps(row) + "\n")

    handlers.serve = serve
    controllers.serve = serve  # imported by name


class _OnGatewayApp:
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "gateway.app":
            sys.meta_path.remove(self)  # type: ignore[arg-type]
            _patch()


if OUT:
    sys.meta_path.insert(0, _OnGatewayApp())  # type: ignore[arg-type]
