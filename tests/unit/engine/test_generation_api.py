"""Engine.generate / Engine.stream: the public generation API over load_engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.api import Engine, load_engine
from engine.errors import ExpertSetError
from engine.generation import Finished, GenerationResult, PromptError, TextDelta
from engine.sampling import SamplingParams
from tests.unit.engine.conftest import IDS

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture(scope="module")
def eng(tiny_dir: Path) -> Iterator[Engine]:
    e = load_engine(tiny_dir)
    yield e
    e.close()


def test_generate_returns_a_typed_result(eng: Engine) -> None:
    res = eng.generate("The quick brown fox", temperature=0, max_tokens=6, ignore_eos=True)
    assert isinstance(res, GenerationResult)
    assert res.finish_reason == "length"
    assert res.completion_tokens == len(res.token_ids) == 6
    assert res.prompt_tokens == len(eng.tokenizer("The quick brown fox")["input_ids"])
    assert res.usage is not None and set(res.usage) == set(IDS)
    assert res.allowed == IDS and res.narrowed == ()
    again = eng.generate("The quick brown fox", temperature=0, max_tokens=6, ignore_eos=True)
    assert again.token_ids == res.token_ids and again.request_id != res.request_id


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.01}, ValueError, "top_p"),
        ({"top_k": -2}, ValueError, "top_k"),
        ({"max_tokens": 0}, ValueError, "max_tokens"),
        ({"stop": [""]}, ValueError, "stop"),
        ({"prompt": ""}, PromptError, "empty"),
        ({"prompt": list(range(5, 300))}, PromptError, "context window"),
        ({"allowed": ["public", "ghost"]}, ExpertSetError, "ghost"),
        ({"allowed": []}, ExpertSetError, "empty"),
        ({"allowed": "public"}, TypeError, "single string"),
    ],
)
def test_bad_input_is_a_clear_error_before_compute(
    eng: Engine, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    prompt = kwargs.pop("prompt", "hello")
    with pytest.raises(error, match=match):
        eng.generate(prompt, **kwargs)


async def test_stream_yields_deltas_then_the_result(eng: Engine) -> None:
    stream = eng.stream("Shall I compare thee", temperature=0, max_tokens=10, ignore_eos=True)
    events = [ev async for ev in stream]
    assert all(isinstance(ev, TextDelta) for ev in events[:-1])
    assert isinstance(events[-1], Finished)
    res = events[-1].result
    assert "".join(ev.text for ev in events[:-1]) == res.text
    sync = eng.generate("Shall I compare thee", temperature=0, max_tokens=10, ignore_eos=True)
    assert sync.token_ids == res.token_ids


def test_an_expert_unloaded_mid_run_is_revoked_at_the_next_step(eng: Engine) -> None:
    """The unload is queued while a step holds the model lock; the busy scheduler lets it go
    before its next step (not when the request ends), and the running request loses the
    expert from then on."""
    events: list[Any] = []
    first, release, done = threading.Event(), threading.Event(), threading.Event()
    tokens_at_unload: list[int] = []

    def sink(ev: Any) -> None:
        events.append(ev)
        if isinstance(ev, TextDelta) and not first.is_set():
            first.set()
            assert release.wait(10)  # hold this step (and the model lock) until the unload waits
        if isinstance(ev, Finished | BaseException):
            done.set()

    def unload() -> None:
        eng.unload_expert("news")
        tokens_at_unload.append(
            sum(len(e.token_ids) for e in list(events) if isinstance(e, TextDelta))
        )

    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    eng.scheduler.submit("The", params, sink)
    try:
        assert first.wait(10)
        unloader = threading.Thread(target=unload)
        unloader.start()
        deadline = time.monotonic() + 10
        while not eng.maintenance_pending and time.monotonic() < deadline:
            time.sleep(0.001)
        assert eng.maintenance_pending
        release.set()
        unloader.join(10)
        assert not unloader.is_alive()
        assert done.wait(60)
        last = events[-1]
        assert isinstance(last, Finished), last
        res = last.result
        assert res.finish_reason == "length" and res.completion_tokens == 200
        assert "news" in res.narrowed and "news" not in res.allowed
        assert tokens_at_unload and tokens_at_unload[0] <= 3, tokens_at_unload
        assert not eng.maintenance_pending
        later = eng.generate("The", temperature=0, max_tokens=3)
        assert later.allowed == ("public", "code", "math")
        assert later.usage is not None and later.usage["news"] == (0, 0.0)
        with pytest.raises(ExpertSetError, match="unloaded"):
            eng.generate("The", allowed=["news"])
    finally:
        release.set()
        eng.load_expert("news")
    assert eng.generate("The", max_tokens=2, allowed=["news"]).allowed == ("news",)


def test_a_single_stop_string_is_not_split_into_characters(eng: Engine) -> None:
    full = eng.generate("The quick brown fox", temperature=0, max_tokens=20, ignore_eos=True)
    stop = full.text[6:9]
    res = eng.generate(
        "The quick brown fox", temperature=0, max_tokens=20, ignore_eos=True, stop=stop
    )
    assert res.stop_string == stop
    assert res.text == full.text[: full.text.index(stop)]


def test_sampling_as_params_or_keywords_not_both(eng: Engine) -> None:
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    a = eng.generate("The quick", params)
    b = eng.generate("The quick", temperature=0, max_tokens=5, ignore_eos=True)
    assert a.token_ids == b.token_ids and a.completion_tokens == 5
    with pytest.raises(TypeError, match="max_tokens"):
        eng.generate("The quick", params, max_tokens=3)


def test_a_process_that_generated_exits_cleanly(tiny_dir: Path) -> None:
    """The scheduler thread is stopped at exit; a daemon thread left inside torch during
    interpreter finalisation aborts the process ("terminate called ...")."""
    import subprocess
    import sys

    code = (
        "from engine.api import load_engine\n"
        f"eng = load_engine({str(tiny_dir)!r})\n"
        "print(eng.generate('The', max_tokens=3, temperature=0).completion_tokens)\n"
    )
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("3")
    assert "terminate called" not in proc.stderr
