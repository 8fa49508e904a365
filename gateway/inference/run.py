"""One admitted request on the engine: its sequences, their events, its ledger record.

A request of P prompts and n choices is P x n engine sequences submitted together (so the
scheduler batches them), registered in the worker's InflightRegistry as one entry: a policy
change narrows all of them from their next decoding step, and what it took away goes into the
record. The record is appended (awaited, durable) before any text leaves for a plain request;
a stream appends `inference.started` before its first token and the record at its end,
however it ends. If the client goes away, the sequences are cancelled and the record (status
`cancelled`, the tokens generated so far) is appended by a task of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from audit.ledger import Entry
from gateway.errors import UNAVAILABLE, ApiError, bad_request
from gateway.inference import records
from gateway.inference.admission import Admission
from gateway.inference.params import Plan, sampling_params
from gateway.limits import Admission as RateAdmission
from gateway.telemetry import OPERATIONS
from governance.identity import Identity

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Narrowed:
    """When a running request first lost an expert: wall clock (epoch seconds) and the tokens
    its sequences had delivered by then (streams; the engine applies it from its next step)."""

    at: float
    after_tokens: int | None


class RowGroup:
    """The sequences of one request, narrowed together (InflightRegistry's Narrowable)."""

    def __init__(
        self, streams: list[Any], allowed: tuple[str, ...], tokens: Callable[[], int | None]
    ) -> None:
        self.streams = streams
        self._allowed = allowed
        self._tokens = tokens
        self.narrowed: Narrowed | None = None

    @property
    def allowed(self) -> tuple[str, ...]:
        return self._allowed

    def narrow(self, allowed: Iterable[str]) -> tuple[str, ...]:
        keep = set(allowed)
        before = self._allowed
        self._allowed = tuple(e for e in before if e in keep)
        for s in self.streams:
            s.narrow(self._allowed)
        if self.narrowed is None and self._allowed != before:
            self.narrowed = Narrowed(time.time(), self._tokens())
        return self._allowed


@dataclass
class RowState:
    """What one sequence has produced so far."""

    text: list[str] = field(default_factory=list)
    tokens: int = 0
    result: Any = None


def _engine_error(exc: Exception) -> ApiError:
    from engine.errors import ExpertSetError
    from engine.generation import PromptError

    if isinstance(exc, PromptError):
        return bad_request(str(exc), "prompt", "invalid_prompt")
    if isinstance(exc, ExpertSetError):  # e.g. an allowed expert unloaded meanwhile
        return ApiError(
            503,
            f"the engine cannot run this expert set now: {exc}",
            type=UNAVAILABLE,
            code="engine_unavailable",
        )
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    return ApiError(503, "the engine is unavailable", type=UNAVAILABLE, code="engine_unavailable")


class Run:
    """One request from admission to its record."""

    def __init__(
        self,
        state: Any,
        plan: Plan,
        admission: Admission,
        identity: Identity,
        request_id: str,
        *,
        rate: RateAdmission | None = None,
    ) -> None:
        self.state = state
        self.rate = rate
        """The rate-limit admission; released with the real token count at the record."""
        self._engine_span: Any = None
        self.plan = plan
        self.admission = admission
        self.identity = identity
        self.request_id = request_id
        self.rows = [RowState() for _ in range(plan.rows)]
        self.group: RowGroup | None = None
        self.started: Entry | None = None
        self.record: Entry | None = None
        self._t0 = time.perf_counter()
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._pumps: list[asyncio.Task[None]] = []
        self._closing: asyncio.Task[Any] | None = None
        self.failed = False
        """A sequence failed in the engine: the record's status is `error`."""

    # -- start ------------------------------------------------------------------------------

    def _params(self) -> list[Any]:
        return [sampling_params(self.plan, row) for row in range(self.plan.rows)]

    def submit(self) -> None:
        """Submit every sequence (errors, raised before any compute, close those submitted)."""
        params = self._params()
        engine = self.state.engine
        streams: list[Any] = []
        try:
            for row, sp in enumerate(params):
                prompt = self.plan.prompts[row // self.plan.n]
                streams.append(
                    engine.stream(
                        list(prompt.ids),
                        sp,
                        allowed=self.admission.allowed,
                        request_id=f"{self.request_id}/{row}",
                        # a plain reply needs the result only: no event-loop work per token
                        text_events=self.plan.stream,
                    )
                )
        except Exception as exc:
            for s in streams:
                s.cancel()
            raise _engine_error(exc) from exc
        self.group = RowGroup(streams, self.admission.allowed, self._delivered)
        self._engine_span = self.state.telemetry.start_span(
            "engine", **{"flexgate.rows": len(streams)}
        )
        self.state.inflight.register(
            self.request_id,
            self.group,
            principal=self.identity,
            purpose=self.plan.purpose,
            narrowing=self.plan.narrowing,
            policy_version=self.admission.policy_version,
        )
        self._pumps = [
            asyncio.create_task(self._pump(row, s), name=f"pump-{self.request_id}-{row}")
            for row, s in enumerate(streams)
        ]

    def _delivered(self) -> int | None:
        """Tokens the sequences have delivered so far (None: a plain request, which gets no
        text events to count)."""
        return sum(r.tokens for r in self.rows) if self.plan.stream else None

    async def _pump(self, row: int, stream: Any) -> None:
        from engine.generation import Finished

        try:
            async for event in stream:
                if isinstance(event, Finished):
                    self.rows[row].result = event.result
                else:
                    self.rows[row].tokens += len(event.token_ids)
                    self.rows[row].text.append(event.text)
                await self._queue.put((row, event))
        except Exception as exc:
            log.error("request %s row %d failed: %s", self.request_id, row, exc)
            await self._queue.put((row, exc))

    async def start_stream(self) -> None:
        """Streams: `inference.started` durable, then submit (503 if the ledger fails)."""
        self.started = await records.append(
            self.state,
            kind=records.STARTED,
            principal=self.identity.id,
            payload=records.started_payload(
                self.state, self.plan, self.request_id, self.admission, self.identity
            ),
        )
        try:
            self.submit()
        except ApiError:
            await self._end_unstarted()
            raise

    async def _end_unstarted(self) -> None:
        """A started record whose sequences never ran still gets its end."""
        await self._append_final("error", [])

    # -- events -----------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        """(row, TextDelta | Finished) until every sequence finished; a failed sequence
        raises ApiError (the others are cancelled)."""
        from engine.generation import Finished

        remaining = len(self._pumps)
        while remaining:
            row, event = await self._queue.get()
            if isinstance(event, Exception):
                self.failed = True
                self.cancel()
                raise _engine_error(event)
            if isinstance(event, Finished):
                remaining -= 1
            yield row, event

    async def collect(self) -> list[Any]:
        async for _ in self.events():
            pass
        return [r.result for r in self.rows]

    # -- end --------------------------------------------------------------------------------

    @property
    def revoked(self) -> dict[str, str]:
        entry = self.state.inflight.finish(self.request_id)
        if entry is not None:
            self._revoked = dict(entry.revoked)
        return getattr(self, "_revoked", {})

    async def _append_final(self, status: str, results: list[Any]) -> Entry:
        if results:
            completion = "".join(r.text for r in results) or None
        else:
            completion = "".join("".join(r.text) for r in self.rows) or None
        tokens = sum(r.tokens for r in self.rows)
        completion_tokens = sum(int(r.completion_tokens) for r in results) if results else tokens
        payload = records.final_payload(
            self.state,
            self.plan,
            request_id=self.request_id,
            admission=self.admission,
            identity=self.identity,
            results=results,
            revoked=self.revoked,
            narrowed=None if self.group is None else self.group.narrowed,
            status=status,
            duration_ms=(time.perf_counter() - self._t0) * 1000.0,
            completion_text=completion,
            started_seq=None if self.started is None else self.started.seq,
            completion_tokens=completion_tokens,
        )
        if self._engine_span is not None:
            self._engine_span.end()
            self._engine_span = None
        try:
            self.record = await records.append(
                self.state, kind=records.INFERENCE, principal=self.identity.id, payload=payload
            )
        finally:
            used = int(payload["prompt_tokens"]) + int(payload["completion_tokens"])
            if self.rate is not None:
                self.rate.release_soon(used)
            self._observe(payload, status, results)
        return self.record

    def _observe(self, payload: dict[str, Any], status: str, results: list[Any]) -> None:
        """The request's GenAI metrics and per-expert counters (gateway.telemetry)."""
        duration = time.perf_counter() - self._t0
        firsts = [r.first_token_at for r in results if getattr(r, "first_token_at", None)]
        first = min(firsts) if firsts else None
        self.state.telemetry.record_inference(
            operation=OPERATIONS.get(self.plan.endpoint, self.plan.endpoint),
            model=self.state.model_name,
            key_id=self.identity.key_id,
            input_tokens=int(payload["prompt_tokens"]),
            output_tokens=int(payload["completion_tokens"]),
            duration_s=duration,
            ttft_s=None if first is None else max(0.0, first - self._t0),
            usage=payload.get("usage") or {},
            status=status,
        )

    def status_of(self, results: list[Any]) -> str:
        return "cancelled" if any(r.finish_reason == "cancelled" for r in results) else "ok"

    async def finish(self) -> Entry:
        results = [r.result for r in self.rows]
        return await self._append_final(self.status_of(results), results)

    def cancel(self) -> None:
        for s in self.group.streams if self.group else ():
            s.cancel()

    def abandon(self) -> None:
        """The client went away (or the response failed) before the record: cancel the
        sequences and append the record (status cancelled, tokens so far) in a task."""
        if self.record is not None or self._closing is not None:
            return
        self.cancel()
        tasks: set[asyncio.Task[Any]] = self.state.stream_tasks
        self._closing = asyncio.get_running_loop().create_task(self._close_abandoned())
        tasks.add(self._closing)
        self._closing.add_done_callback(tasks.discard)

    async def _close_abandoned(self) -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*self._pumps, return_exceptions=True), 30)
        except TimeoutError:
            log.error("request %s: sequences did not end after cancel", self.request_id)
        results = [r.result for r in self.rows if r.result is not None]
        try:
            await self._append_final("error" if self.failed else "cancelled", results)
        except ApiError:
            log.error("request %s: the cancelled record could not be appended", self.request_id)
