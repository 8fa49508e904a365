"""The scheduler: one thread owns the model and batches every request, continuously.

Callers on any thread (an asyncio event loop included) submit requests; submission checks the
request (prompt, window, sampling parameters, allowed set, and that its KV memory fits the
budget at all) and raises before any compute. The scheduler thread then loops: it applies
cancellations and narrowings; admits waiting requests, oldest first, while the KV memory they
can ever need fits beside what the admitted ones reserved (so short requests admit many, long
ones fewer); runs at most ``prefill_chunk`` prompt tokens (short prompts of equal length
together, a long prompt one chunk at a time); and decodes one token for every running request
in one forward pass — rows with different allowed-expert sets side by side. A long prompt thus
arrives without stalling the running streams for its whole prefill. A row that finishes or is
cancelled leaves the batch at once, freeing its KV memory for the next waiting request.

Events reach asyncio callers through ``loop.call_soon_threadsafe`` and synchronous callers
through a thread-safe queue, so the scheduler never blocks on a caller and an event loop never
blocks on the model.

An idle scheduler holds no thread: the thread ends once nothing has arrived for
``IDLE_EXIT_S`` and the next submission starts a new one (see there for why).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import copy
import queue
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from engine.errors import ExpertSetError, GenerationError, PromptError
from engine.generation import (
    DecodeBatch,
    Finished,
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
    RunningSequence,
    Sink,
    StreamEvent,
    TextDelta,
    iter_groups,
    new_sequence,
    tokenize_prompt,
)
from engine.kvcache import BLOCK_TOKENS, blocks_for, default_kv_cache_bytes, kv_bytes_per_token
from engine.sampling import SamplingParams

__all__ = ["GenerationError", "GenerationStream", "KVMemory", "RequestControl", "Scheduler"]

DEFAULT_MAX_BATCH_SIZE = 64
"""Most requests admitted at once, whatever the KV budget would allow: a safety bound, not the
capacity (that is the budget). Every row adds to each step's cost and to the scheduler thread's
serial per-row work (sampling, detokenising, events), so without a bound a budget that fits
hundreds of short requests would stretch every stream's inter-token latency without limit."""

DEFAULT_PREFILL_CHUNK = 256
"""Most prompt tokens run between two decoding steps (0: a prompt runs in one pass, however
long). A longer prompt is run in chunks of this many tokens, one per step, so running streams
keep producing tokens while it arrives (measured in docs/benchmarks.md, bench/prefill.py)."""

ADMISSION_WINDOW_S = 0.002
"""When an idle scheduler wakes for a request, it waits this long (at most; less once the batch
is full) for more before prefilling, so that a burst of submissions is prefilled and decoded as
one batch rather than the first request alone and the rest one step later."""


IDLE_EXIT_S = 0.05
"""An idle scheduler thread ends after this long without a request. On the CPU, torch runs its
operators on OpenMP (libgomp), which gives every thread that has run a parallel operator a
team of worker threads of its own, kept until that thread ends. Once the threads of all
teams outnumber the CPUs, libgomp stops spin-waiting between parallel regions and puts its
workers to sleep after each, so every small operator pays a futex wake-up: on a 2-CPU machine
a decoding step of the tiny benchmark model ran 1.7x slower, and 8 concurrent requests 5x
slower, merely because a second, idle scheduler thread had run once. A thread that ends frees
its team, so schedulers that are not working (several engines in a process, a benchmark's
second scheduler) do not slow the one that is. Starting a thread again costs ~0.1 ms, next to
the ``ADMISSION_WINDOW_S`` every request after an idle spell waits anyway."""


MAINTENANCE_YIELD_S = 1.0
"""How long the scheduler waits, polling, for a pending unload/load to take and release the
model lock before its next step (a slow load from disk can take longer; the step then waits
on the lock itself)."""


