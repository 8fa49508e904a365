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
(f) 8 concurrent requests whose sets share all experts but one each (each leaves out another
    expert): the cost of their batched decoding step against a batch-1 step, beside the bound
    that the weight bytes each step reads put on it;

and the machine's roofline: its matrix-multiply throughput and its copy bandwidth (best and
median of repeats), the weight bytes a batch-1 decoding step reads, and the fraction of the
bandwidth (b)'s decoding reaches (bytes/token x decoded tokens/s / bandwidth); with
``--step-batch N``, a batch-N decoding step's share of the device's own matmul and memory
throughput (bench/gpu_roofline.py; the GPU command uses the "1b" size in bfloat16). Every run
generates exactly ``--tokens`` tokens after a ``--prompt``-token prompt (EOS ignored), so tokens/s
is ``tokens / wall time`` of the whole request (prefill included); the decoding rates (the
roofline, (f)) count the tokens after the first over the time after it (prefill excluded).
Tables report the median of the rounds; the best round follows each table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import gpu_roofline
from engine import kernels
from engine.api import Engine, load_engine
from engine.checkpoints import build_tiny_checkpoint
from engine.generation import Finished
from engine.routing import RoutingControl
from engine.sampling import SamplingParams
from engine.scheduler import IDLE_EXIT_S, Scheduler
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
# 8 sets of 7 experts: each leaves out another one (they share 6 of 8 pairwise).
SHARED_SETS = [tuple(e for e in EXPERTS if e != left_out) for left_out in EXPERTS]
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
    """Best fp32 matrix-multiply throughput of ``device`` (GFLOP/s): ``n x n`` on the CPU,
    8192 x 8192 on a GPU."""
    size = n if device.type == "cpu" else 8192
    return 1000 * gpu_roofline.matmul_tflops(device, torch.float32, reps, n=size)


def copy_gbs(device: torch.device, mib: int = 256, reps: int = 9) -> tuple[float, float]:
    """(best, median) memory bandwidth of a large tensor copy over ``reps`` repeats (GB/s,
    bytes read + written, as STREAM's copy counts them)."""
    mib = mib if device.type == "cpu" else 4096
    a = torch.ones(mib * 2**18, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t)
    nbytes = 2 * a.numel() * 4
    return nbytes / min(times) / 1e9, nbytes / statistics.median(times) / 1e9


