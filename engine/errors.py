"""Errors the engine raises. Each is a ValueError or RuntimeError subclass with a clear message.

All of them live here (and are exported from `engine`), so a caller can catch any of them
without importing torch: `from engine import PromptError` is cheap.
"""

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


class PromptError(EngineError, ValueError):
    """The prompt is empty, holds ids outside the vocabulary, or leaves no room in the context
    window. Raised before any compute."""


class SamplingError(EngineError, ValueError):
    """A sampling parameter is out of range (max_tokens, temperature, top_p, top_k, seed, stop).
    Raised before any compute."""


class GenerationError(EngineError, RuntimeError):
    """The model failed while generating a request (the cause is chained)."""
