"""``flexgate model eval``: held-out perplexity per domain under an allowed set of experts.

Runs through the governed engine (``engine.load_engine`` and ``Engine.forward`` with the
allowed set), so the numbers are those of the model as served: an excluded expert is never
computed. Perplexity is ``exp`` of the mean next-token loss over every token of the domain's
blocks (``SEQ_LEN`` tokens each, EOS between documents).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.api import Engine
from kit.data import tokenize_blocks
from kit.errors import KitError

__all__ = ["allowed_set", "format_table", "perplexity", "perplexity_table"]

SEQ_LEN = 128
BATCH = 8


def allowed_set(eng: Engine, only: Sequence[str], exclude: Sequence[str]) -> list[str]:
    """The experts left by ``--only``/``--exclude`` (engine.cli's rule); unknown ids refused."""
    from engine.cli import _allowed
    from engine.errors import ExpertSetError

    try:
        allowed = _allowed(eng.expert_ids, only, exclude)
    except ExpertSetError as exc:
        raise KitError(f"{exc}; the model has {', '.join(eng.expert_ids)}") from exc
    if not allowed:
        raise KitError("no expert left: --only/--exclude exclude every expert")
    return allowed


def domain_blocks(eng: Engine, texts: Sequence[str], max_blocks: int | None = None) -> torch.Tensor:
    seq = min(SEQ_LEN, int(eng.config.max_position_embeddings))
    blocks = tokenize_blocks(eng.tokenizer, texts, seq)
    return blocks if max_blocks is None else blocks[:max_blocks]


def perplexity(eng: Engine, blocks: torch.Tensor, allowed: Collection[str] | None) -> float:
    total, count = 0.0, 0
    for start in range(0, len(blocks), BATCH):
        x = blocks[start : start + BATCH]
        logits = eng.forward(x, allowed=allowed, track_usage=False).logits.float()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            x[:, 1:].reshape(-1).to(logits.device),
            reduction="sum",
        )
        total += float(loss)
        count += x[:, 1:].numel()
    return math.exp(total / max(count, 1))


def perplexity_table(
    eng: Engine,
    domains: Mapping[str, torch.Tensor],
    sets: Mapping[str, Collection[str] | None],
) -> dict[str, dict[str, float]]:
    """``{set name: {domain: perplexity}}``."""
    return {
        name: {d: perplexity(eng, blocks, allowed) for d, blocks in domains.items()}
        for name, allowed in sets.items()
    }


def format_table(table: Mapping[str, Mapping[str, float]], base: str | None = None) -> str:
    """Rows: domains; columns: the sets. With ``base``, each other cell shows its change."""
    sets = list(table)
    domains = list(next(iter(table.values()))) if table else []
    width = max([len("domain"), *(len(d) for d in domains)])
    cols = [max(10, len(s) + 2) for s in sets]
    head = f"{'domain':<{width}}" + "".join(f"{s:>{c}}" for s, c in zip(sets, cols, strict=True))
    lines = [head]
    for d in domains:
        cells = []
        for s, c in zip(sets, cols, strict=True):
            v = table[s][d]
            cells.append(f"{v:>{c}.2f}")
        lines.append(f"{d:<{width}}" + "".join(cells))
    return "\n".join(lines)


def load_domain_texts(spec: str) -> tuple[str, list[str]]:
    """``NAME=PATH`` -> (name, documents)."""
    from kit.documents import read_documents

    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise KitError(f"--data {spec!r}: expected NAME=PATH")
    return name, read_documents([Path(path)]).texts
