"""Log-probabilities: generated tokens (with top-k alternatives) and prompt tokens, exact
against transformers' FlexOlmoForCausalLM with the disallowed experts physically deleted, in
mixed batches; streamed in step with the tokens; free for requests that do not ask; usage
unchanged; scoring a prompt with max_tokens=0."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import FlexOlmoForCausalLM

import engine
from engine.api import Engine, load_engine
from engine.checkpoints import build_tiny_checkpoint
from engine.generation import Finished, GenerationResult, PromptError, TextDelta, TokenLogprob
from engine.logprobs import MAX_LOGPROBS
from engine.routing import RoutingControl
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from tests.unit.engine.conftest import IDS, prune

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

ATOL = 1e-5
Ref = Callable[[Path], FlexOlmoForCausalLM]


@pytest.fixture(scope="module")
def eng(tiny_dir: Path) -> Iterator[Engine]:
    e = load_engine(tiny_dir)
    yield e
    e.close()


@pytest.fixture(scope="module")
def pruned(tiny_dir: Path, reference_for: Ref) -> Callable[[Any], FlexOlmoForCausalLM]:
    """The reference model with the experts outside ``allowed`` deleted (cached per set)."""
    cache: dict[tuple[str, ...], FlexOlmoForCausalLM] = {}

    def get(allowed: Any) -> FlexOlmoForCausalLM:
        key = tuple(e for e in IDS if allowed is None or e in allowed)
        if key not in cache:
            model = prune(reference_for(tiny_dir), [IDS.index(e) for e in key])
            model.generation_config.eos_token_id = None
            cache[key] = model
        return cache[key]

    return get


def _ids(eng: Engine, text: str) -> list[int]:
    return list(eng.tokenizer(text)["input_ids"])


def _ref_no_cache(model: FlexOlmoForCausalLM, prompt: list[int], gen: Sequence[int]) -> Any:
    """float32 log_softmax of one full forward pass over prompt + generated tokens, at the
    positions that produced the generated tokens ``[len(gen), vocab]``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(gen[:-1])])).logits[0, len(prompt) - 1 :]
    return torch.log_softmax(logits.float(), dim=-1)


def _ref_kv_cache(model: FlexOlmoForCausalLM, prompt: list[int], n: int) -> tuple[list[int], Any]:
    """transformers' greedy generate (KV cache): its tokens and the float32 log_softmax of
    its raw per-step logits."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = [int(t) for t in out.sequences[0, len(prompt) :]]
    return tokens, torch.log_softmax(torch.cat(out.logits).float(), dim=-1)


def _assert_scores(lps: Sequence[TokenLogprob | None], tokens: Sequence[int], ref: Any, k: int):
    """Each entry is token ``tokens[i]`` with the reference's log-probability, and ``k``
    alternatives that are the reference's ``k`` most likely (robust to near-ties: every
    alternative's value is checked against the reference at its own id)."""
    assert len(lps) == len(tokens) == ref.shape[0]
    for lp, tok, row in zip(lps, tokens, ref, strict=True):
        assert lp is not None
        assert lp.token_id == tok
        assert isinstance(lp.logprob, float)
        assert abs(lp.logprob - float(row[tok])) <= ATOL
        assert len(lp.top) == k
        assert len({t for t, _ in lp.top}) == k
        for t, v in lp.top:
            assert abs(v - float(row[t])) <= ATOL
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        expected = torch.topk(row, k).values.tolist() if k else []
        assert all(abs(a - b) <= ATOL for a, b in zip(values, expected, strict=True))


