"""Deprecated: read `contracts.settings` instead (kept for callers not yet migrated).

Each function reads the environment afresh, as this module always did, through the one
parser in `contracts.settings`.
"""

from __future__ import annotations

from pathlib import Path

from contracts.settings import Settings


def flexgate_home() -> Path:
    return Settings.from_env().home


def database_url() -> str:
    return Settings.from_env().database_url