class RequestControl:
    """The caller's grip on a submitted request: cancel it, narrow its allowed set.

    Thread-safe. The scheduler reads the flags before every decoding step, so a cancellation
    frees the request's slot, and a narrowing applies, from the next step on.
    """

    def __init__(self, request_id: str, expert_ids: Sequence[str], allowed: Iterable[str]):
        self.request_id = request_id
        self._expert_ids = tuple(expert_ids)
        self._lock = threading.Lock()
        self._allowed = frozenset(allowed)
        self.version = 0
        """Bumped by every narrowing; the scheduler compares it with what it applied."""
        self.cancelled = False

    @property
    def allowed(self) -> tuple[str, ...]:
        """The experts the request may use from the next step on (router order)."""
        with self._lock:
            current = self._allowed
        return tuple(e for e in self._expert_ids if e in current)

    def snapshot(self) -> tuple[int, frozenset[str]]:
        with self._lock:
            return self.version, self._allowed

    def _ids(self, ids: Iterable[str]) -> frozenset[str]:
        if isinstance(ids, str):
            raise TypeError("pass a collection of expert ids, not a single string")
        wanted = frozenset(ids)
        unknown = sorted(wanted.difference(self._expert_ids))
        if unknown:
            raise ExpertSetError(f"unknown expert ids: {', '.join(unknown)}", unknown)
        return wanted

    def narrow(self, allowed: Iterable[str]) -> tuple[str, ...]:
        """Keep only the experts in ``allowed`` (intersected with the current set: never
        widens). If nothing is left, the request ends with finish reason ``cancelled``.
        Returns the new set. Unknown ids raise :class:`ExpertSetError` and change nothing."""
        keep = self._ids(allowed)
        with self._lock:
            self._allowed = self._allowed & keep
            self.version += 1
        return self.allowed

    def revoke(self, expert_ids: Iterable[str]) -> tuple[str, ...]:
        """Remove ``expert_ids`` from the allowed set (a revocation); see :meth:`narrow`."""
        drop = self._ids(expert_ids)
        with self._lock:
            self._allowed = self._allowed - drop
            self.version += 1
        return self.allowed

    def cancel(self) -> None:
        """Stop the request; it ends with finish reason ``cancelled`` at the next step."""
        self.cancelled = True


@dataclass(frozen=True)
class KVMemory:
    """A snapshot of the scheduler's KV memory (approximate when read from another thread)."""

    budget_bytes: int
    reserved_bytes: int
    """What the admitted requests may grow to, at most ``budget_bytes``."""
    allocated_bytes: int
    """What the cache's block pools hold now."""
    requests: int
    """Requests holding KV memory: running, or with their prompt being prefilled."""
    working_bytes: int = 0
    """Buffers attention reads beside the pools, outside the budget: the decoding batch's
    staging buffers (at most the pools' size again) and the gather buffer the layers share."""


class GenerationStream:
    """An async iterator over one request's events: :class:`~engine.generation.TextDelta`
    events, then one :class:`~engine.generation.Finished` event with the full result.

    Closing it (``aclose()``, leaving ``async with``, cancelling the task that awaits it, or
    dropping it) cancels the request, which frees its slot at the next decoding step.
    ``narrow``/``revoke`` change the request's allowed set mid-generation.
    """

    def __init__(self, control: RequestControl, events: asyncio.Queue[StreamEvent | BaseException]):
        self._control = control
        self._events = events
        self._done = False
        self.result: GenerationResult | None = None
        """The final result, once the :class:`Finished` event was read."""
        self._finalizer = weakref.finalize(self, control.cancel)

    @property
    def request_id(self) -> str:
        return self._control.request_id

    @property
    def allowed(self) -> tuple[str, ...]:
        return self._control.allowed

    def narrow(self, allowed: Iterable[str]) -> tuple[str, ...]:
        """See :meth:`RequestControl.narrow`."""
        return self._control.narrow(allowed)

    def revoke(self, expert_ids: Iterable[str]) -> tuple[str, ...]:
        """See :meth:`RequestControl.revoke`."""
        return self._control.revoke(expert_ids)

    def cancel(self) -> None:
        """Cancel the request; the stream still delivers its final (cancelled) result."""
        self._control.cancel()

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._events.get()
        except asyncio.CancelledError:
            self._done = True
            self._control.cancel()
            raise
        if isinstance(event, BaseException):
            self._done = True
            raise GenerationError(f"generation failed: {event}") from event
        if isinstance(event, Finished):
            self._done = True
            self.result = event.result
            self._finalizer.detach()
        return event

    async def aclose(self) -> None:
        """Cancel the request unless it already finished."""
        if not self._done:
            self._done = True
            self._control.cancel()

    async def collect(self) -> GenerationResult:
        """Read the remaining events and return the final result."""
        async for _ in self:
            pass
        if self.result is None:
            raise GenerationError("the stream was closed before it finished")
        return self.result

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Closed(Exception):
    pass