def _run_batch(
    sched: Scheduler, requests: Sequence[tuple[Any, SamplingParams, Any]]
) -> tuple[list[GenerationResult], list[list[Any]]]:
    """Submit every request at once (so they share prefills and decoding steps); their
    results and event lists in order."""
    results: dict[int, GenerationResult] = {}
    events: list[list[Any]] = [[] for _ in requests]
    done = threading.Semaphore(0)

    def sink_for(i: int) -> Any:
        def sink(ev: Any) -> None:
            events[i].append(ev)
            if isinstance(ev, Finished):
                results[i] = ev.result
                done.release()

        return sink

    for i, (prompt, params, allowed) in enumerate(requests):
        sched.submit(prompt, params, sink_for(i), allowed=allowed)
    for _ in requests:
        assert done.acquire(timeout=60)
    return [results[i] for i in range(len(requests))], events


# -- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, MAX_LOGPROBS + 1, 1.5, True, "3"])
def test_out_of_range_counts_are_rejected_with_the_field_named(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{field} must be None or an integer in \\[0, 20\\]"):
        SamplingParams(**{field: value})


def test_max_tokens_zero_only_scores_a_prompt() -> None:
    with pytest.raises(ValueError, match="needs prompt_logprobs"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="needs prompt_logprobs"):
        SamplingParams(max_tokens=0, logprobs=3)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1, prompt_logprobs=0)
    p = SamplingParams(max_tokens=0, prompt_logprobs=0)
    assert (p.max_tokens, p.prompt_logprobs, p.logprobs) == (0, 0, None)
    assert SamplingParams(logprobs=0, prompt_logprobs=MAX_LOGPROBS).logprobs == 0


def test_engine_keywords_and_bad_counts_fail_before_compute(eng: Engine) -> None:
    with pytest.raises(ValueError, match="logprobs"):
        eng.generate("hello", logprobs=21)
    with pytest.raises(TypeError, match="not both"):
        eng.generate("hello", SamplingParams(), logprobs=1)
    res = eng.generate("hello", max_tokens=2, temperature=0, logprobs=1, prompt_logprobs=2)
    assert res.logprobs is not None and len(res.logprobs) == 2
    assert res.prompt_logprobs is not None and len(res.prompt_logprobs) == res.prompt_tokens


def test_token_logprob_is_exported_and_frozen() -> None:
    assert engine.TokenLogprob is TokenLogprob
    lp = TokenLogprob(5, -1.0, ((5, -1.0),))
    with pytest.raises(AttributeError):
        lp.logprob = 0.0  # type: ignore[misc]


# -- exactness ----------------------------------------------------------------------------------


MIXED = [
    # (prompt, allowed, logprobs)
    ("The data owner trains", ("public", "code"), 5),
    ("Shall I", ("math",), 0),
    ("A", None, 20),
    ("def add(a, b):", ("news", "public", "math"), 3),
    ("The data owner trains", ("code", "news"), None),  # asks for nothing, same prefill
]


def test_greedy_logprobs_in_a_mixed_batch_equal_the_pruned_models(
    eng: Engine, pruned: Callable[[Any], FlexOlmoForCausalLM]
) -> None:
    """Rows with different allowed sets, prompt lengths and counts decoded together: each
    row's logprobs are log_softmax of its own pruned model, computed with transformers' KV
    cache (generate) and without (one full forward pass)."""
    n = 8
    sched = Scheduler(eng, max_batch_size=8)
    try:
        requests = [
            (
                _ids(eng, p),
                SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=k),
                a,
            )
            for p, a, k in MIXED
        ]
        results, _ = _run_batch(sched, requests)
    finally:
        sched.close()
    for (prompt, params, allowed), res in zip(requests, results, strict=True):
        k = params.logprobs
        if k is None:
            assert res.logprobs is None
            continue
        assert res.logprobs is not None
        model = pruned(allowed)
        tokens, with_cache = _ref_kv_cache(model, prompt, n)
        assert list(res.token_ids) == tokens
        _assert_scores(res.logprobs, res.token_ids, with_cache, k)
        _assert_scores(res.logprobs, res.token_ids, _ref_no_cache(model, prompt, tokens), k)
        if k:  # greedy: the chosen token is the most likely one
            assert all(lp.top[0] == (lp.token_id, lp.logprob) for lp in res.logprobs)
    # and the allowed set matters (the comparison can fail)
    prompt, _, allowed = requests[1]
    full = _ref_no_cache(pruned(None), prompt, results[1].token_ids)
    restricted = results[1].logprobs
    assert restricted is not None
    assert (
        max(abs(lp.logprob - float(full[i, lp.token_id])) for i, lp in enumerate(restricted)) > 1e-3
    )


