"""Sampling parameters and next-token selection for a batch whose rows sample differently.

Greedy rows (``temperature == 0``) take the arg-max. Sampling rows divide their logits by the
temperature, keep the ``top_k`` most likely tokens and the smallest set whose probability
reaches ``top_p``, and draw from the renormalised distribution by inverse transform sampling
with one uniform number from the row's own CPU :class:`torch.Generator`. A seeded request
therefore reproduces its output no matter which other requests share its batch (as long as its
logits are the same) and on which device the model runs.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.logprobs import MAX_LOGPROBS

__all__ = ["MAX_STOP_STRINGS", "SamplingParams", "make_generator", "select_tokens"]

MAX_STOP_STRINGS = 16
"""Most stop strings one request may carry."""

_MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens and when it stops.

    Attributes:
        max_tokens: most tokens to generate (>= 1; 0 only with ``prompt_logprobs``: score the
            prompt, generate nothing, finish reason ``length``). Generation also stops at the
            model's context window (``config.max_position_embeddings``) with finish reason
            ``length``.
        temperature: 0 for greedy decoding, else the softmax temperature (> 0).
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
            reaches ``top_p``; in (0, 1], 1 disables it.
        top_k: keep only the ``top_k`` most likely tokens; 0 disables it.
        seed: seeds the request's own random generator, so that the same request with the
            same seed yields the same tokens; None draws a fresh seed.
        stop: strings that end generation; the returned text stops before the first of them
            and never contains it.
        ignore_eos: keep generating past the end-of-sequence token (benchmarks).
        logprobs: None for no log-probabilities; ``0..MAX_LOGPROBS``: every generated token's
            log-probability and that many most likely alternatives (see engine.logprobs).
        prompt_logprobs: the same for every prompt token (the first has none); None for none.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string is one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(
                    f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}"
                )
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise ValueError(
                f"max_tokens must be an integer >= 1 (0 with prompt_logprobs), "
                f"got {self.max_tokens!r}"
            )
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError(
                "max_tokens must be >= 1 (0, scoring the prompt only, needs prompt_logprobs)"
            )
        if not _is_real(self.temperature) or not (
            math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED):
            raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        """True when the arg-max is taken (temperature 0)."""
        return self.temperature == 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The request's own CPU generator (None for greedy requests)."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device="cpu").manual_seed(seed)


def select_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """The next token of every row of ``logits`` ``[batch, vocab]``.

    ``params[i]`` and ``generators[i]`` belong to row ``i``; a sampling row needs a generator.
    One host transfer of ``batch`` integers per call.
    """
    batch = logits.shape[0]
    if len(params) != batch or len(generators) != batch:
        raise ValueError("one SamplingParams and one generator per row")
    sampling_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampling_rows:
        return [int(t) for t in logits.argmax(dim=-1).tolist()]
    chosen = logits.argmax(dim=-1)
    rows = torch.tensor(sampling_rows, device=logits.device)
    sampled = _sample(
        logits.index_select(0, rows),
        [params[i] for i in sampling_rows],
        [generators[i] for i in sampling_rows],
    )
    chosen = chosen.index_copy(0, rows, sampled)
    return [int(t) for t in chosen.tolist()]


def _sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Draw one token per row; every row samples (temperature > 0)."""
    vocab = logits.shape[1]
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    scaled = logits.float() / temps.unsqueeze(1)
    sorted_logits, sorted_ids = torch.sort(scaled, dim=-1, descending=True)
    # top-k: drop the ranks at or beyond k (k = vocab when disabled).
    ks = torch.tensor(
        [p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device
    ).unsqueeze(1)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= ks, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # top-p: drop a token when the mass of the tokens ranked above it already reaches p
    # (the most likely token always stays).
    if any(p.top_p < 1.0 for p in params):
        tops = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= tops.unsqueeze(1), 0.0)
    cdf = probs.cumsum(dim=-1)
    uniforms = []
    for g in generators:
        if g is None:
            raise ValueError("a sampling row needs a generator")
        uniforms.append(float(torch.rand((), generator=g)))
    u = torch.tensor(uniforms, dtype=torch.float32, device=device).unsqueeze(1) * cdf[:, -1:]
    pos = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)
    # Never land on a dropped token (float round-off at the top of the cdf).
    kept = (probs > 0).sum(dim=-1, keepdim=True) - 1
    pos = torch.minimum(pos, kept)
    return sorted_ids.gather(1, pos).squeeze(1)
