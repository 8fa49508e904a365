"""Token log-probabilities: the chosen token's and the most likely alternatives'.

A log-probability is the raw ``log_softmax`` of the model's logits, in float32, before any
temperature, top-k or top-p: the distribution the governed model (under the request's allowed
set) assigns, whatever the request's sampling did with it. Only the rows that asked are ever
converted; a batch in which nobody asked pays nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["MAX_LOGPROBS", "PROMPT_CHUNK", "TokenLogprob", "prompt_logprobs", "token_logprobs"]

MAX_LOGPROBS = 20
"""Most alternatives a request may ask for per token (generated or prompt)."""

PROMPT_CHUNK = 512
"""Prompt positions converted to float32 at a time: bounds the transient memory of a long
prompt's log-probabilities to ``PROMPT_CHUNK * vocab`` floats."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the most likely alternatives at its position.

    ``top`` holds ``(token_id, logprob)`` pairs, most likely first, as many as the request
    asked for (it may include ``token_id`` itself)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(
    logits: torch.Tensor, token_ids: Sequence[int], counts: Sequence[int]
) -> list[TokenLogprob]:
    """The log-probability of ``token_ids[i]`` under row ``i`` of ``logits`` ``[rows, vocab]``
    and its ``counts[i]`` most likely alternatives (at most two host transfers)."""
    rows = logits.shape[0]
    if len(token_ids) != rows or len(counts) != rows:
        raise ValueError("one token id and one count per row")
    targets = torch.tensor(list(token_ids), dtype=torch.long, device=logits.device)
    return _score(logits, targets, token_ids, counts)


def prompt_logprobs(
    logits: torch.Tensor, prompt_ids: Sequence[int], count: int
) -> list[TokenLogprob | None]:
    """Per prompt token: None for the first, then the log-probability of token ``j`` under
    ``logits[j - 1]`` (``logits`` ``[len(prompt_ids), vocab]``, one row per prompt position)
    with ``count`` alternatives."""
    n = len(prompt_ids)
    if logits.shape[0] != n:
        raise ValueError("one row of logits per prompt position")
    out: list[TokenLogprob | None] = [None]
    targets = torch.tensor(list(prompt_ids), dtype=torch.long, device=logits.device)
    for start in range(0, n - 1, PROMPT_CHUNK):
        stop = min(start + PROMPT_CHUNK, n - 1)
        ids = prompt_ids[start + 1 : stop + 1]
        out.extend(
            _score(logits[start:stop], targets[start + 1 : stop + 1], ids, [count] * len(ids))
        )
    return out


def _score(
    logits: torch.Tensor, targets: torch.Tensor, token_ids: Sequence[int], counts: Sequence[int]
) -> list[TokenLogprob]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, targets.unsqueeze(1))
    k = min(max(counts, default=0), logp.shape[1])
    ids: list[list[int]]
    if k:
        top_vals, top_ids = torch.topk(logp, k, dim=-1)
        vals: list[list[float]] = torch.cat([chosen, top_vals], dim=1).tolist()
        ids = top_ids.tolist()
    else:
        vals = chosen.tolist()
        ids = [[] for _ in token_ids]
    return [
        TokenLogprob(int(t), float(v[0]), tuple(zip(i[:n], v[1 : n + 1], strict=True)))
        for t, n, i, v in zip(token_ids, counts, ids, vals, strict=True)
    ]