class _Idle(Exception):
    """The scheduler thread has handed over (``Scheduler._thread`` is None) and ends."""


_CLOSE = object()


_LIVE: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Stop scheduler threads before the interpreter finalises: a daemon thread still inside
    # torch at that point makes the C++ runtime abort the process.
    for scheduler in list(_LIVE):
        scheduler.close(timeout=5.0)


class Scheduler:
    """Batches the requests of one engine on a thread of its own (started on first use).

    Args:
        backend: the engine (model, tokenizer, expert ids, device, ``mask_for``).
        max_batch_size: most requests admitted at once (a safety bound, see
            :data:`DEFAULT_MAX_BATCH_SIZE`); within it the KV budget decides.
        track_usage: account per-expert usage (``GenerationResult.usage`` is None when off).
        kv_cache_bytes: the KV memory budget; None: a fraction of the memory available on
            the engine's device now (:data:`engine.kvcache.KV_MEMORY_FRACTION`). A request
            whose prompt and ``max_tokens`` can never fit is refused at submission.
        prefill_chunk: most prompt tokens run between two decoding steps; 0 or None: every
            prompt in one pass (see :data:`DEFAULT_PREFILL_CHUNK`).
    """

    def __init__(
        self,
        backend: GenerationBackend,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        track_usage: bool = True,
        kv_cache_bytes: int | None = None,
        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk is not None and prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0, got {prefill_chunk}")
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.track_usage = track_usage
        self.prefill_chunk = prefill_chunk or 0
        dtype = getattr(backend.model, "dtype", torch.float32)
        self._block_bytes = kv_bytes_per_token(backend.model.config, dtype) * BLOCK_TOKENS
        if kv_cache_bytes is None:
            kv_cache_bytes = default_kv_cache_bytes(backend.device)
        if kv_cache_bytes < self._block_bytes:
            raise ValueError(
                f"kv_cache_bytes={kv_cache_bytes} holds no KV block of this model "
                f"({self._block_bytes} bytes, {BLOCK_TOKENS} tokens)"
            )
        self.kv_cache_bytes = kv_cache_bytes
        self.kv_blocks = kv_cache_bytes // self._block_bytes
        """The budget in cache blocks of ``BLOCK_TOKENS`` tokens."""
        self._expert_ids = tuple(backend.expert_ids)
        self._inbox: queue.SimpleQueue[RunningSequence | object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._batch: DecodeBatch | None = None
        self._waiting: deque[RunningSequence] = deque()
        # Fast (Rust) tokenizers are not safe to encode on one thread while another encodes
        # or decodes the same object ("Already borrowed"): the scheduler encodes with a copy
        # of its own under a lock, and decodes (scheduler thread only) with another copy.
        self._encoder = copy.deepcopy(backend.tokenizer)
        self._encoder_lock = threading.Lock()
        self._decoder = copy.deepcopy(backend.tokenizer)
        lock = getattr(backend, "lock", None)
        self._model_lock: contextlib.AbstractContextManager[Any] = (
            lock if lock is not None else contextlib.nullcontext()
        )
        self._has_maintenance = hasattr(backend, "maintenance_pending")

    # -- submission (any thread) ----------------------------------------------------------------

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        sink: Sink,
        *,
        allowed: Collection[str] | None = None,
        request_id: str | None = None,
    ) -> RequestControl:
        """Check and queue a request; its events go to ``sink`` on the scheduler thread.

        Raises ``PromptError``, ``ExpertSetError`` (both ``ValueError``) before any compute.
        """
        with self._encoder_lock:
            prompt_ids = tokenize_prompt(
                self.backend, prompt, self._encoder, room=min(params.max_tokens, 1)
            )
        if allowed is not None and isinstance(allowed, str):
            raise TypeError("allowed must be a collection of expert ids, not a single string")
        # Plain Python: submit runs on the caller's thread (the event loop), never torch.
        allowed_ids = self.backend.resolve_allowed(None if allowed is None else list(allowed))
        request = GenerationRequest(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            params=params,
            allowed=allowed_ids,
        )
        control = RequestControl(request.request_id, self._expert_ids, allowed_ids)
        seq = new_sequence(self.backend, request, sink, control, self._decoder)
        if blocks_for(seq.kv_tokens) > self.kv_blocks:
            raise PromptError(
                f"the prompt ({seq.prompt_len} tokens) and max_tokens ({params.max_tokens}) "
                f"need KV memory for {seq.kv_tokens} tokens; this engine's KV budget "
                f"({self.kv_cache_bytes} bytes) holds {self.kv_blocks * BLOCK_TOKENS}: "
                "ask for fewer tokens"
            )
        with self._lock:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="flexgate-scheduler", daemon=True
                )
                self._thread.start()
                _LIVE.add(self)
            self._inbox.put(seq)
        return control

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        allowed: Collection[str] | None = None,
        request_id: str | None = None,
    ) -> GenerationResult:
        """Generate and wait (blocks the calling thread: from asyncio use :meth:`stream`)."""
        events: queue.SimpleQueue[StreamEvent | BaseException] = queue.SimpleQueue()
        control = self.submit(
            prompt, params or SamplingParams(), events.put, allowed=allowed, request_id=request_id
        )
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise GenerationError(f"generation failed: {event}") from event
                if isinstance(event, Finished):
                    return event.result
        except BaseException:
            control.cancel()
            raise

    def stream(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        allowed: Collection[str] | None = None,
        request_id: str | None = None,
        text_events: bool = True,
    ) -> GenerationStream:
        """Submit and return the request's async event stream. Call it on the event loop that
        will iterate the stream. ``text_events=False``: only the ``Finished`` event (a caller
        that wants the result, not the text as it comes, then costs its loop nothing per
        token)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()
        holder: list[RequestControl] = []

        def sink(event: StreamEvent | BaseException) -> None:
            if not text_events and isinstance(event, TextDelta):
                return
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                if holder:
                    holder[0].cancel()

        control = self.submit(
            prompt, params or SamplingParams(), sink, allowed=allowed, request_id=request_id
        )
        holder.append(control)
        return GenerationStream(control, events)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the thread; requests still waiting or running end as ``cancelled``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._inbox.put(_CLOSE)
        if thread is not None:
            thread.join(timeout)

    @property
    def running(self) -> int:
        """Requests in the running batch (approximate when read from another thread)."""
        return len(self._batch.rows) if self._batch is not None else 0

    def memory(self) -> KVMemory:
        """The KV budget and what is reserved and allocated of it now."""
        batch = self._batch
        if batch is None:
            return KVMemory(self.kv_cache_bytes, 0, 0, 0)
        cache = batch.cache
        return KVMemory(
            budget_bytes=self.kv_cache_bytes,
            reserved_bytes=cache.reserved_blocks * self._block_bytes,
            allocated_bytes=cache.allocated_bytes,
            requests=len(batch.rows) + len(batch.prefilling),
            working_bytes=cache.working_bytes,
        )

    # -- the scheduler thread -------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            batch = self._batch  # kept between threads: its buffers are reused
            if batch is None:
                batch = self._batch = DecodeBatch(
                    self.backend, track_usage=self.track_usage, kv_blocks=self.kv_blocks
                )
            try:
                while True:
                    try:
                        self._iterate(batch)
                    except (_Closed, _Idle):
                        raise
                    except Exception as exc:  # outside the model: fail what is in flight, go on
                        self._fail([*self._waiting, *batch.clear()], exc)
                        self._waiting.clear()
            except _Idle:
                # Nothing was queued or running, and what arrives from now on belongs to the
                # next thread: touch nothing on the way out.
                return
            except _Closed:
                self._cancel_all(batch)
            except BaseException:
                self._cancel_all(batch)
                with self._lock:  # this thread dies: let the next submission start one
                    if self._thread is threading.current_thread():
                        self._thread = None
                raise

    def _cancel_all(self, batch: DecodeBatch) -> None:
        """Cancel what is waiting, running or still queued (the thread is ending)."""
        for seq in [*self._waiting, *batch.clear()]:
            self._finish(seq, "cancelled")
        self._waiting.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, RunningSequence):
                self._finish(item, "cancelled")

    def _take(self, block: bool) -> None:
        deadline: float | None = None
        while True:
            try:
                if block:
                    item = self._wait_or_exit()
                else:
                    left = 0.0 if deadline is None else deadline - time.monotonic()
                    item = self._inbox.get(timeout=left) if left > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is _CLOSE:
                raise _Closed
            assert isinstance(item, RunningSequence)
            self._waiting.append(item)
            if block:  # woken from idle: give a burst of submissions time to arrive
                deadline = time.monotonic() + ADMISSION_WINDOW_S
            if len(self._waiting) >= self.max_batch_size:
                deadline = None
            block = False

    def _wait_or_exit(self) -> object:
        """The next item; after ``IDLE_EXIT_S`` without one, hand over and raise _Idle.

        ``submit`` queues under the lock and starts a thread when there is none, so checking the
        inbox and giving up ``_thread`` under the same lock loses no request."""
        while True:
            try:
                return self._inbox.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if self._inbox.empty():
                        self._thread = None
                        raise _Idle from None

    def _finish(self, seq: RunningSequence, reason: Any) -> None:
        try:
            seq.finish(reason, self._expert_ids, self.track_usage)
        except Exception as exc:  # never let one request's failure stop the thread
            seq.deliver(exc)

    def _fail(self, seqs: Iterable[RunningSequence], exc: BaseException) -> None:
        for seq in seqs:
            seq.deliver(exc)

    def _iterate(self, batch: DecodeBatch) -> None:
        self._take(block=not batch.rows and not batch.prefilling and not self._waiting)
        self._yield_to_maintenance()
        # The engine's lock: experts are unloaded and loaded only between steps.
        with self._model_lock:
            self._apply_controls(batch)
            self._admit(batch)
            if batch.rows:
                try:
                    batch.step()
                except Exception as exc:
                    self._fail(batch.clear_rows(), exc)
                    return
                self._retire(batch)

    def _yield_to_maintenance(self) -> None:
        """Let a waiting unload/load take the model lock before the next step (the engine's
        ``maintenance_pending``); after ``MAINTENANCE_YIELD_S`` the step just queues for it."""
        if not self._has_maintenance:
            return
        backend: Any = self.backend
        deadline = time.monotonic() + MAINTENANCE_YIELD_S
        while backend.maintenance_pending and time.monotonic() < deadline:
            time.sleep(0.0002)

    def _revoke_unloaded(self, batch: DecodeBatch) -> None:
        """An expert unloaded while requests may use it is revoked from them (fail closed)."""
        loaded_ids = getattr(self.backend, "loaded_expert_ids", None)
        if loaded_ids is None:
            return
        loaded = frozenset(loaded_ids)
        if len(loaded) == len(self._expert_ids):
            return
        for seq in [*self._waiting, *batch.prefilling, *batch.rows]:
            _, allowed = seq.control.snapshot()
            gone = allowed - loaded
            if gone:
                seq.control.revoke(gone)

    def _apply_controls(self, batch: DecodeBatch) -> None:
        """Cancellations and narrowings (and unloaded experts), before the next step."""
        self._revoke_unloaded(batch)
        for seq in list(self._waiting):
            if not self._apply_control(seq):
                self._waiting.remove(seq)
                self._finish(seq, "cancelled")
        for seq in list(batch.prefilling):  # the next chunk runs under the new set
            if not self._apply_control(seq):
                batch.drop(seq)
                self._finish(seq, "cancelled")
        for index in range(len(batch.rows) - 1, -1, -1):
            seq = batch.rows[index]
            control = seq.control
            if control.cancelled:
                self._finish(batch.remove(index), "cancelled")
            elif control.version != seq.seen_version:
                seq.seen_version, allowed = control.snapshot()
                if allowed:
                    batch.set_allowed(index, allowed)
                else:
                    removed = batch.remove(index)
                    removed.narrowed |= removed.allowed
                    removed.allowed = frozenset()
                    self._finish(removed, "cancelled")

    @staticmethod
    def _apply_control(seq: RunningSequence) -> bool:
        """Apply a not-yet-running request's cancellation or narrowing; False: it ends."""
        control: RequestControl = seq.control
        if control.cancelled:
            return False
        if control.version != seq.seen_version:
            seq.seen_version, allowed = control.snapshot()
            seq.narrowed |= seq.allowed - allowed
            seq.allowed = allowed
            if not allowed:
                return False
        return True

    def _admit(self, batch: DecodeBatch) -> None:
        """Admit waiting requests, oldest first, while the bound and the KV budget allow (a
        request that does not fit yet waits, and so do those behind it: no starvation of long
        requests), then run this iteration's share of prefill work."""
        while self._waiting and len(batch.rows) + len(batch.prefilling) < self.max_batch_size:
            if not batch.can_start(self._waiting[0]):
                if batch.rows or batch.prefilling:
                    break  # memory frees as they finish
                seq = self._waiting.popleft()  # alone it cannot fit (submit refuses these)
                need = seq.kv_tokens
                seq.deliver(PromptError(f"the request needs KV memory for {need} tokens"))
                continue
            batch.start(self._waiting.popleft())
        if batch.prefilling:
            self._prefill(batch)
            self._retire(batch)

    def _prefill(self, batch: DecodeBatch) -> None:
        """Run prompt work, oldest first, up to ``prefill_chunk`` tokens (the first unit
        always runs): a short prompt together with the others of its length, up to the
        chunk; a long prompt its next chunk. Chunk boundaries depend on the prompt only, so
        a prompt is computed the same way however busy the engine is."""
        limit = self.prefill_chunk
        spent = 0
        queued = list(batch.prefilling)
        done: set[int] = set()
        for head in queued:
            if id(head) in done or head not in batch.prefilling:
                continue
            if limit and head.prompt_len > limit:
                group, q = [head], min(limit, head.prompt_len - head.length)
            else:
                fresh = (s for s in queued if id(s) not in done and s.length == 0)
                group = next(g for g in iter_groups(fresh) if head in g)
                q = head.prompt_len
                if limit:
                    group = group[: max(1, limit // q)]
            cost = len(group) * q
            if spent and limit and spent + cost > limit:
                break
            done.update(id(s) for s in group)
            spent += cost
            try:
                batch.prefill(group, q)
            except Exception as exc:  # the group is dropped; the running rows are untouched
                self._fail(group, exc)
                continue
            for seq in group:
                if seq.finish_reason is not None and seq not in batch.rows:
                    self._finish(seq, seq.finish_reason)

    def _retire(self, batch: DecodeBatch) -> None:
        for index in range(len(batch.rows) - 1, -1, -1):
            reason = batch.rows[index].finish_reason
            if reason is not None:
                self._finish(batch.remove(index), reason)