def weight_bytes_per_token(
    cfg: Any, allowed: int, experts_read: float | None = None, rows: int = 1
) -> float:
    """Bytes of weights one decoding step reads (float32): per layer the attention
    projections and norms, the router rows of the allowed experts and the FFNs of the
    ``experts_read`` experts the step selects (default: top-k of one token), then the final
    norm, the LM head and ``rows`` embedding rows."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    head_dim = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    k = min(cfg.num_experts_per_tok, allowed) if experts_read is None else experts_read
    per_layer = (2 * h * h + 2 * h * kv) + h * allowed + k * 3 * h * inter + (3 * h + kv)
    return 4.0 * (layers * per_layer + h * cfg.vocab_size + h + rows * h)


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


def products_floor(model: Any, reps: int = 5, passes: int = 10) -> tuple[float, float]:
    """Seconds one batch-1 decoding step spends in its matrix products alone, as (``W @ X.T``
    form, ``F.linear`` form), the median of ``reps`` timings of ``passes`` passes: the same
    weights a step reads (every layer's attention projections, 2 of its experts' FFNs, the
    LM head), in order, with nothing between them. What a step costs beyond the faster of
    the two is the work outside the products (small operators, Python)."""
    g = torch.Generator().manual_seed(0)
    weights: list[torch.Tensor] = []
    for layer in model.model.layers:
        a = layer.self_attn
        weights += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight]
        k = int(model.config.num_experts_per_tok)
        for e in torch.randperm(len(layer.mlp.experts), generator=g)[:k].tolist():
            ex = layer.mlp.experts[e]
            weights += [ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight]
    weights.append(model.lm_head.weight)
    pads = {w.shape[1]: torch.zeros(2, w.shape[1], dtype=w.dtype) for w in weights}
    rows = {w.shape[1]: torch.zeros(1, w.shape[1], dtype=w.dtype) for w in weights}

    def timed(form: Callable[[torch.Tensor], object]) -> float:
        times = []
        for _ in range(reps + 1):
            start = time.perf_counter()
            for _ in range(passes):
                for w in weights:
                    form(w)
            times.append((time.perf_counter() - start) / passes)
        return statistics.median(times[1:])

    with torch.inference_mode():
        return (
            timed(lambda w: torch.mm(w, pads[w.shape[1]].t())),
            timed(lambda w: torch.nn.functional.linear(rows[w.shape[1]], w)),
        )


def run_concurrent(
    sched: Scheduler,
    prompts: list[list[int]],
    params: SamplingParams,
    sets: Sequence[Sequence[str]] = CONCURRENT_SETS,
) -> tuple[float, float]:
    """(wall time, decoding time) of ``prompts`` submitted at once with ``sets``: the
    decoding time runs from the last first token (every row prefilled) to the end."""
    done = threading.Semaphore(0)
    results: list[Any] = []

    def sink(ev: Any) -> None:
        if isinstance(ev, Finished | BaseException):
            results.append(ev)
            done.release()

    t = time.perf_counter()
    for prompt, allowed in zip(prompts, sets, strict=True):
        sched.submit(prompt, params, sink, allowed=allowed)
    for _ in prompts:
        done.acquire()
    end = time.perf_counter()
    bad = [r for r in results if not isinstance(r, Finished)]
    if bad:
        raise RuntimeError(f"concurrent run failed: {bad[0]!r}")
    last_first = max(r.result.first_token_at or t for r in results)
    return end - t, end - last_first


def experts_per_step(sched: Scheduler, run: Callable[[], object]) -> float:
    """Mean number of distinct experts one MoE layer of a decoding step computes during
    ``run`` (the selections handed to RoutingControl.accumulate by one-token-per-row passes)."""
    counts: list[int] = []
    original = RoutingControl.accumulate

    def spy(self: RoutingControl, experts: Any, top_p: Any, valid: Any, *rest: Any) -> None:
        if rest[1] == 1:  # seq_len 1: a decoding step, not a prefill
            picked = experts if valid is None else experts[valid]
            counts.append(int(torch.unique(picked).numel()))
        original(self, experts, top_p, valid, *rest)

    RoutingControl.accumulate = spy  # type: ignore[method-assign,assignment]
    try:
        run()
    finally:
        RoutingControl.accumulate = original  # type: ignore[method-assign]
    return statistics.mean(counts)


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

    decoding: dict[str, list[float]] = {}
    """Per configuration, each round's decoding seconds per token after the first."""

    def engine(sched: Scheduler, allowed: Any = None, key: str = "") -> Callable[[], None]:
        def run() -> None:
            res = sched.generate(prompt, params, allowed=allowed)
            assert res.completion_tokens == tokens
            if key and res.first_token_at is not None:
                step = (time.perf_counter() - res.first_token_at) / (tokens - 1)
                decoding.setdefault(key, []).append(step)

        return run

    def concurrent(
        sched: Scheduler, sets: Sequence[Sequence[str]], key: str = ""
    ) -> Callable[[], float]:
        def run() -> float:
            wall, dec = run_concurrent(sched, prompts8, params, sets)
            if key:
                decoding.setdefault(key, []).append(dec / (tokens - 1))
            return wall

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
        "b": timed(engine(on, key="b")),
        "e_off": timed(engine(off)),
        "c": timed(engine(on, HALF)),
        "c1": timed(engine(on, ONE)),
        "d_seq": timed(sequential(on)),
        "d_conc": concurrent(on, CONCURRENT_SETS, "d_conc"),
        "d_conc_off": concurrent(off, CONCURRENT_SETS),
        "f_conc": concurrent(on, SHARED_SETS, "f_conc"),
    }
    # warm-up (first calls allocate, and check the engine equals transformers greedily)
    ref_out = reference()
    same = list(on.generate(prompt, params).token_ids) == ref_out[0, prompt_len:].tolist()
    short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    run_concurrent(on, prompts8, short)
    run_concurrent(off, prompts8, short)
    run_concurrent(on, prompts8, short, SHARED_SETS)
    # distinct experts per MoE layer of a step: batch 1 (all allowed), (d)'s and (f)'s batches
    read_1 = experts_per_step(on, engine(on))
    read_d = experts_per_step(on, lambda: run_concurrent(on, prompts8, params))
    read_f = experts_per_step(on, lambda: run_concurrent(on, prompts8, params, SHARED_SETS))

    t = Timings({})
    keys = list(configs)
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:  # alternate the order: no key always first
            # let the previous configuration's scheduler thread end (it idles IDLE_EXIT_S), so
            # that its OpenMP team does not compete with the next one's
            time.sleep(3 * IDLE_EXIT_S)
            t.add(key, configs[key]())
        print(f"  [{name}] round {r + 1}/{rounds} done", file=sys.stderr)
    floor = isolated(lambda: products_floor(eng.model)) if device.type == "cpu" else None
    accounting_1 = isolated(lambda: accounting_cost(lambda: engine(on)()))
    accounting_8 = isolated(
        lambda: accounting_cost(lambda: run_concurrent(on, prompts8, params)[0])
    )
    on.close()
    off.close()
    eng.close()
    forms = {
        f"{'x'.join(map(str, shape))} {'one token' if single else 'a few'} "
        f"({threads} thr.)": "W @ X.T" if transposed else "F.linear"
        for (single, shape, _, threads), transposed in sorted(kernels._choices.items(), key=str)
    }

    rows = {k: 8 if k[1:].startswith("_conc") or k.startswith("d_") else 1 for k in configs}
    tps = {k: rows[k] * tokens / t.best(k) for k in configs}
    med = {k: rows[k] * tokens / t.median(k) for k in configs}
    step_med = {k: statistics.median(v) for k, v in decoding.items()}
    step_best = {k: min(v) for k, v in decoding.items()}
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
        "step_median": step_med,
        "step_best": step_best,
        "step_spread": {k: (min(v), max(v)) for k, v in decoding.items()},
        "experts_read": {"b": read_1, "d": read_d, "f": read_f},
        "bytes_step": {
            "b": weight_bytes_per_token(cfg, 8, read_1) * dtype.itemsize / 4,
            "d": weight_bytes_per_token(cfg, 8, read_d, rows=8) * dtype.itemsize / 4,
            "f": weight_bytes_per_token(cfg, 8, read_f, rows=8) * dtype.itemsize / 4,
        },
        "expert_path": eng.expert_path,
        "forms": forms,
        "floor": floor,
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
    gbs: tuple[float, float],
    command: str,
    rounds: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> str:
    """The markdown section of a run. ``gbs``: (best, median) copy bandwidth."""
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
    load = ""
    with contextlib.suppress(OSError):
        load = " Load average (1, 5, 15 min) at the end: {:.2f} {:.2f} {:.2f}.".format(
            *os.getloadavg()
        )
    bw_best, bw_med = gbs
    lines = [
        f"## Engine generation (bench/engine.py, {title})",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine}. Configurations are interleaved round by round; the tables report"
        f" the median of {rounds} rounds, the best round follows each table.{load}",
        f"- Measured matmul throughput ({sizes[0]}): {gflops:.0f} GFLOP/s; memory copy "
        f"bandwidth ({sizes[1]}, bytes read + written): best {bw_best:.1f} GB/s, median "
        f"{bw_med:.1f} GB/s.",
        "",
    ]
    for r in results:
        med, tps = r["median_tps"], r["tps"]
        cfg = r["config"]
        ba = med["b"] / med["a"]
        c_red = 1 - med["b"] / med["c"]
        c1_red = 1 - med["b"] / med["c1"]
        d = med["d_conc"] / med["d_seq"]
        e1 = med["e_off"] / med["b"] - 1
        e8 = med["d_conc_off"] / med["d_conc"] - 1
        frac = med["b"] * r["flops_b"] / (gflops * 1e9)
        step, best_step = r["step_median"], r["step_best"]
        bytes_step = r["bytes_step"]
        roof = bytes_step["b"] / step["b"] / 1e9  # GB/s while decoding at batch 1
        roof_frac = roof / bw_best
        f_ratio = step["f_conc"] / step["b"]
        f_bound = bytes_step["f"] / bytes_step["b"]
        d_bound = bytes_step["d"] / bytes_step["b"]
        lines += [
            f"### {r['name']}: {r['params_m']:.1f} M parameters",
            "",
            f"hidden {cfg['hidden_size']}, FFN {cfg['intermediate_size']}, "
            f"{cfg['num_hidden_layers']} layers, 8 experts top-2, vocab {cfg['vocab_size']}; "
            f"expert path {r['expert_path']}; "
            f"greedy; engine output identical to transformers': {r['same_as_transformers']}.",
            "",
            "| measure (median of the rounds) | tokens/s | ratio | target | |",
            "| --- | ---: | ---: | --- | --- |",
            f"| (a) transformers FlexOlmoForCausalLM.generate, batch 1 | {med['a']:.1f} "
            "| 1.00 | | |",
            f"| (b) engine, all experts, batch 1 | {med['b']:.1f} | (b)/(a) = {ba:.2f} "
            f"| >= 1.3 | {verdict(ba >= 1.3)} |",
            f"| (b) its decoding alone (after the first token) | {1 / step['b']:.1f} "
            f"| {roof:.1f} GB/s of weights = {roof_frac:.0%} of the copy bandwidth "
            f"| >= 60% | {verdict(roof_frac >= 0.6)} |",
            f"| (c) engine, 4 of 8 experts | {med['c']:.1f} | time {-c_red:+.1%} vs (b) "
            f"| >= half the FLOPs saved ({r['saved_half']:.1%} saved: top-2 of 4 still runs 2 "
            f"experts) | {verdict(c_red >= r['saved_half'] / 2 - 0.02)} |",
            f"| (c1) engine, 1 of 8 experts (supplementary) | {med['c1']:.1f} | time "
            f"{-c1_red:+.1%} vs (b) | >= half the FLOPs saved ({r['saved_one']:.1%} saved) "
            f"| {verdict(c1_red >= r['saved_one'] / 2)} |",
            f"| (d) 8 sequential requests, 8 allowed sets | {med['d_seq']:.1f} | 1.00 | | |",
            f"| (d) the same 8 concurrently | {med['d_conc']:.1f} | {d:.2f}x | >= 3x "
            f"| {verdict(d >= 3.0)} |",
            f"| (e) usage off, batch 1 | {med['e_off']:.1f} | accounting costs {e1:+.1%} "
            f"(paired rounds: {r['paired_e'][0]:+.1%}) | <= 2% | {verdict(e1 <= 0.02)} |",
            f"| (e) usage off, 8 concurrent | {med['d_conc_off']:.1f} | accounting costs "
            f"{e8:+.1%} (paired rounds: {r['paired_e'][1]:+.1%}) | <= 2% "
            f"| {verdict(e8 <= 0.02)} |",
            f"| (e) accounting work replayed in isolation | | {r['isolated_e'][0]:.2%} of (b)'s "
            f"time, {r['isolated_e'][1]:.2%} of (d)'s | <= 2% "
            f"| {verdict(max(r['isolated_e']) <= 0.02)} |",
            f"| (f) 8 concurrent, sets sharing all experts but one each | {med['f_conc']:.1f} "
            f"| batched step = {f_ratio:.2f}x a batch-1 step | bound {f_bound:.2f}x "
            f"(weight bytes) | {verdict(f_ratio <= 1.25 * f_bound)} |",
            "",
            f"Roofline of batch-1 decoding: a step reads {bytes_step['b'] / 1e6:.1f} MB of "
            f"weights (per layer the attention projections and norms, the router, the "
            f"{r['experts_read']['b']:.0f} selected experts' FFNs; then the LM head and an "
            f"embedding row); at {1 / step['b']:.1f} decoded tokens/s (median; best "
            f"{1 / best_step['b']:.1f}) that is {roof:.1f} GB/s, {roof_frac:.0%} of the best "
            f"copy bandwidth ({bytes_step['b'] / best_step['b'] / 1e9 / bw_best:.0%} at the "
            f"best round; {roof / bw_med:.0%} of the median bandwidth). Whole requests "
            f"(prefill included): {med['b'] * r['bytes_b'] / 1e9:.1f} GB/s. (b) runs "
            f"{r['flops_b'] / 1e6:.1f} MFLOP per token (expert FFNs {r['ffn_share']:.0%}), "
            f"{med['b'] * r['flops_b'] / 1e9:.2f} GFLOP/s = {frac:.1%} of the matmul "
            "throughput: batch-1 decoding is matrix-vector work, bound by the bytes it "
            "streams and the work around them, not by arithmetic.",
            "",
        ]
        if r["floor"] is not None:
            tr, lin = r["floor"]
            best_form = min(tr, lin)
            lines += [
                f"Where a batch-1 step's {step['b'] * 1e3:.2f} ms go: its matrix products "
                f"alone, back to back on the same weights, take {tr * 1e3:.2f} ms as W @ X.T "
                f"({bytes_step['b'] / tr / 1e9:.1f} GB/s) and {lin * 1e3:.2f} ms as F.linear "
                f"({bytes_step['b'] / lin / 1e9:.1f} GB/s); the rest of the step, "
                f"{(step['b'] - best_form) * 1e3:.2f} ms, is the work outside the products "
                "(small operators, Python, sampling). At the faster products' rate with "
                "nothing else, decoding would reach "
                f"{bytes_step['b'] / best_form / 1e9 / bw_best:.0%} of the copy bandwidth.",
                "",
            ]
        lines += [
            f"Batched steps: a step of (d)'s 8 rows computes {r['experts_read']['d']:.2f} "
            f"distinct experts a layer and reads {bytes_step['d'] / 1e6:.1f} MB "
            f"({d_bound:.2f}x a batch-1 step's bytes, so (d) <= {8 / d_bound:.2f}x when both "
            f"stream weights at one rate); its measured step costs "
            f"{step['d_conc'] / step['b']:.2f}x a batch-1 step. (f)'s rows (each set leaves out "
            f"another expert) compute {r['experts_read']['f']:.2f} distinct experts a layer, "
            f"{bytes_step['f'] / 1e6:.1f} MB a step: the batched step costs {f_ratio:.2f}x a "
            f"batch-1 step against a bound of {f_bound:.2f}x (8 rows decoded for "
            f"{f_ratio / 8:.2f} of the cost of 8 batch-1 steps; the target counts as met within "
            "25 % of the bound).",
            "",
            "Kernel forms in use (engine.kernels; "
            + (f"cached in {kernels.cache_path()}" if kernels.cache_path() else "measured here")
            + "): "
            + ", ".join(f"{k}: {v}" for k, v in r["forms"].items())
            + ".",
            "",
            "Best round (tokens/s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in tps.items())
            + f"; (b)/(a) {tps['b'] / tps['a']:.2f}, (d) "
            f"{tps['d_conc'] / tps['d_seq']:.2f}x, (e) "
            f"{tps['e_off'] / tps['b'] - 1:+.1%} / "
            f"{tps['d_conc_off'] / tps['d_conc'] - 1:+.1%}. Spread (seconds, min-max): "
            + ", ".join(f"{k} {lo:.3f}-{hi:.3f}" for k, (lo, hi) in r["spread"].items())
            + ".",
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
        text += "\n" + gpu_roofline.section(shares, tflops, gbs[0], dtype)
    print(text)
    if args.write is not None:
        label = f"threads={torch.get_num_threads()}" if device.type == "cpu" else "gpu"
        if dtype != torch.float32:
            label += f" {args.dtype}"
        write_section(args.write, text, label)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
