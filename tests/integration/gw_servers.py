"""Real `flexgate serve` subprocesses on loopback ports for the integration tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from audit.db import make_engine, make_sessionmaker
from audit.signing import Signer
from governance.identity import Identity
from governance.keys import create_key
from governance.principals import add_principal

OPERATOR = Identity.operator()
MODEL_NAME = "tiny-flexolmo"
PRINCIPALS: list[tuple[str, list[str]]] = [
    ("app-1", ["application"]),
    ("app-2", ["application"]),
    ("owner-code", ["data_owner"]),
    ("officer", ["compliance_officer"]),
    ("root", ["admin"]),
]
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def seed(db_url: str, home: Path) -> dict[str, str]:
    """Principals of every role with one key each (principal id -> bearer token), and the
    signing key, made once before any server starts (servers of one service share it)."""
    Signer.load_or_create(home)
    engine = make_engine(db_url)
    keys: dict[str, str] = {}
    try:
        async with make_sessionmaker(engine)() as s:
            for pid, roles in PRINCIPALS:
                await add_principal(s, actor=OPERATOR, principal_id=pid, roles=roles)
                _row, token = await create_key(s, actor=OPERATOR, principal_id=pid)
                keys[pid] = token
    finally:
        await engine.dispose()
    return keys


@dataclass
class Server:
    port: int
    proc: asyncio.subprocess.Process
    log: Path
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, who: str | None = None, timeout: float = 60.0) -> httpx.AsyncClient:
        headers = {} if who is None else {"Authorization": f"Bearer {self.keys[who]}"}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    def terminate(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)

    async def stop(self) -> int:
        self.terminate()
        try:
            return await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


async def start_server(
    db_url: str, home: Path, model_dir: Path, keys: dict[str, str], workers: int = 1, **env: str
) -> Server:
    port = free_port()
    log = home / f"server-{port}.log"
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FLEXGATE_DATABASE_URL": db_url,
        "FLEXGATE_HOME": str(home),
        "FLEXGATE_MODEL": str(model_dir),
        "FLEXGATE_MODEL_NAME": MODEL_NAME,
        "FLEXGATE_POLICY_POLL_SECONDS": "0.05",
        **env,
    }
    full_env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            env=full_env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            cwd=str(REPO),
        )
    server = Server(port, proc, log, keys)
    deadline = time.monotonic() + 120
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                r = await client.get(f"{server.url}/readyz")
                if r.status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    await server.stop()
    raise RuntimeError(f"server not ready in time: {log.read_text()[-3000:]}")


def completion(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "prompt": "The quick brown",
        "max_tokens": 4,
        "temperature": 0,
    }
    body.update(kw)
    return body
