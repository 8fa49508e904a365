"""Usage accounting: (token, layer) top-k selections and their router probabilities, per row
and expert, checked against the pruned transformers model's own router logits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import FlexOlmoForCausalLM

from engine import Engine, load_engine
from engine.routing import RoutingControl

from .conftest import IDS, prune

Ref = Callable[[Path], FlexOlmoForCausalLM]


@pytest.fixture(scope="module")
def eng(tiny_dir: Path) -> Engine:
    return load_engine(tiny_dir)


def reference_usage(
    ref: FlexOlmoForCausalLM, keep: list[int], ids: torch.Tensor
) -> tuple[list[int], list[float]]:
    """Usage of one row computed from the pruned model's router logits (transformers)."""
    pruned = prune(ref, keep)
    k = pruned.config.num_experts_per_tok
    tokens = [0] * len(IDS)
    weight = [0.0] * len(IDS)
    with torch.no_grad():
        out = pruned(ids, output_router_logits=True)
    assert out.router_logits is not None and len(out.router_logits) == ref.config.num_hidden_layers
    for logits in out.router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = torch.topk(probs, k, dim=-1)
        for p, i in zip(top_p.flatten().tolist(), top_i.flatten().tolist(), strict=True):
            tokens[keep[i]] += 1
            weight[keep[i]] += p
    return tokens, weight


@pytest.mark.parametrize(
    "rows",
    [
        [IDS, ("public",), ("code", "math")],
        [("news", "math"), ("public", "code", "news"), ("math",)],
    ],
)
def test_usage_equals_reference_router_selections(
    eng: Engine,
    tiny_dir: Path,
    reference_for: Ref,
    input_ids: torch.Tensor,
    rows: list[tuple[str, ...]],
) -> None:
    res = eng.forward(input_ids, allowed=rows)
    for r, allowed in enumerate(rows):
        keep = sorted(IDS.index(i) for i in allowed)
        tokens, weight = reference_usage(reference_for(tiny_dir), keep, input_ids[r : r + 1])
        for e, eid in enumerate(IDS):
            got_t, got_w = res.usage[r][eid]
            assert got_t == tokens[e], (r, eid)
            assert got_w == pytest.approx(weight[e], abs=1e-5), (r, eid)
            if eid not in allowed:
                assert (got_t, got_w) == (0, 0.0)
                assert isinstance(got_t, int) and isinstance(got_w, float)


def test_usage_totals(eng: Engine, input_ids: torch.Tensor) -> None:
    seq, layers = input_ids.shape[1], eng.config.num_hidden_layers
    res = eng.forward(input_ids, allowed=[IDS, ("math",), ("public", "news")])
    totals = [sum(t for t, _ in u.values()) for u in res.usage]
    assert totals == [seq * layers * 2, seq * layers * 1, seq * layers * 2]
    # with |S| <= k every allowed expert is selected and the probabilities sum to one per token
    assert sum(w for _, w in res.usage[1].values()) == pytest.approx(seq * layers)
    assert sum(w for _, w in res.usage[2].values()) == pytest.approx(seq * layers)
    assert res.usage[1]["math"] == (seq * layers, pytest.approx(seq * layers))
    # with |S| > k the selected probabilities sum to less than one per token
    assert sum(w for _, w in res.usage[0].values()) < seq * layers


def test_token_mask_counts_only_marked_positions(eng: Engine, input_ids: torch.Tensor) -> None:
    mask = eng.mask_for(None, 3)
    token_mask = torch.ones(input_ids.shape, dtype=torch.bool)
    token_mask[0, :4] = False
    token_mask[2] = False
    ctl = RoutingControl(mask, token_mask=token_mask)
    with torch.no_grad():
        eng.model(input_ids=input_ids, routing=ctl)
    layers, k, seq = eng.config.num_hidden_layers, 2, input_ids.shape[1]
    assert ctl.tokens.sum(dim=1).tolist() == [(seq - 4) * layers * k, seq * layers * k, 0]
    assert ctl.weight[2].abs().sum().item() == 0.0


def test_reused_control_accumulates_and_follows_narrowing(
    eng: Engine, input_ids: torch.Tensor
) -> None:
    ctl = RoutingControl(eng.mask_for(None, 3))
    with torch.no_grad():
        eng.model(input_ids=input_ids, routing=ctl)
        first = ctl.tokens.clone()
        # revoke 'code' for row 0 only; the next call must not select it for that row
        narrowed = ctl.expert_mask.clone()  # type: ignore[union-attr]
        narrowed[0, IDS.index("code")] = False
        ctl.expert_mask = narrowed
        eng.model(input_ids=input_ids, routing=ctl)
    second = ctl.tokens - first
    assert second[0, IDS.index("code")].item() == 0
    assert second[1, IDS.index("code")].item() > 0 or second[2, IDS.index("code")].item() > 0
    assert (ctl.tokens.sum(dim=1) == 2 * first.sum(dim=1)).all()
    ctl.reset()
    assert ctl.tokens.sum().item() == 0


def test_track_usage_off(eng: Engine, input_ids: torch.Tensor) -> None:
    ctl = RoutingControl(eng.mask_for(("public",), 3), track_usage=False)
    with torch.no_grad():
        eng.model(input_ids=input_ids, routing=ctl)
    assert ctl.tokens.sum().item() == 0
    res = eng.forward(input_ids, track_usage=False)
    assert res.usage == []


def test_control_batch_change_needs_reset(eng: Engine) -> None:
    ctl = RoutingControl(eng.mask_for(None, 2))
    with torch.no_grad():
        eng.model(input_ids=torch.tensor([[5, 6], [7, 8]]), routing=ctl)
    with pytest.raises(ValueError, match="reset"):
        ctl.expert_mask = eng.mask_for(None, 3)


def test_narrowing_to_fewer_experts_than_k_mid_way(eng: Engine, input_ids: torch.Tensor) -> None:
    """Calls with different selection widths (k=2, then k=1 after narrowing to one expert)
    accumulate into one control, folded together."""
    ctl = RoutingControl(eng.mask_for(("public", "code"), 3))
    with torch.no_grad():
        eng.model(input_ids=input_ids, routing=ctl)
        ctl.expert_mask = eng.mask_for(("math",), 3)
        eng.model(input_ids=input_ids, routing=ctl)
    seq, layers = input_ids.shape[1], eng.config.num_hidden_layers
    t = ctl.tokens
    assert t[:, IDS.index("math")].tolist() == [seq * layers] * 3
    assert (t[:, :2].sum(dim=1) == seq * layers * 2).all()
    assert ctl.weight[:, IDS.index("math")].tolist() == pytest.approx([seq * layers] * 3)


def test_many_calls_fold_exactly(eng: Engine) -> None:
    """More queued layer calls than the fold threshold: totals stay exact."""
    ctl = RoutingControl(eng.mask_for(None, 2))
    ids = torch.tensor([[5, 6], [7, 8]])
    with torch.no_grad():
        for _ in range(200):  # 400 layer calls
            eng.model(input_ids=ids, routing=ctl)
    assert ctl.tokens.sum(dim=1).tolist() == [200 * 2 * 2 * 2] * 2
    assert ctl.weight.sum().item() < 200 * 2 * 2 * 2 * 2


def test_token_mask_of_wrong_shape(eng: Engine, input_ids: torch.Tensor) -> None:
    ctl = RoutingControl(eng.mask_for(None, 3), token_mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match the input"), torch.no_grad():
        eng.model(input_ids=input_ids, routing=ctl)
