"""The scheduler: batching exactness, continuous batching, streaming, cancellation, narrowing."""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.cache_utils import DynamicCache

from engine import scheduler as scheduler_module
from engine.api import Engine, load_engine
from engine.errors import ExpertSetError
from engine.generation import Finished, GenerationResult, TextDelta
from engine.routing import RoutingControl
from engine.sampling import SamplingParams
from engine.scheduler import GenerationError, RequestControl, Scheduler
from tests.unit.engine.conftest import IDS

EXPERTS = IDS

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def backend(tiny_dir: Path) -> Engine:
    return load_engine(tiny_dir)


@pytest.fixture
def sched(backend: Engine) -> Iterator[Scheduler]:
    s = Scheduler(backend, max_batch_size=8)
    yield s
    s.close()


# Prompts of different lengths and allowed sets: 8 requests, 8 different sets.
CASES: list[tuple[str, Any]] = [
    ("The", None),
    ("The quick brown fox jumps over the lazy dog and keeps running", ("public",)),
    ("def add(a, b):", ("code", "math")),
    ("Shall I compare thee", ("news", "public", "math")),
    ("Theorem: for every natural number n, the sum", ("math",)),
    ("The stock market rose", ("code",)),
    ("Permission is", ("public", "code", "news")),
    ("A", ("news", "math")),
]


class Collector:
    """A thread-safe sink that records events and signals the end."""

    def __init__(self, on_event: Any = None) -> None:
        self.events: list[Any] = []
        self.done = threading.Event()
        self.on_event = on_event

    def __call__(self, ev: Any) -> None:
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(self, ev)
        if isinstance(ev, Finished | BaseException):
            self.done.set()

    @property
    def result(self) -> GenerationResult:
        assert self.done.wait(60), "request did not finish"
        last = self.events[-1]
        assert isinstance(last, Finished), last
        return last.result

    @property
    def n_tokens(self) -> int:
        return sum(len(e.token_ids) for e in self.events if isinstance(e, TextDelta))


def test_batched_greedy_equals_alone(backend: Engine, sched: Scheduler) -> None:
    alone = [sched.generate(p, greedy(10 + i), allowed=a) for i, (p, a) in enumerate(CASES)]
    sinks = [Collector() for _ in CASES]
    for i, ((p, a), sink) in enumerate(zip(CASES, sinks, strict=True)):
        sched.submit(p, greedy(10 + i), sink, allowed=a)
    batched = [s.result for s in sinks]
    for x, y in zip(alone, batched, strict=True):
        assert x.token_ids == y.token_ids
        assert x.text == y.text
        assert x.allowed == y.allowed
        assert x.usage is not None and y.usage is not None
        for e in EXPERTS:
            assert x.usage[e][0] == y.usage[e][0]
            assert x.usage[e][1] == pytest.approx(y.usage[e][1], abs=1e-4)


def test_seeded_sampling_is_the_same_alone_and_batched(sched: Scheduler) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=5, max_tokens=12, ignore_eos=True)
    alone = sched.generate("The stock market", params, allowed=("news", "public"))
    sinks = [Collector() for _ in range(4)]
    sched.submit("The stock market", params, sinks[0], allowed=("news", "public"))
    for i, s in enumerate(sinks[1:]):
        sched.submit("Other prompts go here", SamplingParams(temperature=1.0, seed=i), s)
    assert sinks[0].result.token_ids == alone.token_ids


def test_newcomers_join_a_running_batch(sched: Scheduler) -> None:
    """A long request runs; a longer prompt joins, finishes first (its blocks are freed),
    another joins; all equal their outputs alone."""
    long_p, long_n = "The", 120
    joiners = [
        (
            "The quick brown fox jumps over the lazy dog. A data owner trains an expert",
            ("public", "code"),
            8,
        ),
        ("Shall I", ("math",), 6),
    ]
    alone_long = sched.generate(long_p, greedy(long_n), allowed=("news",))
    alone_j = [sched.generate(p, greedy(n), allowed=a) for p, a, n in joiners]

    started = threading.Event()
    long_sink = Collector(lambda c, ev: started.set() if c.n_tokens >= 5 else None)
    sched.submit(long_p, greedy(long_n), long_sink, allowed=("news",))
    assert started.wait(30)
    first = Collector()
    sched.submit(joiners[0][0], greedy(joiners[0][2]), first, allowed=joiners[0][1])
    first_result = first.result
    tokens_when_first_done = long_sink.n_tokens
    second = Collector()
    sched.submit(joiners[1][0], greedy(joiners[1][2]), second, allowed=joiners[1][1])
    second_result = second.result
    assert not long_sink.done.is_set(), "the joiners waited for the running request"
    assert tokens_when_first_done < long_n
    assert long_sink.result.token_ids == alone_long.token_ids
    assert first_result.token_ids == alone_j[0].token_ids
    assert second_result.token_ids == alone_j[1].token_ids


