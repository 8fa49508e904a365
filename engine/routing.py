"""Governed routing: which experts each row may use, top-k over them, and usage accounting.

A :class:`RoutingControl` travels with one forward call (``model(..., routing=ctl)``) and may be
reused across calls (prefill, then decode steps): it carries the per-row allowed-expert mask and
accumulates usage on the device where each layer runs, so accounting costs no host sync.

Semantics, for a row whose allowed set is S (``|S| >= 1``): router logits of experts outside S
are set to ``-inf`` before the softmax, so the probabilities are the softmax over S exactly as
the physically pruned model computes them; the top ``min(k, |S|)`` experts are selected (and
renormalised when ``config.norm_topk_prob``). Experts outside S are never selected, so they are
never computed; the router rows of experts allowed in no row of the batch are not even read.

Usage per row and expert: ``tokens`` = number of (token, layer) top-k selections, ``weight`` =
sum of the router probabilities of those selections (the softmax over S, before any top-k
renormalisation). Positions where ``token_mask`` is False (padding) are not counted. Prompt and
generated tokens are both counted: each forward call adds the positions it processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import ExpertSetError

__all__ = ["RoutingControl", "RoutingPlan"]

_FOLD_EVERY = 256
"""Queued layer selections per device before they are folded into the totals."""

_Pending = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]
"""(experts [n, k], probs [n, k], count mask [n, k] or None, seq_len) of one layer call."""


@dataclass(frozen=True)
class RoutingPlan:
    """What one MoE layer needs from a mask, on its own device (cached per device and k)."""

    union: torch.Tensor | None
    """Global ids of the experts allowed in at least one row ([u], long), or None for all."""
    row_mask: torch.Tensor | None
    """[batch, u] bool: row may use union column; None when every row may use every column."""
    top_k: int
    """Selections per token: min(k, u)."""
    union_ids: tuple[int, ...] | None = None
    """Host copy of ``union`` (None for all experts)."""


class RoutingControl:
    """Per-call routing control: allowed experts per row, usage accumulators.

    Args:
        expert_mask: BoolTensor ``[batch, num_experts]``, True where the row may use the expert;
            None allows every expert in every row. Every row must allow at least one expert.
        token_mask: optional BoolTensor ``[batch, seq_len]`` of the positions of the next call
            whose routing is counted in usage (False for padding); None counts every position.
            Set it again before each call whose length differs.
        track_usage: accumulate ``tokens`` and ``weight``; when False routing is still governed.

    ``expert_mask`` may be replaced between calls (narrowing a row mid-generation); the batch
    size must stay the same while usage has been accumulated (call :meth:`reset` first).
    """

    def __init__(
        self,
        expert_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        track_usage: bool = True,
    ) -> None:
        self._mask: torch.Tensor | None = None
        self._mask_cpu: torch.Tensor | None = None
        self._plans: dict[tuple[torch.device, int], RoutingPlan] = {}
        self._acc: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending: dict[torch.device, list[_Pending]] = {}
        self._shape: tuple[int, int] | None = None
        self._token_mask: torch.Tensor | None = None
        self._token_mask_on: dict[torch.device, torch.Tensor] = {}
        self.token_mask = token_mask
        self.track_usage = track_usage
        self.expert_mask = expert_mask

    # -- the allowed sets -------------------------------------------------------------------

    @property
    def token_mask(self) -> torch.Tensor | None:
        return self._token_mask

    @token_mask.setter
    def token_mask(self, mask: torch.Tensor | None) -> None:
        if mask is not None and (mask.dtype != torch.bool or mask.dim() != 2):
            raise ValueError("token_mask must be a BoolTensor [batch, seq_len]")
        self._token_mask = mask
        self._token_mask_on = {}

    @property
    def expert_mask(self) -> torch.Tensor | None:
        return self._mask

    @expert_mask.setter
    def expert_mask(self, mask: torch.Tensor | None) -> None:
        if mask is not None:
            if mask.dtype != torch.bool or mask.dim() != 2:
                raise ValueError("expert_mask must be a BoolTensor [batch, num_experts]")
            mask_cpu = mask.detach().to("cpu")
            empty = (~mask_cpu.any(dim=1)).nonzero().flatten().tolist()
            if empty:
                raise ExpertSetError(f"rows {empty} of the batch allow no expert")
            if self._shape is not None and tuple(mask.shape) != self._shape:
                raise ValueError(
                    f"expert_mask shape {tuple(mask.shape)} differs from the accumulated usage "
                    f"{self._shape}; call reset() or use a new RoutingControl"
                )
            self._mask_cpu = mask_cpu
        else:
            self._mask_cpu = None
        self._mask = mask
        self._plans = {}

    def plan(self, device: torch.device, top_k: int, num_experts: int, batch: int) -> RoutingPlan:
        """The routing plan for a layer on ``device`` with ``top_k`` and ``num_experts``."""
        mask = self._mask_cpu
        if mask is not None and mask.shape[0] != batch:
            raise ValueError(f"expert_mask has {mask.shape[0]} rows but the batch has {batch}")
        key = (device, top_k)
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        if mask is None:
            plan = RoutingPlan(None, None, min(top_k, num_experts))
        else:
            if mask.shape[1] != num_experts:
                raise ValueError(
                    f"expert_mask has {mask.shape[1]} columns, the model {num_experts} experts"
                )
            in_union = mask.any(dim=0)
            union_ids = in_union.nonzero().flatten()
            all_in = bool(in_union.all())
            sub = mask if all_in else mask[:, union_ids]
            row_mask = None if bool(sub.all()) else sub.to(device, non_blocking=True)
            union = None if all_in else union_ids.to(device, non_blocking=True)
            plan = RoutingPlan(
                union,
                row_mask,
                min(top_k, int(union_ids.numel())),
                None if all_in else tuple(union_ids.tolist()),
            )
        self._plans[key] = plan
        return plan

    # -- usage ------------------------------------------------------------------------------

    def accumulate(
        self,
        experts: torch.Tensor,
        probs: torch.Tensor,
        valid: torch.Tensor | None,
        batch: int,
        seq_len: int,
        num_experts: int,
    ) -> None:
        """Add one layer's selections. ``experts`` [batch*seq, k] global ids, ``probs`` the
        float32 router probabilities of the selections, ``valid`` which selections are real.

        Selections are queued on their device and folded into the totals in a few batched
        scatter-adds (when the queue grows or the totals are read), so a layer costs no kernel
        launch when every selection counts, and no host sync ever."""
        if not self.track_usage:
            return
        if self._shape is None:
            self._shape = (batch, num_experts)
        elif self._shape != (batch, num_experts):
            raise ValueError(
                f"batch of {batch} rows does not match the accumulated usage {self._shape}"
            )
        count = valid
        token_mask = self._token_mask
        if token_mask is not None:
            if tuple(token_mask.shape) != (batch, seq_len):
                raise ValueError(
                    f"token_mask shape {tuple(token_mask.shape)} does not match the input "
                    f"({batch}, {seq_len})"
                )
            tm = self._token_mask_on.get(experts.device)
            if tm is None:
                tm = token_mask.to(experts.device, non_blocking=True).reshape(-1, 1)
                self._token_mask_on[experts.device] = tm
            tm = tm.expand(-1, experts.shape[1])
            count = tm if count is None else count & tm
        queue = self._pending.setdefault(experts.device, [])
        queue.append((experts, probs, count, seq_len))
        if len(queue) >= _FOLD_EVERY:
            self._fold(experts.device)

    def _fold(self, device: torch.device) -> None:
        queue = self._pending.pop(device, [])
        if not queue or self._shape is None:
            return
        batch, num_experts = self._shape
        acc = self._acc.get(device)
        if acc is None:
            acc = (
                torch.zeros(batch, num_experts, dtype=torch.int64, device=device),
                torch.zeros(batch, num_experts, dtype=torch.float64, device=device),
            )
            self._acc[device] = acc
        groups: dict[tuple[int, int, bool], list[_Pending]] = {}
        for entry in queue:
            key = (entry[3], entry[0].shape[1], entry[2] is not None)
            groups.setdefault(key, []).append(entry)
        tokens, weight = acc
        for (seq_len, k, counted), entries in groups.items():
            experts = torch.cat([e[0] for e in entries]) if len(entries) > 1 else entries[0][0]
            probs = torch.cat([e[1] for e in entries]) if len(entries) > 1 else entries[0][1]
            rows = torch.arange(batch, device=device).repeat_interleave(seq_len * k)
            flat = rows.repeat(len(entries)) * num_experts + experts.reshape(-1)
            p = probs.reshape(-1).to(torch.float64)
            if counted:
                c = torch.cat([e[2] for e in entries if e[2] is not None]).reshape(-1)
                tokens.view(-1).scatter_add_(0, flat, c.to(torch.int64))
                weight.view(-1).scatter_add_(0, flat, p * c)
            else:
                tokens.view(-1).scatter_add_(0, flat, torch.ones_like(flat))
                weight.view(-1).scatter_add_(0, flat, p)

    def _total(self, index: int) -> torch.Tensor:
        for device in list(self._pending):
            self._fold(device)
        parts = [acc[index] for acc in self._acc.values()]
        if not parts:
            dtype = torch.int64 if index == 0 else torch.float64
            if self._mask is None:
                return torch.zeros(0, 0, dtype=dtype)
            return torch.zeros(self._mask.shape, dtype=dtype, device=self._mask.device)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part.to(total.device)
        return total

    @property
    def tokens(self) -> torch.Tensor:
        """int64 ``[batch, num_experts]``: (token, layer) top-k selections so far."""
        return self._total(0)

    @property
    def weight(self) -> torch.Tensor:
        """float64 ``[batch, num_experts]``: router probabilities of those selections, summed."""
        return self._total(1)

    def reset(self) -> None:
        """Forget the accumulated usage (the masks stay)."""
        self._acc = {}
        self._pending = {}
        self._shape = None
