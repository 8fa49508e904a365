"""The stacked expert path: a layer's resident experts run from per-device stacks, sync-free.

Why: the grouped path (``GovernedSparseMoeBlock._dispatch``) reads the selected expert ids on the
host once per MoE layer, to run only those experts. On a CPU that costs nothing; on a GPU it is
a device-to-host copy that drains the GPU's queue in every layer, so the host can never run
ahead of the device. This path keeps every decision on the device: selections are sorted by
expert and handed to one grouped (or batched) matrix product per projection over a stacked
``[experts, ...]`` weight tensor, whose shapes never depend on the data.

Layout, per MoE block and per device: ``gate_up`` ``[n, 2 * inter, hidden]`` (gate rows first,
as transformers' fused FlexOlmo experts) and ``down`` ``[n, hidden, inter]`` hold the block's
experts whose weights lie on that device. Each expert's own parameters (``gate_proj``,
``up_proj``, ``down_proj``) become views into its stack, so the weights are in memory once and
the grouped path, placement and the checkpoint keys see the same tensors as before. An expert
stays its own placement unit: experts on different devices get one stack per device, and an
expert whose weights accelerate streams per call (CPU- or disk-offloaded: its parameters are on
``meta``) is in no stack; a batch that may route to such an expert runs that layer on the grouped
path (streaming an expert is host work anyway).

Withdrawal: :meth:`StackedExperts.restack` (called whenever placement changes, e.g. by
``engine.placement.unload_expert``) rebuilds a device's stack without the withdrawn expert and
drops the old one, so the expert's memory is really freed (a stack cannot free one slice of its
storage); loading it back restacks it in. Rebuilding copies one layer's stack at a time.

Exclusion is unchanged: an excluded expert's router logit is ``-inf`` before the top-k, so it is
never selected; a selection that is not real (a row allowed fewer experts than ``top_k``) gets
the sentinel slot ``n``, sorts after every real one and is never computed. Rows the kernels skip
or compute on padding are removed with ``torch.where``, never by multiplying by zero (an
uninitialised row, or NaN weights, times zero is NaN).

Two kernels, chosen per stack (:func:`kernel_for`):

- ``grouped_mm``: torch's grouped GEMM over the selections sorted by expert, with the group
  offsets computed on the device. On CUDA it is sync-free only on its CUTLASS path (bfloat16 on
  compute capability 9.x / 10.x, 16-byte aligned rows); elsewhere torch itself would copy the
  offsets to the host. On the CPU torch's kernel loops over the groups (no device to wait for).
  It computes each selection with its own expert only, exactly as transformers' default
  ``grouped_mm`` experts do, op for op, so bfloat16 results match transformers'.
- ``capacity``: everywhere else (CUDA float32 included). Each expert gets a zero-padded buffer
  of one row per token (no expert can receive more: top-k picks distinct experts), filled by one
  ``index_copy_``; then two batched products over the stack. The work is ``n / k`` times the
  useful FFN FLOPs, spent on zero rows, and only the experts allowed in some row of the batch
  are computed (when that is not all of the stack, they run one by one, still sync-free).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import PlacementError

__all__ = [
    "EXPERT_PATHS",
    "ExpertPath",
    "ExpertStack",
    "Kernel",
    "StackedExperts",
    "check_expert_path",
    "kernel_for",
    "resident_groups",
    "resolve_expert_path",
]

ExpertPath = Literal["grouped", "stacked"]
"""How a MoE layer runs its experts: ``grouped`` (per-expert modules, selections grouped on the
host for a decoding step), ``stacked`` (this module)."""

EXPERT_PATHS = ("auto", "grouped", "stacked")
"""Accepted by ``load_engine(expert_path=...)``; ``auto`` is ``stacked`` on CUDA, else
``grouped`` (the faster one on a CPU, where a host read costs nothing)."""

Kernel = Literal["grouped_mm", "capacity"]

Experts = Sequence[nn.Module] | nn.ModuleList
"""A block's expert modules in router order (``GovernedSparseMoeBlock.experts``)."""

