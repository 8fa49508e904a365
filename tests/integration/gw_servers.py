"""Real `flexgate serve` subprocesses on loopback ports for the integration tests.

One helper for every test that needs a real server (two servers of one service, SIGKILL and
restart, the console in a browser). The process is a plain `subprocess.Popen`, not bound to
an event loop, so a server can outlive one test (module-scoped fixtures share it) and serve
both async tests (httpx.AsyncClient) and sync ones (Playwright, httpx.Client).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
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
READY_S = 300.0  # a hang guard: two servers importing torch on a loaded machine took > 120 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def seed(
    db_url: str, home: Path, principals: Sequence[tuple[str, list[str]]] = PRINCIPALS
) -> dict[str, str]:
    """Principals with one key each (principal id -> bearer token), and the signing key, made
    once before any server starts (servers of one service share it)."""
    Signer.load_or_create(home)
    engine = make_engine(db_url)
    keys: dict[str, str] = {}
    try:
        async with make_sessionmaker(engine)() as s:
            for pid, roles in principals:
                await add_principal(s, actor=OPERATOR, principal_id=pid, roles=roles)
                _row, token = await create_key(s, actor=OPERATOR, principal_id=pid)
                keys[pid] = token
    finally:
        await engine.dispose()
    return keys


def server_env(db_url: str, home: Path, model_dir: Path, **env: str) -> dict[str, str]:
    """The environment of a server and of the `flexgate` commands run beside it."""
    full = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FLEXGATE_DATABASE_URL": db_url,
        "FLEXGATE_HOME": str(home),
        "FLEXGATE_MODEL": str(model_dir),
        "FLEXGATE_MODEL_NAME": MODEL_NAME,
        "FLEXGATE_POLICY_POLL_SECONDS": "0.05",
        **env,
    }
    full.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    return full


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    home: Path
    db_url: str
    env: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)
    terminated: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, who: str | None = None, timeout: float = 60.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self._auth(who), timeout=timeout)

    def api(self, who: str | None = None, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self._auth(who), timeout=timeout)

    def _auth(self, who: str | None) -> dict[str, str]:
        return {} if who is None else {"Authorization": f"Bearer {self.keys[who]}"}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`flexgate ARGS` with this server's settings (database, home, model)."""
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def terminate(self) -> None:
        """SIGTERM, once: a second one during the graceful shut-down would force the exit."""
        if self.proc.poll() is None and not self.terminated:
            self.terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (unless sent already), then the exit code (SIGKILL after `timeout` s)."""
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    async def wait(self) -> int:
        """The exit code, awaited off the event loop."""
        return await asyncio.to_thread(self.proc.wait)


def spawn(
    db_url: str, home: Path, model_dir: Path, keys: dict[str, str], workers: int = 1, **env: str
) -> Server:
    """Start `flexgate serve` on a free port; it is not ready yet (see `wait_ready`)."""
    port = free_port()
    log = home / f"server-{port}.log"
    full_env = server_env(db_url, home, model_dir, **env)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
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
            ],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
    return Server(port, proc, log, home, db_url, full_env, keys)


def wait_ready(*servers: Server) -> None:
    """Block until every server answers /readyz 200; a server that exits or is not ready in
    time is stopped (with the others) and its log raised."""
    deadline = time.monotonic() + READY_S
    pending = list(servers)
    try:
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for server in list(pending):
                    if server.proc.poll() is not None:
                        raise RuntimeError(
                            f"server exited {server.proc.returncode}: {server.log_tail()}"
                        )
                    try:
                        if client.get(f"{server.url}/readyz").status_code == 200:
                            pending.remove(server)
                    except httpx.HTTPError:
                        pass
                if pending and time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready in time: {pending[0].log_tail()}")
                if pending:
                    time.sleep(0.1)
    except BaseException:
        for server in servers:
            server.stop()
        raise


def start(
    db_url: str, home: Path, model_dir: Path, keys: dict[str, str], workers: int = 1, **env: str
) -> Server:
    server = spawn(db_url, home, model_dir, keys, workers, **env)
    wait_ready(server)
    return server


async def start_server(
    db_url: str, home: Path, model_dir: Path, keys: dict[str, str], workers: int = 1, **env: str
) -> Server:
    server = spawn(db_url, home, model_dir, keys, workers, **env)
    await asyncio.to_thread(wait_ready, server)
    return server


def completion(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "prompt": "The quick brown",
        "max_tokens": 4,
        "temperature": 0,
    }
    body.update(kw)
    return body
