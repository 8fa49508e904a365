"""The engine's public API: :func:`load_engine` and :class:`Engine`.

>>> eng = load_engine("path/to/flexolmo", device_map="cpu")          # doctest: +SKIP
>>> res = eng.forward(ids, allowed=[{"public", "code"}, {"public"}])  # doctest: +SKIP
>>> res.logits.shape, res.usage[0]["code"]                           # doctest: +SKIP
(torch.Size([2, 7, 100352]), (42, 17.3))

For an allowed set S the logits equal those of the same model with the experts outside S
physically deleted (router rows and FFNs removed, ``num_experts = |S|``,
``top_k = min(k, |S|)``); experts outside S are never computed. Usage per row and expert is
``(tokens, weight)``: the number of (token, layer) top-k selections of that expert and the sum of
their router probabilities (softmax over S); 0 and 0.0 when excluded. Prompt and generated
tokens both count; padding (``attention_mask == 0``) does not.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import FlexOlmoConfig, PreTrainedTokenizerBase

from engine import loading, placement, stacked_experts
from engine.errors import ExpertSetError
from engine.experts import ExpertInfo, read_experts
from engine.generation import GenerationResult
from engine.modeling import GovernedFlexOlmoForCausalLM
from engine.placement import DeviceMapSpec, ExpertRecord, Placement
from engine.routing import RoutingControl
from engine.sampling import SamplingParams
from engine.scheduler import DEFAULT_PREFILL_CHUNK, GenerationStream, Scheduler
from engine.stacked_experts import ExpertPath

__all__ = ["Allowed", "Engine", "ForwardResult", "Usage", "load_engine"]

Allowed = Collection[str] | Sequence[Collection[str]] | None
"""None (every loaded expert), one collection of ids for every row, or one per row."""

Usage = dict[str, tuple[int, float]]
"""expert id -> (tokens, weight) for one row."""


@dataclass(frozen=True)
class ForwardResult:
    """Output of :meth:`Engine.forward`."""

    logits: torch.Tensor
    """float ``[batch, seq, vocab]``."""
    usage: list[Usage]
    """One dict per row: every expert id -> (tokens, weight)."""


class Engine:
    """A loaded FlexOlmo model with governed routing. Build it with :func:`load_engine`.

    Attributes:
        model: the governed causal LM (a transformers ``PreTrainedModel``).
        tokenizer: the checkpoint's tokenizer (with its chat template).
        experts: ``experts.json`` entries in router-row order.
        lock: held around every model call and every unload/load; code that calls
            ``model`` directly from several threads should hold it too.
        expert_path: how the MoE layers run their experts (``"grouped"`` or ``"stacked"``,
            see :func:`load_engine`).
    """

    def __init__(
        self,
        model: GovernedFlexOlmoForCausalLM,
        tokenizer: PreTrainedTokenizerBase,
        experts: tuple[ExpertInfo, ...],
        model_dir: Path,
        tensors: Mapping[str, loading.TensorInfo],
        placement_: Placement,
        dtype: torch.dtype,
        expert_path: ExpertPath = "grouped",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.experts = experts
        self.model_dir = model_dir
        self.dtype = dtype
        self.placement = placement_
        self.expert_path: ExpertPath = expert_path
        self.lock = threading.RLock()
        self._tensors = tensors
        self._index = {e.id: i for i, e in enumerate(experts)}
        self._unloaded: dict[int, list[ExpertRecord]] = {}
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = threading.Lock()  # not self.lock: the scheduler holds that per step
        self._maintenance = 0  # unload/load calls waiting for or holding self.lock
        self._maintenance_count_lock = threading.Lock()
        self.kv_cache_bytes: int | None = None
        """The scheduler's KV memory budget; None: derived from the memory available when
        the scheduler starts (engine.kvcache.KV_MEMORY_FRACTION)."""
        self.prefill_chunk: int = DEFAULT_PREFILL_CHUNK
        """Most prompt tokens run between two decoding steps (0: a prompt in one pass)."""

    # -- description ------------------------------------------------------------------------

    @property
    def expert_ids(self) -> tuple[str, ...]:
        """Expert ids in router-row order."""
        return tuple(e.id for e in self.experts)

    @property
    def config(self) -> FlexOlmoConfig:
        config: FlexOlmoConfig = self.model.config
        return config

    @property
    def device(self) -> torch.device:
        """Where ``input_ids`` go: the execution device of the embedding."""
        return self.placement.main_device

    @property
    def device_map(self) -> dict[str, placement.Device]:
        """Placement unit -> device ("cpu", "disk", or a GPU index)."""
        return dict(self.placement.device_map)

    @property
    def loaded_expert_ids(self) -> tuple[str, ...]:
        """Ids of the experts whose weights are loaded (all but the unloaded ones)."""
        return tuple(e.id for i, e in enumerate(self.experts) if i not in self._unloaded)

    # -- allowed sets -----------------------------------------------------------------------

    def mask_for(self, allowed: Allowed, batch_size: int) -> torch.Tensor:
        """BoolTensor ``[batch_size, num_experts]`` (CPU) for ``allowed``.

        ``allowed`` is None (every loaded expert), one collection of ids for every row, or a
        sequence of ``batch_size`` collections, one per row. Raises ExpertSetError, before any
        compute, naming the ids, when a set is empty or names an unknown or unloaded expert.
        """
        n = len(self.experts)
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if allowed is None:
            if len(self._unloaded) == n:
                raise ExpertSetError("no expert is loaded")
            row = torch.ones(n, dtype=torch.bool)
            row[list(self._unloaded)] = False
            return row.expand(batch_size, n).clone()
        rows, per_row = self._split_rows(allowed, batch_size)
        mask = torch.zeros(batch_size, n, dtype=torch.bool)
        for r, ids in enumerate(rows):
            mask[r, self._indices(ids, r if per_row else None)] = True
        return mask

    def resolve_allowed(self, allowed: Collection[str] | None) -> tuple[str, ...]:
        """The ids of one request's allowed set in router order, checked as :meth:`mask_for`
        checks them, without building a tensor: callers on the event loop or request threads
        use this, since torch work belongs to the scheduler thread (DESIGN.md, "Threads")."""
        if allowed is None:
            if len(self._unloaded) == len(self.experts):
                raise ExpertSetError("no expert is loaded")
            return self.loaded_expert_ids
        if isinstance(allowed, str | bytes):
            raise TypeError("allowed must be a collection of expert ids, not a single string")
        ids = list(allowed)
        if not all(isinstance(i, str) for i in ids):
            raise TypeError("allowed must be a collection of expert ids")
        return tuple(self.experts[i].id for i in self._indices(ids, None))

    def _split_rows(
        self, allowed: Collection[object], batch_size: int
    ) -> tuple[list[Collection[str]], bool]:
        if isinstance(allowed, str | bytes):
            raise TypeError("allowed must be a collection of expert ids, not a single string")
        items = list(allowed)
        if all(isinstance(x, str) for x in items):
            return [[str(x) for x in items]] * batch_size, False
        if any(isinstance(x, str | bytes) or not isinstance(x, Collection) for x in items):
            raise TypeError("allowed must hold only ids, or only one collection of ids per row")
        if len(items) != batch_size:
            raise ValueError(f"allowed has {len(items)} rows, the batch {batch_size}")
        rows: list[Collection[str]] = []
        for x in items:
            assert isinstance(x, Collection)
            if isinstance(x, str | bytes) or not all(isinstance(i, str) for i in x):
                raise TypeError("each row of allowed must be a collection of expert ids")
            rows.append([str(i) for i in x])
        return rows, True

    def _indices(self, ids: Collection[str], row: int | None) -> list[int]:
        where = "" if row is None else f" (row {row})"
        if not ids:
            raise ExpertSetError(f"the allowed expert set is empty{where}")
        unknown = sorted({i for i in ids if i not in self._index})
        if unknown:
            raise ExpertSetError(f"unknown expert id(s) {unknown}{where}", unknown)
        unloaded = sorted({i for i in ids if self._index[i] in self._unloaded})
        if unloaded:
            raise ExpertSetError(f"expert(s) {unloaded} are unloaded{where}", unloaded)
        return sorted({self._index[i] for i in ids})

    # -- compute ----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        allowed: Allowed = None,
        attention_mask: torch.Tensor | None = None,
        *,
        track_usage: bool = True,
    ) -> ForwardResult:
        """Logits and per-row usage for ``input_ids`` ``[batch, seq]`` under ``allowed``.

        With ``attention_mask`` (1 for tokens, 0 for padding, left padding expected) positions
        are counted from each row's first token, and padding is not counted in usage.
        """
        if input_ids.dim() != 2:
            raise ValueError("input_ids must be [batch, seq]")
        batch, seq = input_ids.shape
        mask = self.mask_for(allowed, batch)
        position_ids = None
        token_mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, seq):
                raise ValueError("attention_mask must have the shape of input_ids")
            am = attention_mask.to(self.device)
            position_ids = (am.long().cumsum(-1) - 1).clamp(min=0)
            token_mask = am.bool()
            attention_mask = am
        ctl = RoutingControl(mask, token_mask=token_mask, track_usage=track_usage)
        with self.lock, torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                routing=ctl,
            )
        logits = out.logits
        assert logits is not None
        return ForwardResult(logits, self.usage_of(ctl) if track_usage else [])

    def usage_of(self, ctl: RoutingControl) -> list[Usage]:
        """A control's accumulated usage as one dict per row (every expert id present)."""
        tokens = ctl.tokens.cpu().tolist()
        weight = ctl.weight.cpu().tolist()
        ids = self.expert_ids
        return [
            {eid: (int(t[i]), float(w[i])) for i, eid in enumerate(ids)}
            for t, w in zip(tokens, weight, strict=True)
        ]

    # -- generation (engine.generation, engine.scheduler) -----------------------------------

    @property
    def scheduler(self) -> Scheduler:
        """The generation scheduler (its thread starts with the first request)."""
        with self._scheduler_lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(
                    self, kv_cache_bytes=self.kv_cache_bytes, prefill_chunk=self.prefill_chunk
                )
            return self._scheduler

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        allowed: Collection[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        request_id: str | None = None,
    ) -> GenerationResult:
        """Generate a completion of ``prompt`` (text, or token ids) with the experts in
        ``allowed`` (None: every loaded expert); blocks the calling thread until it is done
        (from asyncio, use :meth:`stream`). Concurrent calls are batched together.

        Sampling comes either as ``params`` (a :class:`SamplingParams`) or as keywords with
        the same names and defaults: ``max_tokens`` 16, ``temperature`` 1.0 (0 is greedy),
        ``top_p`` 1.0, ``top_k`` 0 (off), ``seed`` None, ``stop`` () (one string or several,
        cut from the text), ``ignore_eos`` False, ``logprobs`` / ``prompt_logprobs`` None
        (0..20: log-probabilities of the generated / prompt tokens with that many
        alternatives; ``max_tokens=0`` with ``prompt_logprobs`` scores the prompt only).
        Generation ends at ``max_tokens``, the context window, the end-of-sequence token or a
        stop string. The result carries the text, the token ids, the finish reason, prompt and
        completion token counts, per-expert usage over the prompt and the generated tokens
        (see engine.generation) and the log-probabilities asked for.

        Raises (before any compute): ``PromptError`` (empty, outside the vocabulary, no room in
        the window), ``ExpertSetError`` (empty set, unknown or unloaded expert), ``SamplingError``
        (sampling parameters). ``GenerationError`` if the model fails.
        """
        sampling = _sampling(
            params,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            ignore_eos,
            logprobs,
            prompt_logprobs,
        )
        return self.scheduler.generate(prompt, sampling, allowed=allowed, request_id=request_id)

    def stream(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        allowed: Collection[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        request_id: str | None = None,
        text_events: bool = True,
    ) -> GenerationStream:
        """As :meth:`generate`, streaming: call it on the event loop that iterates the result,
        an async iterator of ``TextDelta`` events then one ``Finished`` event with the
        :class:`GenerationResult` (``text_events=False``: the ``Finished`` event only).
        ``stream.narrow(ids)`` / ``stream.revoke(ids)`` change the allowed set from the next
        decoding step; ``aclose()`` or cancelling the consuming task
        cancels the request and frees its slot. Errors as :meth:`generate`, raised here.
        """
        sampling = _sampling(
            params,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            ignore_eos,
            logprobs,
            prompt_logprobs,
        )
        return self.scheduler.stream(
            prompt, sampling, allowed=allowed, request_id=request_id, text_events=text_events
        )

    def close(self) -> None:
        """Stop the generation scheduler; requests still running end as cancelled."""
        with self._scheduler_lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close()

    # -- experts at run time ----------------------------------------------------------------

    @property
    def maintenance_pending(self) -> bool:
        """An ``unload_expert``/``load_expert`` is waiting for the model lock or holds it. The
        scheduler lets it go before its next step. Locks promise no fairness: CPython's
        usually hands a released lock to a thread blocked on it, but nothing guarantees that a
        busy batch, releasing and retaking the lock between steps, cannot hold a withdrawal
        off until it drains."""
        return self._maintenance > 0

    @contextlib.contextmanager
    def _maintenance_turn(self) -> Iterator[None]:
        with self._maintenance_count_lock:
            self._maintenance += 1
        try:
            with self.lock:
                yield
        finally:
            with self._maintenance_count_lock:
                self._maintenance -= 1

    def unload_expert(self, expert_id: str) -> None:
        """Free an expert's weights (every layer) while the engine runs; requests that allow
        it fail with ExpertSetError until :meth:`load_expert`. No-op if already unloaded."""
        idx = self._index.get(expert_id)
        if idx is None:
            raise ExpertSetError(f"unknown expert id(s) {[expert_id]}", [expert_id])
        with self._maintenance_turn():
            if idx in self._unloaded:
                return
            self._unloaded[idx] = placement.unload_expert(self.model, idx)

    def load_expert(self, expert_id: str) -> None:
        """Read an unloaded expert's weights back from the checkpoint onto their devices."""
        idx = self._index.get(expert_id)
        if idx is None:
            raise ExpertSetError(f"unknown expert id(s) {[expert_id]}", [expert_id])
        with self._maintenance_turn():
            records = self._unloaded.get(idx)
            if records is None:
                return
            placement.load_expert(self.model, idx, records, self._tensors, self.dtype)
            del self._unloaded[idx]


def _sampling(
    params: SamplingParams | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: str | Sequence[str] | None,
    ignore_eos: bool | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
) -> SamplingParams:
    """``params``, or a SamplingParams from the keywords given (not both)."""
    keywords = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "stop": stop,
        "ignore_eos": ignore_eos,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
    }
    given = sorted(k for k, v in keywords.items() if v is not None)
    if params is not None:
        if given:
            raise TypeError(f"pass either params or sampling keywords, not both: {given}")
        return params
    d = SamplingParams()
    return SamplingParams(
        max_tokens=d.max_tokens if max_tokens is None else max_tokens,
        temperature=d.temperature if temperature is None else temperature,
        top_p=d.top_p if top_p is None else top_p,
        top_k=d.top_k if top_k is None else top_k,
        seed=seed,
        stop=d.stop if stop is None else (stop,) if isinstance(stop, str) else tuple(stop),
        ignore_eos=d.ignore_eos if ignore_eos is None else ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def load_engine(
    model_dir: str | Path,
    device_map: DeviceMapSpec = "cpu",
    max_memory: Mapping[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    expert_priority: Sequence[str] | None = None,
    expert_path: str = "auto",
    kv_cache_bytes: int | None = None,
    prefill_chunk: int | None = None,
) -> Engine:
    """Load a FlexOlmo checkpoint folder into an :class:`Engine`.

    Args:
        model_dir: Hugging Face FlexOlmo folder (config.json, safetensors with per-expert keys,
            tokenizer files, optional ``experts.json``).
        device_map: ``"cpu"`` (default), one device (``"cuda:0"``), ``"auto"``, or a mapping of
            module names to devices (``"cpu"``, ``"disk"``, GPU index); see engine.placement.
        max_memory: per-device budget for ``"auto"`` (``{0: "20GiB", "cpu": "64GiB"}``).
        offload_folder: where disk-placed weights are copied (in the compute dtype); without
            it they are read straight from the checkpoint's safetensors files.
        dtype: compute dtype (``torch.bfloat16``, ``"float32"``); default the config's.
        expert_priority: expert ids to keep on GPU first under ``"auto"`` (the rest follow
            in router-row order).
        expert_path: ``"grouped"`` (each expert its own module; a decoding step's selections
            are grouped on the host, one read per MoE layer), ``"stacked"`` (the resident
            experts of a layer as one stacked tensor per device, run by grouped or batched
            matrix products with no host read: engine.stacked_experts) or ``"auto"``
            (default: grouped, the path measured on a GPU; see docs/engine.md).
        kv_cache_bytes: the generation scheduler's KV memory budget; default
            ``FLEXGATE_KV_CACHE_BYTES``, and when that is 0, a quarter of the memory available
            on the engine's device when the scheduler starts.
        prefill_chunk: most prompt tokens run between two decoding steps (0: every prompt in
            one pass); default ``FLEXGATE_PREFILL_CHUNK_TOKENS``.

    Raises:
        CheckpointError: missing/mis-shaped/unexpected tensor, bad config or experts.json,
            missing or unreadable tokenizer files (named).
        PlacementError: a device map or budget that cannot be honoured, or an unknown
            ``expert_path``.
    """
    stacked_experts.check_expert_path(expert_path)  # before anything is read
    folder = Path(model_dir)
    config = loading.read_config(folder)
    experts = read_experts(folder, config.num_experts)
    loading.check_tokenizer_files(folder)
    tensors = loading.checkpoint_tensors(folder)
    bias = loading.has_router_bias(tensors, config.num_hidden_layers)
    compute_dtype = loading.resolve_dtype(dtype, config)
    model = loading.build_empty_model(config, bias, compute_dtype)
    loading.validate_checkpoint(model, tensors)
    priority = None
    if expert_priority is not None:
        index = {e.id: i for i, e in enumerate(experts)}
        unknown = [e for e in expert_priority if e not in index]
        if unknown:
            raise ExpertSetError(f"unknown expert id(s) {unknown} in expert_priority", unknown)
        first = [index[e] for e in dict.fromkeys(expert_priority)]
        priority = first + [i for i in range(len(experts)) if i not in first]
    unit_map = placement.resolve_device_map(model, device_map, max_memory, compute_dtype, priority)
    placed = placement.place_model(model, tensors, unit_map, compute_dtype, offload_folder)
    path = stacked_experts.resolve_expert_path(expert_path, placed.main_device)
    if path == "stacked":
        for layer in model.model.layers:
            layer.mlp.stack_experts()
    tokenizer: PreTrainedTokenizerBase = loading.load_tokenizer(folder)
    engine = Engine(model, tokenizer, experts, folder, tensors, placed, compute_dtype, path)
    if kv_cache_bytes is None or prefill_chunk is None:
        from contracts.settings import settings

        current = settings()
        if kv_cache_bytes is None:
            kv_cache_bytes = current.kv_cache_bytes or None
        if prefill_chunk is None:
            prefill_chunk = current.prefill_chunk_tokens
    if kv_cache_bytes is not None and kv_cache_bytes < 1:
        raise ValueError(f"kv_cache_bytes must be >= 1, got {kv_cache_bytes}")
    if prefill_chunk < 0:
        raise ValueError(f"prefill_chunk must be >= 0, got {prefill_chunk}")
    engine.kv_cache_bytes = kv_cache_bytes
    engine.prefill_chunk = prefill_chunk
    return engine
