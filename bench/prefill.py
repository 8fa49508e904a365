"""KV memory that follows the work (a script, not a test): chunked prefill and admission.

    PYTHONPATH=. python bench/prefill.py [--size medium] [--rounds 5] [--chunks 0,128,256] \\
        [--streams 4] [--long 1000] [--device cpu]

(1) Running streams while a long prompt arrives. ``--streams`` greedy requests (16-token
prompts) are decoding; once they are steady, a ``--long``-token prompt is submitted. The time
between two decoding steps is every running stream's inter-token latency; the gaps from the
long prompt's submission until its first token (the stall it causes) are pooled over the rounds
and reported as median, p99 and max, beside the gaps before it arrived (the base line) and the
long request's time to first token. One scheduler per chunk size (0: the prompt in one pass,
as before chunked prefill) on one engine, interleaved round by round.

(2) Concurrency under a fixed KV budget (``--budget-blocks`` blocks of 16 tokens): how many
requests are admitted at once when all are short, all long, or one long among short ones, and
the pools' allocated bytes at the peak and once the long one has left.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.api import Engine, load_engine
from engine.checkpoints import build_tiny_checkpoint
from engine.generation import DecodeBatch, Finished
from engine.kvcache import BLOCK_TOKENS, kv_bytes_per_token
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler

STEPS: list[float] = []
"""perf_counter() at the end of every decoding step (one scheduler runs at a time)."""
PROMPTS_DONE: list[tuple[float, int]] = []
"""(perf_counter(), prompt length) whenever a prefill completes a prompt: its first token."""

_real_step = DecodeBatch.step
_real_prefill = DecodeBatch.prefill


def _timed_step(self: DecodeBatch) -> None:
    _real_step(self)
    STEPS.append(time.perf_counter())


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
    first: dict[int, set[int]] = {c: set() for c in chunks}
    try:
        for c in chunks:  # warm-up
            one_round(scheds[c], streams, long_prompt)
        for _ in range(rounds):
            for c in chunks:
                gaps, before, t, tok = one_round(scheds[c], streams, long_prompt)
                stall[c] += gaps
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
        "| prefill chunk | gaps | median | p99 | max | base line median (p99) "
        "| long prompt's TTFT median (range) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in chunks:
        s, b = stall[c], base[c]
        lines.append(
            f"| {'one pass' if c == 0 else c} | {len(s)} | {statistics.median(s) * 1e3:.1f} "
            f"| {pct(s, 0.99) * 1e3:.1f} | {max(s) * 1e3:.1f} "
            f"| {statistics.median(b) * 1e3:.1f} ({pct(b, 0.99) * 1e3:.1f}) "
            f"| {statistics.median(ttft[c]) * 1e3:.0f} ({spread(ttft[c])}) |"
        )
    if 0 in chunks:
        for c in chunks:
            if c:
                ratio = max(stall[0]) / max(stall[c])
                med = statistics.median(stall[0]) / statistics.median(stall[c])
                lines.append(
                    f"\nchunk {c}: the worst gap is {ratio:.1f}x shorter than one pass's, the "
                    f"median gap {med:.1f}x; TTFT "
                    f"{statistics.median(ttft[c]) / statistics.median(ttft[0]):.2f}x one pass's."
                )
    lines.append(
        f"\nthe long prompt's first token is the same in every run: {'yes' if same else 'NO'}"
    )
    return lines


def admitted(
    eng: Engine, budget_bytes: int, requests: list[tuple[list[int], int]], watch: int | None
) -> tuple[int, int, int, int | None, int]:
    """Submit ``requests`` (prompt, max_tokens) at once to a scheduler with this budget:
    (most admitted at once, most bytes reserved, most bytes allocated, bytes allocated once
    request ``watch`` finished while others still ran, bytes allocated at the end)."""
    sched = Scheduler(eng, kv_cache_bytes=budget_bytes, prefill_chunk=256)
    sinks = [Sink() for _ in requests]
    peak_n = peak_reserved = peak_alloc = 0
    after: int | None = None
    try:
        for (p, n), s in zip(requests, sinks, strict=True):
            sched.submit(p, greedy(n), s)
        while not all(s.done.is_set() for s in sinks):
            m = sched.memory()
            peak_n = max(peak_n, m.requests)
            peak_reserved = max(peak_reserved, m.reserved_bytes)
            peak_alloc = max(peak_alloc, m.allocated_bytes)
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
    return peak_n, peak_reserved, peak_alloc, after, end


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
        "| peak allocated MiB | allocated at the end |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    after_long: int | None = None
    for label, reqs, each, watch in (
        ("96 short: 24-token prompt, 24 tokens", short, "47 (48)", None),
        ("12 long: 400-token prompt, 112 tokens", long, "511 (512)", None),
        ("1 long (1000 + 64) among 16 short (24 + 100)", mixed, "1063 (1072), 123 (128)", 0),
    ):
        n, reserved, alloc, after, end = admitted(eng, budget, reqs, watch)
        if watch is not None:
            after_long = after
        lines.append(
            f"| {label} | {each} | {n} | {reserved / mib:.1f} | {alloc / mib:.1f} "
            f"| {end / mib:.1f} |"
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
    ap.add_argument("--skip-admission", action="store_true")
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
        chunks = [int(c) for c in args.chunks.split(",")]
        lines = chunked_prefill(eng, chunks, args.rounds, args.streams, args.long)
        print(f"\n## {args.size} model\n")
        print("\n".join(lines))
        if not args.skip_admission:
            print()
            print("\n".join(admission(eng, args.budget_blocks)))
        eng.close()
    print(f"\nload average at the end (1, 5, 15 min): {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
