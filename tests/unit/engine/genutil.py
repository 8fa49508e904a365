"""Helpers for the generation and scheduler tests: a tiny checkpoint and an engine over it."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from engine.checkpoints import build_tiny_checkpoint
from engine.errors import ExpertSetError
from engine.experts import read_experts
from engine.modeling import GovernedFlexOlmoForCausalLM

EXPERTS = ("public", "code", "news", "math")


class TinyBackend:
    """What generation needs from an engine, over a tiny checkpoint."""

    def __init__(self, path: Path) -> None:
        self.model: Any = GovernedFlexOlmoForCausalLM.from_pretrained(path).eval()
        self.tokenizer: Any = PreTrainedTokenizerFast.from_pretrained(path)
        n = self.model.config.num_experts
        self.expert_ids = tuple(e.id for e in read_experts(path, n))
        self.device = torch.device("cpu")

    def mask_for(self, allowed: Any, batch_size: int) -> torch.Tensor:
        if allowed is None:
            return torch.ones(batch_size, len(self.expert_ids), dtype=torch.bool)
        sets: Sequence[Collection[str]] = (
            allowed
            if allowed and not isinstance(next(iter(allowed)), str)
            else [allowed] * batch_size
        )
        rows = []
        for s in sets:
            unknown = sorted(set(s) - set(self.expert_ids))
            if unknown:
                raise ExpertSetError(f"unknown expert ids: {unknown}", unknown)
            if not s:
                raise ExpertSetError("the allowed set is empty")
            rows.append([e in s for e in self.expert_ids])
        return torch.tensor(rows, dtype=torch.bool)


def tiny_backend(tmp: Path, **overrides: Any) -> TinyBackend:
    return TinyBackend(build_tiny_checkpoint(tmp, EXPERTS, seed=0, **overrides))
