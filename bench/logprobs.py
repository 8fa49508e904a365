"""What log-probabilities cost (a script, not a test).

    PYTHONPATH=. python bench/logprobs.py [--sizes tiny,medium] [--rounds 7] [--device cpu]
    PYTHONPATH=. python bench/logprobs.py --only-plain   # also runs on a tree without logprobs

For each model size of bench/engine.py, interleaving the configurations round by round and
taking medians, it times 8 concurrent greedy requests of 64 tokens after a 32-token prompt
(EOS ignored) and reports the wall time per decoding step:

  plain      nobody asks (the path every request that does not ask takes)
  one-asks   1 of the 8 asks for logprobs=5
  all-5      all 8 ask for logprobs=5
  all-20     all 8 ask for logprobs=20

and one request with a 512-token prompt and 1 generated token, without and with
prompt_logprobs=5 (the prefill's cost of scoring a prompt), and, replayed alone with timeit on
8 real running sequences, the one piece of work logprobs added to the plain step (finding the
rows that ask), as a share of the plain step. ``--only-plain`` runs only the
plain configuration and the plain prefill, with parameters a tree from before logprobs
accepts, so that the step cost of requests that do not ask can be compared across commits
(run it on each tree, alternating, a few times).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.api import load_engine
from engine.checkpoints import build_tiny_checkpoint
from engine.generation import Finished
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler


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
PROMPT = 32
LONG_PROMPT = 512
CONCURRENT = 8


def run_batch(sched: Scheduler, prompts: list[list[int]], params: list[SamplingParams]) -> float:
    """Wall seconds for every request to finish, submitted together."""
    done = threading.Semaphore(0)

    def sink(ev: Any) -> None:
        if isinstance(ev, Finished):
            done.release()

    start = time.perf_counter()
    for prompt, p in zip(prompts, params, strict=True):
        sched.submit(prompt, p, sink)
    for _ in prompts:
        if not done.acquire(timeout=600):
            raise RuntimeError("a request did not finish")
    return time.perf_counter() - start


def bench_size(
    name: str,
    rounds: int,
    tokens: int,
    tmp: Path,
    device: torch.device,
    only_plain: bool,
    models: Any,
) -> dict[str, float]:
    def setup() -> tuple[Any, list[list[int]], list[list[int]]]:
        # torch work on this long-lived thread would slow the scheduler's (bench/engine.py,
        # isolated): build, load and draw the prompts on a thread that ends.
        path = build_tiny_checkpoint(tmp / name, models.EXPERTS, seed=0, **models.SIZES[name])
        eng = load_engine(path, device_map="cpu" if device.type == "cpu" else str(device))
        g = torch.Generator().manual_seed(0)
        vocab = min(int(eng.model.config.vocab_size), len(eng.tokenizer))
        prompts = [
            torch.randint(5, vocab, (PROMPT,), generator=g).tolist() for _ in range(CONCURRENT)
        ]
        return eng, prompts, [torch.randint(5, vocab, (LONG_PROMPT,), generator=g).tolist()]

    eng, prompts, long_prompt = models.isolated(setup)
    sched = Scheduler(eng, max_batch_size=CONCURRENT)

    def greedy(n: int, **extra: Any) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **extra)

    plain = greedy(tokens)
    configs: dict[str, Callable[[], float]] = {
        "plain": lambda: run_batch(sched, prompts, [plain] * CONCURRENT) / tokens,
        "prefill-plain": lambda: run_batch(sched, long_prompt, [greedy(1)]),
    }
    if not only_plain:
        lp5, lp20 = greedy(tokens, logprobs=5), greedy(tokens, logprobs=20)
        configs |= {
            "one-asks": lambda: (
                run_batch(sched, prompts, [lp5] + [plain] * (CONCURRENT - 1)) / tokens
            ),
            "all-5": lambda: run_batch(sched, prompts, [lp5] * CONCURRENT) / tokens,
            "all-20": lambda: run_batch(sched, prompts, [lp20] * CONCURRENT) / tokens,
            "prefill-scored": lambda: run_batch(sched, long_prompt, [greedy(1, prompt_logprobs=5)]),
        }
    if not only_plain:
        from engine.generation import GenerationRequest, new_sequence

        rows = [
            new_sequence(
                eng, GenerationRequest(str(i), tuple(p), plain, eng.expert_ids), print, None
            )
            for i, p in enumerate(prompts)
        ]

        def plain_step_addition() -> float:
            # DecodeBatch._sample's check before it takes the plain path
            reps = 20000
            start = time.perf_counter()
            for _ in range(reps):
                asking = [i for i, s in enumerate(rows) if s.request.params.logprobs is not None]
                if not asking:
                    pass
            return (time.perf_counter() - start) / reps

        configs["replayed"] = plain_step_addition
    times: dict[str, list[float]] = {k: [] for k in configs}
    try:
        for fn in configs.values():  # warm-up
            fn()
        for _ in range(rounds):
            for key, fn in configs.items():
                times[key].append(fn())
    finally:
        sched.close()
        eng.close()
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="tiny,medium")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="'cpu' (default) or a GPU ('cuda:0')")
    ap.add_argument("--only-plain", action="store_true", help="only what asks for nothing")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="generated tokens per request")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = _bench_engine()
    print(f"threads={torch.get_num_threads()} device={device}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes.split(","):
            res = bench_size(
                name, args.rounds, args.tokens, Path(tmp), device, args.only_plain, models
            )
            base = res["plain"]
            print(f"{name}: {CONCURRENT} concurrent requests, ms per decoding step (median)")
            for key in ("plain", "one-asks", "all-5", "all-20"):
                if key in res:
                    print(f"  {key:<10} {res[key] * 1e3:8.3f}  ({res[key] / base:5.3f}x plain)")
            if "replayed" in res:
                added = res["replayed"]
                print(
                    f"  the plain step's added work, replayed alone: {added * 1e6:.2f} µs "
                    f"= {added / base * 100:.3f}% of the plain step"
                )
            print(f"{name}: one {LONG_PROMPT}-token prompt + 1 token, ms (median)")
            for key in ("prefill-plain", "prefill-scored"):
                if key in res:
                    ratio = res[key] / res["prefill-plain"]
                    print(f"  {key:<15} {res[key] * 1e3:8.2f}  ({ratio:5.3f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
