"""The governed FlexOlmo model: transformers' FlexOlmo with a governed sparse MoE block.

Everything but the MoE block is transformers' own (attention, RMS norms, rotary embeddings, KV
cache, causal mask). The MoE block differs in three ways:

- each expert is its own module (``experts.E.{gate,up,down}_proj``, transformers'
  ``FlexOlmoMLP``), matching the per-expert keys on disk, so that accelerate can place or offload
  every expert separately and an expert can be unloaded and loaded back;
- routing is governed by a :class:`~engine.routing.RoutingControl` (per-row allowed sets,
  usage accounting); an expert outside a row's set is never computed;
- the router may carry a per-expert bias (``mlp.gate.bias``, the FlexOlmo paper's negative
  bias on non-public experts), added to the router logits when present.

Tokens are grouped by expert (on the host for the few selections of a decoding step, by one
stable sort and one bincount for a prefill) and only the experts that received tokens run, each
on its own device; a single token (batch-1 decoding) runs its experts on the hidden state
itself and sums their outputs with one small matrix product. That grouping reads the selections
on the host once per layer; after :meth:`GovernedSparseMoeBlock.stack_experts` (the engine's
``expert_path="stacked"``) the resident experts run instead from per-device stacks with no host
read (:mod:`engine.stacked_experts`).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import FlexOlmoConfig
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.flex_olmo import modeling_flex_olmo as fo

from engine import kernels
from engine.errors import ExpertSetError
from engine.routing import RoutingControl
from engine.stacked_experts import StackedExperts

__all__ = [
    "ROUTER_BIAS_ATTR",
    "FastRMSNorm",
    "GovernedFlexOlmoDecoderLayer",
    "GovernedFlexOlmoForCausalLM",
    "GovernedFlexOlmoModel",
    "GovernedRouter",
    "GovernedSparseMoeBlock",
    "SkinnyLinear",
]

ROUTER_BIAS_ATTR = "router_bias"
"""Config attribute (bool): the checkpoint carries ``model.layers.N.mlp.gate.bias``."""

_HOST_GROUPING_MAX = 64
"""Up to this many selections per layer are grouped by expert on the host (one transfer of
the ids) rather than by a device sort and bincount."""

ExpertMLP = fo.FlexOlmoMLP
"""One expert's FFN: transformers' FlexOlmoMLP (gate_proj, up_proj, down_proj, SiLU)."""


class SkinnyLinear(nn.Linear):
    """``nn.Linear`` whose few-row products (a decoding step's attention projections and LM
    head) take the form :mod:`engine.kernels` measures faster on this CPU; anything else
    (training, prefill, other devices and dtypes) is ``F.linear``, as transformers' own.

    Float32 only: there the two forms agree to the order of float additions, while the
    bfloat16 engine is held to transformers' exact bfloat16 logits."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            self.bias is None
            and w.dtype == torch.float32
            and input.dtype == torch.float32
            and w.device.type == "cpu"
            and input.device.type == "cpu"
            and not torch.is_grad_enabled()
        ):
            rows = input.numel() // max(input.shape[-1], 1)
            if 0 < rows <= kernels.SKINNY_MAX and kernels.transposed_is_faster(
                w, rows, lambda: _skinny_weights(w)
            ):
                out = kernels.linear(input.reshape(rows, -1), w, True)
                return out.view(*input.shape[:-1], w.shape[0])
        return F.linear(input, w, self.bias)