FORCE_KERNEL: Kernel | None = None
"""Tests set this to run one kernel whatever the device prefers; None: :func:`kernel_for`."""

_GROUPED_MM: Callable[..., torch.Tensor] | None = getattr(
    F, "grouped_mm", getattr(torch, "_grouped_mm", None)
)


def check_expert_path(requested: object) -> None:
    """PlacementError unless ``requested`` is one of :data:`EXPERT_PATHS`."""
    if not isinstance(requested, str) or requested not in EXPERT_PATHS:
        raise PlacementError(
            f"invalid expert_path {requested!r} (use {', '.join(map(repr, EXPERT_PATHS))})"
        )


def resolve_expert_path(requested: str, device: torch.device) -> ExpertPath:
    """The path for ``requested`` (one of :data:`EXPERT_PATHS`) on an engine whose main device
    is ``device``; PlacementError for anything else."""
    check_expert_path(requested)
    if requested == "auto":
        # The grouped path is the one measured on a GPU (docs/benchmarks.md); the stacked one
        # is exact on the CPU but has not run on a GPU yet, so it is not chosen for anyone
        # until it has been measured there. `device` is where that choice will be made.
        del device
        return "grouped"
    return cast(ExpertPath, requested)


def kernel_for(device: torch.device, dtype: torch.dtype, hidden: int, inter: int) -> Kernel:
    """``grouped_mm`` where torch's grouped GEMM runs without reading the offsets on the host
    (CUDA: its CUTLASS kernel, bfloat16 on capability 9.x/10.x with 16-byte aligned rows) or
    where reading them costs nothing (the CPU); else ``capacity``."""
    if _GROUPED_MM is None:
        return "capacity"
    if device.type == "cpu":
        return "grouped_mm" if dtype in (torch.float32, torch.bfloat16) else "capacity"
    if device.type == "cuda" and dtype == torch.bfloat16 and hidden % 8 == 0 and inter % 8 == 0:
        major, _ = torch.cuda.get_device_capability(device)
        if major in (9, 10):
            return "grouped_mm"
    return "capacity"


