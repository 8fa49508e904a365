"""The one training loop (nanoGPT-style): AdamW, warm-up and cosine decay, gradient clipping,
checkpoints and resume, a progress line, several processes.

Every kit command that trains (pretrain, expert train, router-tune) builds the engine's model,
says which parameters train, and calls :func:`train`. A step: the global batch of that step
(:mod:`kit.data`), this rank's rows, forward with ``labels`` (transformers' loss), backward,
gradients averaged over ranks, ``grad_hook`` (expert training zeroes the public rows there),
clipping, the optimiser step, ``after_step`` (the bias clamp). The state (trained parameters,
optimiser, step, loss history) is saved every ``checkpoint_every`` steps to one file, replaced
atomically, so an interrupted run resumes from the last checkpoint and loses at most one
interval; the batch of each step depends only on the seed and the step, so a resumed run ends
with the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kit.data import batch_rows, global_batch
from kit.distributed import World, all_reduce_grads, all_reduce_mean
from kit.errors import KitError

__all__ = [
    "Schedule",
    "TrainResult",
    "fine_tune_schedule",
    "lr_at",
    "partial_dir",
    "train",
    "train_only",
]

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class Schedule:
    """Optimiser and schedule settings; saved with checkpoints (a resume must match them)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    checkpoint_every: int = 50


