"""How big each mode of bench/reproduce.py is: data, model, steps, evaluation, extraction.

Every expert and every baseline trains ``expert_steps`` steps of ``expert_batch`` blocks of
``seq_len`` tokens (the same token budget); the joint MoE trains ``len(DOMAINS)`` times as many
steps (the same training FLOPs as all experts together: top-2 of its experts per token, as in
each expert's 2-expert MoE). ``tiny`` exists for the test suite only (a micro model, a few
steps: it checks the plumbing, not the numbers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kit.pretrain import SIZES, Size

__all__ = ["DOMAINS", "EXTRACT_DOMAIN", "MODES", "OWNERS", "Plan"]

DOMAINS = ("code", "literature", "biomedical", "legal", "math")
"""The closed domains (kit.corpora), one expert each."""
OWNERS = {
    "code": "alice",
    "legal": "alice",
    "literature": "bob",
    "biomedical": "bob",
    "math": "carol",
}
EXTRACT_DOMAIN = "legal"
"""Whose training documents the extraction test prompts with."""


@dataclass(frozen=True)
class Plan:
    size: Size
    public_chars: int
    domain_chars: int
    valid_chars: int
    pretrain_steps: int
    expert_steps: int
    expert_batch: int
    expert_lr: float
    seq_len: int
    tune_steps: int
    tune_chars: int
    """Router tuning: steps, and characters of each domain's training text used as proxy."""
    eval_blocks: int
    extract_docs: int
    extract_prefix: int
    extract_tokens: int
    joint: bool
    checkpoint_every: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def expert_tokens(self) -> int:
        return self.expert_steps * self.expert_batch * self.seq_len


MICRO = Size(320, 32, 64, 2, 4, 2, 32, 4, 3e-3)

MODES = {
    "tiny": Plan(
        size=MICRO,
        public_chars=12_000,
        domain_chars=6_000,
        valid_chars=2_000,
        pretrain_steps=4,
        expert_steps=2,
        expert_batch=4,
        expert_lr=2e-3,
        seq_len=32,
        tune_steps=2,
        tune_chars=2_000,
        eval_blocks=2,
        extract_docs=2,
        extract_prefix=8,
        extract_tokens=8,
        joint=True,
        checkpoint_every=50,
    ),
    "quick": Plan(
        size=SIZES["tiny"],
        public_chars=200_000,
        domain_chars=60_000,
        valid_chars=12_000,
        pretrain_steps=60,
        expert_steps=20,
        expert_batch=8,
        expert_lr=2e-3,
        seq_len=128,
        tune_steps=10,
        tune_chars=10_000,
        eval_blocks=8,
        extract_docs=8,
        extract_prefix=32,
        extract_tokens=32,
        joint=True,
        checkpoint_every=50,
    ),
    "full": Plan(
        size=SIZES["tiny"],
        public_chars=1_000_000,
        domain_chars=250_000,
        valid_chars=40_000,
        pretrain_steps=400,
        expert_steps=80,
        expert_batch=16,
        expert_lr=2e-3,
        seq_len=128,
        tune_steps=40,
        tune_chars=30_000,
        eval_blocks=40,
        extract_docs=40,
        extract_prefix=32,
        extract_tokens=32,
        joint=True,
        checkpoint_every=20,
    ),
}
