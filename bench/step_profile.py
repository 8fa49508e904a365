"""Where one batch-1 decoding step spends its time: this engine vs transformers' generate.

    PYTHONPATH=. python bench/step_profile.py [--device cuda:0] [--sizes medium,tiny]

For each model size of bench/engine.py it generates 64 tokens greedily (after two warm-up
runs) with each side, times one run, then profiles another with torch.profiler and reports per
step: wall time, the time the device spent in kernels (on a GPU: the fraction of wall time the
GPU is busy), kernels launched, and device-to-host copies (host syncs: the engine has one per
MoE layer, to read which experts were selected). On a GPU it tells whether a step is bound by
the device or by the host's Python and launch overhead.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import load_engine
from engine.checkpoints import build_tiny_checkpoint
from engine.sampling import SamplingParams


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


TOKENS = 64


def profile_size(path: Path, size: str, device: torch.device, models: Any) -> None:
    """Print one table row per side for the checkpoint at ``path``; ``models`` is
    bench/engine.py (its ``sync``, and ``isolated``: transformers' generate runs on a
    short-lived thread, so that its OpenMP team does not slow the engine's on a CPU)."""
    from transformers import FlexOlmoForCausalLM

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)

    def sync() -> None:
        models.sync(device)

    def transformers_generate() -> Any:
        with torch.inference_mode():  # thread-local: set on the thread that generates
            return ref.generate(x, max_new_tokens=TOKENS, do_sample=False)

    eng = models.isolated(
        lambda: load_engine(path, device_map="cpu" if device.type == "cpu" else str(device))
    )
    ref = models.isolated(
        lambda: FlexOlmoForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    )
    ref.generation_config.eos_token_id = None
    prompt = list(range(5, 37))
    params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
    x = torch.tensor([prompt], device=device)
    runs: dict[str, Callable[[], Any]] = {
        "engine": lambda: eng.generate(prompt, params),
        "transformers": lambda: models.isolated(transformers_generate),
    }
    try:
        for name, fn in runs.items():
            with torch.inference_mode():
                fn()
                fn()
                sync()
                start = time.perf_counter()
                fn()
                sync()
                wall = (time.perf_counter() - start) / TOKENS
                with profile(activities=activities) as prof:
                    fn()
                    sync()
            events = prof.key_averages()
            busy = sum(e.self_device_time_total for e in events) / 1e6 / TOKENS
            kernels = sum(e.count for e in events if e.self_device_time_total > 0) / TOKENS
            d2h = sum(e.count for e in events if "DtoH" in e.key) / TOKENS
            print(
                f"| {size} | {name} | {1 / wall:.1f} | {wall * 1e3:.2f} | {busy * 1e3:.3f} "
                f"({busy / wall:.1%}) | {kernels:.0f} | {d2h:.1f} |",
                flush=True,
            )
    finally:
        eng.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="medium,tiny")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    models = _bench_engine()
    print("| model | side | tokens/s | ms/step | device busy, ms/step | kernels/step | DtoH/step |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            build = partial(
                build_tiny_checkpoint,
                Path(tmp) / size,
                models.EXPERTS,
                seed=0,
                **models.SIZES[size],
            )
            path = models.isolated(build)
            profile_size(path, size, device, models)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