def test_more_requests_than_slots_all_complete(backend: Engine) -> None:
    s = Scheduler(backend, max_batch_size=2)
    try:
        alone = [s.generate(p, greedy(8), allowed=a) for p, a in CASES[:5]]
        sinks = [Collector() for _ in range(5)]
        for (p, a), sink in zip(CASES[:5], sinks, strict=True):
            s.submit(p, greedy(8), sink, allowed=a)
        assert [k.result.token_ids for k in sinks] == [r.token_ids for r in alone]
    finally:
        s.close()


def test_cancel_frees_the_slot(sched: Scheduler) -> None:
    sink = Collector(lambda c, ev: control.cancel() if c.n_tokens >= 3 else None)
    control: RequestControl = sched.submit("The", greedy(500), sink)
    res = sink.result
    assert res.finish_reason == "cancelled"
    assert 3 <= res.completion_tokens < 500
    deadline = time.monotonic() + 5
    while sched.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sched.running == 0
    assert sched.generate("The", greedy(3)).completion_tokens == 3


def _reference_with_narrowing(
    backend: Engine, prompt: list[int], tokens: list[int], n: int, narrowed_to: Any
) -> tuple[list[int], dict[str, tuple[int, float]]]:
    """Greedy tokens and usage when positions up to token n-1 use every expert and the
    positions from generated token n on use ``narrowed_to``."""
    cache = DynamicCache(config=backend.model.config)
    a = RoutingControl(backend.mask_for(None, 1))
    b = RoutingControl(backend.mask_for(narrowed_to, 1))
    with torch.inference_mode():
        first = backend.model(
            input_ids=torch.tensor([prompt + tokens[: n - 1]]), past_key_values=cache, routing=a
        )
        second = backend.model(
            input_ids=torch.tensor([tokens[n - 1 : -1]]), past_key_values=cache, routing=b
        )
    predicted = first.logits[0, len(prompt) - 1 :].argmax(-1).tolist()
    predicted += second.logits[0].argmax(-1).tolist()
    t = (a.tokens + b.tokens)[0].tolist()
    w = (a.weight + b.weight)[0].tolist()
    return predicted, {e: (int(t[i]), float(w[i])) for i, e in enumerate(EXPERTS)}


@pytest.mark.parametrize(
    ("revoked", "left"),
    [(("code", "news"), ("public", "math")), (("public", "code", "news"), ("math",))],
)
def test_narrowing_mid_generation_applies_from_the_next_step(
    backend: Engine, sched: Scheduler, revoked: tuple[str, ...], left: tuple[str, ...]
) -> None:
    seen_at_narrowing: list[int] = []

    def narrow(c: Collector, ev: Any) -> None:
        if not seen_at_narrowing and c.n_tokens >= 4:
            seen_at_narrowing.append(c.n_tokens)
            assert control.revoke(revoked) == left

    sink = Collector(narrow)
    prompt = list(backend.tokenizer("A data owner trains")["input_ids"])
    control = sched.submit(prompt, greedy(16), sink)
    res = sink.result
    assert res.allowed == left
    assert res.narrowed == revoked
    n = seen_at_narrowing[0]
    predicted, usage = _reference_with_narrowing(backend, prompt, list(res.token_ids), n, left)
    assert predicted == list(res.token_ids)
    assert res.usage is not None
    for e in EXPERTS:
        assert res.usage[e][0] == usage[e][0], (e, res.usage, usage)
        assert res.usage[e][1] == pytest.approx(usage[e][1], abs=1e-4)
    # revoked experts were used before, and their usage stopped growing at the narrowing
    whole = _reference_with_narrowing(backend, prompt, list(res.token_ids), n, None)[1]
    assert any(res.usage[e][0] < whole[e][0] for e in revoked)


