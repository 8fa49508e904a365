"""`flexgate serve`: the gateway under uvicorn, in one or N worker processes.

Each worker builds its own app (`gateway.app:create_app`, uvicorn's factory mode), so each has
its own engine, ledger writer and policy watcher; they share the one database, which is what
makes them one service (policy versions, the ledger chain). Workers find out about each
other's changes through the database alone.
"""

from __future__ import annotations

import signal
from types import FrameType

import click


def _exit_0(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


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
    from contracts.settings import SettingsError, settings

    try:
        settings()  # a bad variable fails here, before any worker starts
    except SettingsError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(int(ExitCode.USAGE)) from None
    # SIGTERM: uvicorn stops accepting, lets running requests finish (up to the graceful
    # timeout), runs the lifespan's shutdown (records appended, ledger drained) and then
    # re-raises the signal into the handler that was there before it; this one makes that
    # an orderly exit 0 instead of death by signal.
    signal.signal(signal.SIGTERM, _exit_0)
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
