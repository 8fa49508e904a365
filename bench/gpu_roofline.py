"""Roofline figures for bench/engine.py (``--step-batch N``): what share of the device's own
matrix-multiply and memory throughput one batch-N decoding step reaches, and whether a MoE layer
synchronises with the host.

Not a script: bench/engine.py calls :func:`measure` once per model size, on the checkpoint it
built, and appends :func:`section` to its report. Three measures:

- the device's matmul throughput in the compute dtype (square products, best of a few) and its
  copy bandwidth (bench/engine.py's ``copy_gbs``, passed in);
- the batch-N decoding step: N concurrent requests (every expert allowed, different prompts)
  run twice, for ``short`` and ``long`` generated tokens; the difference of the two wall times
  over ``long - short`` is the time of one step with prefill and admission cancelled out. Its
  useful FLOPs and the bytes it must read (weights of the experts the batch reaches, attention,
  LM head, the KV cache) over that time, against the measured peaks, are the shares;
- on CUDA, one MoE layer's forward under ``torch.cuda.set_sync_debug_mode("error")`` for a
  decoding step's shape (a batch-1 and a batch-N step, all experts and per-row sets): "none"
  when it never waits for the device, else the error torch raised.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.api import Engine, load_engine
from engine.generation import Finished
from engine.routing import RoutingControl
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(
    device: torch.device, dtype: torch.dtype, reps: int = 10, n: int | None = None
) -> float:
    """Best ``n x n`` matrix-multiply throughput of ``device`` in ``dtype`` (TFLOP/s); ``n``
    defaults to 8192 on a GPU, 1024 on the CPU."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def step_cost(cfg: Any, batch: int, context: int, itemsize: int) -> tuple[float, float]:
    """(useful FLOPs, bytes read) of one decoding step of ``batch`` rows at ``context`` cached
    positions, every expert allowed. The experts read per layer are the expected number the
    batch's ``batch * k`` selections reach if routing spreads them: ``n (1 - (1 - k/n)^batch)``
    (all n at batch 32 with 8 experts, top-2)."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, n, k = cfg.num_attention_heads, cfg.num_experts, cfg.num_experts_per_tok
    head_dim = h // heads
    kv = cfg.num_key_value_heads * head_dim
    attn_w = 2 * h * h + 2 * h * kv
    expert_w = 3 * h * inter
    reached = n * (1 - (1 - k / n) ** batch)
    attention = 4 * context * heads * head_dim  # scores and values over the cached positions
    per_token = layers * (2 * attn_w + attention + 2 * h * n + k * 2 * expert_w)
    flops = batch * (per_token + 2 * h * cfg.vocab_size)
    weights = layers * (attn_w + h * n + reached * expert_w) + h * cfg.vocab_size
    kv_cache = batch * context * layers * 2 * kv
    return float(flops), float(itemsize * (weights + kv_cache))


def _run_batch(sched: Scheduler, prompts: Sequence[Sequence[int]], params: SamplingParams) -> float:
    done = threading.Semaphore(0)
    bad: list[Any] = []

    def sink(event: Any) -> None:
        if isinstance(event, Finished | BaseException):
            if not isinstance(event, Finished):
                bad.append(event)
            done.release()

    start = time.perf_counter()
    for prompt in prompts:
        sched.submit(list(prompt), params, sink)
    for _ in prompts:
        done.acquire()
    elapsed = time.perf_counter() - start
    if bad:
        raise RuntimeError(f"batch run failed: {bad[0]!r}")
    return elapsed


def layer_syncs(eng: Engine, batch: int) -> str:
    """ "none" if one MoE layer's forward, for a decoding step of 1 and of ``batch`` rows (all
    experts; and per-row sets), never synchronises with the device; else torch's message."""
    device = eng.device
    if device.type != "cuda":
        return "not checked (no CUDA device)"
    block = eng.model.model.layers[0].mlp
    ids = eng.expert_ids
    results = []
    for rows in (1, batch):
        sets = [ids[: 1 + r % len(ids)] for r in range(rows)]
        for mask in (eng.mask_for(None, rows), eng.mask_for(sets, rows)):
            ctl = RoutingControl(mask)
            h = torch.randn(rows, 1, eng.config.hidden_size, device=device, dtype=eng.dtype)
            with torch.inference_mode():
                block(h, routing=ctl)  # makes the routing plan (host-to-device copies)
                torch.cuda.synchronize(device)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    block(h, routing=ctl)
                except RuntimeError as exc:
                    results.append(f"batch {rows}: {exc}".splitlines()[0])
                finally:
                    torch.cuda.set_sync_debug_mode(0)
    return "; ".join(results) or "none"


@dataclass
class StepShare:
    name: str
    batch: int
    expert_path: str
    step_s: list[float]
    flops: float
    bytes: float
    syncs: str


def measure(
    path: Path,
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    expert_path: str,
    batch: int,
    rounds: int,
    prompt_len: int = 32,
    short: int = 8,
    long: int = 40,
) -> StepShare:
    """The batch-``batch`` decoding step of the checkpoint at ``path`` (see the module)."""
    device_map = "cpu" if device.type == "cpu" else str(device)
    eng = load_engine(path, device_map=device_map, dtype=dtype, expert_path=expert_path)
    sched = Scheduler(eng, max_batch_size=batch, track_usage=True)
    g = torch.Generator().manual_seed(1)
    vocab = min(eng.config.vocab_size, len(eng.tokenizer))
    prompts = [torch.randint(5, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    try:
        _run_batch(sched, prompts, params(4))  # warm-up
        steps = []
        for r in range(rounds):
            order = (short, long) if r % 2 == 0 else (long, short)
            t = {n: _run_batch(sched, prompts, params(n)) for n in order}
            steps.append((t[long] - t[short]) / (long - short))
        syncs = layer_syncs(eng, batch)
    finally:
        sched.close()
        eng.close()
    flops, nbytes = step_cost(eng.config, batch, prompt_len + (short + long) // 2, dtype.itemsize)
    return StepShare(name, batch, eng.expert_path, steps, flops, nbytes, syncs)


def section(shares: Sequence[StepShare], tflops: float, gbs: float, dtype: torch.dtype) -> str:
    """Markdown for bench/engine.py's report."""
    name = str(dtype).removeprefix("torch.")
    lines = [
        f"#### Batch decoding step against the device's roofline ({name})",
        "",
        f"Measured here: matmul {tflops:.3g} TFLOP/s ({name}), copy bandwidth {gbs:.0f} GB/s.",
        "",
        "| model | rows | expert path | ms/step, median (min-max) | tokens/s | useful TFLOP/s "
        "| share of matmul | GB/s read | share of bandwidth | host syncs in a MoE layer |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in shares:
        med = statistics.median(s.step_s)
        lines.append(
            f"| {s.name} | {s.batch} | {s.expert_path} | {med * 1e3:.2f} "
            f"({min(s.step_s) * 1e3:.2f}-{max(s.step_s) * 1e3:.2f}) | {s.batch / med:.0f} "
            f"| {s.flops / med / 1e12:.3g} | {s.flops / med / (tflops * 1e12):.1%} "
            f"| {s.bytes / med / 1e9:.3g} | {s.bytes / med / (gbs * 1e9):.1%} | {s.syncs} |"
        )
    lines += [
        "",
        "A step's time is the difference of two runs of the same concurrent requests (8 and 40 "
        "generated tokens) over their 32 extra steps, so prefill and admission cancel out; "
        "FLOPs are the useful ones (the capacity kernel computes more), bytes the weights of the "
        "experts the batch reaches, attention, LM head and KV cache.",
        "",
    ]
    return "\n".join(lines)