def test_sampled_logprobs_are_the_raw_distribution_not_the_tempered_one(
    eng: Engine, pruned: Callable[[Any], FlexOlmoForCausalLM]
) -> None:
    prompt = _ids(eng, "Shall I compare thee")
    allowed = ("public", "news")
    params = SamplingParams(
        temperature=3.0, top_p=0.9, seed=7, max_tokens=6, ignore_eos=True, logprobs=2
    )
    res = eng.generate(prompt, params, allowed=allowed)
    assert res.logprobs is not None
    ref = _ref_no_cache(pruned(allowed), prompt, res.token_ids)
    _assert_scores(res.logprobs, res.token_ids, ref, 2)


def test_prompt_logprobs_equal_a_full_forward_pass(
    eng: Engine, pruned: Callable[[Any], FlexOlmoForCausalLM]
) -> None:
    """Token j's prompt logprob is log_softmax(logits[j - 1])[token j]; rows of one prompt
    length with different sets and counts share a prefill; a row that does not ask is
    prefilled apart and gets None."""
    prompt = _ids(eng, "The data owner trains a model")
    other = _ids(eng, "Shall I compare thee to a summer")[: len(prompt)]
    assert len(other) == len(prompt)
    requests = [
        (
            prompt,
            SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=4),
            ("public", "math"),
        ),
        (other, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0, logprobs=1), None),
        (prompt, SamplingParams(temperature=0, max_tokens=3), ("public", "math")),
    ]
    sched = Scheduler(eng)
    try:
        results, _ = _run_batch(sched, requests)
    finally:
        sched.close()
    for (ids, params, allowed), res in zip(requests, results, strict=True):
        if params.prompt_logprobs is None:
            assert res.prompt_logprobs is None
            continue
        got = res.prompt_logprobs
        assert got is not None and len(got) == len(ids) == res.prompt_tokens
        assert got[0] is None
        with torch.no_grad():
            engine_logits = eng.forward(torch.tensor([ids]), allowed=allowed).logits[0]
            ref_logits = pruned(allowed)(torch.tensor([ids])).logits[0]
        for logits in (engine_logits, ref_logits):
            ref = torch.log_softmax(logits[:-1].float(), dim=-1)
            _assert_scores(got[1:], ids[1:], ref, params.prompt_logprobs)
    # asking for prompt logprobs changes nothing about the generation itself
    assert results[0].token_ids == results[2].token_ids
    assert results[1].logprobs is not None and len(results[1].logprobs) == 2


def test_prompt_logprobs_of_a_long_prompt_are_chunked_and_still_exact(
    eng: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.logprobs as logprobs

    monkeypatch.setattr(logprobs, "PROMPT_CHUNK", 3)
    ids = _ids(eng, "The data owner trains a model on the public data and")
    res = eng.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=2), allowed=("code",))
    assert res.prompt_logprobs is not None
    with torch.no_grad():
        logits = eng.forward(torch.tensor([ids]), allowed=("code",)).logits[0]
    _assert_scores(
        res.prompt_logprobs[1:], ids[1:], torch.log_softmax(logits[:-1].float(), dim=-1), 2
    )


def test_a_one_token_prompt_has_one_none(eng: Engine) -> None:
    res = eng.generate([42], SamplingParams(max_tokens=1, prompt_logprobs=3, temperature=0))
    assert res.prompt_logprobs == (None,)
    assert res.completion_tokens == 1


# -- streaming ----------------------------------------------------------------------------------