def test_narrowing_to_nothing_cancels_and_unknown_ids_are_refused(sched: Scheduler) -> None:
    errors: list[Exception] = []

    def narrow(c: Collector, ev: Any) -> None:
        if c.n_tokens >= 2 and not errors:
            try:
                control.narrow(["no-such-expert"])
            except ExpertSetError as exc:
                errors.append(exc)
            control.narrow(["math"])
            control.revoke(["math"])

    sink = Collector(narrow)
    control = sched.submit("The quick", greedy(200), sink, allowed=("public", "math"))
    res = sink.result
    assert errors and "no-such-expert" in str(errors[0])
    assert res.finish_reason == "cancelled"
    assert res.allowed == ()
    assert res.narrowed == ("public", "math")
    assert res.completion_tokens < 200


def test_a_model_failure_fails_the_batch_and_the_scheduler_survives(
    backend: Engine, sched: Scheduler
) -> None:
    layer = backend.model.model.layers[1]
    real = layer.forward
    calls = 0

    def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:  # a decoding step, after the prefill
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    layer.forward = flaky
    try:
        with pytest.raises(GenerationError, match="device lost"):
            sched.generate("The", greedy(10))
    finally:
        del layer.forward
    assert calls == 3
    assert sched.generate("The", greedy(4)).completion_tokens == 4


