"""``flexgate model inspect``: what a FlexOlmo checkpoint holds, without loading its weights.

Reads config.json, experts.json and the safetensors headers, checks the tensors against the
config (as loading would), and counts parameters: total, active per token (everything but the
experts a token does not select: the trunk plus ``top_k`` experts per layer), and per expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import loading
from engine.experts import ExpertInfo, read_experts

__all__ = ["DTYPE_BYTES", "ModelSummary", "format_summary", "summarize"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelSummary:
    """Facts about a checkpoint; all parameter counts are exact (from tensor shapes)."""

    path: Path
    config: dict[str, Any]
    experts: tuple[ExpertInfo, ...]
    router_bias: bool
    stored_dtypes: tuple[str, ...]
    total_params: int
    expert_params: int
    """Parameters of one expert's FFNs over all layers."""
    active_params: int
    """Parameters used for one token: total minus the (num_experts - top_k) unselected experts."""

    def memory_bytes(self, dtype: str) -> int:
        """Bytes the weights take at ``dtype`` (weights only: no KV cache nor activations)."""
        return self.total_params * DTYPE_BYTES[dtype]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "config": self.config,
            "experts": [e.to_json() for e in self.experts],
            "router_bias": self.router_bias,
            "stored_dtypes": list(self.stored_dtypes),
            "parameters": {
                "total": self.total_params,
                "active_per_token": self.active_params,
                "per_expert": self.expert_params,
            },
            "memory_bytes": {d: self.memory_bytes(d) for d in DTYPE_BYTES},
        }


_CONFIG_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "num_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "tie_word_embeddings",
    "rms_norm_eps",
    "dtype",
)


def summarize(model_dir: str | Path) -> ModelSummary:
    """Summarise and validate a checkpoint folder (CheckpointError when inconsistent)."""
    folder = Path(model_dir)
    config = loading.read_config(folder)
    experts = read_experts(folder, config.num_experts)
    tensors = loading.checkpoint_tensors(folder)
    bias = loading.has_router_bias(tensors, config.num_hidden_layers)
    model = loading.build_empty_model(config, bias, torch.float32)
    loading.validate_checkpoint(model, tensors)
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(
        p.numel() for layer in model.model.layers for p in layer.mlp.experts[0].parameters()
    )
    k = min(config.num_experts_per_tok, config.num_experts)
    active = total - (config.num_experts - k) * per_expert
    fields: dict[str, Any] = {}
    for name in _CONFIG_FIELDS:
        value = getattr(config, name, None)
        fields[name] = str(value).removeprefix("torch.") if name == "dtype" else value
    rope = getattr(config, "rope_parameters", None)
    if rope:
        fields["rope_parameters"] = dict(rope)
    return ModelSummary(
        path=folder,
        config=fields,
        experts=experts,
        router_bias=bias,
        stored_dtypes=tuple(sorted({t.dtype for t in tensors.values()})),
        total_params=total,
        expert_params=per_expert,
        active_params=active,
    )


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.4g}{suffix}{unit}" if suffix else f"{int(n)}{unit}"
        n /= 1000
    raise AssertionError


def _bytes(n: int) -> str:
    value = float(n)
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or suffix == "TiB":
            return f"{value:.1f} {suffix}" if suffix != "B" else f"{n} B"
        value /= 1024
    raise AssertionError


def format_summary(s: ModelSummary) -> str:
    """The human-readable report printed by ``flexgate model inspect``."""
    lines = [f"model: {s.path}", "config:"]
    lines += [f"  {k}: {v}" for k, v in s.config.items()]
    lines.append(f"  router_bias: {'yes' if s.router_bias else 'no'}")
    lines.append(f"  stored dtypes: {', '.join(s.stored_dtypes)}")
    lines.append(f"experts ({len(s.experts)}, router-row order):")
    width = max(len(e.id) for e in s.experts)
    for i, e in enumerate(s.experts):
        extra = "  ".join(x for x in (e.owner and f"owner={e.owner}", e.description) if x)
        lines.append(f"  {i:>3}  {e.id:<{width}}  {extra}".rstrip())
    lines.append("parameters:")
    lines.append(f"  total:            {s.total_params:>15,}  ({_human(s.total_params)})")
    lines.append(f"  active per token: {s.active_params:>15,}  ({_human(s.active_params)})")
    lines.append(f"  per expert:       {s.expert_params:>15,}  ({_human(s.expert_params)})")
    lines.append("memory for the weights (no KV cache or activations):")
    for dtype in DTYPE_BYTES:
        lines.append(f"  {dtype:<9} {_bytes(s.memory_bytes(dtype)):>12}")
    return "\n".join(lines)