def fine_tune_schedule(
    steps: int, batch_size: int, lr: float, seed: int, checkpoint_every: int = 50
) -> Schedule:
    """The schedule of everything trained from the public model (an expert, its dense
    twin, router tuning, the joint MoE): a tenth of the steps warming up, no weight decay."""
    return Schedule(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=max(1, steps // 10),
        weight_decay=0.0,
        seed=seed,
        checkpoint_every=checkpoint_every,
    )


def train_only(
    model: torch.nn.Module, keep: Callable[[str], bool]
) -> dict[str, torch.nn.Parameter]:
    """The parameters whose names ``keep`` accepts, made trainable (kit.modelio.build_model
    freezes every one): what ``train`` is given."""
    params = {n: p for n, p in model.named_parameters() if keep(n)}
    for p in params.values():
        p.requires_grad_(True)
    return params


def partial_dir(out: Path, force: bool) -> Path:
    """``OUT.partial``, where a run keeps its checkpoint until ``out`` is written; ``force``
    removes an old one (every rank does this; one of them wins)."""
    work = out.with_name(out.name + ".partial")
    if force and work.exists():
        shutil.rmtree(work, ignore_errors=True)
    return work


def lr_at(step: int, s: Schedule) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr_ratio``."""
    if s.warmup and step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    span = max(1, s.steps - s.warmup)
    progress = min(1.0, (step - s.warmup) / span)
    floor = s.lr * s.min_lr_ratio
    return floor + 0.5 * (s.lr - floor) * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    resumed_from: int = 0
    seconds: float = 0.0


class Progress:
    """One progress line on stderr (rank 0): step, loss, tokens/s, ETA.

    Redrawn in place on a terminal; a line every ~5 % of the steps otherwise (logs, CI)."""

    def __init__(self, label: str, total: int, start: int, enabled: bool) -> None:
        self.label, self.total, self.start = label, total, start
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.every = max(1, total // 20)

    def update(self, step: int, loss: float, tokens: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        done = step - self.start
        final = step == self.total
        if self.tty and not final and now - self.last < 0.25:
            return
        if not self.tty and not final and step % self.every:
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        eta = (self.total - step) * elapsed / max(done, 1)
        line = (
            f"{self.label}: step {step}/{self.total}  loss {loss:.3f}  "
            f"{tokens / elapsed:,.0f} tok/s  elapsed {_hms(elapsed)}  ETA {_hms(eta)}"
        )
        end = "\n" if final or not self.tty else ""
        sys.stderr.write(("\r\x1b[2K" if self.tty else "") + line + end)
        sys.stderr.flush()


def _hms(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    blocks: torch.Tensor,
    schedule: Schedule,
    work_dir: Path,
    world: World,
    *,
    label: str = "train",
    grad_hook: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    forward_kwargs: dict[str, Any] | None = None,
    stop_after: int | None = None,
    lr_scale: Callable[[str], float] | None = None,
    settings: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``params`` (name -> parameter of ``model``) on ``blocks`` ``[n, seq_len]``.

    ``work_dir`` holds the checkpoint; when it has one, the run resumes from it (its schedule
    must be this one, and so must ``settings``: what else decided the run's start, such as
    how the trained weights were initialised, which a resume would otherwise silently take
    from the checkpoint). ``stop_after`` ends the run after that many steps of this call, as an
    interruption would (tests). Returns the loss history (one mean loss per step)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(params)
    plist = [params[n] for n in names]
    # one group per (weight decay, learning-rate scale); matrices decay, vectors do not
    by_group: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for n, p in zip(names, plist, strict=True):
        wd = schedule.weight_decay if p.dim() >= 2 else 0.0
        by_group.setdefault((wd, lr_scale(n) if lr_scale else 1.0), []).append(p)
    groups = [
        {"params": ps, "weight_decay": wd, "lr_scale": scale}
        for (wd, scale), ps in sorted(by_group.items())
    ]
    opt = torch.optim.AdamW(groups, lr=schedule.lr, betas=schedule.betas, eps=1e-8)
    # what the checkpoint must match besides the schedule: the caller's settings and the
    # training data itself (its token blocks, so another corpus or sequence length is caught)
    run_settings = {
        **(settings or {}),
        "blocks": [list(blocks.shape), hashlib.sha256(blocks.cpu().numpy().tobytes()).hexdigest()],
    }
    result = TrainResult()
    ckpt = work_dir / CHECKPOINT
    start = 0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=world.device, weights_only=False)
        if "settings" not in state:
            raise KitError(
                f"{ckpt}: a checkpoint written before runs recorded their settings and data; "
                f"remove {work_dir} (or pass --force) to start again"
            )
        if (
            state.get("schedule") != asdict(schedule)
            or sorted(state["params"]) != names
            or state["settings"] != run_settings
        ):
            raise KitError(
                f"{ckpt}: a checkpoint of a run with other settings or data; remove "
                f"{work_dir} (or pass --force) to start again"
            )
        with torch.no_grad():
            for n in names:
                params[n].copy_(state["params"][n])
        opt.load_state_dict(state["optim"])
        start = result.resumed_from = int(state["step"])
        result.losses = list(state["losses"])
        result.tokens = int(state["tokens"])
    model.train(True)
    bar = Progress(label, schedule.steps, start, world.main)
    n_blocks = blocks.shape[0]
    seq_len = blocks.shape[1]
    t0 = time.perf_counter()
    run_tokens = 0
    extra = forward_kwargs or {}
    for step in _steps(start, schedule.steps, stop_after):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule) * group["lr_scale"]
        rows = batch_rows(
            global_batch(n_blocks, schedule.batch_size, step, schedule.seed), world.rank, world.size
        )
        x = blocks[rows].to(world.device)
        with _autocast(world.device):
            loss = model(input_ids=x, labels=x, **extra).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_grads(plist, world)
        if grad_hook is not None:
            grad_hook()
        if schedule.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(plist, schedule.grad_clip)
        opt.step()
        if after_step is not None:
            after_step()
        mean_loss = all_reduce_mean(float(loss.detach()), world)
        result.losses.append(mean_loss)
        step_tokens = schedule.batch_size * seq_len
        result.tokens += step_tokens
        run_tokens += step_tokens
        bar.update(step + 1, mean_loss, run_tokens)
        done = step + 1
        if world.main and (done % schedule.checkpoint_every == 0 or done == schedule.steps):
            _save_state(
                ckpt,
                {
                    "step": done,
                    "schedule": asdict(schedule),
                    "settings": run_settings,
                    "params": {n: params[n].detach().cpu().clone() for n in names},
                    "optim": opt.state_dict(),
                    "losses": result.losses,
                    "tokens": result.tokens,
                },
            )
        if done % schedule.checkpoint_every == 0:
            world.barrier()
    model.train(False)
    result.seconds = time.perf_counter() - t0
    return result


def _steps(start: int, total: int, stop_after: int | None) -> Iterator[int]:
    end = total if stop_after is None else min(total, start + stop_after)
    return iter(range(start, end))


def finished(work_dir: Path, steps: int) -> bool:
    """Whether ``work_dir``'s checkpoint is of a run that reached ``steps``."""
    ckpt = work_dir / CHECKPOINT
    if not ckpt.is_file():
        return False
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["step"]) >= steps
