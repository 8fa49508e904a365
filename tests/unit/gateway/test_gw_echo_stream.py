"""`echo` with `stream` on /v1/completions, through the official `openai` client: each
choice's prompt (its tokens and logprobs, the first null) comes first, then the generated
text; joined up, a stream says exactly what the plain reply says."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from gw_helpers import MODEL

PROMPT = "The quick brown"


@pytest.fixture
def client(gw_live: Any, gw_world: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=gw_live.base_url + "/v1", api_key=gw_world.keys["application"], max_retries=0
    )


def _joined(chunks: list[Any], index: int) -> dict[str, Any]:
    """One choice of a stream, its chunks joined as one reply would hold them."""
    out: dict[str, Any] = {
        "text": "",
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
        "finish_reason": None,
    }
    for chunk in chunks:
        for c in chunk.choices:
            if c.index != index:
                continue
            out["text"] += c.text
            if c.logprobs is not None:
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    out[name] += getattr(c.logprobs, name) or []
            if c.finish_reason is not None:
                out["finish_reason"] = c.finish_reason
    return out


async def test_echo_stream_sends_the_scored_prompt_first(client: openai.AsyncOpenAI) -> None:
    args: dict[str, Any] = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 4,
        "temperature": 0,
        "echo": True,
        "logprobs": 2,
        "n": 2,
    }
    plain = await client.completions.create(**args)
    stream = await client.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    for index in (0, 1):
        mine = [c for chunk in chunks for c in chunk.choices if c.index == index]
        first = mine[0]
        assert first.text == PROMPT and first.finish_reason is None
        assert first.logprobs is not None and first.logprobs.token_logprobs is not None
        assert first.logprobs.token_logprobs[0] is None  # nothing predicts the first token
        assert first.logprobs.text_offset is not None and first.logprobs.text_offset[0] == 0
        got = _joined(chunks, index)
        want = plain.choices[index]
        assert want.logprobs is not None
        assert got["text"] == want.text and got["text"].startswith(PROMPT)
        assert got["finish_reason"] == want.finish_reason
        assert got["tokens"] == want.logprobs.tokens
        assert got["text_offset"] == want.logprobs.text_offset
        assert got["token_logprobs"][0] is None
        assert got["token_logprobs"][1:] == pytest.approx(
            want.logprobs.token_logprobs[1:], abs=1e-5
        )
        assert len(got["top_logprobs"]) == len(want.logprobs.top_logprobs or [])
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.prompt_tokens == plain.usage.prompt_tokens  # type: ignore[union-attr]
    assert final.usage.completion_tokens == 8
    assert (final.model_extra or {})["flexgate"]["audit_seq"] > 0


async def test_echo_stream_without_logprobs_and_max_tokens_0(client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, stream=True
    )
    chunks = [chunk async for chunk in stream]
    texts = [c.text for chunk in chunks for c in chunk.choices if c.text]
    assert texts[0] == PROMPT and len(texts) > 1
    assert all(c.logprobs is None for chunk in chunks for c in chunk.choices)
    # scoring only: the prompt, then its finish, nothing generated
    stream = await client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=0,
        temperature=0,
        echo=True,
        logprobs=0,
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    got = _joined(chunks, 0)
    assert got["text"] == PROMPT and got["finish_reason"] == "length"
    assert got["token_logprobs"][0] is None
    assert len(got["token_logprobs"]) > 1
    assert all(isinstance(x, float) and x <= 0 for x in got["token_logprobs"][1:])
    plain = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=0, temperature=0, echo=True, logprobs=0
    )
    assert plain.choices[0].logprobs is not None
    assert got["token_logprobs"][1:] == pytest.approx(
        plain.choices[0].logprobs.token_logprobs[1:], abs=1e-5
    )
