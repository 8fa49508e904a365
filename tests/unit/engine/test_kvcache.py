"""The paged KV cache: what a pass writes is what attention reads, reservations, growth and
shrinking; and KV memory as the scheduler uses it: admission by budget, chunked prefill."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from contracts.settings import Settings, SettingsError
from engine import kvcache
from engine.api import Engine, load_engine
from engine.errors import PromptError
from engine.generation import DecodeBatch, Finished, GenerationResult
from engine.kvcache import BLOCK_TOKENS, PagedKVCache, blocks_for, kv_bytes_per_token
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from tests.unit.engine.conftest import IDS

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

HEADS, DIM = 2, 4


def _states(rows: int, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, HEADS, q, DIM, generator=g),
        torch.randn(rows, HEADS, q, DIM, generator=g),
    )


class Mirror:
    """What each sequence's keys and values should be: the tokens written, in order."""

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def open(self, tokens: int) -> int:
        h = self.cache.open(tokens)
        self.keys[h] = torch.zeros(HEADS, 0, DIM)
        self.values[h] = torch.zeros(HEADS, 0, DIM)
        return h

    def run(self, handles: list[int], q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = _states(len(handles), q, seed)
        self.cache.begin(handles, q)
        out = self.cache.update(k, v, 0)
        self.cache.commit()
        for i, h in enumerate(handles):
            self.keys[h] = torch.cat([self.keys[h], k[i]], dim=1)
            self.values[h] = torch.cat([self.values[h], v[i]], dim=1)
        return out

    def check(self, handles: list[int], out: tuple[torch.Tensor, torch.Tensor]) -> None:
        keys, values = out
        kv_len = max(self.cache.length(h) for h in handles)
        assert keys.shape == values.shape == (len(handles), HEADS, kv_len, DIM)
        assert torch.isfinite(keys).all() and torch.isfinite(values).all()
        for i, h in enumerate(handles):
            n = self.cache.length(h)
            assert torch.equal(keys[i, :, :n], self.keys[h])
            assert torch.equal(values[i, :, :n], self.values[h])


def test_a_pass_reads_back_every_sequence_in_its_own_blocks() -> None:
    cache = PagedKVCache(1)
    m = Mirror(cache)
    a, b, c = m.open(100), m.open(100), m.open(100)
    m.check([a, b], m.run([a, b], 5, seed=0))  # a prefill from 0: the new states themselves
    m.check([c], m.run([c], 37, seed=1))  # 3 blocks, consecutive
    m.check([a], m.run([a], 20, seed=2))  # a chunk after a's first 5 tokens
    for step in range(30):  # decoding steps over rows of three lengths, blocks interleaved
        m.check([a, b, c], m.run([a, b, c], 1, seed=10 + step))
    assert cache.length(a) == 55 and cache.length(b) == 35 and cache.length(c) == 67
    assert cache.used_blocks == blocks_for(55) + blocks_for(35) + blocks_for(67)


def test_one_sequence_on_consecutive_blocks_is_read_without_a_copy() -> None:
    cache = PagedKVCache(1)
    m = Mirror(cache)
    h = m.open(200)
    m.run([h], 40, seed=0)
    keys, values = m.run([h], 1, seed=1)
    layer = cache.paged_layers[0]
    assert layer.keys is not None and layer.values is not None
    assert keys.untyped_storage().data_ptr() == layer.keys.untyped_storage().data_ptr()
    assert values.untyped_storage().data_ptr() == layer.values.untyped_storage().data_ptr()
    m.check([h], (keys, values))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _staged(cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor]:
    layer = cache.paged_layers[0]
    assert layer.staged_keys is not None and layer.staged_values is not None
    return layer.staged_keys, layer.staged_values


def _plan(cache: PagedKVCache, handles: list[int]) -> tuple[str, list[int], list[int]]:
    """What a decoding step over ``handles`` would do: (mode, appended rows, refilled rows)."""
    cache.begin(handles, 1)
    p = cache.current
    assert p is not None
    cache.cancel()
    return p.mode, p.appended, p.refilled


def test_decoding_steps_append_to_staging_buffers_they_reuse() -> None:
    cache = PagedKVCache(1)
    m = Mirror(cache)
    rows = [m.open(400) for _ in range(4)]
    m.run(rows, 32, seed=0)  # a prefill: each row on its own consecutive blocks
    assert _plan(cache, rows) == ("stage", [], [0, 1, 2, 3])
    m.check(rows, m.run(rows, 1, seed=1))  # the first step gathers every row once
    keys, values = _staged(cache)
    shape, working = cache.staging_shape, cache.working_bytes
    assert shape[0] >= 4 and shape[1] >= 48 and working > 0
    while cache.length(rows[0]) < 48:  # within the columns the buffers have: only appends
        assert _plan(cache, rows) == ("stage", [0, 1, 2, 3], [])
        out = m.run(rows, 1, seed=10 + cache.length(rows[0]))
        m.check(rows, out)
        assert _storage(out[0]) == _storage(keys) and _storage(out[1]) == _storage(values)
        assert all(a is b for a, b in zip(_staged(cache), (keys, values), strict=True))
        assert cache.staging_shape == shape and cache.working_bytes == working
    # a longer sequence: the buffers grow, keeping the rows still current
    m.run(rows[:1], 40, seed=80)  # a chunk (gathered): the staging is left alone
    assert cache.staging_shape == shape
    assert _plan(cache, rows) == ("stage", [1, 2, 3], [0])
    m.check(rows, m.run(rows, 1, seed=81))
    grown = cache.staging_shape
    assert grown[1] > shape[1] and grown[1] >= cache.length(rows[0])
    assert cache.working_bytes > working
    for step in range(5):
        assert _plan(cache, rows) == ("stage", [0, 1, 2, 3], [])
        m.check(rows, m.run(rows, 1, seed=90 + step))
    assert cache.staging_shape == grown


def _allocated_by(fn: Any) -> int:
    """Bytes ``fn()`` allocates on the CPU (freed or not), as torch's profiler records them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


@pytest.mark.parametrize("share", [1.0, 0.0], ids=["staged", "gathered"])
def test_a_steady_decoding_step_allocates_nothing_proportional_to_the_context(
    share: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kvcache, "STAGING_SHARE", share)
    heads, dim, rows, layers = 8, 32, 4, 2
    cache = PagedKVCache(layers)
    handles = [cache.open(1000) for _ in range(rows)]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(rows, heads, 600, dim, generator=g)
    new = torch.randn(rows, heads, 1, dim, generator=g)

    def step() -> None:
        cache.begin(handles, 1)
        for layer in range(layers):
            cache.update(new, new, layer)
        cache.commit()

    cache.begin(handles, 600)
    for layer in range(layers):
        cache.update(prompt, prompt, layer)
    cache.commit()
    one_row = 600 * heads * dim * prompt.element_size()  # one row's keys in one layer
    first = _allocated_by(step)  # the buffers are made for this length
    assert first >= 2 * one_row
    for _ in range(3):
        assert _allocated_by(step) < one_row // 16
    assert cache.staging_shape == ((rows, blocks_for(601) * BLOCK_TOKENS) if share else (0, 0))


def test_rows_that_join_leave_or_move_are_gathered_the_others_appended() -> None:
    cache = PagedKVCache(1)
    m = Mirror(cache)
    a, b, c = m.open(300), m.open(300), m.open(300)
    m.run([a, b, c], 30, seed=0)
    m.run([a, b, c], 1, seed=1)
    d = m.open(300)
    m.run([d], 20, seed=2)  # joins later, shorter
    m.run([a, b, c], 1, seed=3)  # the three go on appending
    assert _plan(cache, [a, b, c, d]) == ("stage", [0, 1, 2], [3])
    m.check([a, b, c, d], m.run([a, b, c, d], 1, seed=4))
    cache.close(b)  # b leaves: c and d move up a row
    m.keys.pop(b), m.values.pop(b)
    assert _plan(cache, [a, c, d]) == ("stage", [0], [1, 2])
    for step in range(3):
        m.check([a, c, d], m.run([a, c, d], 1, seed=5 + step))


def test_a_cancelled_step_leaves_no_stale_staging() -> None:
    cache = PagedKVCache(2)
    rows = [cache.open(100) for _ in range(3)]
    g = torch.Generator().manual_seed(0)
    written: list[list[torch.Tensor]] = [[] for _ in range(2)]

    def step(q: int, layers: int, keep: bool) -> list[torch.Tensor]:
        k = torch.randn(3, HEADS, q, DIM, generator=g)
        cache.begin(rows, q)
        out = [cache.update(k * (layer + 1), k, layer)[0] for layer in range(layers)]
        if keep:
            cache.commit()
            for layer in range(2):
                written[layer].append(k * (layer + 1))
        else:
            cache.cancel()
        return out

    step(20, 2, keep=True)
    step(1, 2, keep=True)
    step(1, 1, keep=False)  # layer 0's staging took a token the pass never committed
    for _ in range(3):
        out = step(1, 2, keep=True)
    for layer in range(2):
        assert torch.equal(out[layer][:, :, : cache.length(rows[0])], torch.cat(written[layer], 2))


def test_uneven_rows_gather_into_one_reused_scratch_buffer() -> None:
    cache = PagedKVCache(1)
    m = Mirror(cache)
    long, *short = [m.open(1200)] + [m.open(40) for _ in range(7)]
    m.run([long], 900, seed=0)
    m.run(short, 8, seed=1)
    # staging would hold 8 rows x the long row's columns: far more than the pools
    m.check([long, *short], m.run([long, *short], 1, seed=2))
    assert cache.staging_shape == (0, 0)
    ptr, working = _storage(m.run([long, *short], 1, seed=3)[0]), cache.working_bytes
    for step in range(10):
        assert _plan(cache, [long, *short])[0] == "gather"
        out = m.run([long, *short], 1, seed=4 + step)
        m.check([long, *short], out)
        assert _storage(out[0]) == ptr and cache.working_bytes == working
    cache.close(long)  # the short rows alone are staged again, and the scratch is let go
    m.keys.pop(long), m.values.pop(long)
    m.check(short, m.run(short, 1, seed=20))
    assert cache.staging_shape[0] >= 7 and cache.working_bytes < working
    for h in short:
        cache.close(h)
    assert cache.working_bytes == 0 and cache.staging_shape == (0, 0)


def test_reservations_bound_the_budget_and_a_sequence_its_own_growth() -> None:
    cache = PagedKVCache(1, max_blocks=10)
    assert cache.can_reserve(10 * BLOCK_TOKENS) and not cache.can_reserve(10 * BLOCK_TOKENS + 1)
    a = cache.open(6 * BLOCK_TOKENS)
    assert cache.reserved_blocks == 6
    assert not cache.can_reserve(4 * BLOCK_TOKENS + 1)
    with pytest.raises(ValueError, match="reserved"):
        cache.open(5 * BLOCK_TOKENS)
    assert cache.reserved_blocks == 6 and cache.sequences == 1  # the refusal changed nothing
    b = cache.open(4 * BLOCK_TOKENS)
    with pytest.raises(RuntimeError, match="past its reservation"):
        cache.begin([b], 4 * BLOCK_TOKENS + 1)
    assert cache.current is None and cache.length(b) == 0
    cache.close(a)
    assert cache.reserved_blocks == 4 and cache.can_reserve(6 * BLOCK_TOKENS)
    cache.close(b)
    assert cache.reserved_blocks == 0 and cache.sequences == 0
    with pytest.raises(ValueError, match="max_blocks"):
        PagedKVCache(1, max_blocks=0)


def test_a_pass_must_be_planned_and_match_its_plan() -> None:
    cache = PagedKVCache(1)
    h = cache.open(64)
    k, v = _states(1, 3, 0)
    with pytest.raises(RuntimeError, match="begin"):
        cache.update(k, v, 0)
    cache.begin([h], 2)
    with pytest.raises(RuntimeError, match="planned for 1 rows of 2 tokens"):
        cache.update(k, v, 0)
    with pytest.raises(RuntimeError, match="already planned"):
        cache.begin([h], 2)
    with pytest.raises(RuntimeError, match="cannot close"):
        cache.close(h)
    cache.cancel()  # a failed pass leaves the length as it was
    assert cache.length(h) == 0
    with pytest.raises(ValueError, match="at least one row"):
        cache.begin([], 1)


def test_pools_grow_shrink_and_are_freed_with_the_last_sequence() -> None:
    cache = PagedKVCache(1)
    m = Mirror(cache)
    big = m.open(2048)
    m.run([big], 128, seed=0)  # blocks 0-7
    small = [m.open(64) for _ in range(3)]
    m.run(small, 3, seed=1)  # blocks 8-10: they must move down when the pools shrink
    for chunk in range(7):
        m.run([big], 128, seed=2 + chunk)
    for step in range(5):
        m.run([*small, big], 1, seed=20 + step)
    peak = cache.allocated_bytes
    assert cache.capacity >= blocks_for(1029) + 3
    cache.close(big)  # the long one leaves: the pools shrink, the others' data is kept
    assert cache.capacity <= 2 * cache.used_blocks
    assert all(b < cache.capacity for h in small for b in cache._tables[h])
    assert cache.allocated_bytes * 8 < peak
    m.check(small, m.run(small, 1, seed=40))
    for h in small:
        cache.close(h)
    assert cache.allocated_bytes == 0 and cache.capacity == 0
    again = m.open(64)  # and a new sequence starts from nothing
    m.check([again], m.run([again], 4, seed=50))


def test_bytes_per_token_follow_the_config(backend: Engine) -> None:
    cfg = backend.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert cfg.num_key_value_heads is not None
    expected = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    assert kv_bytes_per_token(cfg, torch.float32) == expected
    assert kv_bytes_per_token(cfg, torch.bfloat16) == expected // 2


# -- the scheduler ------------------------------------------------------------------------------


def greedy(n: int, **extra: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **extra)


@pytest.fixture(scope="module")
def backend(tiny_dir: Path) -> Engine:
    return load_engine(tiny_dir)


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """What the scheduler thread did, in order: ("prefill", request ids, tokens run so far,
    admitted) and ("step", request ids, admitted) where admitted counts the requests holding
    KV memory."""
    events: list[tuple[Any, ...]] = []
    real_prefill, real_step = DecodeBatch.prefill, DecodeBatch.step

    def admitted(batch: DecodeBatch) -> int:
        return len(batch.rows) + len(batch.prefilling)

    def prefill(self: DecodeBatch, seqs: Any, q: int | None = None) -> None:
        ids = tuple(s.request.request_id for s in seqs)
        n = admitted(self)
        real_prefill(self, seqs, q)
        events.append(("prefill", ids, seqs[0].length, n))

    def step(self: DecodeBatch) -> None:
        events.append(("step", tuple(s.request.request_id for s in self.rows), admitted(self)))
        real_step(self)

    monkeypatch.setattr(DecodeBatch, "prefill", prefill)
    monkeypatch.setattr(DecodeBatch, "step", step)
    return events


class Collector:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self.done = threading.Event()

    def __call__(self, ev: Any) -> None:
        self.events.append(ev)
        if isinstance(ev, Finished | BaseException):
            self.done.set()

    @property
    def result(self) -> GenerationResult:
        assert self.done.wait(60), "request did not finish"
        last = self.events[-1]
        assert isinstance(last, Finished), last
        return last.result


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 300, (n,), generator=g).tolist()


@pytest.fixture
def one_pass(backend: Engine) -> Iterator[Scheduler]:
    s = Scheduler(backend, prefill_chunk=0)
    yield s
    s.close()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_chunked_prompt_computes_what_one_pass_computes(
    tiny_dir: Path, attn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = load_engine(tiny_dir)
    monkeypatch.setattr(eng.model.config, "_attn_implementation", attn)
    ids = _prompt(150, seed=3)
    params = greedy(16, logprobs=5, prompt_logprobs=5)
    results = []
    for chunk in (0, 32, 7):
        s = Scheduler(eng, prefill_chunk=chunk)
        try:
            results.append(s.generate(ids, params, allowed=("public", "math")))
        finally:
            s.close()
    base = results[0]
    assert base.prompt_logprobs is not None and base.logprobs is not None
    for res in results[1:]:
        assert res.token_ids == base.token_ids
        assert res.usage is not None and base.usage is not None
        for e in IDS:
            assert res.usage[e][0] == base.usage[e][0]
            assert res.usage[e][1] == pytest.approx(base.usage[e][1], abs=1e-4)
        assert res.prompt_logprobs is not None and res.logprobs is not None
        assert res.prompt_logprobs[0] is None
        pairs = [*zip(res.prompt_logprobs[1:], base.prompt_logprobs[1:], strict=True)]
        pairs += zip(res.logprobs, base.logprobs, strict=True)
        for x, y in pairs:  # every prompt position's distribution, and every generated one's
            assert x is not None and y is not None
            assert x.token_id == y.token_id
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
            assert [lp for _, lp in x.top] == pytest.approx([lp for _, lp in y.top], abs=1e-5)


def test_running_streams_decode_while_a_long_prompt_is_prefilled(
    backend: Engine, one_pass: Scheduler, trace: list[tuple[Any, ...]]
) -> None:
    runner_ids, long_ids = _prompt(6, seed=1), _prompt(200, seed=2)
    alone_runner = one_pass.generate(runner_ids, greedy(200))
    alone_long = one_pass.generate(long_ids, greedy(5))
    trace.clear()
    s = Scheduler(backend, prefill_chunk=32)
    try:
        runner, long = Collector(), Collector()
        s.submit(runner_ids, greedy(200), runner, request_id="runner")
        while not any(e[0] == "step" for e in trace):  # the runner is decoding
            threading.Event().wait(0.001)
        s.submit(long_ids, greedy(5), long, request_id="long")
        assert long.result.token_ids == alone_long.token_ids
        assert runner.result.token_ids == alone_runner.token_ids
    finally:
        s.close()
    chunks = [i for i, e in enumerate(trace) if e[0] == "prefill" and e[1] == ("long",)]
    assert [trace[i][2] for i in chunks] == [32, 64, 96, 128, 160, 192, 200]
    for a, b in itertools.pairwise(chunks):  # a decoding step between two chunks
        between = trace[a + 1 : b]
        assert [e[1] for e in between] == [("runner",)], between
    # one pass: the whole prompt at once (the runner waits for all of it)
    trace.clear()
    runner, long = Collector(), Collector()
    one_pass.submit(runner_ids, greedy(200), runner, request_id="runner")
    while not any(e[0] == "step" for e in trace):
        threading.Event().wait(0.001)
    one_pass.submit(long_ids, greedy(5), long, request_id="long")
    assert long.result.token_ids == alone_long.token_ids
    assert runner.result.token_ids == alone_runner.token_ids
    assert [e[2] for e in trace if e[0] == "prefill" and e[1] == ("long",)] == [200]


def test_the_kv_budget_sets_how_many_run_at_once(
    backend: Engine, trace: list[tuple[Any, ...]]
) -> None:
    per_block = kv_bytes_per_token(backend.model.config, torch.float32) * BLOCK_TOKENS
    s = Scheduler(backend, kv_cache_bytes=12 * per_block, max_batch_size=64)
    try:
        assert s.kv_blocks == 12
        # short: 10 + 6 tokens -> 15 in the cache, 1 block each: 12 at once
        # long: 40 + 25 tokens -> 64, 4 blocks each: 3 at once
        for label, n_prompt, n_new, most in (("short", 10, 6, 12), ("long", 40, 25, 3)):
            trace.clear()
            prompts = [_prompt(n_prompt, seed=i) for i in range(16)]
            sinks = [Collector() for _ in prompts]
            with backend.lock:  # the scheduler waits until all 16 are queued
                for i, (p, sink) in enumerate(zip(prompts, sinks, strict=True)):
                    s.submit(p, greedy(n_new), sink, request_id=f"{label}-{i}")
            results = [sink.result for sink in sinks]
            assert all(r.completion_tokens == n_new for r in results)
            assert max(e[-1] for e in trace) == most, label
            m = s.memory()
            assert (m.reserved_bytes, m.allocated_bytes, m.requests) == (0, 0, 0)
            assert m.working_bytes == 0
            assert m.budget_bytes == 12 * per_block
        # each equals its output alone
        alone = s.generate(prompts[5], greedy(25))
        assert alone.token_ids == results[5].token_ids
    finally:
        s.close()


def test_a_request_that_can_never_fit_is_refused_at_submission(backend: Engine) -> None:
    per_block = kv_bytes_per_token(backend.model.config, torch.float32) * BLOCK_TOKENS
    s = Scheduler(backend, kv_cache_bytes=4 * per_block)
    try:
        fits = s.generate(_prompt(40, 0), greedy(25))  # 64 tokens in the cache: 4 blocks
        assert fits.completion_tokens == 25
        sink = Collector()
        with pytest.raises(PromptError, match="KV budget"):
            s.submit(_prompt(40, 0), greedy(26), sink)  # 65: 5 blocks, never
        assert not sink.events and s.running == 0 and s.memory().requests == 0
        # a prompt-only request needs its prompt alone
        res = s.generate(_prompt(64, 1), SamplingParams(max_tokens=0, prompt_logprobs=1))
        assert res.finish_reason == "length" and res.prompt_logprobs is not None
        assert s.generate(_prompt(3, 2), greedy(4)).completion_tokens == 4
    finally:
        s.close()
    with pytest.raises(ValueError, match="holds no KV block"):
        Scheduler(backend, kv_cache_bytes=per_block - 1)
    with pytest.raises(ValueError, match="prefill_chunk"):
        Scheduler(backend, prefill_chunk=-1)


def test_the_default_budget_is_a_share_of_the_memory_available(backend: Engine) -> None:
    from engine.kvcache import KV_MEMORY_FRACTION, available_memory

    s = Scheduler(backend)
    try:
        total = available_memory(torch.device("cpu"))
        assert 0 < s.kv_cache_bytes <= total * KV_MEMORY_FRACTION * 1.5
        assert s.kv_cache_bytes >= total * KV_MEMORY_FRACTION * 0.5
    finally:
        s.close()


def test_cancelling_a_prompt_mid_prefill_frees_its_memory(
    backend: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_block = kv_bytes_per_token(backend.model.config, torch.float32) * BLOCK_TOKENS
    s = Scheduler(backend, prefill_chunk=16)
    try:
        runner = Collector()
        s.submit(_prompt(4, 0), greedy(240), runner, request_id="runner")
        long = Collector()
        holder: list[Any] = []
        real = DecodeBatch.prefill

        def prefill(self: DecodeBatch, seqs: Any, q: int | None = None) -> None:
            real(self, seqs, q)
            if seqs[0].request.request_id == "long" and seqs[0].length == 32:
                holder[0].cancel()  # after two chunks

        monkeypatch.setattr(DecodeBatch, "prefill", prefill)
        holder.append(s.submit(_prompt(150, 1), greedy(5), long, request_id="long"))
        res = long.result
        assert res.finish_reason == "cancelled" and res.completion_tokens == 0
        assert res.usage is not None
        layers = backend.model.config.num_hidden_layers
        assert sum(t for t, _ in res.usage.values()) == 32 * layers * 2  # the two chunks run
        m = s.memory()
        assert m.requests == 1
        assert m.reserved_bytes == blocks_for(4 + 240 - 1) * per_block  # the runner's alone
        assert runner.result.completion_tokens == 240
    finally:
        s.close()


def test_a_failing_chunk_fails_its_request_only(
    backend: Engine, one_pass: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner_ids = _prompt(5, 0)
    alone = one_pass.generate(runner_ids, greedy(80))
    layer = backend.model.model.layers[0]
    real = layer.forward

    def flaky(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        positions = kwargs.get("position_ids")
        if hidden.shape[1] == 16 and positions is not None and int(positions[0, 0]) == 32:
            raise RuntimeError("device lost")  # the long prompt's third chunk
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(layer, "forward", flaky)
    s = Scheduler(backend, prefill_chunk=16)
    try:
        runner, long = Collector(), Collector()
        s.submit(runner_ids, greedy(80), runner)
        s.submit(_prompt(100, 1), greedy(5), long)
        assert long.done.wait(60)
        assert isinstance(long.events[-1], RuntimeError)
        assert "device lost" in str(long.events[-1])
        assert runner.result.token_ids == alone.token_ids
        m = s.memory()
        assert (m.reserved_bytes, m.allocated_bytes, m.requests) == (0, 0, 0)
    finally:
        s.close()


def test_settings_and_load_engine_carry_the_budget_and_the_chunk(tiny_dir: Path) -> None:
    env = {"FLEXGATE_KV_CACHE_BYTES": "1048576", "FLEXGATE_PREFILL_CHUNK_TOKENS": "0"}
    st = Settings.from_env(env)
    assert (st.kv_cache_bytes, st.prefill_chunk_tokens) == (1048576, 0)
    assert (Settings.from_env({}).kv_cache_bytes, Settings.from_env({}).prefill_chunk_tokens) == (
        0,
        256,
    )
    for name in env:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: "-1"})
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: "lots"})
    eng = load_engine(tiny_dir, kv_cache_bytes=1 << 20, prefill_chunk=64)
    try:
        assert eng.scheduler.kv_cache_bytes == 1 << 20
        assert eng.scheduler.prefill_chunk == 64
    finally:
        eng.close()
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        load_engine(tiny_dir, kv_cache_bytes=0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        load_engine(tiny_dir, prefill_chunk=-5)
