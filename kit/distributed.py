"""Several processes, one training run: ``torchrun`` / ``accelerate launch`` set the env.

The launchers export ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with more than one process the
default process group starts (gloo on CPUs, NCCL on GPUs). Every rank holds the whole model,
takes its rows of each global batch (:func:`kit.data.batch_rows`) and, after its backward pass,
averages the trainable gradients with one all-reduce, which is what DistributedDataParallel
does, written out so that frozen parameters (most of them, in expert training) cost nothing and
the order of operations is the same at every world size. Rank 0 alone writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "all_reduce_grads", "init_world"]


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world(device: str | None = None) -> World:
    """This process's place in the run (rank 0 of 1 without a launcher)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return World(rank, size, dev)


def all_reduce_grads(params: list[torch.nn.Parameter], world: World) -> None:
    """Average the gradients of ``params`` over the ranks (one flat all-reduce)."""
    if world.size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.size
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def all_reduce_mean(value: float, world: World) -> float:
    """The mean of a scalar over the ranks (the logged loss)."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if world.device.type == "cuda":
        t = t.to(world.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / world.size