def _weights(expert: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = cast(Any, expert)
    return m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight


def resident_groups(
    experts: Experts, unloaded: Collection[int]
) -> list[tuple[torch.device, tuple[int, ...]]]:
    """Per device, the experts whose three weights lie on it (not unloaded, not streamed by
    accelerate: an offloaded expert's parameters are on ``meta``), in router order."""
    by_device: dict[torch.device, list[int]] = {}
    for e, expert in enumerate(experts):
        if e in unloaded:
            continue
        weights = _weights(expert)
        device = weights[0].device
        if device.type == "meta" or any(w.device != device for w in weights):
            continue
        by_device.setdefault(device, []).append(e)
    return [(device, tuple(ids)) for device, ids in by_device.items()]


@dataclass(eq=False)
class ExpertStack:
    """One device's experts of one MoE block, stacked; see the module documentation."""

    device: torch.device
    experts: tuple[int, ...]
    """Global expert ids (router rows), in slot order."""
    gate_up: torch.Tensor
    """``[n, 2 * inter, hidden]``: slot s holds expert ``experts[s]``'s gate then up rows."""
    down: torch.Tensor
    """``[n, hidden, inter]``."""
    slot_of: torch.Tensor
    """``[num_experts]`` long on ``device``: an expert's slot, ``n`` for experts not here."""
    act: Callable[[torch.Tensor], torch.Tensor]
    views: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]
    """The parameters installed on the experts (views into the stack), to tell whether they
    still are (a stack is reused only then)."""
    kernel: Kernel

    @classmethod
    def build(
        cls,
        experts: Experts,
        ids: tuple[int, ...],
        device: torch.device,
        num_experts: int,
    ) -> ExpertStack:
        """Copy experts ``ids`` (weights on ``device``) into a new stack and make their
        parameters views of it; their previous tensors are then no longer referenced here."""
        gate0 = _weights(experts[ids[0]])[0]
        inter, hidden = gate0.shape
        dtype = gate0.dtype
        for e in ids:
            g, u, d = _weights(experts[e])
            shapes = (tuple(g.shape), tuple(u.shape), tuple(d.shape))
            if shapes != ((inter, hidden), (inter, hidden), (hidden, inter)) or any(
                w.dtype != dtype for w in (g, u, d)
            ):
                raise PlacementError(f"expert {e} does not match the others' shapes and dtype")
        n = len(ids)
        with torch.no_grad():
            gate_up = torch.empty((n, 2 * inter, hidden), dtype=dtype, device=device)
            down = torch.empty((n, hidden, inter), dtype=dtype, device=device)
            for s, e in enumerate(ids):
                g, u, d = _weights(experts[e])
                gate_up[s, :inter].copy_(g)
                gate_up[s, inter:].copy_(u)
                down[s].copy_(d)
            views = []
            for s, e in enumerate(ids):
                m = cast(Any, experts[e])
                grad = m.gate_proj.weight.requires_grad
                triple = (
                    nn.Parameter(gate_up[s, :inter], requires_grad=grad),
                    nn.Parameter(gate_up[s, inter:], requires_grad=grad),
                    nn.Parameter(down[s], requires_grad=grad),
                )
                m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight = triple
                views.append(triple)
            slot_of = torch.full((num_experts,), n, dtype=torch.long)
            slot_of[list(ids)] = torch.arange(n)
        act = cast(Any, experts[ids[0]]).act_fn
        return cls(
            device,
            ids,
            gate_up,
            down,
            slot_of.to(device),
            act,
            tuple(views),
            kernel_for(device, dtype, hidden, inter),
        )

    def intact(self, experts: Experts) -> bool:
        """Every expert of this stack still has the parameters it installed."""
        return all(
            all(a is b for a, b in zip(_weights(experts[e]), view, strict=True))
            for e, view in zip(self.experts, self.views, strict=True)
        )

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def outputs(
        self,
        h: torch.Tensor,
        experts: torch.Tensor,
        valid: torch.Tensor | None,
        used: Collection[int] | None,
    ) -> torch.Tensor:
        """``[tokens * k, hidden]`` on ``h``'s device: selection i's expert output (before its
        routing weight) when its expert is in this stack and the selection is real, else 0.
        ``used``: the experts allowed in some row (None: all)."""
        n = len(self.experts)
        k = experts.shape[1]
        x = h.to(self.device)
        slot = self.slot_of.index_select(0, experts.reshape(-1).to(self.device))
        if valid is not None:
            slot = slot.masked_fill(~valid.reshape(-1).to(self.device), n)
        kernel = FORCE_KERNEL or self.kernel
        if kernel == "grouped_mm":
            y = self._grouped_mm(x, slot, k)
        else:
            slots = [s for s, e in enumerate(self.experts) if used is None or e in used]
            y = self._capacity(x, slot, k, slots)
        return y.to(h.device)

    def _ffn_tail(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act(gate) * up

    def _grouped_mm(self, x: torch.Tensor, slot: torch.Tensor, k: int) -> torch.Tensor:
        assert _GROUPED_MM is not None
        n = len(self.experts)
        order = torch.argsort(slot, stable=True)
        sorted_slot = slot.index_select(0, order)
        counts = torch.zeros(n + 1, dtype=torch.long, device=slot.device)
        counts.scatter_add_(0, slot, torch.ones_like(slot))
        offs = counts[:n].cumsum(0, dtype=torch.int32)  # ends of the groups; sentinels after
        xs = x.index_select(0, order // k)
        hidden = self._ffn_tail(_GROUPED_MM(xs, self.gate_up.transpose(1, 2), offs=offs))
        ys = _GROUPED_MM(hidden, self.down.transpose(1, 2), offs=offs)
        # rows past the last group (sentinels) are left uninitialised by the kernel
        ys = torch.where((sorted_slot < n).unsqueeze(1), ys, ys.new_zeros(()))
        return torch.empty_like(ys).index_copy_(0, order, ys)

    def _capacity(
        self, x: torch.Tensor, slot: torch.Tensor, k: int, slots: list[int]
    ) -> torch.Tensor:
        n = len(self.experts)
        cap = x.shape[0]  # top-k picks distinct experts: at most one row per token each
        s_len = slot.numel()
        arange = torch.arange(s_len, device=slot.device)
        local = slot < n
        hits = slot.unsqueeze(1) == torch.arange(n, device=slot.device)
        rank = (hits.cumsum(0) - 1).gather(1, slot.clamp(max=n - 1).unsqueeze(1)).squeeze(1)
        # real selections go to (slot, rank); the others to a row of their own past the buffers
        dest = torch.where(local, slot * cap + rank, n * cap + arange)
        buf = x.new_zeros((n * cap + s_len, x.shape[1]))
        buf.index_copy_(0, dest, x.index_select(0, arange // k))
        xb = buf[: n * cap].view(n, cap, x.shape[1])
        if len(slots) == n:
            hidden = self._ffn_tail(torch.bmm(xb, self.gate_up.transpose(1, 2)))
            yb = torch.bmm(hidden, self.down.transpose(1, 2))
        else:  # experts allowed in no row of the batch are not computed
            yb = xb.new_zeros(xb.shape)
            for s in slots:
                yb[s] = F.linear(self._ffn_tail(F.linear(xb[s], self.gate_up[s])), self.down[s])
        ys = yb.reshape(n * cap, -1).index_select(0, torch.where(local, dest, 0))
        return torch.where(local.unsqueeze(1), ys, ys.new_zeros(()))


class StackedExperts:
    """A MoE block's experts as per-device stacks (see the module documentation)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.stacks: list[ExpertStack] = []
        self.stacked: frozenset[int] = frozenset()
        """Experts held by some stack."""

    def restack(
        self,
        experts: Experts,
        unloaded: Collection[int],
        groups: Sequence[tuple[torch.device, tuple[int, ...]]] | None = None,
    ) -> None:
        """Make the stacks hold exactly the resident experts (``groups``: which experts go
        into one stack on which device; default :func:`resident_groups`). A stack whose
        experts and parameters are unchanged is kept; any other is rebuilt, and the stacks
        left over are dropped, which frees their memory."""
        wanted = resident_groups(experts, unloaded) if groups is None else list(groups)
        old = {(s.device, s.experts): s for s in self.stacks}
        stacks: list[ExpertStack] = []
        for device, ids in wanted:
            if not ids:
                continue
            kept = old.get((device, ids))
            if kept is not None and kept.intact(experts):
                stacks.append(kept)
            else:
                stacks.append(ExpertStack.build(experts, ids, device, self.num_experts))
        self.stacks = stacks
        self.stacked = frozenset(e for s in stacks for e in s.experts)

    def covers(self, used: Collection[int] | None) -> bool:
        """Every expert in ``used`` (None: all) is in a stack."""
        if used is None:
            return len(self.stacked) == self.num_experts
        return self.stacked.issuperset(used)

    def forward(
        self,
        h: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        valid: torch.Tensor | None,
        used: Collection[int] | None,
    ) -> torch.Tensor:
        """The block's expert output ``[tokens, hidden]`` for ``h`` ``[tokens, hidden]``,
        selections ``experts`` ``[tokens, k]`` (global ids), their routing ``weights`` and
        ``valid`` (which selections are real; None: all). Requires :meth:`covers`."""
        n_tok, k = experts.shape
        y: torch.Tensor | None = None
        for stack in self.stacks:
            if used is not None and not any(e in used for e in stack.experts):
                continue
            part = stack.outputs(h, experts, valid, used)
            y = part if y is None else y + part  # disjoint selections: adding zeros is exact
        if y is None:
            return torch.zeros_like(h)
        w = weights.reshape(-1, 1).to(y.device, y.dtype)
        return (y * w).view(n_tok, k, -1).sum(dim=1).to(h.dtype)
