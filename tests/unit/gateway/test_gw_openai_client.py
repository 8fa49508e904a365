"""The official `openai` client, unchanged, against a real server (uvicorn on loopback):
only base_url and the key differ from calling OpenAI; FlexGate's extras go in extra_body."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from gw_helpers import MODEL, grant

from gateway.inference.params import engine_supports_logprobs


@pytest.fixture
def client(gw_live: Any, gw_world: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=gw_live.base_url + "/v1", api_key=gw_world.keys["application"], max_retries=0
    )


async def test_models(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    (card,) = models.data
    assert card.id == MODEL
    extra = card.model_extra or {}
    assert extra["max_model_len"] > 0
    assert [e["id"] for e in extra["experts"]] == ["public", "code", "news", "math"]


async def test_completions_plain_tokens_and_n(client: openai.AsyncOpenAI, gw_world: Any) -> None:
    await grant(gw_world.sm, "code")
    r = await client.completions.create(
        model=MODEL, prompt="The quick", max_tokens=5, temperature=0, user="end-user-1"
    )
    assert r.choices[0].finish_reason == "length" and r.usage is not None
    assert r.usage.completion_tokens == 5
    fg = (r.model_extra or {})["flexgate"]
    assert fg["experts"]["allowed"] == ["public", "code"]
    ids = [264, 80, 80]
    r2 = await client.completions.create(
        model=MODEL, prompt=[ids, ids[:2]], max_tokens=3, temperature=0, n=2
    )
    assert [c.index for c in r2.choices] == [0, 1, 2, 3]
    assert r2.choices[0].text == r2.choices[1].text  # greedy: the same per prompt
    r3 = await client.completions.create(
        model=MODEL,
        prompt="The quick",
        max_tokens=5,
        temperature=0,
        extra_body={"experts": {"exclude": ["code"]}, "purpose": "general"},
    )
    fg3 = (r3.model_extra or {})["flexgate"]
    assert fg3["experts"]["excluded"]["code"] == "caller-excluded"


async def test_chat_and_streams(client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_completion_tokens=4,
        temperature=0,
    )
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 4
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, last = [], None
    async for chunk in stream:
        last = chunk
        parts.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(parts) == text
    assert last is not None and last.usage is not None and last.usage.completion_tokens == 4
    assert (last.model_extra or {})["flexgate"]["audit_seq"] > 0
    cstream = await client.completions.create(
        model=MODEL, prompt="The quick", max_tokens=4, temperature=0, stream=True
    )
    seen = [c.choices[0].text async for c in cstream if c.choices]
    plain = await client.completions.create(
        model=MODEL, prompt="The quick", max_tokens=4, temperature=0
    )
    assert "".join(seen) == plain.choices[0].text


async def test_errors_are_openai_errors(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        await client.completions.create(model="gpt-4", prompt="x")
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert br.value.param == "tools"
    bad = openai.AsyncOpenAI(base_url=client.base_url, api_key="fg_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()


@pytest.mark.skipif(not engine_supports_logprobs(), reason="engine logprobs not merged yet")
async def test_logprobs_and_echo(client: openai.AsyncOpenAI) -> None:
    r = await client.completions.create(
        model=MODEL, prompt="The quick brown", max_tokens=0, echo=True, logprobs=1
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    c = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
    )
    content = c.choices[0].logprobs.content
    assert content is not None and len(content) == 3
    assert all(len(t.top_logprobs) == 2 for t in content)
