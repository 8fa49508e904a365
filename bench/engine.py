"""Engine generation benchmark (a script, not a test): tokens/s reported as ratios.

    PYTHONPATH=. python bench/engine.py [--sizes medium,tiny] [--rounds 5] \\
        [--device cpu|cuda:0] [--dtype float32|bfloat16] [--expert-path auto|grouped|stacked] \\
        [--step-batch 32] [--write docs/benchmarks.md]

For each model size it builds a random FlexOlmo checkpoint (8 experts, top-2) and measures, in
one run, interleaving the configurations round by round and taking medians:

(a) transformers' FlexOlmoForCausalLM.generate (greedy, batch 1, its default DynamicCache);
(b) this engine (Engine.scheduler, greedy, batch 1) with all experts allowed;
(c) the same with half of the experts allowed, and (c1) with one expert allowed;
(d) 8 concurrent requests with 8 different allowed sets vs the same 8 one after another;
(e) usage accounting on vs off (batch 1, and the 8 concurrent requests);

and the machine's matrix-multiply throughput, to say what fraction of it (b) reaches; with
``--step-batch N``, a batch-N decoding step's share of the device's own matmul and memory
throughput (bench/gpu_roofline.py; the GPU command uses the "1b" size in bfloat16). Every run
generates exactly ``--tokens`` tokens after a ``--prompt``-token prompt (EOS ignored), so tokens/s
is ``tokens / wall time`` of the whole request (prefill included).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import gpu_roofline
from engine.api import Engine, load_engine
from engine.checkpoints import build_tiny_checkpoint
from engine.generation import Finished
from engine.routing import RoutingControl
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.stacked_experts import EXPERT_PATHS

EXPERTS = tuple(["public"] + [f"owner-{i}" for i in range(1, 8)])

SIZES: dict[str, dict[str, Any]] = {
    # ~82 M parameters: compute dominates.
    "medium": {
        "vocab_size": 512,
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 2048,
    },
    # ~1.07 B parameters (bfloat16: 2.1 GB): for a GPU, where the device must matter.
    "1b": {
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 4096,
    },
    # ~0.3 M parameters: per-step overhead dominates.
    "tiny": {
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 2048,
    },
}

# 8 different allowed sets of 4 experts, each with the public expert.
CONCURRENT_SETS = [
    ("public", "owner-1", "owner-2", "owner-3"),
    ("public", "owner-4", "owner-5", "owner-6"),
    ("public", "owner-7", "owner-1", "owner-4"),
    ("public", "owner-2", "owner-5", "owner-7"),
    ("public", "owner-3", "owner-6", "owner-1"),
    ("public", "owner-2", "owner-4", "owner-6"),
    ("public", "owner-3", "owner-5", "owner-7"),
    ("public", "owner-1", "owner-5", "owner-6"),
]
HALF = ("public", "owner-1", "owner-2", "owner-3")
ONE = ("public",)


T = TypeVar("T")


def isolated(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own that ends with it. On the CPU, torch's OpenMP runtime
    gives every thread that runs a parallel operator a team of worker threads until that
    thread ends, and once the teams' threads outnumber the CPUs it stops spin-waiting between
    operators (engine.scheduler.IDLE_EXIT_S): torch work done on this script's own thread
    (transformers' generate, the matmul test) would slow every side measured after it,
    transformers' included. So all of it runs on short-lived threads."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            err.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if err:
        raise err[0]
    return out[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """Best fp32 matrix-multiply throughput of ``device`` (GFLOP/s)."""
    n = n if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def copy_gbs(device: torch.device, mib: int = 256, reps: int = 5) -> float:
    """Best memory bandwidth of a large tensor copy (GB/s, bytes read + written)."""
    mib = mib if device.type == "cpu" else 4096
    a = torch.ones(mib * 2**18, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def weight_bytes_per_token(cfg: Any, allowed: int) -> float:
    """Bytes of weights one batch-1 decoding step reads (float32)."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    head_dim = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    k = min(cfg.num_experts_per_tok, allowed)
    per_layer = (2 * h * h + 2 * h * kv) + h * allowed + k * 3 * h * inter + 4 * h
    return 4.0 * (layers * per_layer + h * cfg.vocab_size + 2 * h)


