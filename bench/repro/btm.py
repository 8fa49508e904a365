"""Branch-train-merge (Li et al., 2022) as the FlexOlmo paper's baseline: an ensemble of
dense models, each weighted at every position by its posterior on the context so far.

A bench-only helper: nothing in FlexGate serves an ensemble of models, so it lives beside the
reproduction instead of in the kit. Each member's next-token log-probabilities come from the
governed engine (``Engine.forward``, the kit's evaluation path). With a uniform prior the
weight of member ``m`` before token ``t`` is ``p_m(x_<t) / sum_j p_j(x_<t)`` (the context is
the block up to ``t``), and the ensemble's probability of ``x_t`` is the weighted mixture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from engine.api import Engine
from kit.evaluate import BATCH

__all__ = ["btm_perplexity", "perplexity_of", "token_logprobs"]


def token_logprobs(eng: Engine, blocks: torch.Tensor) -> torch.Tensor:
    """``[n, seq - 1]`` float64 log p(x_t | x_<t) of every block, with every expert allowed."""
    rows = []
    for start in range(0, len(blocks), BATCH):
        x = blocks[start : start + BATCH]
        logits = eng.forward(x, allowed=None, track_usage=False).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        target = x[:, 1:].to(logp.device).unsqueeze(-1)
        rows.append(torch.gather(logp, -1, target).squeeze(-1).double().cpu())
    return torch.cat(rows)


def perplexity_of(logp: torch.Tensor) -> float:
    """``exp`` of the mean negative log-probability (kit.evaluate's definition)."""
    return math.exp(-float(logp.mean()))


def btm_logprobs(members: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ensemble's ``[n, seq - 1]`` log-probabilities from each member's."""
    if not members:
        raise ValueError("BTM needs at least one member")
    stacked = torch.stack(list(members))  # [m, n, t]
    context = torch.cumsum(stacked, dim=-1) - stacked  # log p_m(x_<t) within the block
    log_w = context - torch.logsumexp(context, dim=0, keepdim=True)
    return torch.logsumexp(log_w + stacked, dim=0)


def btm_perplexity(members: Sequence[torch.Tensor]) -> float:
    return perplexity_of(btm_logprobs(members))