async def test_streaming_is_async_and_never_blocks_the_loop(
    backend: Engine, sched: Scheduler
) -> None:
    """Every model step runs off the event loop, and the loop keeps running during a step:
    the step waits, mid-stream, for a callback on the loop to release it (it would wait in
    vain if the step ran on, or blocked, the loop). Deterministic: no clock; the loop-gap
    figures are bench/engine.py --loop-gaps (docs/benchmarks.md)."""
    loop_thread = threading.get_ident()
    loop = asyncio.get_running_loop()
    layer = backend.model.model.layers[0]
    real = layer.forward
    step_threads: set[int] = set()
    calls = 0
    released = threading.Event()
    waited: list[bool] = []

    def held(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        step_threads.add(threading.get_ident())
        if calls == 5:  # a decoding step, well into the stream: only the loop can release it
            loop.call_soon_threadsafe(released.set)
            waited.append(released.wait(timeout=30))
        return real(*args, **kwargs)

    layer.forward = held
    try:
        stream = sched.stream("The quick brown", greedy(40))
        texts, final = [], None
        async for ev in stream:
            if isinstance(ev, TextDelta):
                texts.append(ev.text)
            else:
                final = ev.result
    finally:
        del layer.forward
    assert waited == [True]  # released by the loop while the step was in progress
    assert loop_thread not in step_threads and len(step_threads) == 1
    assert final is not None and final.completion_tokens == 40
    assert "".join(texts) == final.text
    assert stream.result == final


async def test_aclose_and_task_cancellation_free_the_slot(sched: Scheduler) -> None:
    stream = sched.stream("The", greedy(500))
    async for ev in stream:
        if isinstance(ev, TextDelta):
            break
    await stream.aclose()

    decoding = asyncio.Event()

    async def consume() -> None:
        async for ev in sched.stream("Shall", greedy(500)):
            if isinstance(ev, TextDelta):
                decoding.set()

    task = asyncio.create_task(consume())
    # cancel once it decodes: a fixed sleep let a fast machine finish the whole request first
    await asyncio.wait_for(decoding.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if sched.running == 0:
            break
        await asyncio.sleep(0.01)
    assert sched.running == 0
    res = await sched.stream("A", greedy(3)).collect()
    assert res.completion_tokens == 3


async def test_stream_narrowing_and_context_manager(sched: Scheduler) -> None:
    # 200 tokens: the narrowing must land before the request ends (the loop reacts to the
    # first delta while the scheduler keeps decoding)
    async with sched.stream("The data", greedy(200), allowed=("public", "code")) as stream:
        assert stream.allowed == ("public", "code")
        async for ev in stream:
            if isinstance(ev, TextDelta):
                stream.narrow(["public"])
            else:
                assert ev.result.allowed == ("public",)
                assert ev.result.narrowed == ("code",)
    assert stream.result is not None


def test_close_cancels_what_is_left(backend: Engine) -> None:
    s = Scheduler(backend)
    sink = Collector()
    s.submit("The", greedy(1000), sink)
    time.sleep(0.05)
    s.close()
    assert sink.result.finish_reason in ("cancelled", "length")
    with pytest.raises(RuntimeError, match="closed"):
        s.submit("The", greedy(2), Collector())


def test_text_prompts_from_many_threads_at_once(backend: Engine, sched: Scheduler) -> None:
    """Encoding on caller threads while the scheduler decodes must not trip the Rust
    tokenizer's borrow checks ("Already borrowed")."""
    expected = sched.generate("Shall I compare thee to a summer's day?", greedy(6))
    errors: list[BaseException] = []
    outs: list[tuple[int, ...]] = []

    def worker() -> None:
        try:
            for _ in range(5):
                r = sched.generate("Shall I compare thee to a summer's day?", greedy(6))
                outs.append(r.token_ids)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert outs == [expected.token_ids] * 30


def test_a_failing_sink_cancels_only_its_own_request(sched: Scheduler) -> None:
    def bad_sink(ev: Any) -> None:
        raise RuntimeError("client went away")

    good = Collector()
    sched.submit("The", greedy(40), bad_sink)
    sched.submit("The", greedy(40), good)
    assert good.result.completion_tokens == 40
    deadline = time.monotonic() + 5
    while sched.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sched.running == 0


def test_an_idle_scheduler_ends_its_thread_and_starts_one_again(
    backend: Engine, sched: Scheduler
) -> None:
    """An idle thread ends (freeing torch's OpenMP team, see IDLE_EXIT_S); the next request
    starts a new one and decodes exactly as before."""
    first = sched.generate("The quick brown fox", greedy(5))
    thread = sched._thread
    assert thread is not None
    thread.join(5 + 20 * scheduler_module.IDLE_EXIT_S)
    assert not thread.is_alive()
    assert sched._thread is None
    again = sched.generate("The quick brown fox", greedy(5))
    assert again.token_ids == first.token_ids
    assert sched._thread is not None and sched._thread is not thread


def test_no_request_is_lost_when_an_idle_thread_hands_over(
    backend: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submissions racing the idle thread's exit all complete, across many handovers."""
    monkeypatch.setattr(scheduler_module, "IDLE_EXIT_S", 0.0005)
    s = Scheduler(backend, max_batch_size=4)
    try:
        expected = s.generate("Permission is", greedy(2)).token_ids
        seen: list[threading.Thread] = []
        outs: list[tuple[int, ...]] = []
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            rng = random.Random(k)
            try:
                for _ in range(30):
                    time.sleep(rng.uniform(0, 0.003))
                    outs.append(s.generate("Permission is", greedy(2)).token_ids)
                    if (t := s._thread) is not None:
                        seen.append(t)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a request was lost at a handover"
        assert not errors, errors
        assert outs == [expected] * 120
        assert len({id(t) for t in seen}) > 1  # the thread did end and start again
    finally:
        s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.submit("The", greedy(2), Collector())


class _RacingInbox:
    """The scheduler's inbox, holding the idle thread between its timed-out wait and its
    exit until the test has submitted: the exact race a handover must survive."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.armed = False
        self.timed_out = threading.Event()
        self.submitted = threading.Event()

        self.idle_thread: threading.Thread | None = None
        self.after_timeout: list[str] = []  # inbox calls of the idle thread after its wait

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self._note("get")
        try:
            return self.inner.get(block, timeout)
        except queue.Empty:
            if self.armed and timeout is not None:
                self.armed = False
                self.idle_thread = threading.current_thread()
                self.timed_out.set()
                self.submitted.wait(5)
            raise

    def get_nowait(self) -> Any:
        self._note("get_nowait")
        return self.inner.get_nowait()

    def _note(self, call: str) -> None:
        if self.idle_thread is threading.current_thread():
            self.after_timeout.append(call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("submit_before_exit", [True, False])
def test_a_request_racing_the_idle_thread_exit_is_served(
    backend: Engine, submit_before_exit: bool
) -> None:
    """Submitted while the idle thread is between its timed-out wait and its decision to end
    (it must serve it), or after that decision (a new thread must serve it, and the old one
    must not touch the inbox on its way out)."""
    s = Scheduler(backend)
    inbox = _RacingInbox(s._inbox)
    s._inbox = inbox  # type: ignore[assignment]
    try:
        expected = s.generate("The", greedy(3)).token_ids
        inbox.armed = True  # the thread's next timed wait is its idle wait
        assert inbox.timed_out.wait(5)
        old = s._thread
        assert old is not None
        sink = Collector()
        if submit_before_exit:
            s.submit("The", greedy(3), sink)  # the old thread still owns the scheduler here
            inbox.submitted.set()
        else:
            inbox.submitted.set()
            old.join(5)
            assert not old.is_alive() and s._thread is None
            s.submit("The", greedy(3), sink)
        assert sink.result.token_ids == expected
        if not submit_before_exit:
            assert inbox.after_timeout == [], inbox.after_timeout
            assert s._thread is not old
    finally:
        s.close()
