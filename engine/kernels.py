"""How an expert's FFN runs on the CPU for a few tokens: the form of matmul, chosen per machine.

A decoding step gives each selected expert one token (batch 1) or a few (a batched step: ~2
each). ``F.linear(x, W)`` computes ``x @ W.T``; for such skinny products torch's CPU BLAS can be
far from the memory bandwidth the product needs, and how far depends on the machine: on the
2-CPU AMD EPYC development machine (torch 2.13, MKL) a ``[1024, 512]`` weight took ~220 µs for
one token through ``F.linear`` (a matrix-vector product, one thread whatever the thread
count) against ~70 µs as ``W @ X.T`` with ``X`` two rows (the token and a zero row), at one
thread and at two; on an earlier Intel Xeon machine the transposed form was ~8 % slower at
one thread. So the form is measured, not assumed: once per weight shape, dtype, thread count
and case (one token, or a few), on the experts' own weights, the first time it is needed
(~1-2 ms), and the transposed form is taken only when it is at least 20 % faster, so that the
choice is stable from run to run on a machine and not decided by noise. Both forms compute the
same products (they differ in the order of float additions, ~1e-7 relative); the exactness
tests run both.

The transposed form's operand layout matters as much: ``torch.mm(W, X.t())`` with ``X`` a
contiguous ``[n, k]`` is the fast case, so the hidden activations between ``up`` and ``down``
are made contiguous as ``[n, inter]`` and passed transposed too (a row-major ``[inter, n]``
right operand ran ~4x slower for ``n = 2`` on the machine above).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

SKINNY_MAX = 64
"""Up to this many tokens an expert may take the transposed form (more: a prefill, where
``F.linear`` is a proper matrix product)."""

FORCE_TRANSPOSED: bool | None = None
"""Tests set this to run one form whatever the machine prefers; None: measured."""

_MARGIN = 0.8
_REPS = 5
_choices: dict[tuple[bool, tuple[int, ...], torch.dtype, int], bool] = {}


def transposed_is_faster(
    weight: torch.Tensor, tokens: int, sample: Callable[[], Sequence[torch.Tensor]]
) -> bool:
    """Whether ``W @ X.T`` beats ``F.linear`` here for ``tokens`` tokens on a CPU weight
    shaped as ``weight``. ``sample`` gives the weights to time when that is not known yet
    (the layer's experts' ``gate_proj`` weights, timed in turn so that the measure reads
    weights from memory as decoding does)."""
    if FORCE_TRANSPOSED is not None:
        return FORCE_TRANSPOSED
    single = tokens == 1
    key = (single, tuple(weight.shape), weight.dtype, torch.get_num_threads())
    choice = _choices.get(key)
    if choice is None:
        weights = [w for w in sample() if w.shape == weight.shape and w.dtype == weight.dtype]
        choice = _choices[key] = _measure(weights or [weight], single)
    return choice


def _measure(weights: Sequence[torch.Tensor], single: bool) -> bool:
    x = torch.randn(1 if single else 2, weights[0].shape[1], dtype=weights[0].dtype)
    xp = torch.cat([x, torch.zeros_like(x)]) if single else x

    def linear() -> None:
        for w in weights:
            F.linear(x, w)

    def transposed() -> None:
        for w in weights:
            torch.mm(w, xp.t())

    best: dict[Callable[[], None], float] = {linear: float("inf"), transposed: float("inf")}
    with torch.inference_mode():
        for _ in range(_REPS):
            for form in (linear, transposed):
                start = time.perf_counter()
                form()
                best[form] = min(best[form], time.perf_counter() - start)
    return best[transposed] < _MARGIN * best[linear]


def expert_ffn_transposed(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` for a few tokens ``x`` ``[n, hidden]``, as ``W @ X.T``
    products; a single token is computed beside a zero row (see the module docstring)."""
    n = x.shape[0]
    if n == 1:
        x = torch.cat([x, torch.zeros_like(x)])
    xt = x.t()
    hidden = (act(torch.mm(gate, xt)) * torch.mm(up, xt)).t().contiguous()
    out = torch.mm(down, hidden.t()).t()
    return out[:1] if n == 1 else out