class FastRMSNorm(fo.FlexOlmoRMSNorm):
    """transformers' FlexOlmo RMS norm as one ``F.rms_norm`` in float32 inference (the same
    formula in one operator instead of eight: a decoding step runs five norms a layer);
    otherwise transformers' own forward."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            hidden_states.dtype == torch.float32
            and w.dtype == torch.float32
            and not torch.is_grad_enabled()
        ):
            return F.rms_norm(hidden_states, (w.shape[0],), w, self.variance_epsilon)
        return super().forward(hidden_states)


def _fast_norm(norm: nn.Module) -> FastRMSNorm:
    """``norm`` (a FlexOlmoRMSNorm) as a :class:`FastRMSNorm` (same parameters and keys)."""
    norm.__class__ = FastRMSNorm
    return cast(FastRMSNorm, norm)


_SKINNY: weakref.WeakSet[SkinnyLinear] = weakref.WeakSet()
_BLOCKS: weakref.WeakSet[GovernedSparseMoeBlock] = weakref.WeakSet()
"""Every MoE block alive (engine.kernels times their experts' weights together)."""
_BLOCKS_LOCK = threading.Lock()
"""A model built on one thread while a scheduler thread times its kernels: the set is
snapshotted and grown under this lock (a WeakSet changed while iterated raises)."""


def _skinny(linear: nn.Linear) -> SkinnyLinear:
    """``linear`` as a :class:`SkinnyLinear` (same parameters and checkpoint keys)."""
    linear.__class__ = SkinnyLinear
    skinny = cast(SkinnyLinear, linear)
    _SKINNY.add(skinny)
    return skinny


def _skinny_weights(like: torch.Tensor) -> list[torch.Tensor]:
    """The CPU weights of every :class:`SkinnyLinear` shaped as ``like`` (timed together by
    engine.kernels, so that the measure reads them from memory, as decoding does)."""
    return [
        m.weight
        for m in list(_SKINNY)
        if m.weight.shape == like.shape
        and m.weight.dtype == like.dtype
        and m.weight.device.type == "cpu"
    ]


class GovernedRouter(nn.Module):
    """The router: logits = h @ W.T (+ bias), computed only for the experts asked for."""

    def __init__(self, config: FlexOlmoConfig) -> None:
        super().__init__()
        self.num_experts: int = config.num_experts
        self.hidden_dim: int = config.hidden_size
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        self.bias: nn.Parameter | None = None
        if getattr(config, ROUTER_BIAS_ATTR, False):
            self.bias = nn.Parameter(torch.zeros(self.num_experts))

    def forward(
        self, hidden_states: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Router logits ``[tokens, len(rows) or num_experts]`` in the hidden dtype."""
        weight = self.weight if rows is None else self.weight.index_select(0, rows)
        logits = F.linear(hidden_states, weight)
        if self.bias is not None:
            bias = self.bias if rows is None else self.bias.index_select(0, rows)
            logits = logits + bias.to(logits.dtype)
        return logits


class GovernedSparseMoeBlock(nn.Module):
    """Sparse MoE block with per-expert modules and governed top-k routing."""

    def __init__(self, config: FlexOlmoConfig) -> None:
        super().__init__()
        self.num_experts: int = config.num_experts
        self.top_k: int = config.num_experts_per_tok
        self.norm_topk_prob: bool = bool(config.norm_topk_prob)
        self.gate = GovernedRouter(config)
        self.experts = nn.ModuleList([ExpertMLP(config) for _ in range(self.num_experts)])  # type: ignore[no-untyped-call]
        self.unloaded: set[int] = set()
        """Experts whose weights are unloaded (engine.placement); routing to them fails."""
        self._direct: list[bool] | None = None
        self.stacked: StackedExperts | None = None
        """Per-device stacks of the resident experts, once :meth:`stack_experts` was called."""
        with _BLOCKS_LOCK:
            _BLOCKS.add(self)

    def forward(
        self, hidden_states: torch.Tensor, routing: RoutingControl | None = None
    ) -> torch.Tensor:
        batch, seq_len, hidden_dim = hidden_states.shape
        h = hidden_states.reshape(-1, hidden_dim)
        n_tok = h.shape[0]
        plan = None
        if routing is not None and routing.expert_mask is not None:
            plan = routing.plan(h.device, self.top_k, self.num_experts, batch)
        union = plan.union if plan is not None else None
        row_mask = plan.row_mask if plan is not None else None
        k = plan.top_k if plan is not None else min(self.top_k, self.num_experts)
        used = plan.union_ids if plan is not None else None  # None: every expert
        if self.unloaded:
            bad = sorted(self.unloaded if used is None else self.unloaded.intersection(used))
            if bad:
                raise ExpertSetError(f"experts at router rows {bad} are unloaded", map(str, bad))

        logits = self.gate(h, union)
        n_cols = logits.shape[1]
        if row_mask is not None:
            logits = logits.view(batch, seq_len, n_cols).masked_fill(
                ~row_mask.to(logits.device).unsqueeze(1), float("-inf")
            )
            logits = logits.view(n_tok, n_cols)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_p, top_i = torch.topk(probs, k, dim=-1)
        valid: torch.Tensor | None = None
        if row_mask is not None:
            # A selection is real only if the row may use that expert (rows with |S| < k get
            # fewer selections); the others are never computed and weigh nothing.
            rm = row_mask.to(top_i.device).unsqueeze(1).expand(batch, seq_len, n_cols)
            valid = torch.gather(rm, 2, top_i.view(batch, seq_len, k)).view(n_tok, k)
            top_p = top_p.masked_fill(~valid, 0.0)
        top_w = top_p / top_p.sum(dim=-1, keepdim=True) if self.norm_topk_prob else top_p
        top_w = top_w.to(logits.dtype)
        experts = top_i if union is None else union.to(top_i.device)[top_i]

        if routing is not None:
            routing.accumulate(experts, top_p, valid, batch, seq_len, self.num_experts)
        stacked = self.stacked
        if stacked is not None and stacked.covers(used):
            out = stacked.forward(h, experts, top_w, valid, used)
        else:  # no stacks, or the batch may route to an offloaded expert
            out = self._dispatch(h, experts, top_w, valid)
        return out.view(batch, seq_len, hidden_dim)

    def stack_experts(self) -> None:
        """Run the resident experts from per-device stacks from now on (their parameters
        become views into the stacks; engine.stacked_experts)."""
        self.stacked = StackedExperts(self.num_experts)
        self.stacked.restack(self.experts, self.unloaded)

    def reset_placement_cache(self) -> None:
        """Forget which experts can be called directly, and restack the resident experts
        (freeing an unloaded expert's stacked memory); call after placement changes."""
        self._direct = None
        if self.stacked is not None:
            self.stacked.restack(self.experts, self.unloaded)

    def _direct_flags(self) -> list[bool]:
        """Per expert: no accelerate hook on it or its projections, so its weights lie on the
        block's device and it can run as three plain matmuls (no module-call overhead)."""
        if self._direct is None:
            self._direct = [
                not any(hasattr(m, "_hf_hook") for m in expert.modules()) for expert in self.experts
            ]
        return self._direct

    def _dispatch(
        self,
        h: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        valid: torch.Tensor | None,
    ) -> torch.Tensor:
        """Run each selected expert once on the tokens routed to it; sum weighted outputs.

        Few selections (decoding steps) are grouped on the host from one transfer of the
        selected ids; many (prefill) are sorted by expert on the device (sentinel
        ``num_experts`` for invalid selections, which sort last and are dropped), gathered
        once, and scattered back with one index_add."""
        n_exp = self.num_experts
        n_tok, k = experts.shape
        flat = experts.reshape(-1).to(h.device)  # no-op unless the router sits elsewhere
        weights = weights.to(h.device)
        if valid is not None:
            flat = flat.masked_fill(~valid.reshape(-1).to(h.device), n_exp)
        if flat.numel() <= _HOST_GROUPING_MAX:
            ids: list[int] = flat.tolist()  # the one host sync
            if n_tok == 1:
                return self._dispatch_one(h, ids, weights)
            groups: list[list[int]] = [[] for _ in range(n_exp + 1)]
            for pos, e in enumerate(ids):
                groups[e].append(pos)
            counts = [len(g) for g in groups]
            order_list = [pos for g in groups[:n_exp] for pos in g]
            order = torch.tensor(order_list, dtype=torch.long, device=h.device)
        else:
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=n_exp + 1).tolist()  # the one host sync
            order = order[: flat.numel() - counts[n_exp]]
        token_of = order // k
        x = h.index_select(0, token_of)
        outs: list[torch.Tensor] = []
        start = 0
        for e in range(n_exp):
            c = counts[e]
            if c == 0:
                continue
            outs.append(self._run_expert(e, x[start : start + c], h.device))
            start += c
        out = torch.zeros_like(h)
        if outs:
            y = torch.cat(outs) if len(outs) > 1 else outs[0]
            w = weights.reshape(-1).index_select(0, order).unsqueeze(1)
            out.index_add_(0, token_of, (y * w).to(out.dtype))
        return out

    def _dispatch_one(self, h: torch.Tensor, ids: list[int], weights: torch.Tensor) -> torch.Tensor:
        """One token (batch-1 decoding): each selected expert runs on ``h`` itself (no
        gather), and the weighted sum is one ``[1, m] @ [m, hidden]`` product (no scatter)."""
        n_exp = self.num_experts
        picked = [j for j, e in enumerate(ids) if e < n_exp]
        if not picked:
            return torch.zeros_like(h)
        outs = [self._run_expert(ids[j], h, h.device) for j in picked]
        w = weights.reshape(1, -1)
        if len(picked) < len(ids):
            w = w[:, picked]
        if len(outs) == 1:
            return (outs[0] * w).to(h.dtype)
        return torch.mm(w.to(outs[0].dtype), torch.cat(outs)).to(h.dtype)

    def _cpu_gate_weights(self) -> list[torch.Tensor]:
        """The CPU gate_proj weights of the loaded experts of every MoE block alive, this
        one's first (engine.kernels times them: all the layers' experts, so that the measure
        streams them from memory as decoding does; one layer's may fit in a cache)."""
        with _BLOCKS_LOCK:
            others = [b for b in list(_BLOCKS) if b is not self]
        return [w for b in [self, *others] for w in b._own_cpu_gate_weights()]

    def _own_cpu_gate_weights(self) -> list[torch.Tensor]:
        flags = self._direct_flags()
        return [
            cast(ExpertMLP, expert).gate_proj.weight
            for e, expert in enumerate(self.experts)
            if flags[e]
            and e not in self.unloaded
            and cast(ExpertMLP, expert).gate_proj.weight.device.type == "cpu"
        ]

    def _run_expert(self, e: int, xe: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Expert ``e`` on ``xe``, its output on ``device``."""
        expert = cast(ExpertMLP, self.experts[e])
        if self._direct_flags()[e]:
            gate_w = expert.gate_proj.weight
            if (
                not torch.is_grad_enabled()  # the fast form is for inference; training: F.linear
                and xe.shape[0] <= kernels.SKINNY_MAX
                and xe.device.type == "cpu"
                and kernels.transposed_is_faster(gate_w, xe.shape[0], self._cpu_gate_weights)
            ):
                return kernels.expert_ffn_transposed(
                    xe, gate_w, expert.up_proj.weight, expert.down_proj.weight, expert.act_fn
                )
            gate = F.linear(xe, expert.gate_proj.weight)
            up = F.linear(xe, expert.up_proj.weight)
            return F.linear(expert.act_fn(gate) * up, expert.down_proj.weight)
        # accelerate hooks bring offloaded weights in, or run it on its own device
        return cast(torch.Tensor, expert(xe)).to(device)


class GovernedFlexOlmoDecoderLayer(GradientCheckpointingLayer):  # type: ignore[no-untyped-call]
    """transformers' FlexOlmo decoder layer with the governed MoE block."""

    def __init__(self, config: FlexOlmoConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = fo.FlexOlmoAttention(config=config, layer_idx=layer_idx)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _skinny(getattr(self.self_attn, name))
        for name in ("q_norm", "k_norm"):
            _fast_norm(getattr(self.self_attn, name))
        self.mlp = GovernedSparseMoeBlock(config)
        self.post_attention_layernorm = _fast_norm(
            fo.FlexOlmoRMSNorm(config.hidden_size, config.rms_norm_eps)
        )
        self.post_feedforward_layernorm = _fast_norm(
            fo.FlexOlmoRMSNorm(config.hidden_size, config.rms_norm_eps)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        routing: RoutingControl | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = self.post_attention_layernorm(hidden_states)
        # .to() is a no-op unless accelerate placed the parts of this layer on different devices
        hidden_states = residual.to(hidden_states.device) + hidden_states

        residual = hidden_states
        hidden_states = self.mlp(hidden_states, routing=routing)
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        return residual.to(hidden_states.device) + hidden_states


class GovernedFlexOlmoPreTrainedModel(fo.FlexOlmoPreTrainedModel):  # type: ignore[no-untyped-call]
    # each expert FFN, the router and each attention block are placeable units of their own
    _no_split_modules = ["FlexOlmoAttention", "FlexOlmoMLP", "GovernedRouter"]  # noqa: RUF012
    _can_record_outputs = {  # noqa: RUF012
        "hidden_states": GovernedFlexOlmoDecoderLayer,
        "attentions": fo.FlexOlmoAttention,
    }

    def _init_weights(self, module: nn.Module) -> None:
        PreTrainedModel._init_weights(self, module)  # type: ignore[no-untyped-call]
        if isinstance(module, GovernedRouter):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class GovernedFlexOlmoModel(GovernedFlexOlmoPreTrainedModel, fo.FlexOlmoModel):  # type: ignore[no-untyped-call]
    """FlexOlmoModel whose decoder layers carry the governed MoE block."""

    def __init__(self, config: FlexOlmoConfig) -> None:
        GovernedFlexOlmoPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [GovernedFlexOlmoDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = _fast_norm(fo.FlexOlmoRMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        self.rotary_emb = fo.FlexOlmoRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()  # type: ignore[no-untyped-call]


class GovernedFlexOlmoForCausalLM(GovernedFlexOlmoPreTrainedModel, fo.FlexOlmoForCausalLM):
    """FlexOlmoForCausalLM with governed routing: ``model(..., routing=RoutingControl(...))``.

    ``routing=None`` allows every expert in every row and tracks no usage. Everything else
    (KV cache, attention masks, ``logits_to_keep``) is transformers' own.
    """

    def __init__(self, config: FlexOlmoConfig) -> None:
        GovernedFlexOlmoPreTrainedModel.__init__(self, config)
        self.model = GovernedFlexOlmoModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = _skinny(nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()  # type: ignore[no-untyped-call]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        routing: RoutingControl | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        """Logits for ``input_ids`` under ``routing``; ``cache`` (alias ``past_key_values``)
        is the KV cache, returned in ``out.cache`` (alias ``out.past_key_values``). With
        ``labels`` (training, kit/), ``out.loss`` is transformers' causal-LM loss (labels are
        shifted inside; -100 is ignored)."""
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("pass either cache or past_key_values, not both")
            cache = past_key_values
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            routing=routing,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        assert hidden_states is not None
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                hidden_states = hidden_states[:, -logits_to_keep:, :]
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
