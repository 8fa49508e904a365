"""Process-wide settings read from the environment (DESIGN.md, "Configuration").

Read on every call rather than cached, so tests and the CLI can point a process at another
state folder or database by setting the variables.
"""

from __future__ import annotations

import os
from pathlib import Path


def flexgate_home() -> Path:
    """State folder: SQLite file, signing key, demo model, offload folder."""
    return Path(os.environ.get("FLEXGATE_HOME", "./var")).expanduser().resolve()


def database_url() -> str:
    """SQLAlchemy async URL; a SQLite file in FLEXGATE_HOME unless FLEXGATE_DATABASE_URL is set."""
    url = os.environ.get("FLEXGATE_DATABASE_URL")
    if url:
        return url
    return f"sqlite+aiosqlite:///{flexgate_home() / 'flexgate.db'}"


def store_raw_text() -> bool:
    """Operator switch: keep raw prompts and completions in the (hashed) ledger payload."""
    return os.environ.get("FLEXGATE_AUDIT_STORE_TEXT", "").lower() in {"1", "true", "yes"}


def checkpoint_every() -> int:
    """Records between automatic signed checkpoints (FLEXGATE_AUDIT_CHECKPOINT_EVERY)."""
    return int(os.environ.get("FLEXGATE_AUDIT_CHECKPOINT_EVERY", "1000"))


def checkpoint_interval_s() -> float:
    """Seconds between automatic checkpoints while records arrive
    (FLEXGATE_AUDIT_CHECKPOINT_SECONDS)."""
    return float(os.environ.get("FLEXGATE_AUDIT_CHECKPOINT_SECONDS", "60"))
