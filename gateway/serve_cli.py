"""`flexgate serve`: the gateway under uvicorn, in one or N worker processes.

Each worker builds its own app (`gateway.app:create_app`, uvicorn's factory mode), so each has
its own engine, ledger writer and policy watcher; they share the one database, which is what
makes them one service (policy versions, the ledger chain). Workers find out about each
other's changes through the database alone.

Metrics: before any worker starts, serve makes the server's metrics folder
(`FLEXGATE_HOME/metrics/<pid of serve>`, emptied) and names it in PROMETHEUS_MULTIPROC_DIR,
which the workers inherit; each writes its metrics there and /metrics reads the folder, so
every worker answers for the whole server. Folders of servers no longer running are removed
at start (and this server's own at exit).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from types import FrameType

import click

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _exit_0(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def metrics_folder(home: Path) -> Path:
    """An empty metrics folder for this server; folders of dead servers are removed."""
    from gateway.workers import pid_alive

    parent = home / "metrics"
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for entry in parent.iterdir():
        if entry.name.isdigit() and not pid_alive(int(entry.name)):
            shutil.rmtree(entry, ignore_errors=True)
    mine = parent / str(os.getpid())
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir(mode=0o700)
    return mine


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="worker processes, each with its own engine",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
def serve(host: str, port: int, workers: int, log_level: str) -> None:
    """Serve the OpenAI-compatible API (settings from FLEXGATE_* variables)."""
    import uvicorn

    from contracts.exit_codes import ExitCode
    from contracts.settings import Settings, SettingsError, settings

    try:
        home = Settings.from_env().home  # a bad variable fails here, before any worker starts
    except SettingsError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(int(ExitCode.USAGE)) from None
    metrics = metrics_folder(home)
    os.environ[METRICS_ENV] = str(metrics)  # before prometheus_client is imported anywhere
    # the resolved home for every worker (the default ./var included), so the engine's kernel
    # choices (engine.kernels, $FLEXGATE_HOME/engine-kernels.json) are shared by all of them
    os.environ["FLEXGATE_HOME"] = str(home)
    settings()
    # SIGTERM: uvicorn stops accepting, lets running requests finish (up to the graceful
    # timeout), runs the lifespan's shutdown (records appended, ledger drained) and then
    # re-raises the signal into the handler that was there before it; this one makes that
    # an orderly exit 0 instead of death by signal.
    signal.signal(signal.SIGTERM, _exit_0)
    try:
        uvicorn.run(
            "gateway.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            lifespan="on",
            timeout_graceful_shutdown=30,
        )
    finally:
        shutil.rmtree(metrics, ignore_errors=True)
