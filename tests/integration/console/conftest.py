"""A real `flexgate serve` and Debian's Chromium for the console's browser tests.

One server per module (a tiny checkpoint, a migrated SQLite file, principals and keys made
with the governance services first, then `python -m gateway.cli serve` as a subprocess on a
free loopback port). Playwright drives the system Chromium (`/usr/bin/chromium`, installed by
.ci/run from the Debian packages; Playwright never downloads a browser here). When either is
missing the tests skip and say why. `FLEXGATE_CONSOLE_SCREENSHOTS=DIR` saves the main pages
as PNG files there (docs/console/ is made that way).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from audit.db import make_engine, make_sessionmaker, upgrade
from governance.identity import Identity
from governance.keys import create_key
from governance.principals import add_principal

CHROMIUM = os.environ.get("FLEXGATE_CHROMIUM", "/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[3]
PRINCIPALS: list[tuple[str, list[str]]] = [
    ("app-1", ["application"]),
    ("owner-code", ["data_owner"]),
    ("owner-news", ["data_owner"]),
    ("officer", ["compliance_officer"]),
    ("root", ["admin"]),
]


@dataclass
class Server:
    url: str
    home: Path
    db_file: Path
    db_url: str
    model_name: str
    env: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)

    def api(self, who: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.keys[who]}"}, timeout=60
        )

    def complete(self, who: str = "app-1") -> dict[str, Any]:
        with self.api(who) as client:
            r = client.post(
                "/v1/completions",
                json={"model": self.model_name, "prompt": "The data owner", "max_tokens": 2},
            )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _seed(db_url: str) -> dict[str, str]:
    operator = Identity.operator()
    db = make_engine(db_url)
    keys: dict[str, str] = {}
    try:
        async with make_sessionmaker(db)() as s:
            for pid, roles in PRINCIPALS:
                await add_principal(s, actor=operator, principal_id=pid, roles=roles)
                _row, token = await create_key(s, actor=operator, principal_id=pid)
                keys[pid] = token
    finally:
        await db.dispose()
    return keys


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from engine.checkpoints import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("console")
    home = root / "home"
    home.mkdir()
    model = build_tiny_checkpoint(root / "tiny-flexolmo")
    db_file = home / "flexgate.db"
    db_url = f"sqlite+aiosqlite:///{db_file}"
    upgrade(db_url)
    keys = asyncio.run(_seed(db_url))
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FLEXGATE_HOME": str(home),
        "FLEXGATE_DATABASE_URL": db_url,
        "FLEXGATE_MODEL": str(model),
        "FLEXGATE_MODEL_NAME": "tiny-flexolmo",
    }
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()[-3000:])
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready: " + (root / "server.log").read_text()[-3000:])
            time.sleep(0.2)
        yield Server(url, home, db_file, db_url, "tiny-flexolmo", env, keys)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def new_page(browser: Any, server: Server) -> Iterator[Any]:
    contexts: list[Any] = []

    def make(who: str | None = None) -> Any:
        ctx = browser.new_context(base_url=server.url, viewport={"width": 1200, "height": 900})
        contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(15_000)
        if who is not None:
            sign_in(page, server.keys[who])
        return page

    yield make
    for ctx in contexts:
        ctx.close()


def sign_in(page: Any, key: str) -> None:
    page.goto("/console/signin")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()


def shot(page: Any, name: str) -> None:
    folder = os.environ.get("FLEXGATE_CONSOLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)