def flops_per_token(cfg: Any, allowed: int, context: int) -> tuple[float, float]:
    """(total, expert FFN) forward FLOPs for one token at ``context`` cached positions."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    head_dim = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    k = min(cfg.num_experts_per_tok, allowed)
    attn = 2 * (h * h * 2 + h * kv * 2) + 2 * 2 * context * cfg.num_attention_heads * head_dim
    router = 2 * h * allowed
    ffn = k * 2 * 3 * h * inter
    total = layers * (attn + router + ffn) + 2 * h * cfg.vocab_size
    return float(total), float(layers * ffn)


@dataclass
class Timings:
    samples: dict[str, list[float]]

    def add(self, key: str, seconds: float) -> None:
        self.samples.setdefault(key, []).append(seconds)

    def best(self, key: str) -> float:
        """The fastest round: on a machine shared with other jobs, interference only ever
        adds time, so the minimum is the least noisy estimate (as timeit does)."""
        return min(self.samples[key])

    def median(self, key: str) -> float:
        return statistics.median(self.samples[key])


def accounting_cost(request: Callable[[], object], reps: int = 5) -> float:
    """Seconds of usage-accounting work in one run of ``request``, measured in isolation:
    the selections every MoE layer hands to RoutingControl.accumulate are recorded during the
    run, then replayed through fresh controls (accumulate, fold, read the totals) ``reps``
    times; the fastest replay is returned. Immune to the noise of a shared machine."""
    recorded: list[tuple[Any, ...]] = []
    original = RoutingControl.accumulate

    def spy(self: RoutingControl, *args: Any) -> None:
        if self.track_usage:
            recorded.append(args)
        original(self, *args)

    RoutingControl.accumulate = spy  # type: ignore[method-assign]
    try:
        request()
    finally:
        RoutingControl.accumulate = original  # type: ignore[method-assign]
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        ctl: RoutingControl | None = None
        shape: tuple[int, int] | None = None
        for args in recorded:
            if ctl is None or (args[3], args[5]) != shape:
                if ctl is not None:
                    ctl.tokens.cpu(), ctl.weight.cpu()
                ctl, shape = RoutingControl(), (args[3], args[5])
            ctl.accumulate(*args)
        if ctl is not None:
            ctl.tokens.cpu(), ctl.weight.cpu()
        best = min(best, time.perf_counter() - start)
    return best


def run_concurrent(sched: Scheduler, prompts: list[list[int]], params: SamplingParams) -> float:
    done = threading.Semaphore(0)
    results: list[Any] = []

    def sink(ev: Any) -> None:
        if isinstance(ev, Finished | BaseException):
            results.append(ev)
            done.release()

    t = time.perf_counter()
    for prompt, allowed in zip(prompts, CONCURRENT_SETS, strict=True):
        sched.submit(prompt, params, sink, allowed=allowed)
    for _ in prompts:
        done.acquire()
    elapsed = time.perf_counter() - t
    bad = [r for r in results if not isinstance(r, Finished)]
    if bad:
        raise RuntimeError(f"concurrent run failed: {bad[0]!r}")
    return elapsed


def bench_size(
    name: str,
    rounds: int,
    tokens: int,
    prompt_len: int,
    workdir: Path,
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float32,
    expert_path: str = "auto",
) -> dict[str, Any]:
    from transformers import FlexOlmoForCausalLM

    overrides = SIZES[name]

    def setup() -> tuple[Engine, Any]:
        path = build_tiny_checkpoint(workdir / name, EXPERTS, seed=0, dtype=dtype, **overrides)
        device_map = "cpu" if device.type == "cpu" else str(device)
        eng = load_engine(path, device_map=device_map, dtype=dtype, expert_path=expert_path)
        ref = FlexOlmoForCausalLM.from_pretrained(path, dtype=dtype)
        return eng, ref.to(device).eval()

    eng, ref = isolated(setup)
    cfg = eng.model.config
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = cfg.pad_token_id
    params_m = sum(p.numel() for p in eng.model.parameters()) / 1e6

    g = torch.Generator().manual_seed(0)
    vocab = min(cfg.vocab_size, len(eng.tokenizer))
    prompt = torch.randint(5, vocab, (prompt_len,), generator=g).tolist()
    prompts8 = [torch.randint(5, vocab, (prompt_len,), generator=g).tolist() for _ in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)

    on = Scheduler(eng, max_batch_size=8, track_usage=True)
    off = Scheduler(eng, max_batch_size=8, track_usage=False)

    def reference() -> torch.Tensor:
        def run() -> torch.Tensor:
            with torch.inference_mode():  # thread-local: set on the thread that generates
                return ref.generate(
                    torch.tensor([prompt], device=device), max_new_tokens=tokens, do_sample=False
                )

        return isolated(run)

    def hf() -> None:
        assert reference().shape[1] == prompt_len + tokens

    def engine(sched: Scheduler, allowed: Any = None) -> Callable[[], None]:
        def run() -> None:
            res = sched.generate(prompt, params, allowed=allowed)
            assert res.completion_tokens == tokens

        return run

    def sequential(sched: Scheduler) -> Callable[[], None]:
        def run() -> None:
            for p, allowed in zip(prompts8, CONCURRENT_SETS, strict=True):
                sched.generate(p, params, allowed=allowed)

        return run

    def timed(fn: Callable[[], None]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        return run

    # One round runs every configuration once; the (e) pairs run back to back.
    configs: dict[str, Callable[[], float]] = {
        "a": timed(hf),
        "b": timed(engine(on)),
        "e_off": timed(engine(off)),
        "c": timed(engine(on, HALF)),
        "c1": timed(engine(on, ONE)),
        "d_seq": timed(sequential(on)),
        "d_conc": lambda: run_concurrent(on, prompts8, params),
        "d_conc_off": lambda: run_concurrent(off, prompts8, params),
    }
    # warm-up (first calls allocate, and check the engine equals transformers greedily)
    ref_out = reference()
    same = list(on.generate(prompt, params).token_ids) == ref_out[0, prompt_len:].tolist()
    run_concurrent(on, prompts8, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    run_concurrent(off, prompts8, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))

    t = Timings({})
    keys = list(configs)
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:  # alternate the order: no key always first
            t.add(key, configs[key]())
        print(f"  [{name}] round {r + 1}/{rounds} done", file=sys.stderr)
    accounting_1 = isolated(lambda: accounting_cost(lambda: engine(on)()))
    accounting_8 = isolated(lambda: accounting_cost(lambda: run_concurrent(on, prompts8, params)))
    on.close()
    off.close()
    eng.close()

    tps = {k: (8 if k.startswith("d_") else 1) * tokens / t.best(k) for k in configs}
    med = {k: (8 if k.startswith("d_") else 1) * tokens / t.median(k) for k in configs}
    paired_e1 = statistics.median(
        b / o for b, o in zip(t.samples["b"], t.samples["e_off"], strict=True)
    )
    paired_e8 = statistics.median(
        b / o for b, o in zip(t.samples["d_conc"], t.samples["d_conc_off"], strict=True)
    )
    context = prompt_len + tokens // 2
    total_all, ffn_all = flops_per_token(cfg, 8, context)
    total_half, _ = flops_per_token(cfg, len(HALF), context)
    total_one, _ = flops_per_token(cfg, len(ONE), context)
    return {
        "name": name,
        "params_m": params_m,
        "config": overrides,
        "tps": tps,
        "median_tps": med,
        "same_as_transformers": same,
        "flops_b": total_all,
        "bytes_b": weight_bytes_per_token(cfg, 8) * dtype.itemsize / 4,
        "expert_path": eng.expert_path,
        "ffn_share": ffn_all / total_all,
        "saved_half": 1 - total_half / total_all,
        "saved_one": 1 - total_one / total_all,
        "spread": {k: (min(v), max(v)) for k, v in t.samples.items()},
        "paired_e": (paired_e1 - 1, paired_e8 - 1),
        "isolated_e": (accounting_1 / t.best("b"), accounting_8 / t.best("d_conc")),
    }


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def report(
    results: list[dict[str, Any]],
    gflops: float,
    gbs: float,
    command: str,
    rounds: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        title = f"{torch.cuda.get_device_name(device)} GPU"
        machine = (
            f"{torch.cuda.get_device_name(device)} ({device}), host {cpu}, torch "
            f"{torch.__version__}; {str(dtype).removeprefix('torch.')} (TF32 off, torch's "
            "default)"
        )
        sizes = "8192x8192 fp32 on the GPU", "4 GiB"
    else:
        title = f"{torch.get_num_threads()} threads"
        machine = (
            f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), no GPU; {str(dtype).removeprefix('torch.')}"
        )
        sizes = "2048x2048 fp32", "256 MiB"
    lines = [
        f"## Engine generation (bench/engine.py, {title})",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine}. Configurations are interleaved round by round and the best of"
        f" {rounds} rounds is reported (interference only adds time); medians follow each table.",
        f"- Measured matmul throughput ({sizes[0]}): {gflops:.0f} GFLOP/s; memory copy "
        f"bandwidth ({sizes[1]}): {gbs:.1f} GB/s.",
        "",
    ]
    for r in results:
        tps = r["tps"]
        cfg = r["config"]
        ba = tps["b"] / tps["a"]
        c_red = 1 - tps["b"] / tps["c"]
        c1_red = 1 - tps["b"] / tps["c1"]
        d = tps["d_conc"] / tps["d_seq"]
        e1 = tps["e_off"] / tps["b"] - 1
        e8 = tps["d_conc_off"] / tps["d_conc"] - 1
        frac = tps["b"] * r["flops_b"] / (gflops * 1e9)
        lines += [
            f"### {r['name']}: {r['params_m']:.1f} M parameters",
            "",
            f"hidden {cfg['hidden_size']}, FFN {cfg['intermediate_size']}, "
            f"{cfg['num_hidden_layers']} layers, 8 experts top-2, vocab {cfg['vocab_size']}; "
            f"expert path {r['expert_path']}; "
            f"greedy; engine output identical to transformers': {r['same_as_transformers']}.",
            "",
            "| measure | tokens/s | ratio | target | |",
            "| --- | ---: | ---: | --- | --- |",
            f"| (a) transformers FlexOlmoForCausalLM.generate, batch 1 | {tps['a']:.1f} "
            "| 1.00 | | |",
            f"| (b) engine, all experts, batch 1 | {tps['b']:.1f} | (b)/(a) = {ba:.2f} "
            f"| >= 1.0 | {verdict(ba >= 1.0)} |",
            f"| (c) engine, 4 of 8 experts | {tps['c']:.1f} | time {-c_red:+.1%} vs (b) "
            f"| >= half the FLOPs saved ({r['saved_half']:.1%} saved: top-2 of 4 still runs 2 "
            f"experts) | {verdict(c_red >= r['saved_half'] / 2 - 0.02)} |",
            f"| (c1) engine, 1 of 8 experts (supplementary) | {tps['c1']:.1f} | time "
            f"{-c1_red:+.1%} vs (b) | >= half the FLOPs saved ({r['saved_one']:.1%} saved) "
            f"| {verdict(c1_red >= r['saved_one'] / 2)} |",
            f"| (d) 8 sequential requests, 8 allowed sets | {tps['d_seq']:.1f} | 1.00 | | |",
            f"| (d) the same 8 concurrently | {tps['d_conc']:.1f} | {d:.2f}x | >= 3x "
            f"| {verdict(d >= 3.0)} |",
            f"| (e) usage off, batch 1 | {tps['e_off']:.1f} | accounting costs {e1:+.1%} "
            f"(paired rounds: {r['paired_e'][0]:+.1%}) | <= 2% | {verdict(e1 <= 0.02)} |",
            f"| (e) usage off, 8 concurrent | {tps['d_conc_off']:.1f} | accounting costs "
            f"{e8:+.1%} (paired rounds: {r['paired_e'][1]:+.1%}) | <= 2% "
            f"| {verdict(e8 <= 0.02)} |",
            f"| (e) accounting work replayed in isolation | | {r['isolated_e'][0]:.2%} of (b)'s "
            f"time, {r['isolated_e'][1]:.2%} of (d)'s | <= 2% "
            f"| {verdict(max(r['isolated_e']) <= 0.02)} |",
            "",
            f"(b) runs {r['flops_b'] / 1e6:.1f} MFLOP per token (expert FFNs "
            f"{r['ffn_share']:.0%}), i.e. {tps['b'] * r['flops_b'] / 1e9:.2f} GFLOP/s = "
            f"{frac:.1%} of the measured matmul throughput; the 8 concurrent requests reach "
            f"{tps['d_conc'] * r['flops_b'] / 1e9:.2f} GFLOP/s "
            f"({tps['d_conc'] * r['flops_b'] / (gflops * 1e9):.1%}). Batch-1 decoding is a "
            "matrix-vector product per weight matrix, bound by memory bandwidth, not by "
            f"matmul throughput: (b) reads {r['bytes_b'] / 1e6:.0f} MB of weights per token, "
            f"i.e. {tps['b'] * r['bytes_b'] / 1e9:.1f} GB/s "
            f"({tps['b'] * r['bytes_b'] / (gbs * 1e9):.0%} of the measured copy bandwidth).",
            "",
            "Medians of the rounds (tokens/s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in r["median_tps"].items())
            + f"; (b)/(a) {r['median_tps']['b'] / r['median_tps']['a']:.2f}, (d) "
            f"{r['median_tps']['d_conc'] / r['median_tps']['d_seq']:.2f}x, (e) "
            f"{r['median_tps']['e_off'] / r['median_tps']['b'] - 1:+.1%} / "
            f"{r['median_tps']['d_conc_off'] / r['median_tps']['d_conc'] - 1:+.1%}.",
            "",
        ]
    return "\n".join(lines)


def write_section(path: Path, text: str, label: str) -> None:
    """Replace (or append) this run's section of ``path``, one section per ``label``."""
    begin, end = (
        f"<!-- bench/engine.py {label}: begin -->",
        f"<!-- bench/engine.py {label}: end -->",
    )
    body = f"{begin}\n{text}\n{end}\n"
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        new = head + body + tail
    else:
        new = old.rstrip("\n") + "\n\n" + body
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="medium,tiny")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--write", type=Path, default=None, help="update this markdown file")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu", help="'cpu' (default) or a GPU ('cuda:0')")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--expert-path", default="auto", choices=EXPERT_PATHS)
    ap.add_argument(
        "--step-batch",
        type=int,
        default=0,
        help="also measure a decoding step of this many rows against the roofline (0: off)",
    )
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = "PYTHONPATH=. python bench/engine.py " + " ".join(argv or sys.argv[1:])
    gflops = isolated(lambda: matmul_gflops(device))
    results = []
    shares: list[gpu_roofline.StepShare] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes.split(","):
            print(f"benchmarking {name} ...", file=sys.stderr)
            results.append(
                bench_size(
                    name,
                    args.rounds,
                    args.tokens,
                    args.prompt,
                    Path(tmp),
                    device,
                    dtype=dtype,
                    expert_path=args.expert_path,
                )
            )
            if args.step_batch:
                print(f"batch-{args.step_batch} step of {name} ...", file=sys.stderr)
                shares.append(
                    isolated(
                        lambda name=name: gpu_roofline.measure(
                            Path(tmp) / name,
                            name,
                            device,
                            dtype,
                            args.expert_path,
                            args.step_batch,
                            args.rounds,
                        )
                    )
                )
    gflops = max(gflops, isolated(lambda: matmul_gflops(device)))
    gbs = isolated(lambda: copy_gbs(device))
    text = report(results, gflops, gbs, command.strip(), args.rounds, device, dtype)
    if shares:
        tflops = isolated(lambda: gpu_roofline.matmul_tflops(device, dtype))
        text += "\n" + gpu_roofline.section(shares, tflops, gbs, dtype)
    print(text)
    if args.write is not None:
        label = f"threads={torch.get_num_threads()}" if device.type == "cpu" else "gpu"
        if dtype != torch.float32:
            label += f" {args.dtype}"
        write_section(args.write, text, label)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
