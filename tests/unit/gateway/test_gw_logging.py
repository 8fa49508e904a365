"""The worker's logging follows `flexgate serve --log-level`, and the libraries' start-up INFO
chatter (Alembic, Casbin) stays out of an operator's log unless they ask for debug."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from gateway.app import QUIET_LOGGERS, logging_config


@pytest.fixture
def uvicorn_level() -> Iterator[logging.Logger]:
    uv = logging.getLogger("uvicorn.error")
    saved = {name: logging.getLogger(name).level for name in ("", "uvicorn.error", *QUIET_LOGGERS)}
    yield uv
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize(
    ("cli", "root", "quiet"),
    [
        (logging.INFO, logging.INFO, logging.WARNING),
        (logging.WARNING, logging.WARNING, logging.WARNING),
        (logging.ERROR, logging.ERROR, logging.ERROR),
        (logging.DEBUG, logging.DEBUG, logging.DEBUG),
    ],
)
def test_levels_follow_the_cli(
    uvicorn_level: logging.Logger, cli: int, root: int, quiet: int
) -> None:
    uvicorn_level.setLevel(cli)
    logging_config().configure()
    assert logging.getLogger().level == root
    for name in QUIET_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() == quiet, name
    # A FlexGate module's INFO line shows exactly when the CLI asked for INFO or lower.
    assert logging.getLogger("gateway.lifespan").isEnabledFor(logging.INFO) == (cli <= logging.INFO)
    assert logging.getLogger("alembic.runtime.migration").isEnabledFor(logging.INFO) == (
        cli <= logging.DEBUG
    )
