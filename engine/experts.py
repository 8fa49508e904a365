"""``experts.json``: the ids of a checkpoint's experts, in router-row order.

The schema and the id grammar are `contracts.experts` (shared with governance, which turns the
same ids into policy rules); this module only turns its errors into CheckpointError.
"""

from __future__ import annotations

from pathlib import Path

from contracts.experts import (
    EXPERTS_FILE,
    ExpertsFileError,
    default_expert_ids,
    model_experts,
    write_experts_file,
)
from contracts.experts import ExpertEntry as ExpertInfo
from engine.errors import CheckpointError

__all__ = ["EXPERTS_FILE", "ExpertInfo", "default_expert_ids", "read_experts", "write_experts"]


def read_experts(model_dir: str | Path, num_experts: int) -> tuple[ExpertInfo, ...]:
    """Read and validate ``experts.json`` in ``model_dir``; default ids when it is absent.

    Raises CheckpointError for anything `contracts.experts` refuses, and when the file lists a
    different number of experts than the config's ``num_experts``.
    """
    try:
        return model_experts(model_dir, num_experts)
    except ExpertsFileError as exc:
        raise CheckpointError(str(exc)) from None


def write_experts(
    model_dir: str | Path, experts: list[ExpertInfo] | tuple[ExpertInfo, ...]
) -> Path:
    """Write ``experts.json`` into ``model_dir``; returns its path."""
    try:
        return write_experts_file(model_dir, experts)
    except ExpertsFileError as exc:
        raise CheckpointError(str(exc)) from None
