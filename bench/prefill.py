"""KV memory that follows the work (a script, not a test): chunked prefill, admission, step cost.

    PYTHONPATH=. python bench/prefill.py [--size medium] [--rounds 5] [--chunks 0,128,256] \\
        [--streams 4] [--long 1000] [--device cpu] [--contexts 100,1000,2000] [--step-rows 8] \\
        [--step-uneven 100] [--decode-contexts 1000] [--decode-tokens 64] \\
        [--skip-stall] [--skip-admission] [--skip-step] [--skip-decode]

(1) Running streams while a long prompt arrives. ``--streams`` greedy requests (16-token
prompts) are decoding; once they are steady, a ``--long``-token prompt is submitted. The time
between two decoding steps is every running stream's inter-token latency; the gaps from the
long prompt's submission until its first token (the stall it causes) are pooled over the rounds
and reported as median, p99 and max, beside the gaps before it arrived (the base line) and the
long request's time to first token. Because one noisy round can hold the pooled maximum, each
round's worst gap is also reported (median and range over the rounds), and the comparison with
one pass is made on those medians. One scheduler per chunk size (0: the prompt in one pass, as
before chunked prefill) on one engine, interleaved round by round.

(2) Concurrency under a fixed KV budget (``--budget-blocks`` blocks of 16 tokens): how many
requests are admitted at once when all are short, all long, or one long among short ones, and
the pools' allocated bytes at the peak and once the long one has left.

(3) The paged cache's price at long contexts: one decoding step's attention and cache work
alone (every layer's ``update`` and sdpa, the model's layer count and attention shape, no
projections or experts) for ``--step-rows`` rows of each ``--contexts`` length, as the engine
runs it (the rows staged: each step appends its token), with every row gathered from the pool
at every step (``STAGING_SHARE = 0``, into the reused scratch buffer: the first paged version
also allocated that buffer anew each time), and over one contiguous buffer per layer written
in place (what the slot cache it replaced did: the bound); and one row of the longest context
among ``--step-uneven``-token rows, which the engine gathers (staging them would be mostly
padding), against contiguous buffers as wide as the longest row. Medians over ``--rounds``
rounds of ``--step-reps`` steps each, the three interleaved round by round.

(4) The same in the model: ``--step-rows`` greedy requests with ``--decode-contexts``-token
prompts, submitted at once; the decoding step's time while all of them decode, staged (the
engine) and with every row gathered each step, interleaved round by round; and whether both
generate the same tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import kvcache
from engine.api import Engine, load_engine
from engine.checkpoints import build_tiny_checkpoint
from engine.generation import DecodeBatch, Finished
from engine.kvcache import BLOCK_TOKENS, PagedKVCache, kv_bytes_per_token
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler

STEPS: list[float] = []
"""perf_counter() at the end of every decoding step (one scheduler runs at a time)."""
STEP_COSTS: list[tuple[int, float]] = []
"""(rows, seconds) of every decoding step."""
PROMPTS_DONE: list[tuple[float, int]] = []
"""(perf_counter(), prompt length) whenever a prefill completes a prompt: its first token."""

_real_step = DecodeBatch.step
_real_prefill = DecodeBatch.prefill


def _timed_step(self: DecodeBatch) -> None:
    rows, t0 = len(self.rows), time.perf_counter()
    _real_step(self)
    STEPS.append(time.perf_counter())
    STEP_COSTS.append((rows, STEPS[-1] - t0))


def _timed_prefill(self: DecodeBatch, seqs: Any, q: int | None = None) -> None:
    _real_prefill(self, seqs, q)
    if seqs[0].length == seqs[0].prompt_len:
        PROMPTS_DONE.append((time.perf_counter(), seqs[0].prompt_len))


DecodeBatch.step = _timed_step  # type: ignore[method-assign]
DecodeBatch.prefill = _timed_prefill  # type: ignore[method-assign]


def _bench_engine() -> Any:
    """bench/engine.py as a module (its name would shadow the engine package on sys.path)."""
    spec = importlib.util.spec_from_file_location(
        "bench_engine", Path(__file__).with_name("engine.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_engine"] = module
    spec.loader.exec_module(module)
    return module


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


class Sink:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None

    def __call__(self, ev: Any) -> None:
        if isinstance(ev, Finished | BaseException):
            self.result = ev
            self.done.set()


def wait_steps(n: int, timeout: float = 600.0) -> None:
    target = len(STEPS) + n
    deadline = time.monotonic() + timeout
    while len(STEPS) < target:
        if time.monotonic() > deadline:
            raise RuntimeError("the streams stopped stepping")
        time.sleep(0.001)


def one_round(
    sched: Scheduler, streams: list[list[int]], long_prompt: list[int]
) -> tuple[list[float], list[float], float, int]:
    """(gaps while the long prompt arrives, gaps before, its time to first token, its token)."""
    sinks = [Sink() for _ in streams]
    controls = [sched.submit(p, greedy(100_000), s) for p, s in zip(streams, sinks, strict=True)]
    wait_steps(12)
    before_start = len(STEPS)
    wait_steps(8)
    base = [b - a for a, b in zip(STEPS[before_start:], STEPS[before_start + 1 :], strict=False)]
    long_sink = Sink()
    PROMPTS_DONE.clear()
    t0 = time.perf_counter()
    mark = len(STEPS)
    sched.submit(long_prompt, greedy(4), long_sink)
    if not long_sink.done.wait(600):
        raise RuntimeError("the long request did not finish")
    first_at = next(t for t, n in PROMPTS_DONE if n == len(long_prompt))
    ttft = first_at - t0
    for c in controls:
        c.cancel()
    for s in [*sinks, long_sink]:
        if not s.done.wait(600):
            raise RuntimeError("a request did not finish")
    if not isinstance(long_sink.result, Finished):
        raise RuntimeError(f"the long request failed: {long_sink.result!r}")
    ticks = [t0, *STEPS[mark:]]
    gaps = []
    for a, b in itertools.pairwise(ticks):
        gaps.append(b - a)
        if b >= first_at:  # the step after the prompt's first token ends the stall
            break
    return gaps, base, ttft, long_sink.result.result.token_ids[0]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(values: list[float]) -> str:
    return f"{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}"


def chunked_prefill(
    eng: Engine, chunks: list[int], rounds: int, n_streams: int, long_len: int
) -> list[str]:
    g = torch.Generator().manual_seed(0)
    vocab = min(int(eng.model.config.vocab_size), len(eng.tokenizer))
    streams = [torch.randint(5, vocab, (16,), generator=g).tolist() for _ in range(n_streams)]
    long_prompt = torch.randint(5, vocab, (long_len,), generator=g).tolist()
    scheds = {c: Scheduler(eng, prefill_chunk=c) for c in chunks}
    stall: dict[int, list[float]] = {c: [] for c in chunks}
    base: dict[int, list[float]] = {c: [] for c in chunks}
    ttft: dict[int, list[float]] = {c: [] for c in chunks}
    worst: dict[int, list[float]] = {c: [] for c in chunks}
    """Every round's worst gap while the long prompt arrived."""
    first: dict[int, set[int]] = {c: set() for c in chunks}
    try:
        for c in chunks:  # warm-up
            one_round(scheds[c], streams, long_prompt)
        for _ in range(rounds):
            for c in chunks:
                gaps, before, t, tok = one_round(scheds[c], streams, long_prompt)
                stall[c] += gaps
                worst[c].append(max(gaps))
                base[c] += before
                ttft[c].append(t)
                first[c].add(tok)
    finally:
        for s in scheds.values():
            s.close()
    same = len(set().union(*first.values())) == 1
    lines = [
        f"{n_streams} running streams, a {long_len}-token prompt arrives; ms between decoding "
        f"steps (every stream's inter-token latency), pooled over {rounds} rounds",
        "",
        "| prefill chunk | gaps | median | p99 | max | worst per round: median (range) "
        "| base line median (p99) | long prompt's TTFT median (range) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in chunks:
        gaps, b = stall[c], base[c]
        lines.append(
            f"| {'one pass' if c == 0 else c} | {len(gaps)} | {statistics.median(gaps) * 1e3:.1f} "
            f"| {pct(gaps, 0.99) * 1e3:.1f} | {max(gaps) * 1e3:.1f} "
            f"| {statistics.median(worst[c]) * 1e3:.1f} ({spread(worst[c])}) "
            f"| {statistics.median(b) * 1e3:.1f} ({pct(b, 0.99) * 1e3:.1f}) "
            f"| {statistics.median(ttft[c]) * 1e3:.0f} ({spread(ttft[c])}) |"
        )
    if 0 in chunks:
        for c in chunks:
            if c:
                ratio = statistics.median(worst[0]) / statistics.median(worst[c])
                pooled = max(stall[0]) / max(stall[c])
                med = statistics.median(stall[0]) / statistics.median(stall[c])
                lines.append(
                    f"\nchunk {c}: a round's worst gap is {ratio:.1f}x shorter than one pass's "
                    f"at the median of the rounds (pooled maximum {pooled:.1f}x), the median "
                    f"gap {med:.1f}x; TTFT "
                    f"{statistics.median(ttft[c]) / statistics.median(ttft[0]):.2f}x one pass's."
                )
    lines.append(
        f"\nthe long prompt's first token is the same in every run: {'yes' if same else 'NO'}"
    )
    return lines


def admitted(
    eng: Engine, budget_bytes: int, requests: list[tuple[list[int], int]], watch: int | None
) -> tuple[int, int, int, int, int | None, int]:
    """Submit ``requests`` (prompt, max_tokens) at once to a scheduler with this budget:
    (most admitted at once, most bytes reserved, most bytes allocated, most working bytes
    beside them, bytes allocated once request ``watch`` finished while others still ran,
    bytes allocated at the end)."""
    sched = Scheduler(eng, kv_cache_bytes=budget_bytes, prefill_chunk=256)
    sinks = [Sink() for _ in requests]
    peak_n = peak_reserved = peak_alloc = peak_working = 0
    after: int | None = None
    try:
        for (p, n), s in zip(requests, sinks, strict=True):
            sched.submit(p, greedy(n), s)
        while not all(s.done.is_set() for s in sinks):
            m = sched.memory()
            peak_n = max(peak_n, m.requests)
            peak_reserved = max(peak_reserved, m.reserved_bytes)
            peak_alloc = max(peak_alloc, m.allocated_bytes)
            peak_working = max(peak_working, m.working_bytes)
            if (
                watch is not None
                and after is None
                and sinks[watch].done.is_set()
                and m.requests > 0
            ):
                after = m.allocated_bytes
            time.sleep(0.0005)
        bad = [s.result for s in sinks if not isinstance(s.result, Finished)]
        if bad:
            raise RuntimeError(f"a request failed: {bad[0]!r}")
        end = sched.memory().allocated_bytes
    finally:
        sched.close()
    return peak_n, peak_reserved, peak_alloc, peak_working, after, end


def admission(eng: Engine, budget_blocks: int) -> list[str]:
    cfg = eng.model.config
    per_token = kv_bytes_per_token(cfg, eng.model.dtype)
    budget = budget_blocks * BLOCK_TOKENS * per_token
    g = torch.Generator().manual_seed(1)
    vocab = min(int(cfg.vocab_size), len(eng.tokenizer))

    def prompt(n: int) -> list[int]:
        return torch.randint(5, vocab, (n,), generator=g).tolist()

    short = [(prompt(24), 24) for _ in range(96)]
    long = [(prompt(400), 112) for _ in range(12)]
    mixed = [(prompt(1000), 64)] + [(prompt(24), 100) for _ in range(16)]
    mib = 2**20
    lines = [
        f"KV budget {budget / mib:.1f} MiB = {budget_blocks} blocks of {BLOCK_TOKENS} tokens "
        f"({per_token} bytes per token); requests submitted at once",
        "",
        "| requests | KV tokens each (reserved) | admitted at once | peak reserved MiB "
        "| peak allocated MiB | peak staging and gather MiB | allocated at the end |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    after_long: int | None = None
    for label, reqs, each, watch in (
        ("96 short: 24-token prompt, 24 tokens", short, "47 (48)", None),
        ("12 long: 400-token prompt, 112 tokens", long, "511 (512)", None),
        ("1 long (1000 + 64) among 16 short (24 + 100)", mixed, "1063 (1072), 123 (128)", 0),
    ):
        n, reserved, alloc, working, after, end = admitted(eng, budget, reqs, watch)
        if watch is not None:
            after_long = after
        lines.append(
            f"| {label} | {each} | {n} | {reserved / mib:.1f} | {alloc / mib:.1f} "
            f"| {working / mib:.1f} | {end / mib:.1f} |"
        )
    if after_long is not None:
        lines.append(
            f"\nonce the long request of the mixed run finished, the pools held "
            f"{after_long / mib:.1f} MiB while the short ones ran on"
        )
    lines.append(
        "(before: at most 16 requests whatever their lengths, and every row as wide as the "
        "longest, its columns doubling and never shrinking)"
    )
    return lines


def step_cost(
    config: Any,
    dtype: torch.dtype,
    device: torch.device,
    contexts: list[int],
    rows: int,
    rounds: int,
    reps: int,
    uneven: int,
) -> list[str]:
    """(3): ms per decoding step of attention and cache work alone, per context length (and,
    with ``uneven``, one row of the longest among rows of ``uneven`` tokens)."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    g = torch.Generator().manual_seed(2)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    query = randn(rows, heads, 1, dim)
    new_k, new_v = randn(rows, kv_heads, 1, dim), randn(rows, kv_heads, 1, dim)
    gqa = heads != kv_heads

    def attend(k: torch.Tensor, v: torch.Tensor, kv_len: int) -> None:
        mask = torch.ones((rows, 1, 1, kv_len), dtype=torch.bool, device=device)
        F.scaled_dot_product_attention(query, k, v, attn_mask=mask, enable_gqa=gqa)

    class Paged:
        def __init__(self, ctx: int, share: float, short: int | None) -> None:
            """``rows`` sequences of ``ctx`` tokens, or (``short``) the first of ``ctx`` and
            the others of ``short``."""
            self.share = share
            self.cache = PagedKVCache(layers)
            self.handles = [self.cache.open(ctx + (rounds + 1) * reps + 8) for _ in range(rows)]
            first = ctx if short is None else short
            for handles, n in ((self.handles, first), (self.handles[:1], ctx - first)):
                if n:
                    k = randn(len(handles), kv_heads, n, dim)
                    v = randn(len(handles), kv_heads, n, dim)
                    self.cache.begin(handles, n)
                    for layer in range(layers):
                        self.cache.update(k, v, layer)
                    self.cache.commit()

        def step(self) -> None:
            saved, kvcache.STAGING_SHARE = kvcache.STAGING_SHARE, self.share
            try:
                self.cache.begin(self.handles, 1)
                assert self.cache.current is not None
                kv_len = self.cache.current.kv_len
                for layer in range(layers):
                    attend(*self.cache.update(new_k, new_v, layer), kv_len)
                self.cache.commit()
            finally:
                kvcache.STAGING_SHARE = saved

    class Contiguous:
        def __init__(self, ctx: int) -> None:
            cols = ctx + (rounds + 1) * reps + 8
            self.k = [randn(rows, kv_heads, cols, dim) for _ in range(layers)]
            self.v = [randn(rows, kv_heads, cols, dim) for _ in range(layers)]
            self.length = ctx

        def step(self) -> None:
            n = self.length
            for k, v in zip(self.k, self.v, strict=True):
                k[:, :, n : n + 1].copy_(new_k)
                v[:, :, n : n + 1].copy_(new_v)
                attend(k[:, :, : n + 1], v[:, :, : n + 1], n + 1)
            self.length += 1

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    lines = [
        f"one decoding step's attention and cache work alone: {rows} rows, {layers} layers, "
        f"{heads} heads ({kv_heads} KV) of {dim}, {dtype}; ms per step, median (range) of "
        f"{rounds} rounds of {reps} steps",
        "",
        "| context | paged (the engine: staged where it fits) "
        "| paged, every row gathered each step (no staging) "
        "| contiguous buffers (the slot cache's bound) | engine / contiguous "
        "| gathered / contiguous |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    cases: list[tuple[str, int, int | None]] = [(str(c), c, None) for c in contexts]
    if uneven:  # one long row among short ones: staging would be mostly padding
        cases.append((f"{max(contexts)} + {rows - 1} x {uneven}", max(contexts), uneven))
    for label, ctx, short in cases:
        sides: dict[str, Any] = {
            "staged": Paged(ctx, kvcache.STAGING_SHARE, short),
            "gathered": Paged(ctx, 0.0, short),
            "contiguous": Contiguous(ctx),
        }
        times: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(rounds + 1):  # round 0 warms up
            for name, side in sides.items():
                sync()
                t0 = time.perf_counter()
                for _ in range(reps):
                    side.step()
                sync()
                if r:
                    times[name].append((time.perf_counter() - t0) / reps)
        med = {name: statistics.median(t) for name, t in times.items()}
        lines.append(
            f"| {label} | "
            + " | ".join(f"{med[n] * 1e3:.2f} ({spread(times[n])})" for n in sides)
            + f" | {med['staged'] / med['contiguous']:.2f} "
            f"| {med['gathered'] / med['contiguous']:.2f} |"
        )
        del sides
    return lines


def decode_steps(
    eng: Engine, contexts: list[int], rows: int, rounds: int, tokens: int
) -> list[str]:
    """(4): the model's decoding step with ``rows`` requests of about each context length,
    staged (the engine) and with every row gathered each step, interleaved round by round."""
    g = torch.Generator().manual_seed(3)
    vocab = min(int(eng.model.config.vocab_size), len(eng.tokenizer))
    sides = {"staged": kvcache.STAGING_SHARE, "gathered": 0.0}
    lines = [
        f"the model's decoding step, {rows} greedy requests with prompts of the context length "
        f"and {tokens} tokens each, all submitted at once; ms per step while all {rows} "
        f"decode, median over {rounds} rounds (range of the rounds' medians)",
        "",
        "| context | staged (the engine) | every row gathered each step | gathered / staged "
        "| same tokens |",
        "| --- | --- | --- | --- | --- |",
    ]
    saved = kvcache.STAGING_SHARE
    sched = Scheduler(eng, prefill_chunk=256)
    try:
        for ctx in contexts:
            prompts = [torch.randint(5, vocab, (ctx,), generator=g).tolist() for _ in range(rows)]
            medians: dict[str, list[float]] = {name: [] for name in sides}
            outputs: set[tuple[tuple[int, ...], ...]] = set()
            for r in range(rounds + 1):  # round 0 warms up
                for name, share in sides.items():
                    kvcache.STAGING_SHARE = share  # read by the scheduler thread's passes
                    sinks = [Sink() for _ in prompts]
                    STEP_COSTS.clear()
                    with eng.lock:  # the scheduler admits all of them together
                        for p, sink in zip(prompts, sinks, strict=True):
                            sched.submit(p, greedy(tokens), sink)
                    for sink in sinks:
                        if not sink.done.wait(600):
                            raise RuntimeError("a request did not finish")
                    if not all(isinstance(sink.result, Finished) for sink in sinks):
                        raise RuntimeError("a request failed")
                    outputs.add(tuple(tuple(sink.result.result.token_ids) for sink in sinks))
                    full = [t for n, t in STEP_COSTS if n == rows]
                    if r and full:
                        medians[name].append(statistics.median(full))
            med = {name: statistics.median(v) for name, v in medians.items()}
            lines.append(
                f"| {ctx} | "
                + " | ".join(f"{med[n] * 1e3:.1f} ({spread(medians[n])})" for n in sides)
                + f" | {med['gathered'] / med['staged']:.2f} "
                f"| {'yes' if len(outputs) == 1 else 'NO'} |"
            )
    finally:
        kvcache.STAGING_SHARE = saved
        sched.close()
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="medium", help="a model size of bench/engine.py")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunks", default="0,128,256", help="prefill chunk sizes (0: one pass)")
    ap.add_argument("--streams", type=int, default=4, help="running streams")
    ap.add_argument("--long", type=int, default=1000, help="the arriving prompt's tokens")
    ap.add_argument("--budget-blocks", type=int, default=128, help="KV budget for (2)")
    ap.add_argument("--device", default="cpu", help="'cpu' (default) or a GPU ('cuda:0')")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--contexts", default="100,1000,2000", help="context lengths for (3)")
    ap.add_argument("--step-rows", type=int, default=8, help="rows of the steps in (3)")
    ap.add_argument("--step-reps", type=int, default=20, help="steps per round in (3)")
    ap.add_argument(
        "--step-uneven",
        type=int,
        default=100,
        help="(3) also: one row of the longest context among rows of this many tokens (0: not)",
    )
    ap.add_argument("--skip-stall", action="store_true")
    ap.add_argument("--skip-admission", action="store_true")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--decode-contexts", default="1000", help="context lengths for (4)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="tokens per request in (4)")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = _bench_engine()
    command = "PYTHONPATH=. python bench/prefill.py " + " ".join(argv or sys.argv[1:])
    print(command.strip())
    print(
        f"threads={torch.get_num_threads()} device={device} cpus={os.cpu_count()} "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:

        def setup() -> Engine:
            path = build_tiny_checkpoint(
                Path(tmp) / args.size, models.EXPERTS, seed=0, **models.SIZES[args.size]
            )
            return load_engine(path, device_map="cpu" if device.type == "cpu" else str(device))

        eng = models.isolated(setup)
        print(f"\n## {args.size} model")
        if not args.skip_stall:
            chunks = [int(c) for c in args.chunks.split(",")]
            print()
            print("\n".join(chunked_prefill(eng, chunks, args.rounds, args.streams, args.long)))
        if not args.skip_admission:
            print()
            print("\n".join(admission(eng, args.budget_blocks)))
        if not args.skip_step:
            contexts = [int(c) for c in args.contexts.split(",")]
            print()
            print(
                "\n".join(
                    models.isolated(
                        lambda: step_cost(
                            eng.model.config,
                            eng.model.dtype,
                            device,
                            contexts,
                            args.step_rows,
                            args.rounds,
                            args.step_reps,
                            args.step_uneven,
                        )
                    )
                )
            )
        if not args.skip_decode:
            contexts = [int(c) for c in args.decode_contexts.split(",")]
            print()
            print(
                "\n".join(
                    decode_steps(eng, contexts, args.step_rows, args.rounds, args.decode_tokens)
                )
            )
        eng.close()
    print(f"\nload average at the end (1, 5, 15 min): {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
