"""Generation: request checks, the decoding batch, incremental detokenisation and stop strings.

The scheduler thread (:mod:`engine.scheduler`) owns one :class:`DecodeBatch` and drives it:
an admitted request reserves the KV memory it can ever need, its prompt is prefilled (short
prompts of equal length together, a long one in chunks between decoding steps), and it joins
the running batch; then every step decodes one token for every row in one forward pass, each
row under its own allowed-expert set. Keys and values live in a paged
:class:`~engine.kvcache.PagedKVCache` (blocks per sequence, so memory follows each sequence's
own length); each row has its own position ids and padding mask, so a row computes exactly
what it computes alone (up to floating-point summation order in the batched matrix products),
and a prompt run in chunks computes what it computes in one pass (likewise).

Usage accounting (per request, per expert): ``tokens`` = number of (position, layer) top-k
selections of the expert, ``weight`` = sum of their router probabilities, over every position
the model processed for the request: all ``prompt_tokens`` prompt positions, and every generated
token that was fed back to produce the next one, i.e. ``completion_tokens - 1`` positions (the
last generated token is never fed back; each generated token is produced by exactly one
processed position). Without narrowing, the tokens of all experts sum to
``(prompt_tokens + max(completion_tokens - 1, 0)) * num_layers * min(top_k, |allowed|)`` (a
request with ``max_tokens == 0`` only scores its prompt). Log-probabilities
(:mod:`engine.logprobs`) are read from the same logits and change no usage. Experts that
were never allowed report ``(0, 0.0)``; an expert narrowed away mid-run keeps what it was used
for before the narrowing and gains nothing after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from engine.errors import PromptError
from engine.kvcache import PagedKVCache
from engine.logprobs import TokenLogprob, prompt_logprobs, token_logprobs
from engine.routing import RoutingControl
from engine.sampling import SamplingParams, make_generator, select_tokens

__all__ = [
    "DecodeBatch",
    "FinishReason",
    "Finished",
    "GenerationBackend",
    "GenerationRequest",
    "GenerationResult",
    "PromptError",
    "StreamEvent",
    "TextAssembler",
    "TextDelta",
    "TokenLogprob",
]

FinishReason = Literal["stop", "length", "cancelled"]
"""``stop``: end-of-sequence token or a stop string; ``length``: ``max_tokens`` or the context
window reached; ``cancelled``: the caller cancelled, or a narrowing left no expert allowed."""

_DETOKENIZE_CONTEXT = 4
"""Prompt tokens decoded before the first generated token, so its leading space is right."""


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one request.

    ``text`` never contains a stop string nor anything after it; ``token_ids`` are all the
    generated tokens (including an end-of-sequence token, and the tokens that completed a stop
    string), and ``completion_tokens == len(token_ids)``. ``usage`` maps every expert id (router
    order) to ``(tokens, weight)`` over the prompt and the generated tokens (see the module
    documentation); it is None when the engine does not track usage. ``allowed`` is the set
    allowed at the end, ``narrowed`` the experts removed from it after the request was submitted.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    usage: dict[str, tuple[int, float]] | None
    allowed: tuple[str, ...]
    narrowed: tuple[str, ...] = ()
    stop_string: str | None = None
    """The stop string that ended generation, if one did."""
    logprobs: tuple[TokenLogprob, ...] | None = None
    """One per generated token (parallel to ``token_ids``); None when not asked."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """One per prompt token, the first None (nothing predicts it); None when not asked, or
    when the request ended (cancelled) before its prompt was run."""
    first_token_at: float | None = None
    """``time.perf_counter()`` when the first token was sampled (time to first token); None
    when none was."""


@dataclass(frozen=True)
class TextDelta:
    """New text of a streaming request; the deltas of a request concatenate to its final text.

    ``token_ids`` are the tokens generated since the previous event (text may lag behind
    tokens: a multi-byte character split over tokens, or a possible beginning of a stop string,
    is held back until it is complete); the ``token_ids`` of a request's deltas concatenate to
    its ``token_ids`` (the last delta may have empty text: an end-of-sequence token, or the
    tokens that completed a stop string). ``logprobs`` is parallel to ``token_ids`` when the
    request asked for them, else empty."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """On a request's first delta only, when it asked for prompt log-probabilities (computed at
    prefill): a stream can send the scored prompt before the generated text."""


@dataclass(frozen=True)
class Finished:
    """The last event of a stream: the full result."""

    result: GenerationResult


StreamEvent = TextDelta | Finished


class GenerationBackend(Protocol):
    """What generation needs from an engine (``engine.api.Engine`` provides it)."""

    @property
    def model(self) -> Any: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def expert_ids(self) -> tuple[str, ...]: ...

    @property
    def device(self) -> torch.device: ...

    def mask_for(self, allowed: Any, batch_size: int) -> torch.Tensor: ...

    def resolve_allowed(self, allowed: Any) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: token ids within the vocabulary and the window, a valid allowed set."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    allowed: tuple[str, ...]


def tokenize_prompt(
    backend: GenerationBackend,
    prompt: str | Sequence[int],
    tokenizer: Any = None,
    *,
    room: int = 1,
) -> tuple[int, ...]:
    """The prompt's token ids, checked against the vocabulary and the context window, which
    must hold ``room`` more tokens (0 for a request that only scores its prompt).
    A text prompt is encoded with ``tokenizer`` (default: the backend's)."""
    config = backend.model.config
    if isinstance(prompt, str):
        if not prompt:
            raise PromptError("the prompt is empty")
        tok = backend.tokenizer if tokenizer is None else tokenizer
        ids = tuple(int(i) for i in tok(prompt)["input_ids"])
    else:
        ids = tuple(prompt)
        if any(not isinstance(i, int) or isinstance(i, bool) for i in ids):
            raise PromptError("prompt token ids must be integers")
        vocab = int(config.vocab_size)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise PromptError(f"prompt token ids outside the vocabulary [0, {vocab}): {bad[:8]}")
    if not ids:
        raise PromptError("the prompt is empty (no tokens)")
    window = context_window(backend)
    if len(ids) + room > window:
        if room == 0:
            raise PromptError(
                f"the prompt has {len(ids)} tokens; the context window holds {window}"
            )
        raise PromptError(
            f"the prompt has {len(ids)} tokens; the context window holds {window}, "
            "which leaves no room for a completion"
        )
    return ids


def context_window(backend: GenerationBackend) -> int:
    """Most tokens (prompt and completion) one sequence may hold."""
    return int(backend.model.config.max_position_embeddings)


def eos_token_ids(backend: GenerationBackend) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer, the config and the generation config."""
    ids: set[int] = set()
    sources: list[object] = [
        getattr(backend.tokenizer, "eos_token_id", None),
        getattr(backend.model.config, "eos_token_id", None),
    ]
    gen_config = getattr(backend.model, "generation_config", None)
    if gen_config is not None:
        sources.append(getattr(gen_config, "eos_token_id", None))
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list | tuple):
            ids.update(int(i) for i in src)
    return frozenset(ids)


class TextAssembler:
    """Incremental detokenisation with stop strings.

    Each pushed token is decoded together with the few tokens before it, and text is released
    only once it no longer ends in an incomplete UTF-8 sequence (the replacement character).
    Text that could be the beginning of a stop string is held back; when a stop string
    appears, the text is cut before it and nothing after it is ever released.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-_DETOKENIZE_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        self._stop = tuple(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._text = ""
        self._scanned = 0
        self._released = 0
        self.stop_string: str | None = None

    @property
    def text(self) -> str:
        """The text so far (cut before a stop string once one appeared)."""
        return self._text

    def push(self, token_id: int) -> str:
        """Add a generated token; returns the text that may be released now (maybe '')."""
        if self.stop_string is not None:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            if self._prefix > 64:  # keep only the window the next decode needs
                del self._ids[: self._prefix]
                self._read -= self._prefix
                self._prefix = 0
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: release everything left (an incomplete character decodes as the
        replacement character), still honouring stop strings."""
        if self.stop_string is None and len(self._ids) > self._read:
            prefix_text = self._decode(self._ids[self._prefix : self._read])
            new_text = self._decode(self._ids[self._prefix :])
            if len(new_text) > len(prefix_text):
                self._text += new_text[len(prefix_text) :]
            self._read = len(self._ids)
        return self._release(final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        text = self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return str(text)

    def _release(self, final: bool) -> str:
        limit = len(self._text)
        if self._stop and self.stop_string is None:
            start = max(0, self._scanned - self._max_stop + 1)
            found: tuple[int, str] | None = None
            for s in self._stop:
                at = self._text.find(s, start)
                if at >= 0 and (found is None or at < found[0]):
                    found = (at, s)
            if found is not None:
                self._text = self._text[: found[0]]
                self.stop_string = found[1]
                limit = len(self._text)
            else:
                self._scanned = len(self._text)
                if not final:
                    limit -= self._partial_stop_suffix()
        if limit <= self._released:
            return ""
        out = self._text[self._released : limit]
        self._released = limit
        return out

    def _partial_stop_suffix(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best


Sink = Callable[["StreamEvent | BaseException"], None]
"""Where a sequence's events go (called on the scheduler thread; must not block)."""


@dataclass(eq=False)
class RunningSequence:
    """A request being generated (owned by the scheduler thread, except ``control``)."""

    request: GenerationRequest
    sink: Sink
    control: Any  # engine.scheduler.RequestControl: cancellation and narrowing flags
    eos_ids: frozenset[int]
    window: int
    assembler: TextAssembler
    generator: torch.Generator | None
    allowed: frozenset[str]
    narrowed: set[str] = field(default_factory=set)
    seen_version: int = 0
    generated: list[int] = field(default_factory=list)
    length: int = 0
    """Tokens of this sequence held in the KV cache (its next position id)."""
    usage_tokens: torch.Tensor | None = None
    usage_weight: torch.Tensor | None = None
    pending_ids: list[int] = field(default_factory=list)
    """Tokens generated since the last text event."""
    logprobs: list[TokenLogprob] | None = None
    """Per generated token, when the request asked for them."""
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    prompt_logprobs_sent: bool = False
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None
    kv: int | None = None
    """The sequence's handle in the batch's KV cache, from admission until it leaves."""
    prompt_logits: list[torch.Tensor] = field(default_factory=list)
    """A chunked prompt's logits so far, when the request asked for prompt log-probabilities."""

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def kv_tokens(self) -> int:
        """The most tokens this sequence can ever hold in the KV cache: its prompt and every
        generated token but the last (which is never fed back), within the context window."""
        total = min(self.prompt_len + self.request.params.max_tokens, self.window)
        return max(self.prompt_len, total - 1)

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def add_usage(self, tokens: torch.Tensor, weight: torch.Tensor) -> None:
        if self.usage_tokens is None or self.usage_weight is None:
            self.usage_tokens = tokens.clone()
            self.usage_weight = weight.clone()
        else:
            self.usage_tokens += tokens
            self.usage_weight += weight

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """Record a sampled token (with its log-probability when the request asked for it);
        sets ``finish_reason`` when generation must end."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.generated.append(token)
        self.pending_ids.append(token)
        if logprob is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(logprob)
            self.pending_logprobs.append(logprob)
        params = self.request.params
        if token in self.eos_ids and not params.ignore_eos:
            self.finish_reason = "stop"
            return
        delta = self.assembler.push(token)
        if delta:
            self._emit_text(delta)
        if self.assembler.stop_string is not None:
            self.finish_reason = "stop"
        elif (
            len(self.generated) >= params.max_tokens
            or self.prompt_len + len(self.generated) >= self.window
        ):
            self.finish_reason = "length"

    def deliver(self, event: StreamEvent | BaseException) -> None:
        """Hand an event to the sink; a sink that fails cancels its own request only."""
        try:
            self.sink(event)
        except Exception:
            self.control.cancel()

    def _emit_text(self, text: str) -> None:
        prompt = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent:
            prompt, self.prompt_logprobs_sent = self.prompt_logprobs, True
        self.deliver(TextDelta(text, tuple(self.pending_ids), tuple(self.pending_logprobs), prompt))
        self.pending_ids = []
        if self.pending_logprobs:
            self.pending_logprobs = []

    def finish(self, reason: FinishReason, expert_ids: Sequence[str], track_usage: bool) -> None:
        """Flush the text and send the final event."""
        self.finish_reason = reason
        tail = self.assembler.finish()
        if tail or self.pending_ids:
            self._emit_text(tail)
        usage: dict[str, tuple[int, float]] | None = None
        if track_usage:
            usage = {e: (0, 0.0) for e in expert_ids}
            if self.usage_tokens is not None and self.usage_weight is not None:
                tokens = self.usage_tokens.tolist()
                weights = self.usage_weight.tolist()
                usage = {e: (int(tokens[i]), float(weights[i])) for i, e in enumerate(expert_ids)}
        allowed = tuple(e for e in expert_ids if e in self.allowed)
        narrowed = tuple(e for e in expert_ids if e in self.narrowed)
        result = GenerationResult(
            request_id=self.request.request_id,
            text=self.assembler.text,
            token_ids=tuple(self.generated),
            finish_reason=reason,
            prompt_tokens=self.prompt_len,
            completion_tokens=len(self.generated),
            usage=usage,
            allowed=allowed,
            narrowed=narrowed,
            stop_string=self.assembler.stop_string,
            logprobs=None if self.request.params.logprobs is None else tuple(self.logprobs or ()),
            prompt_logprobs=self.prompt_logprobs,
            first_token_at=self.first_token_at,
        )
        self.deliver(Finished(result))


class DecodeBatch:
    """The running batch: one paged KV cache, the admitted sequences whose prompts are being
    run, and the rows being decoded, one forward pass per prefill and per step.

    A sequence is admitted with :meth:`start` (its most KV tokens reserved), its prompt is run
    by one or more :meth:`prefill` calls (all at once, or in chunks between decoding steps),
    then it is a row of every :meth:`step` until it is removed.

    Not thread-safe: only the scheduler thread calls it, inside ``torch.inference_mode()``.
    """

    def __init__(
        self, backend: GenerationBackend, *, track_usage: bool = True, kv_blocks: int | None = None
    ) -> None:
        self.backend = backend
        self.model = backend.model
        config = self.model.config
        self.expert_ids = tuple(backend.expert_ids)
        self.num_layers = int(config.num_hidden_layers)
        self.track_usage = track_usage
        self.device = backend.device
        attn = str(getattr(config, "_attn_implementation", None) or "eager")
        self._mask_kind: Literal["bool", "float", "2d"] = (
            "bool" if attn == "sdpa" else "float" if attn == "eager" else "2d"
        )
        self._dtype = getattr(self.model, "dtype", torch.float32)
        self._fast_path = self._mask_kind != "2d" and _plain_governed_forward(self.model)
        self.kv_blocks = kv_blocks
        """The KV budget in blocks (None: unbounded)."""
        self.rows: list[RunningSequence] = []
        self.prefilling: list[RunningSequence] = []
        """Admitted sequences (KV reserved) whose prompts are not fully run, oldest first."""
        self.cache = PagedKVCache(self.num_layers, max_blocks=kv_blocks)
        self._expert_rows: list[torch.Tensor] = []  # per row: bool [num_experts] (cpu)
        self._ctl: RoutingControl | None = None

    # -- rows and masks -------------------------------------------------------------------------

    def _expert_mask_row(self, allowed: Collection[str]) -> torch.Tensor:
        return torch.tensor([e in allowed for e in self.expert_ids], dtype=torch.bool)

    def _routing(self, masks: Sequence[torch.Tensor]) -> RoutingControl:
        mask: torch.Tensor | None = torch.stack(list(masks))
        assert mask is not None
        if bool(mask.all()):
            mask = None
        return RoutingControl(expert_mask=mask, token_mask=None, track_usage=self.track_usage)

    def _harvest(self) -> None:
        """Move the usage accumulated in the current routing control into the rows."""
        ctl = self._ctl
        self._ctl = None
        if ctl is None or not self.track_usage:
            return
        tokens = ctl.tokens
        if tokens.numel() == 0:
            return
        tokens = tokens.cpu()
        weight = ctl.weight.cpu()
        for i, seq in enumerate(self.rows):
            seq.add_usage(tokens[i], weight[i])

    def can_start(self, seq: RunningSequence) -> bool:
        """Whether ``seq``'s most KV tokens fit beside what the admitted sequences reserved."""
        return self.cache.can_reserve(seq.kv_tokens)

    def start(self, seq: RunningSequence) -> None:
        """Admit ``seq``: reserve its KV memory; its prompt is run by :meth:`prefill`."""
        seq.kv = self.cache.open(seq.kv_tokens)
        seq.length = 0
        self.prefilling.append(seq)

    def _release(self, seq: RunningSequence) -> None:
        if seq.kv is not None:
            self.cache.close(seq.kv)
            seq.kv = None

    def drop(self, seq: RunningSequence) -> None:
        """Take ``seq`` out of the batch, wherever it is, and free its KV memory."""
        if seq in self.rows:
            self.remove(self.rows.index(seq))
            return
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        self._release(seq)

    def set_allowed(self, index: int, allowed: frozenset[str]) -> None:
        """Narrow row ``index`` to ``allowed`` from the next step on."""
        seq = self.rows[index]
        seq.narrowed |= seq.allowed - allowed
        seq.allowed = allowed
        self._expert_rows[index] = self._expert_mask_row(allowed)
        if self._ctl is not None:
            mask = torch.stack(self._expert_rows)
            self._ctl.expert_mask = None if bool(mask.all()) else mask

    def remove(self, index: int) -> RunningSequence:
        """Take row ``index`` out of the batch (its usage harvested), freeing its KV blocks."""
        self._harvest()
        seq = self.rows.pop(index)
        self._expert_rows.pop(index)
        self._release(seq)
        return seq

    def clear_rows(self) -> list[RunningSequence]:
        """Drop every row, freeing its KV (after a failed step); returns them. The sequences
        being prefilled stay: a step writes only the rows' own blocks."""
        rows = self.rows
        self.rows = []
        self._expert_rows = []
        self._ctl = None
        for seq in rows:
            self._release(seq)
        return rows

    def clear(self) -> list[RunningSequence]:
        """Drop every row and every sequence being prefilled (after an error); returns them."""
        out = [*self.rows, *self.prefilling]
        self.rows = []
        self.prefilling = []
        self._expert_rows = []
        self._ctl = None
        for seq in out:
            seq.kv = None
        self.cache = PagedKVCache(self.num_layers, max_blocks=self.kv_blocks)
        return out

    # -- compute --------------------------------------------------------------------------------

    def prefill(self, seqs: Sequence[RunningSequence], q: int | None = None) -> None:
        """Run the next ``q`` prompt tokens of ``seqs`` (all that remain when None) in one
        forward pass. ``seqs`` are being prefilled, with prompts of one length and as many
        tokens already run. A sequence whose prompt is then complete samples its first token
        and joins :attr:`rows`, unless it finished at once (``finish_reason`` set, its KV
        freed, not in :attr:`rows`). Rows that asked for prompt log-probabilities get them (the
        LM head then runs over every prompt position, which is why :func:`iter_groups` keeps
        such rows apart); rows with ``max_tokens == 0`` only score their prompt and finish with
        ``length``. If the pass fails, ``seqs`` are dropped (their KV freed) and the error
        propagates; the running rows are untouched."""
        length, start = seqs[0].prompt_len, seqs[0].length
        if any(s.prompt_len != length or s.length != start for s in seqs):
            raise ValueError("prefill takes prompts of one length, run as far")
        if any(s not in self.prefilling for s in seqs):
            raise ValueError("prefill takes sequences admitted with start() and not yet run")
        count = length - start if q is None else min(q, length - start)
        if count < 1:
            raise ValueError(f"nothing to prefill: q={q}")
        try:
            self._prefill(seqs, start, count)
        except BaseException:
            for s in seqs:
                self.drop(s)
            raise

    def _prefill(self, seqs: Sequence[RunningSequence], start: int, q: int) -> None:
        n, end = len(seqs), start + q
        scoring = any(s.request.params.prompt_logprobs is not None for s in seqs)
        masks = [self._expert_mask_row(s.allowed) for s in seqs]
        ctl = self._routing(masks)
        input_ids = torch.tensor(
            [s.request.prompt_ids[start:end] for s in seqs], device=self.device
        )
        positions = torch.arange(start, end, device=self.device).unsqueeze(0).expand(n, -1)
        handles: list[int] = []
        for s in seqs:
            assert s.kv is not None
            handles.append(s.kv)
        self.cache.begin(handles, q)
        try:
            out = self.model(
                input_ids=input_ids,
                # A pass from position 0 is plain causal: the model's own mask (and sdpa's
                # causal kernel), exactly as a prefill without chunks.
                attention_mask=None if start == 0 else self._chunk_mask(n, start, q),
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                routing=ctl,
                logits_to_keep=0 if scoring else 1,
            )
        except BaseException:
            self.cache.cancel()
            raise
        self.cache.commit()
        for s in seqs:
            s.length = end
        if self.track_usage:
            used, weight = ctl.tokens.cpu(), ctl.weight.cpu()
            for i, s in enumerate(seqs):
                s.add_usage(used[i], weight[i])
        if scoring:
            for i, s in enumerate(seqs):
                if s.request.params.prompt_logprobs is not None:
                    s.prompt_logits.append(out.logits[i])
        if end < seqs[0].prompt_len:
            return
        for s in seqs:
            count = s.request.params.prompt_logprobs
            if count is not None:
                parts = s.prompt_logits
                full = parts[0] if len(parts) == 1 else torch.cat(parts)
                s.prompt_logprobs = tuple(prompt_logprobs(full, s.request.prompt_ids, count))
                s.prompt_logits = []
        logits = out.logits[:, -1, :]
        generating = [i for i, s in enumerate(seqs) if s.request.params.max_tokens > 0]
        for seq in seqs:
            self.prefilling.remove(seq)
            if seq.request.params.max_tokens == 0:
                seq.finish_reason = "length"
        if len(generating) == n:
            self._sample(logits, seqs)
        elif generating:
            self._sample(logits[generating], [seqs[i] for i in generating])
        joining = [(i, s) for i, s in enumerate(seqs) if s.finish_reason is None]
        for s in seqs:
            if s.finish_reason is not None:
                self._release(s)
        if not joining:
            return
        self._harvest()  # the batch changes shape
        for i, seq in joining:
            self.rows.append(seq)
            self._expert_rows.append(masks[i])

    def step(self) -> None:
        """Decode one token for every row."""
        if self._ctl is None:
            self._ctl = self._routing(self._expert_rows)
        input_ids = torch.tensor([[s.last_token] for s in self.rows], device=self.device)
        positions = torch.tensor([[s.length] for s in self.rows], device=self.device)
        handles: list[int] = []
        for s in self.rows:
            assert s.kv is not None
            handles.append(s.kv)
        self.cache.begin(handles, 1)
        assert self.cache.current is not None
        kv_len = self.cache.current.kv_len
        # A row sees its own columns up to the one this step writes (its position).
        valid = torch.arange(kv_len, device=self.device).unsqueeze(0) <= positions
        try:
            logits = self.decode_logits(input_ids, positions, self._mask(valid))
        except BaseException:
            self.cache.cancel()
            raise
        self.cache.commit()
        for s in self.rows:
            s.length += 1
        self._sample(logits, self.rows)

    def _sample(self, logits: torch.Tensor, rows: Sequence[RunningSequence]) -> None:
        """Choose the next token of every row (``logits`` ``[len(rows), vocab]``), with its
        log-probability for the rows that asked (and only for them)."""
        tokens = select_tokens(
            logits, [s.request.params for s in rows], [s.generator for s in rows]
        )
        asking = [i for i, s in enumerate(rows) if s.request.params.logprobs is not None]
        if not asking:
            for seq, token in zip(rows, tokens, strict=True):
                seq.accept(token)
            return
        if len(asking) < len(rows):
            logits = logits.index_select(0, torch.tensor(asking, device=logits.device))
        scored = token_logprobs(
            logits,
            [tokens[i] for i in asking],
            [int(rows[i].request.params.logprobs or 0) for i in asking],
        )
        by_row = dict(zip(asking, scored, strict=True))
        for i, (seq, token) in enumerate(zip(rows, tokens, strict=True)):
            seq.accept(token, by_row.get(i))

    def decode_logits(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``[batch, vocab]`` of one decoding step (the cache is not advanced).

        When the model is the governed FlexOlmo with transformers' own outer forward passes,
        they are unrolled here (embedding, rotary embedding, decoder layers, norm, LM head):
        the same modules in the same order, without the per-call wrapping (output recording,
        argument defaults, mask construction: the mask is already built), which costs about
        a third of a millisecond per step. Anything else goes through ``model(...)``.
        """
        if self._fast_path:
            inner = self.model.model
            hidden = inner.embed_tokens(input_ids)
            rotary = inner.rotary_emb(hidden, positions)
            for layer in inner.layers[: inner.config.num_hidden_layers]:
                hidden = layer(
                    hidden,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=self.cache,
                    position_embeddings=rotary,
                    routing=self._ctl,
                )
            logits: torch.Tensor = self.model.lm_head(inner.norm(hidden[:, -1, :]))
            return logits
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            routing=self._ctl,
        )
        full: torch.Tensor = out.logits[:, -1, :]
        return full

    def _mask(self, valid: torch.Tensor) -> torch.Tensor:
        """The attention mask of ``valid`` (bool ``[rows, kv_len]`` for a step, ``[rows, 1, q,
        kv_len]`` for a chunk) in the form the attention implementation takes."""
        if self._mask_kind == "2d":
            return valid
        mask4d = valid[:, None, None, :] if valid.dim() == 2 else valid
        if self._mask_kind == "bool":
            return mask4d
        zero = torch.zeros((), dtype=self._dtype, device=self.device)
        neg = torch.full((), torch.finfo(self._dtype).min, dtype=self._dtype, device=self.device)
        return torch.where(mask4d, zero, neg)

    def _chunk_mask(self, n: int, start: int, q: int) -> torch.Tensor:
        """Causal mask of a chunk: query ``j`` (position ``start + j``) sees columns up to
        its own position."""
        kv_len = start + q
        if self._mask_kind == "2d":  # the model adds causality from the cache's query offset
            return torch.ones((n, kv_len), dtype=torch.bool, device=self.device)
        cols = torch.arange(kv_len, device=self.device)
        rows = torch.arange(start, kv_len, device=self.device)
        causal = cols.unsqueeze(0) <= rows.unsqueeze(1)
        return self._mask(causal.expand(n, 1, q, kv_len))


def _plain_governed_forward(model: Any) -> bool:
    """The model is engine.modeling's governed FlexOlmo and neither it nor its inner model
    overrides transformers' forward passes (so decoding may unroll them)."""
    from transformers.models.flex_olmo import modeling_flex_olmo as fo

    from engine.modeling import GovernedFlexOlmoForCausalLM

    inner = getattr(model, "model", None)
    return (
        type(model).forward is GovernedFlexOlmoForCausalLM.forward
        and inner is not None
        and type(inner).forward is fo.FlexOlmoModel.forward
        and all(hasattr(inner, a) for a in ("embed_tokens", "rotary_emb", "layers", "norm"))
    )


def iter_groups(seqs: Iterable[RunningSequence]) -> list[list[RunningSequence]]:
    """Group sequences by prompt length (each group is prefilled in one forward pass), those
    that ask for prompt log-probabilities apart (only they pay for the full LM head)."""
    groups: dict[tuple[int, bool], list[RunningSequence]] = {}
    for s in seqs:
        key = (s.prompt_len, s.request.params.prompt_logprobs is not None)
        groups.setdefault(key, []).append(s)
    return list(groups.values())


def new_sequence(
    backend: GenerationBackend,
    request: GenerationRequest,
    sink: Sink,
    control: Any,
    tokenizer: Any = None,
) -> RunningSequence:
    """The running state of a checked request; ``tokenizer`` (default: the backend's) decodes
    its tokens, on the scheduler thread only."""
    return RunningSequence(
        request=request,
        sink=sink,
        control=control,
        eos_ids=eos_token_ids(backend),
        window=context_window(backend),
        assembler=TextAssembler(
            backend.tokenizer if tokenizer is None else tokenizer,
            request.prompt_ids,
            request.params.stop,
        ),
        generator=make_generator(request.params),
        allowed=frozenset(request.allowed),
    )
