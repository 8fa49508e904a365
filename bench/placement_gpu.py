"""Placement check and speed on a GPU machine (runs on CPU too, with the GPU parts skipped).

    python bench/placement_gpu.py                     # builds a ~70M-parameter 8-expert model
    python bench/placement_gpu.py --model DIR --dtype bfloat16 --out results.json

For each placement it checks that the logits equal those of the reference placement (one
device) and measures prefill and decode throughput:

- ``single``: everything on the first GPU (the reference; on CPU-only machines: "cpu");
- ``auto-all-gpus``: ``device_map="auto"`` over every GPU (multi-GPU: layer trunks spread
  evenly, experts beside them); checks that more than one GPU holds weights;
- ``cpu-offload``: ``auto`` with a GPU budget that holds the trunk and 2 experts per layer;
  the rest are offloaded to CPU RAM and streamed per call;
- ``disk-offload``: 3 experts per layer on disk (read from the checkpoint's safetensors);
- each offloaded placement also runs with only the GPU-resident experts allowed: excluded
  offloaded experts are never loaded, so it should run at GPU speed;
- in every placement one GPU-resident expert and one offloaded expert (where there is one) are
  withdrawn (``unload_expert``) and loaded back while the engine runs: without them the
  logits of the other experts are unchanged, a request that allows them is refused, and once
  loaded back the logits equal the reference again; GPU memory must fall on withdrawal.

Record the printed table in docs/benchmarks.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import Engine, ExpertSetError, load_engine
from engine.checkpoints import build_tiny_checkpoint
from engine.placement import expert_unit, placement_units
from engine.routing import RoutingControl

IDS = tuple(f"e{i}" for i in range(8))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def measure(
    eng: Engine, allowed: tuple[str, ...] | None, args: argparse.Namespace
) -> dict[str, float]:
    dev = eng.device
    g = torch.Generator().manual_seed(0)
    vocab = eng.config.vocab_size
    prompt = torch.randint(5, vocab, (args.batch, args.prompt_len), generator=g).to(dev)
    mask = eng.mask_for(allowed, args.batch)

    def prefill() -> None:
        with torch.inference_mode():
            eng.model(input_ids=prompt, routing=RoutingControl(mask), logits_to_keep=1)

    def decode() -> None:
        with torch.inference_mode():
            ctl = RoutingControl(mask)
            cache = DynamicCache(config=eng.config)
            out = eng.model(
                input_ids=prompt, cache=cache, use_cache=True, routing=ctl, logits_to_keep=1
            )
            for _ in range(args.new_tokens):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = eng.model(
                    input_ids=nxt, cache=out.cache, use_cache=True, routing=ctl, logits_to_keep=1
                )

    t_prefill = timed(prefill, dev, args.repeat)
    t_total = timed(decode, dev, args.repeat)
    t_decode = max(t_total - t_prefill, 1e-9)
    return {
        "prefill_tok_s": args.batch * args.prompt_len / t_prefill,
        "decode_tok_s": args.batch * args.new_tokens / t_decode,
    }


def logits_of(eng: Engine, allowed: tuple[str, ...] | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, eng.config.vocab_size, (2, 32), generator=g)
    return eng.forward(ids, allowed=allowed).logits.float().cpu()


def resident_experts(eng: Engine, on_gpu: bool) -> tuple[str, ...]:
    """Experts whose FFN lies on a compute device (a GPU; the CPU when there is none) in
    every layer, i.e. not offloaded."""
    compute = (lambda d: isinstance(d, int)) if on_gpu else (lambda d: d == "cpu")
    layers = range(eng.config.num_hidden_layers)
    return tuple(
        eid
        for e, eid in enumerate(eng.expert_ids)
        if all(compute(eng.device_map[expert_unit(layer, e)]) for layer in layers)
    )


def gpu_bytes() -> int:
    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))


def check_withdrawal(
    eng: Engine, name: str, reference: dict[Any, torch.Tensor], tol: float, on_gpu: bool
) -> list[str]:
    """Withdraw and reload experts while the engine runs; returns what was checked."""
    ids = eng.expert_ids
    resident = set(resident_experts(eng, on_gpu))
    offloaded = [e for e in ids if e not in resident]
    kept = ids[:2]  # the reference's restricted set: never withdrawn here
    picks = [e for e in ids[::-1] if e in resident and e not in kept][:1] + offloaded[-1:]
    done = []
    for eid in picks:
        before = gpu_bytes() if on_gpu else 0
        eng.unload_expert(eid)
        freed = before - gpu_bytes() if on_gpu else 0
        if on_gpu and eid in resident:
            assert freed > 0, f"{name}: withdrawing GPU-resident {eid} freed no GPU memory"
        diff = (logits_of(eng, kept) - reference[kept]).abs().max().item()
        assert diff <= tol, f"{name}: without {eid} the logits of {kept} moved by {diff}"
        try:
            logits_of(eng, ids)
        except ExpertSetError:
            pass
        else:
            raise AssertionError(f"{name}: a request allowing withdrawn {eid} was not refused")
        eng.load_expert(eid)
        diff = (logits_of(eng, None) - reference[None]).abs().max().item()
        assert diff <= tol, f"{name}: after reloading {eid} the logits differ by {diff}"
        where = "resident" if eid in resident else "offloaded"
        done.append(f"{eid} ({where}, {freed / 2**20:.1f} MiB GPU freed)" if on_gpu else eid)
    return done


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, help="FlexOlmo checkpoint (default: build one)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flexgate-bench-"))
    model_dir = args.model or build_tiny_checkpoint(
        work / "model",
        IDS,
        seed=0,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8192,
        max_position_embeddings=1024,
        initializer_range=0.02,
    )
    gpus = torch.cuda.device_count()
    single: Any = 0 if gpus else "cpu"
    tol = 1e-4 if args.dtype == "float32" else 5e-2
    ref_eng = load_engine(model_dir, device_map=single, dtype=args.dtype)
    ids = ref_eng.expert_ids
    n_layers = ref_eng.config.num_hidden_layers
    sizes = {
        n: sum(p.numel() * p.element_size() for p in m.parameters())
        for n, m in ref_eng.model.named_modules()
    }
    units = placement_units(ref_eng.model)
    trunk = sum(sizes[u] for u in units if ".mlp.experts." not in u)
    expert_layer = sizes[expert_unit(0, 0)]
    params = sum(p.numel() for p in ref_eng.model.parameters())
    reference = {a: logits_of(ref_eng, a) for a in (None, ids[:2])}
    if gpus:  # the GPU reference against the same checkpoint on the CPU
        cpu_eng = load_engine(model_dir, device_map="cpu", dtype=args.dtype)
        cpu_diff = max(
            (logits_of(cpu_eng, a) - expected).abs().max().item()
            for a, expected in reference.items()
        )
        del cpu_eng
        print(f"GPU vs CPU logits: max abs difference {cpu_diff:.2e} ({args.dtype})", flush=True)
        assert args.dtype != "float32" or cpu_diff <= tol, f"GPU and CPU differ by {cpu_diff}"

    placements: list[tuple[str, dict[str, Any]]] = [("single", {"device_map": single})]
    if gpus > 1:
        placements.append(("auto-all-gpus", {"device_map": "auto"}))
    if gpus:
        budget = trunk + 2 * n_layers * expert_layer + 64 * 2**20
        placements.append(
            ("cpu-offload", {"device_map": "auto", "max_memory": {0: budget, "cpu": "64GiB"}})
        )
    disk = {"": single} | {
        expert_unit(layer, e): "disk" for layer in range(n_layers) for e in (5, 6, 7)
    }
    placements.append(("disk-offload", {"device_map": disk}))

    results: list[dict[str, Any]] = []
    del ref_eng
    for name, kwargs in placements:
        eng = load_engine(model_dir, dtype=args.dtype, **kwargs)
        devices = sorted({str(d) for d in eng.device_map.values()})
        for allowed, expected in reference.items():
            diff = (logits_of(eng, allowed) - expected).abs().max().item()
            assert diff <= tol, f"{name}: logits differ from the single-device run by {diff}"
        if name == "auto-all-gpus":
            used = {d for d in eng.device_map.values() if isinstance(d, int)}
            assert len(used) > 1, f"auto placed everything on {used}"
        withdrawn = check_withdrawal(eng, name, reference, tol, gpus > 0)
        print(f"{name:15} withdrawn and reloaded: {', '.join(withdrawn)}", flush=True)
        resident = resident_experts(eng, gpus > 0)
        for label, allowed in (("all", None), ("resident only", resident or None)):
            if label == "resident only" and (not resident or len(resident) == len(ids)):
                continue
            row = {
                "placement": name,
                "allowed": label,
                "devices": devices,
                "withdrawn": withdrawn,
                **measure(eng, allowed, args),
            }
            results.append(row)
            print(
                f"{name:15} {label:14} prefill {row['prefill_tok_s']:10.0f} tok/s  "
                f"decode {row['decode_tok_s']:9.0f} tok/s  on {','.join(devices)}",
                flush=True,
            )
        del eng
        if gpus:
            torch.cuda.empty_cache()

    machine = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "params": params,
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
    }
    print(json.dumps(machine))
    if not gpus:
        print("no GPU here: only the CPU placements ran (multi-GPU and CPU-offload checks skipped)")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
