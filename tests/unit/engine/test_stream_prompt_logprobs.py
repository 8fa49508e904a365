"""A stream that asked for prompt log-probabilities gets them on its first delta, once (so a
server can send the scored prompt before the generated text: `echo` with `stream`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.api import Engine, load_engine
from engine.generation import Finished, TextDelta
from engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def eng(tiny_dir: Path) -> Iterator[Engine]:
    e = load_engine(tiny_dir)
    yield e
    e.close()


async def test_the_first_delta_carries_the_prompt_logprobs_once(eng: Engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=2, ignore_eos=True)
    events = [ev async for ev in eng.stream("A data owner", params)]
    deltas = [ev for ev in events if isinstance(ev, TextDelta)]
    final = events[-1]
    assert isinstance(final, Finished) and deltas
    assert final.result.prompt_logprobs is not None
    assert deltas[0].prompt_logprobs == final.result.prompt_logprobs
    assert deltas[0].prompt_logprobs[0] is None
    assert all(d.prompt_logprobs is None for d in deltas[1:])


async def test_deltas_carry_no_prompt_logprobs_unless_asked(eng: Engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=1, ignore_eos=True)
    events = [ev async for ev in eng.stream("A data owner", params)]
    assert all(ev.prompt_logprobs is None for ev in events if isinstance(ev, TextDelta))
