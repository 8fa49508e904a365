"""Errors the engine raises. Each is a ValueError or RuntimeError subclass with a clear message."""

from __future__ import annotations

from collections.abc import Iterable


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ExpertSetError(EngineError, ValueError):
    """An allowed-expert set is empty, names unknown experts, or names unloaded experts.

    Raised before any compute. ``ids`` holds the offending ids (empty for an empty set).
    """

    def __init__(self, message: str, ids: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.ids: tuple[str, ...] = tuple(ids)


class CheckpointError(EngineError, ValueError):
    """A checkpoint is incomplete or inconsistent: missing or mis-shaped tensor, bad config,
    bad ``experts.json``. The message names the tensor or file at fault."""


class PlacementError(EngineError, ValueError):
    """A device map, memory budget or offload request cannot be honoured."""
