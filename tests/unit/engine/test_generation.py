"""Generation on a tiny governed FlexOlmo: exactness, stopping, the window, usage, bad input."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import FlexOlmoForCausalLM

from engine.api import Engine, load_engine
from engine.checkpoints import build_tiny_checkpoint
from engine.errors import ExpertSetError
from engine.generation import Finished, GenerationResult, PromptError, TextDelta
from engine.routing import RoutingControl
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from tests.unit.engine.conftest import IDS, prune

EXPERTS = IDS

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def backend(tiny_dir: Path) -> Engine:
    return load_engine(tiny_dir)


@pytest.fixture(scope="module")
def sched(backend: Engine) -> Iterator[Scheduler]:
    s = Scheduler(backend, max_batch_size=8)
    yield s
    s.close()


def _ids(backend: Engine, text: str) -> list[int]:
    return list(backend.tokenizer(text)["input_ids"])


def _hf_greedy(ref: FlexOlmoForCausalLM, ids: list[int], n: int, allowed: Any = None) -> list[int]:
    """transformers' own FlexOlmoForCausalLM.generate, the experts outside ``allowed``
    physically deleted (the reference)."""
    keep = [i for i, e in enumerate(EXPERTS) if allowed is None or e in allowed]
    model = prune(ref, keep)
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, len(ids) :]]


def _usage_by_forward(
    backend: Engine, ids: list[int], allowed: Any = None
) -> dict[str, tuple[int, float]]:
    ctl = RoutingControl(backend.mask_for(allowed, 1))
    with torch.inference_mode():
        backend.model(input_ids=torch.tensor([ids]), routing=ctl)
    t, w = ctl.tokens[0].tolist(), ctl.weight[0].tolist()
    return {e: (int(t[i]), float(w[i])) for i, e in enumerate(EXPERTS)}


def _assert_usage_close(
    a: dict[str, tuple[int, float]] | None, b: dict[str, tuple[int, float]]
) -> None:
    assert a is not None
    assert a.keys() == b.keys()
    for e in a:
        assert a[e][0] == b[e][0], (e, a, b)
        assert a[e][1] == pytest.approx(b[e][1], abs=1e-4), (e, a, b)


@pytest.mark.parametrize(
    "allowed", [None, ("public", "code"), ("math",), ("news", "public", "math")]
)
def test_greedy_matches_transformers_generate_on_the_pruned_model(
    backend: Engine,
    sched: Scheduler,
    allowed: Any,
    tiny_dir: Path,
    reference_for: Callable[[Path], FlexOlmoForCausalLM],
) -> None:
    ids = _ids(backend, "The data owner trains")
    res = sched.generate(ids, GREEDY, allowed=allowed)
    assert list(res.token_ids) == _hf_greedy(reference_for(tiny_dir), ids, 12, allowed)
    assert res.finish_reason == "length"
    assert res.prompt_tokens == len(ids) and res.completion_tokens == 12
    assert res.allowed == tuple(e for e in EXPERTS if allowed is None or e in allowed)
    assert res.narrowed == ()


def test_usage_covers_prompt_and_generated_tokens_and_excluded_experts_are_zero(
    backend: Engine, sched: Scheduler
) -> None:
    ids = _ids(backend, "def add(a, b):")
    allowed = ("public", "news", "math")
    res = sched.generate(ids, GREEDY, allowed=allowed)
    assert res.usage is not None
    assert res.usage["code"] == (0, 0.0)
    layers = backend.model.config.num_hidden_layers
    total = sum(t for t, _ in res.usage.values())
    assert total == (res.prompt_tokens + res.completion_tokens - 1) * layers * 2
    # exactly what one forward pass over every processed position accounts
    expected = _usage_by_forward(backend, ids + list(res.token_ids[:-1]), allowed)
    _assert_usage_close(res.usage, expected)


def test_text_is_the_decoded_completion(backend: Engine, sched: Scheduler) -> None:
    res = sched.generate("Shall I compare thee", GREEDY)
    decoded = backend.tokenizer.decode(list(res.token_ids), skip_special_tokens=True)
    assert res.text == decoded


def test_stop_string_ends_generation_and_is_cut(backend: Engine, sched: Scheduler) -> None:
    prompt = "The quick brown fox"
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = sched.generate(prompt, params)
    text = full.text
    stop = text[5:8]
    assert stop and stop in text
    cut = text.index(stop)
    res = sched.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=(stop,))
    )
    assert res.finish_reason == "stop" and res.stop_string == stop
    assert res.text == text[:cut]
    assert res.completion_tokens < full.completion_tokens
    assert list(res.token_ids) == list(full.token_ids[: res.completion_tokens])


def test_eos_ends_generation(backend: Engine, sched: Scheduler) -> None:
    ids = _ids(backend, "Permission is hereby granted")
    full = sched.generate(ids, GREEDY)
    eos = full.token_ids[4]
    first = full.token_ids.index(eos)
    config = backend.model.config
    old = config.eos_token_id, backend.model.generation_config.eos_token_id
    config.eos_token_id = backend.model.generation_config.eos_token_id = eos
    try:
        res = sched.generate(ids, SamplingParams(temperature=0.0, max_tokens=12))
        ignored = sched.generate(ids, GREEDY)
    finally:
        config.eos_token_id, backend.model.generation_config.eos_token_id = old
    assert res.finish_reason == "stop" and res.stop_string is None
    assert res.token_ids == full.token_ids[: first + 1]  # the EOS token is reported...
    expected = backend.tokenizer.decode(list(full.token_ids[:first]), skip_special_tokens=True)
    assert res.text == expected  # ...but adds no text
    assert ignored.token_ids == full.token_ids


def test_generation_stops_at_the_context_window(tmp_path: Path) -> None:
    small = load_engine(build_tiny_checkpoint(tmp_path, IDS, max_position_embeddings=24))
    s = Scheduler(small)
    try:
        ids = list(range(10, 30))  # 20 tokens
        res = s.generate(ids, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
        assert res.finish_reason == "length" and res.completion_tokens == 4
        res = s.generate(
            [*ids, 1, 2, 3], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
        )
        assert res.completion_tokens == 1
        with pytest.raises(PromptError, match="context window"):
            s.generate(list(range(10, 34)), GREEDY)
        with pytest.raises(PromptError, match="24 tokens"):
            s.generate(list(range(10, 34)), GREEDY)
    finally:
        s.close()


@pytest.mark.parametrize(
    ("prompt", "allowed", "error", "match"),
    [
        ("", None, PromptError, "empty"),
        ([], None, PromptError, "empty"),
        ([5, 100000], None, PromptError, "vocabulary"),
        ([5, -1], None, PromptError, "vocabulary"),
        ("hi", ("public", "nope"), ExpertSetError, "nope"),
        ("hi", (), ExpertSetError, "empty"),
    ],
)
def test_bad_requests_fail_before_compute(
    backend: Engine, prompt: Any, allowed: Any, error: type[Exception], match: str
) -> None:
    calls = 0
    real_forward = backend.model.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real_forward(*args, **kwargs)

    s = Scheduler(backend)
    backend.model.forward = counting
    try:
        with pytest.raises(error, match=match):
            s.generate(prompt, GREEDY, allowed=allowed)
    finally:
        del backend.model.forward
        s.close()
    assert calls == 0


def test_seeded_sampling_is_reproducible(backend: Engine, sched: Scheduler) -> None:
    params = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True
    )
    a = sched.generate("Theorem: for every", params)
    b = sched.generate("Theorem: for every", params)
    assert a.token_ids == b.token_ids
    c = sched.generate(
        "Theorem: for every",
        SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True),
    )
    assert c.token_ids != a.token_ids


def test_events_concatenate_to_the_result(backend: Engine, sched: Scheduler) -> None:
    events: list[Any] = []
    done: list[GenerationResult] = []
    import threading

    finished = threading.Event()

    def sink(ev: Any) -> None:
        events.append(ev)
        if isinstance(ev, Finished):
            done.append(ev.result)
            finished.set()

    sched.submit("A data owner", SamplingParams(temperature=0.0, max_tokens=20, stop=("e",)), sink)
    assert finished.wait(30)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert isinstance(events[-1], Finished)
    res = done[0]
    assert "".join(d.text for d in deltas) == res.text
    ids = [i for d in deltas for i in d.token_ids]
    assert ids == list(res.token_ids[: len(ids)])


def test_unrolled_decoding_equals_the_model_call(
    backend: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import engine.generation as generation

    assert generation.DecodeBatch(backend)._fast_path  # the governed model is unrolled
    prompts = [("The quick brown fox", None), ("Shall I", ("math",)), ("A", ("code", "news"))]

    def run() -> list[GenerationResult]:
        s = Scheduler(backend)
        results: dict[int, GenerationResult] = {}
        all_done = threading.Semaphore(0)

        def sink_for(i: int) -> Any:
            def sink(ev: Any) -> None:
                if isinstance(ev, Finished):
                    results[i] = ev.result
                    all_done.release()

            return sink

        try:
            for i, (p, a) in enumerate(prompts):
                s.submit(p, GREEDY, sink_for(i), allowed=a)
            for _ in prompts:
                assert all_done.acquire(timeout=60)
        finally:
            s.close()
        return [results[i] for i in range(len(prompts))]

    fast = run()
    monkeypatch.setattr(generation, "_plain_governed_forward", lambda model: False)
    assert not generation.DecodeBatch(backend)._fast_path
    slow = run()
    for f, s in zip(fast, slow, strict=True):
        assert f.finish_reason == s.finish_reason == "length"
        assert f.token_ids == s.token_ids
        assert f.usage is not None and s.usage is not None
        for e in EXPERTS:
            assert f.usage[e][0] == s.usage[e][0]
            assert f.usage[e][1] == pytest.approx(s.usage[e][1], abs=1e-4)
