"""OpenAI parameters through HTTP: prompt forms, n and seeds, stop, echo, the flexgate block,
the ledger record, and every bad input a 4xx naming the problem with nothing appended."""

from __future__ import annotations

from typing import Any

import pytest
from gw_helpers import MODEL, assert_error, chat, completion, ledger_seq, records
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.inference.params import engine_supports_logprobs

needs_logprobs = pytest.mark.skipif(
    not engine_supports_logprobs(), reason="engine logprobs (wt-engine-lp) not merged yet"
)

Client = AsyncTestClient[Litestar]


async def post(client: Client, world: Any, path: str, body: Any, **kw: Any) -> Any:
    kw.setdefault("headers", world.headers("application"))
    return await client.post(path, json=body, **kw)


async def test_completion_record_and_flexgate_block(gw_client: Client, gw_world: Any) -> None:
    before = await ledger_seq(gw_world.sm)
    r = await post(
        gw_client,
        gw_world,
        "/v1/completions",
        completion(user="u-7"),
        headers={**gw_world.headers("application"), "X-Request-Id": "mine-1"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-request-id"] == "mine-1"
    seq = int(r.headers["x-flexgate-audit-seq"])
    assert seq == before + 1 == body["flexgate"]["audit_seq"]
    assert body["object"] == "text_completion" and body["model"] == MODEL
    fg = body["flexgate"]
    assert fg["experts"] == {
        "allowed": ["public"],
        "excluded": {"code": "no-license", "news": "no-license", "math": "no-license"},
    }
    assert fg["usage"]["public"]["tokens"] > 0
    assert all(fg["usage"][e] == {"tokens": 0, "weight": 0.0} for e in ("code", "news", "math"))
    (rec,) = [e for e in await records(gw_world.sm, "inference") if e.seq == seq]
    p = rec.payload
    assert rec.principal == "app-1"
    assert p["request_id"] == "mine-1" and p["user"] == "u-7" and p["status"] == "ok"
    assert p["endpoint"] == "/v1/completions" and p["model"] == MODEL
    assert p["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert p["completion_tokens"] == body["usage"]["completion_tokens"] == 4
    assert p["usage"]["public"]["tokens"] == fg["usage"]["public"]["tokens"]
    assert "prompt" not in p and len(p["prompt_sha256"]) == 64


async def test_prompt_forms_and_choice_order(gw_client: Client, gw_world: Any) -> None:
    tok = await post(gw_client, gw_world, "/tokenize", {"prompt": "The quick brown"})
    ids = tok.json()["tokens"]
    det = await post(gw_client, gw_world, "/detokenize", {"tokens": ids})
    assert det.json() == {"prompt": "The quick brown"}
    text = (await post(gw_client, gw_world, "/v1/completions", completion())).json()
    by_ids = (await post(gw_client, gw_world, "/v1/completions", completion(prompt=ids))).json()
    assert by_ids["choices"][0]["text"] == text["choices"][0]["text"]
    many = await post(
        gw_client, gw_world, "/v1/completions", completion(prompt=[ids, [ids[0]], ids])
    )
    assert many.status_code == 200, many.text
    choices = many.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert choices[0]["text"] == choices[2]["text"] == text["choices"][0]["text"]
    strs = await post(
        gw_client, gw_world, "/v1/completions", completion(prompt=["The quick brown", "Hello"])
    )
    assert strs.json()["choices"][0]["text"] == text["choices"][0]["text"]
    assert strs.json()["usage"]["prompt_tokens"] == len(ids) + len(
        (await post(gw_client, gw_world, "/tokenize", {"prompt": "Hello"})).json()["tokens"]
    )


async def test_n_and_seed(gw_client: Client, gw_world: Any) -> None:
    body = completion(n=3, temperature=1.0, seed=11, max_tokens=6)
    a = (await post(gw_client, gw_world, "/v1/completions", body)).json()
    b = (await post(gw_client, gw_world, "/v1/completions", body)).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert len({c["text"] for c in a["choices"]}) > 1  # derived seeds differ per choice
    assert a["usage"]["completion_tokens"] == 18
    c = (
        await post(gw_client, gw_world, "/v1/chat/completions", chat(n=2, temperature=1.0, seed=3))
    ).json()
    assert [ch["index"] for ch in c["choices"]] == [0, 1]
    assert c["choices"][0]["message"]["role"] == "assistant"


async def test_stop_strings(gw_client: Client, gw_world: Any) -> None:
    full = (await post(gw_client, gw_world, "/v1/completions", completion(max_tokens=12))).json()
    text = full["choices"][0]["text"]
    cut = text[2:4]
    if not cut.strip():
        pytest.skip("generated text too short to cut")
    r = (
        await post(
            gw_client, gw_world, "/v1/completions", completion(max_tokens=12, stop=[cut, "zzzz"])
        )
    ).json()
    assert r["choices"][0]["text"] == text[: text.index(cut)]
    assert r["choices"][0]["finish_reason"] == "stop"


async def test_stream_completion_records_started_then_inference(
    gw_client: Client, gw_world: Any
) -> None:
    r = await post(
        gw_client,
        gw_world,
        "/v1/completions",
        completion(stream=True, max_tokens=5, stream_options={"include_usage": True}),
    )
    assert r.status_code == 200
    lines = [ln for ln in r.text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    final = chunks[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 5
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    plain = (await post(gw_client, gw_world, "/v1/completions", completion(max_tokens=5))).json()
    assert text == plain["choices"][0]["text"]
    started_seq = int(r.headers["x-flexgate-audit-started-seq"])
    (started,) = [
        e for e in await records(gw_world.sm, "inference.started") if e.seq == started_seq
    ]
    assert started.payload["experts_allowed"] == ["public"]
    assert started.payload["worker"]["pid"] > 0
    (rec,) = [
        e
        for e in await records(gw_world.sm, "inference")
        if e.seq == final["flexgate"]["audit_seq"]
    ]
    assert rec.payload["started_seq"] == started_seq and rec.payload["status"] == "ok"


@needs_logprobs
async def test_logprobs_and_echo(gw_client: Client, gw_world: Any) -> None:
    r = await post(
        gw_client, gw_world, "/v1/completions", completion(logprobs=2, echo=True, max_tokens=3)
    )
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    lp = ch["logprobs"]
    n_prompt = len(
        (await post(gw_client, gw_world, "/tokenize", {"prompt": "The quick brown"})).json()[
            "tokens"
        ]
    )
    assert len(lp["tokens"]) == n_prompt + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(2 <= len(t) <= 3 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and ch["text"].startswith("The quick brown")
    # max_tokens 0 with echo: scoring a text, nothing generated
    z = await post(
        gw_client, gw_world, "/v1/completions", completion(logprobs=0, echo=True, max_tokens=0)
    )
    assert z.status_code == 200, z.text
    zc = z.json()["choices"][0]
    assert zc["text"] == "The quick brown" and len(zc["logprobs"]["tokens"]) == n_prompt
    assert zc["logprobs"]["token_logprobs"][1:] == lp["token_logprobs"][1:n_prompt]
    c = await post(gw_client, gw_world, "/v1/chat/completions", chat(logprobs=True, top_logprobs=3))
    content = c.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(t["top_logprobs"]) == 3 for t in content)


BAD: list[tuple[str, Any, int, str | None]] = [
    ("/v1/completions", completion(model="gpt-4"), 404, "model"),
    ("/v1/completions", completion(n=0), 400, "n"),
    ("/v1/completions", completion(n=17), 400, "n"),
    ("/v1/completions", completion(logprobs=6), 400, "logprobs"),
    ("/v1/completions", completion(max_tokens=-1), 400, "max_tokens"),
    ("/v1/completions", completion(max_tokens=10**6), 400, "max_tokens"),
    ("/v1/completions", completion(max_tokens=0), 400, "max_tokens"),
    ("/v1/completions", completion(max_tokens="4"), 400, "max_tokens"),
    ("/v1/completions", completion(prompt=""), 400, "prompt"),
    ("/v1/completions", completion(prompt=[]), 400, "prompt"),
    ("/v1/completions", completion(prompt=[[]]), 400, "prompt"),
    ("/v1/completions", completion(prompt=[1, "a"]), 400, "prompt"),
    ("/v1/completions", completion(prompt=[10**6]), 400, "prompt"),
    ("/v1/completions", completion(prompt=[-1]), 400, "prompt"),
    ("/v1/completions", completion(prompt="word " * 1200), 400, "prompt"),
    ("/v1/completions", completion(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("/v1/completions", completion(stop=[""]), 400, "stop"),
    ("/v1/completions", completion(temperature=3), 400, "temperature"),
    ("/v1/completions", completion(top_p=0), 400, "top_p"),
    ("/v1/completions", completion(suffix="x"), 400, "suffix"),
    ("/v1/completions", completion(logit_bias={"1": 2}), 400, "logit_bias"),
    ("/v1/completions", completion(presence_penalty=0.5), 400, "presence_penalty"),
    ("/v1/completions", completion(frequency_penalty=1), 400, "frequency_penalty"),
    ("/v1/completions", completion(best_of=3), 400, "best_of"),
    ("/v1/completions", completion(wibble=1), 400, "wibble"),
    ("/v1/completions", completion(stream_options={"include_usage": True}), 400, "stream_options"),
    ("/v1/completions", completion(experts={"only": ["nope"]}), 400, "experts"),
    (
        "/v1/completions",
        completion(experts={"only": ["public"], "exclude": ["code"]}),
        400,
        "experts",
    ),
    ("/v1/completions", completion(experts={"drop": ["code"]}), 400, "drop"),
    ("/v1/completions", completion(purpose="Bad Purpose!"), 400, "purpose"),
    ("/v1/completions", {"prompt": "x"}, 400, None),
    ("/v1/chat/completions", chat(messages=[]), 400, "messages"),
    (
        "/v1/chat/completions",
        chat(messages=[{"role": "robot", "content": "x"}]),
        400,
        "messages[0].role",
    ),
    ("/v1/chat/completions", chat(tools=[{"type": "function"}]), 400, "tools"),
    ("/v1/chat/completions", chat(tool_choice="auto"), 400, "tool_choice"),
    ("/v1/chat/completions", chat(response_format={"type": "json_object"}), 400, "response_format"),
    ("/v1/chat/completions", chat(top_logprobs=21, logprobs=True), 400, "top_logprobs"),
    ("/v1/chat/completions", chat(top_logprobs=2), 400, "top_logprobs"),
    ("/v1/chat/completions", chat(max_tokens=4, max_completion_tokens=5), 400, "max_tokens"),
    (
        "/v1/chat/completions",
        {**chat(max_completion_tokens=10**6), "max_tokens": None},
        400,
        "max_completion_tokens",
    ),
    ("/v1/chat/completions", chat(max_tokens=0), 400, "max_tokens"),
    ("/v1/chat/completions", chat(model="x"), 404, "model"),
    (
        "/v1/chat/completions",
        chat(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        ),
        400,
        None,
    ),
    ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
]


async def test_bad_input_is_a_named_4xx_and_appends_nothing(
    gw_client: Client, gw_world: Any
) -> None:
    before = await ledger_seq(gw_world.sm)
    for path, body, status, param in BAD:
        r = await post(gw_client, gw_world, path, body)
        try:
            assert_error(r, status, param)
        except AssertionError as exc:
            raise AssertionError(f"{path} {body}: {exc}") from None
    hdr = {**gw_world.headers("application"), "content-type": "application/json"}
    r = await gw_client.post("/v1/completions", content=b'{"model": ', headers=hdr)
    assert_error(r, 400)
    r = await gw_client.post("/v1/completions", content=b"[1, 2]", headers=hdr)
    assert_error(r, 400)
    huge = b'{"model": "m", "prompt": "' + b"a" * 1_100_000 + b'"}'
    r = await gw_client.post("/v1/completions", content=huge, headers=hdr)
    assert_error(r, 413)
    assert await ledger_seq(gw_world.sm) == before


@needs_logprobs
async def test_echo_logprobs_equal_the_pruned_models_log_softmax(
    gw_client: Client, gw_world: Any, gw_engine: Any
) -> None:
    import threading

    import torch

    r = await post(
        gw_client,
        gw_world,
        "/v1/completions",
        completion(prompt="The quick brown fox", logprobs=0, echo=True, max_tokens=0),
    )
    lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    ids = (await post(gw_client, gw_world, "/tokenize", {"prompt": "The quick brown fox"})).json()[
        "tokens"
    ]
    out: list[Any] = []

    def reference() -> None:  # torch on a thread that ends (DESIGN.md, "Threads")
        logits = gw_engine.forward(torch.tensor([ids]), allowed=["public"]).logits[0]
        out.append(torch.log_softmax(logits.float(), dim=-1))

    thread = threading.Thread(target=reference)
    thread.start()
    thread.join()
    (lsm,) = out
    assert lps[0] is None
    for j in range(1, len(ids)):
        assert abs(lps[j] - float(lsm[j - 1, ids[j]])) < 1e-5