async def test_stream_deltas_carry_logprobs_parallel_to_their_tokens(eng: Engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=20, logprobs=2, stop=("e",))
    stream = eng.stream("A data owner", params)
    events = [ev async for ev in stream]
    deltas = [ev for ev in events[:-1] if isinstance(ev, TextDelta)]
    assert len(deltas) == len(events) - 1
    final = events[-1]
    assert isinstance(final, Finished)
    res = final.result
    assert res.logprobs is not None
    for d in deltas:
        assert len(d.logprobs) == len(d.token_ids)
        assert tuple(lp.token_id for lp in d.logprobs) == d.token_ids
    assert tuple(t for d in deltas for t in d.token_ids) == res.token_ids
    assert tuple(lp for d in deltas for lp in d.logprobs) == res.logprobs
    assert "".join(d.text for d in deltas) == res.text


async def test_deltas_of_a_request_that_asks_for_nothing_have_none(eng: Engine) -> None:
    stream = eng.stream("A data owner", temperature=0, max_tokens=8, ignore_eos=True)
    events = [ev async for ev in stream]
    assert all(ev.logprobs == () for ev in events if isinstance(ev, TextDelta))
    final = events[-1]
    assert isinstance(final, Finished)
    assert final.result.logprobs is None and final.result.prompt_logprobs is None


