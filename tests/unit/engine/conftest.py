"""Fixtures for the engine tests: tiny FlexOlmo checkpoints built here (no hub) and
transformers' own FlexOlmoForCausalLM as the reference, physically pruned for an allowed set."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import FlexOlmoForCausalLM

from engine.checkpoints import build_tiny_checkpoint

IDS = ("public", "code", "news", "math")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 experts, top-2, norm_topk_prob False (as FlexOlmo), GQA attention."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), IDS, seed=0)


@pytest.fixture(scope="session")
def tiny_norm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 experts, top-3, norm_topk_prob True, sharded over 3 files."""
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny_norm"),
        ("public", "a", "b", "c", "d"),
        seed=1,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        shards=3,
    )


BIAS = (0.0, -0.7, -1.5, -0.3)


@pytest.fixture(scope="session")
def tiny_bias_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As tiny_dir but with the FlexOlmo paper's per-expert router bias."""
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny_bias"), IDS, seed=2, router_bias=BIAS
    )


@pytest.fixture(scope="session")
def reference_for() -> Callable[[Path], FlexOlmoForCausalLM]:
    """transformers' FlexOlmoForCausalLM loaded from a folder (cached per folder)."""
    cache: dict[Path, FlexOlmoForCausalLM] = {}

    def get(path: Path) -> FlexOlmoForCausalLM:
        if path not in cache:
            model, info = FlexOlmoForCausalLM.from_pretrained(
                path, dtype=torch.float32, output_loading_info=True
            )
            real_missing = [k for k in info["missing_keys"]]
            assert not real_missing, real_missing
            cache[path] = model.eval()
        return cache[path]

    return get


def prune(
    ref: FlexOlmoForCausalLM, keep: Sequence[int], bias: Sequence[float] | None = None
) -> FlexOlmoForCausalLM:
    """A copy of ``ref`` with every expert outside ``keep`` physically deleted: router rows and
    FFNs removed, num_experts = |keep|, top_k = min(k, |keep|). With ``bias``, the router adds
    the kept experts' biases to its logits (the FlexOlmo paper's router bias)."""
    keep = sorted(keep)
    model = copy.deepcopy(ref)
    k = min(ref.config.num_experts_per_tok, len(keep))
    model.config.num_experts = len(keep)
    model.config.num_experts_per_tok = k
    model.num_experts, model.num_experts_per_tok = len(keep), k
    idx = torch.tensor(keep)
    for layer in model.model.layers:
        moe = layer.mlp
        moe.gate.weight = torch.nn.Parameter(moe.gate.weight.data[idx].clone())
        moe.gate.num_experts = len(keep)
        moe.gate.top_k = k
        moe.experts.gate_up_proj = torch.nn.Parameter(moe.experts.gate_up_proj.data[idx].clone())
        moe.experts.down_proj = torch.nn.Parameter(moe.experts.down_proj.data[idx].clone())
        moe.experts.num_experts = len(keep)
        if bias is not None:
            _add_router_bias(moe.gate, torch.tensor([bias[i] for i in keep]))
    return model


def _add_router_bias(router: torch.nn.Module, bias: torch.Tensor) -> None:
    """transformers' FlexOlmoTopKRouter.forward with ``+ bias`` on the logits."""

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        logits = F.linear(hidden_states, router.weight) + bias.to(hidden_states.dtype)
        probs = F.softmax(logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
        if router.norm_topk_prob:
            top_value /= top_value.sum(dim=-1, keepdim=True)
        return logits, top_value.to(logits.dtype), top_index

    router.forward = forward  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(5, 320, (3, 9), generator=g)