def test_the_tokens_after_the_last_text_reach_the_stream(
    eng: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An end-of-sequence token produces no text; it still arrives in a (last) delta, with its
    logprob. The EOS id is set to a token the greedy continuation produces."""
    prompt = "A data owner"
    probe = eng.generate(prompt, temperature=0, max_tokens=6, ignore_eos=True)
    eos = probe.token_ids[3]
    end = probe.token_ids.index(eos) + 1
    monkeypatch.setattr(eng.model.generation_config, "eos_token_id", eos)
    sched = Scheduler(eng)
    try:
        (res,), (events,) = _run_batch(
            sched, [(prompt, SamplingParams(temperature=0, max_tokens=6, logprobs=1), None)]
        )
    finally:
        sched.close()
    assert res.finish_reason == "stop" and res.token_ids == probe.token_ids[:end]
    assert res.text == eng.tokenizer.decode(list(probe.token_ids[: end - 1]))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert tuple(t for d in deltas for t in d.token_ids) == res.token_ids
    assert tuple(lp for d in deltas for lp in d.logprobs) == res.logprobs
    assert deltas[-1].token_ids[-1] == eos and deltas[-1].logprobs[-1].token_id == eos


# -- cost and usage -----------------------------------------------------------------------------


def test_rows_that_do_not_ask_never_reach_log_softmax(
    eng: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows: list[int] = []
    original = torch.log_softmax

    def counting(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows.append(int(x.shape[0]))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(torch, "log_softmax", counting)
    head_positions: list[int] = []  # positions per row the LM head runs over

    def record(module: Any, args: tuple[torch.Tensor, ...]) -> None:
        head_positions.append(int(args[0].shape[1]) if args[0].dim() == 3 else 1)

    hook = eng.model.lm_head.register_forward_pre_hook(record)
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    sched = Scheduler(eng)
    try:
        _run_batch(sched, [("The data owner", plain, None), ("Shall I", plain, ("math",))] * 2)
        assert rows == []
        asking = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
        _run_batch(
            sched,
            [("The data owner", plain, None), ("Shall I", asking, ("math",)), ("A", plain, None)],
        )
    finally:
        sched.close()
        hook.remove()
    # one row (the asking one) per generated token: the prefill's and five decoding steps'
    assert rows == [1] * 6
    # nobody asked for prompt logprobs: every prefill ran the LM head on its last position only
    assert head_positions and set(head_positions) == {1}


def _usage_by_forward(eng: Engine, ids: list[int], allowed: Any) -> dict[str, tuple[int, float]]:
    ctl = RoutingControl(eng.mask_for(allowed, 1))
    with torch.inference_mode():
        eng.model(input_ids=torch.tensor([ids]), routing=ctl)
    t, w = ctl.tokens[0].tolist(), ctl.weight[0].tolist()
    return {e: (int(t[i]), float(w[i])) for i, e in enumerate(IDS)}


def _assert_usage_equal(a: Any, b: Any) -> None:
    assert a is not None and b is not None and a.keys() == b.keys()
    for e in a:
        assert a[e][0] == b[e][0], (e, a, b)
        assert a[e][1] == pytest.approx(b[e][1], abs=1e-4), (e, a, b)


def test_usage_is_the_same_whether_logprobs_are_asked_or_not(eng: Engine) -> None:
    prompt = _ids(eng, "def add(a, b):")
    allowed = ("public", "code", "math")
    base = dict(temperature=0.0, max_tokens=10, ignore_eos=True)
    plain = eng.generate(prompt, SamplingParams(**base), allowed=allowed)  # type: ignore[arg-type]
    asked = eng.generate(
        prompt,
        SamplingParams(**base, logprobs=20, prompt_logprobs=20),  # type: ignore[arg-type]
        allowed=allowed,
    )
    assert asked.token_ids == plain.token_ids
    assert (asked.prompt_tokens, asked.completion_tokens) == (plain.prompt_tokens, 10)
    _assert_usage_equal(asked.usage, plain.usage)
    _assert_usage_equal(
        asked.usage, _usage_by_forward(eng, prompt + list(plain.token_ids[:-1]), allowed)
    )


def test_max_tokens_zero_scores_the_prompt_and_accounts_it(eng: Engine) -> None:
    prompt = _ids(eng, "The data owner trains a model")
    allowed = ("news", "math")
    params = SamplingParams(max_tokens=0, prompt_logprobs=1, logprobs=3)
    res = eng.generate(prompt, params, allowed=allowed)
    assert res.finish_reason == "length"
    assert res.token_ids == () and res.completion_tokens == 0 and res.text == ""
    assert res.logprobs == ()  # asked, and parallel to no generated token
    assert res.prompt_logprobs is not None and len(res.prompt_logprobs) == len(prompt)
    assert res.prompt_tokens == len(prompt)
    assert res.usage is not None
    layers = eng.model.config.num_hidden_layers
    assert sum(t for t, _ in res.usage.values()) == len(prompt) * layers * 2
    _assert_usage_equal(res.usage, _usage_by_forward(eng, prompt, allowed))
    assert res.usage["public"] == (0, 0.0)
    # the same prompt scored inside a generating request gives the same numbers
    gen = eng.generate(prompt, SamplingParams(max_tokens=2, prompt_logprobs=1), allowed=allowed)
    assert gen.prompt_logprobs is not None
    for a, b in zip(res.prompt_logprobs[1:], gen.prompt_logprobs[1:], strict=True):
        assert a is not None and b is not None
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) <= ATOL


async def test_a_scoring_stream_ends_at_once(eng: Engine) -> None:
    stream = eng.stream("Shall I", SamplingParams(max_tokens=0, prompt_logprobs=0))
    events = [ev async for ev in stream]
    assert len(events) == 1 and isinstance(events[0], Finished)
    assert events[0].result.finish_reason == "length"
    assert events[0].result.prompt_logprobs is not None


def test_a_scoring_request_may_fill_the_window(tmp_path: Path) -> None:
    small = load_engine(build_tiny_checkpoint(tmp_path, IDS, max_position_embeddings=24))
    try:
        ids = list(range(10, 34))  # 24 tokens: the whole window
        res = small.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=0))
        assert res.prompt_logprobs is not None and len(res.prompt_logprobs) == 24
        with pytest.raises(PromptError, match="no room for a completion"):
            small.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=0))
        with pytest.raises(PromptError, match="25 tokens; the context window holds 24"):
            small.generate([*ids, 5], SamplingParams(max_tokens=0, prompt_logprobs=0))
    finally:
        small.close()
