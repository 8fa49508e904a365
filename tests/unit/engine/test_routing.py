"""Governed routing: exactness against a physically pruned transformers model, non-use of
excluded experts, per-row sets, errors before compute, router bias."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, FlexOlmoForCausalLM

from engine import Engine, ExpertSetError, kernels, load_engine
from engine.routing import RoutingControl

from .conftest import BIAS, IDS, prune

ATOL = 1e-5
Ref = Callable[[Path], FlexOlmoForCausalLM]


@pytest.fixture(scope="module")
def eng(tiny_dir: Path) -> Engine:
    return load_engine(tiny_dir)


@pytest.fixture(
    params=[(1, False), (1, True), (2, False), (2, True)],
    ids=["1-thread-linear", "1-thread-transposed", "2-threads-linear", "2-threads-transposed"],
)
def torch_threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Run a test with 1 and with 2 torch threads, and with each form of the few-token expert
    products (``F.linear`` and ``W @ X.T``, which engine.kernels picks per machine)."""
    threads, transposed = request.param
    monkeypatch.setattr(kernels, "FORCE_TRANSPOSED", transposed)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield threads
    torch.set_num_threads(old)


def ref_logits(model: FlexOlmoForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_all_experts_match_transformers(
    eng: Engine, tiny_dir: Path, reference_for: Ref, input_ids: torch.Tensor
) -> None:
    expected = ref_logits(reference_for(tiny_dir), input_ids)
    got = eng.forward(input_ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # allowed=None and allowed=every id are the same thing
    torch.testing.assert_close(eng.forward(input_ids, allowed=IDS).logits, got, atol=0, rtol=0)


@pytest.mark.parametrize(
    "allowed",
    [("public",), ("math",), ("public", "news"), ("code", "news", "math"), ("news", "code")],
)
def test_allowed_set_equals_pruned_model(
    eng: Engine,
    tiny_dir: Path,
    reference_for: Ref,
    input_ids: torch.Tensor,
    allowed: tuple[str, ...],
) -> None:
    keep = [IDS.index(i) for i in allowed]
    expected = ref_logits(prune(reference_for(tiny_dir), keep), input_ids)
    got = eng.forward(input_ids, allowed=allowed).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # and it really differs from the full model (the test can fail)
    full = eng.forward(input_ids).logits
    assert (full - got).abs().max() > 1e-3


@pytest.mark.parametrize(
    "allowed", [("public",), ("a", "d"), ("public", "b", "c"), ("a", "b", "c", "d")]
)
def test_top_k_above_set_size_and_norm_topk(
    tiny_norm_dir: Path, reference_for: Ref, input_ids: torch.Tensor, allowed: tuple[str, ...]
) -> None:
    eng = load_engine(tiny_norm_dir)
    assert eng.config.num_experts_per_tok == 3 and eng.config.norm_topk_prob
    keep = [eng.expert_ids.index(i) for i in allowed]
    expected = ref_logits(prune(reference_for(tiny_norm_dir), keep), input_ids)
    torch.testing.assert_close(
        eng.forward(input_ids, allowed=allowed).logits, expected, atol=ATOL, rtol=0
    )


def test_mixed_batch_each_row_equals_its_pruned_model(
    eng: Engine, tiny_dir: Path, reference_for: Ref, input_ids: torch.Tensor, torch_threads: int
) -> None:
    rows = [("public", "code"), ("math",), ("code", "news", "math")]
    got = eng.forward(input_ids, allowed=rows).logits
    ref = reference_for(tiny_dir)
    for r, allowed in enumerate(rows):
        pruned = prune(ref, [IDS.index(i) for i in allowed])
        expected = ref_logits(pruned, input_ids[r : r + 1])
        torch.testing.assert_close(got[r : r + 1], expected, atol=ATOL, rtol=0)


def nan_engine(path: Path, expert: int, router_row: bool = False) -> Engine:
    eng = load_engine(path)
    with torch.no_grad():
        for layer in eng.model.model.layers:
            for p in layer.mlp.experts[expert].parameters():
                p.fill_(float("nan"))
            if router_row:
                layer.mlp.gate.weight[expert].fill_(float("nan"))
    return eng


def test_excluded_expert_weights_are_never_read(
    tiny_dir: Path, reference_for: Ref, input_ids: torch.Tensor
) -> None:
    """NaN in every weight of 'news' (FFN and router row): finite output equal to the model
    with 'news' deleted, in a single-set batch."""
    eng = nan_engine(tiny_dir, IDS.index("news"), router_row=True)
    allowed = ("public", "code", "math")
    got = eng.forward(input_ids, allowed=allowed).logits
    assert torch.isfinite(got).all()
    expected = ref_logits(prune(reference_for(tiny_dir), [0, 1, 3]), input_ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # the NaN really is there: allowing the expert poisons the output
    assert torch.isnan(eng.forward(input_ids).logits).any()


def test_excluded_expert_not_computed_for_its_row_in_mixed_batch(
    tiny_dir: Path, reference_for: Ref, input_ids: torch.Tensor
) -> None:
    eng = nan_engine(tiny_dir, IDS.index("code"))
    rows = [("public", "news"), IDS, ("math", "news")]
    got = eng.forward(input_ids, allowed=rows).logits
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[2]).all()
    assert torch.isnan(got[1]).any()  # the row that allows 'code' sees its NaN weights
    ref = reference_for(tiny_dir)
    for r in (0, 2):
        keep = [IDS.index(i) for i in rows[r]]
        expected = ref_logits(prune(ref, keep), input_ids[r : r + 1])
        torch.testing.assert_close(got[r : r + 1], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("seq_len", [9, 40], ids=["host-grouped", "device-sorted"])
def test_rows_allowed_fewer_than_top_k_beside_rows_with_more(
    tiny_dir: Path, reference_for: Ref, seq_len: int
) -> None:
    """Rows allowed one expert (|S| = 1 < top-k = 2) share a batch with a row allowed the
    NaN-weighted experts: their second top-k selection is not real and must not be computed
    (0 x NaN is NaN), on both dispatch paths (few selections grouped on the host, many
    sorted on the device)."""
    eng = load_engine(tiny_dir)
    with torch.no_grad():
        for layer in eng.model.model.layers:
            for e in (IDS.index("code"), IDS.index("news")):
                for p in layer.mlp.experts[e].parameters():
                    p.fill_(float("nan"))
    ids = torch.randint(5, 320, (3, seq_len), generator=torch.Generator().manual_seed(7))
    rows = [("public",), ("public", "code", "news"), ("math",)]
    got = eng.forward(ids, allowed=rows).logits
    assert torch.isnan(got[1]).any()  # the NaN experts really are in the batch's union
    ref = reference_for(tiny_dir)
    for r in (0, 2):
        assert torch.isfinite(got[r]).all(), f"row {r} computed an expert it may not use"
        expected = ref_logits(prune(ref, [IDS.index(i) for i in rows[r]]), ids[r : r + 1])
        torch.testing.assert_close(got[r : r + 1], expected, atol=ATOL, rtol=0)


def test_excluded_expert_module_is_never_called(tiny_dir: Path, input_ids: torch.Tensor) -> None:
    """With accelerate hooks (here: one expert on disk) experts run as modules, so the hooks
    that would load their weights fire only for the experts computed."""
    eng = load_engine(tiny_dir, device_map={"": "cpu", "model.layers.0.mlp.experts.0": "disk"})
    calls: list[int] = []
    handles = [
        layer.mlp.experts[e].register_forward_pre_hook(lambda m, a, e=e: calls.append(e))
        for layer in eng.model.model.layers
        for e in range(len(IDS))
    ]
    try:
        eng.forward(input_ids, allowed=[("public",), ("code", "math"), ("public", "math")])
    finally:
        for h in handles:
            h.remove()
    assert calls and set(calls) <= {0, 1, 3}
    assert IDS.index("news") not in calls


def _count_embedding_calls(eng: Engine) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    handle = eng.model.model.embed_tokens.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize(
    ("allowed", "names"),
    [
        ((), []),
        (("public", "sports"), ["sports"]),
        (("zzz", "aaa"), ["aaa", "zzz"]),
        ([("public",), ()], []),
        ([("public",), ("code", "nope")], ["nope"]),
    ],
)
def test_bad_sets_raise_before_compute(
    eng: Engine, input_ids: torch.Tensor, allowed: object, names: list[str]
) -> None:
    calls, handle = _count_embedding_calls(eng)
    batch = input_ids[:2]
    try:
        with pytest.raises(ExpertSetError) as info:
            eng.forward(batch, allowed=allowed)  # type: ignore[arg-type]
    finally:
        handle.remove()
    assert calls == []
    assert isinstance(info.value, ValueError)
    assert list(info.value.ids) == names
    for name in names:
        assert name in str(info.value)
    if not names:
        assert "empty" in str(info.value)


def test_bad_allowed_shapes(eng: Engine, input_ids: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="not a single string"):
        eng.mask_for("public", 2)
    with pytest.raises(ValueError, match="3 rows"):
        eng.mask_for([("public",), ("code",), ("math",)], 2)
    with pytest.raises(TypeError):
        eng.mask_for(["public", ("code",)], 2)


def test_mask_for(eng: Engine) -> None:
    m = eng.mask_for(None, 2)
    assert m.dtype == torch.bool and m.shape == (2, 4) and bool(m.all())
    m = eng.mask_for({"code", "public"}, 3)
    assert m.tolist() == [[True, True, False, False]] * 3
    m = eng.mask_for([["math"], ["public", "news"]], 2)
    assert m.tolist() == [[False, False, False, True], [True, False, True, False]]


def test_routing_none_on_the_model_is_all_experts(eng: Engine, input_ids: torch.Tensor) -> None:
    with torch.no_grad():
        bare = eng.model(input_ids=input_ids).logits
    torch.testing.assert_close(bare, eng.forward(input_ids).logits, atol=0, rtol=0)


def test_kv_cache_decode_matches_full_forward(
    eng: Engine, input_ids: torch.Tensor, torch_threads: int
) -> None:
    """Prefill then token-by-token decode with one reused RoutingControl equals one forward;
    usage accumulates across the calls."""
    rows = [("public", "code"), ("math",), IDS]
    mask = eng.mask_for(rows, 3)
    full_ctl = RoutingControl(mask)
    with torch.no_grad():
        full = eng.model(input_ids=input_ids, routing=full_ctl).logits
        ctl = RoutingControl(mask)
        cache = DynamicCache(config=eng.config)
        out = eng.model(input_ids=input_ids[:, :5], cache=cache, use_cache=True, routing=ctl)
        steps = [out.logits]
        for t in range(5, input_ids.shape[1]):
            out = eng.model(
                input_ids=input_ids[:, t : t + 1], cache=out.cache, use_cache=True, routing=ctl
            )
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    assert torch.equal(ctl.tokens, full_ctl.tokens)
    torch.testing.assert_close(ctl.weight, full_ctl.weight, atol=1e-5, rtol=0)


def test_left_padding_matches_unpadded_rows(eng: Engine, input_ids: torch.Tensor) -> None:
    short = input_ids[1, 3:]
    padded = input_ids.clone()
    padded[1, :3] = eng.config.pad_token_id
    attn = torch.ones_like(padded)
    attn[1, :3] = 0
    res = eng.forward(padded, allowed=[IDS, ("public", "math"), ("code",)], attention_mask=attn)
    alone = eng.forward(short[None], allowed=("public", "math"))
    torch.testing.assert_close(res.logits[1, 3:], alone.logits[0], atol=ATOL, rtol=0)
    for eid in IDS:
        tokens, weight = res.usage[1][eid]
        assert tokens == alone.usage[0][eid][0]
        assert weight == pytest.approx(alone.usage[0][eid][1], abs=1e-5)
    assert sum(t for t, _ in res.usage[1].values()) == 6 * 2 * 2  # 6 real tokens, 2 layers, k=2


def test_router_bias_is_applied_and_matches_biased_pruned_model(
    tiny_bias_dir: Path, reference_for: Ref, input_ids: torch.Tensor
) -> None:
    eng = load_engine(tiny_bias_dir)
    assert eng.model.model.layers[0].mlp.gate.bias is not None
    ref = reference_for(tiny_bias_dir)  # transformers ignores the bias tensor
    for allowed in (IDS, ("public", "news"), ("code", "news", "math"), ("math",)):
        keep = [IDS.index(i) for i in allowed]
        expected = ref_logits(prune(ref, keep, bias=BIAS), input_ids)
        torch.testing.assert_close(
            eng.forward(input_ids, allowed=allowed).logits, expected, atol=ATOL, rtol=0
        )
    # without the bias the output differs: the bias matters
    unbiased = ref_logits(prune(ref, [0, 1, 2, 3]), input_ids)
    assert (unbiased - eng.forward(input_ids).logits).abs().max() > 1e-3


def test_excluded_experts_bias_plays_no_part(tiny_bias_dir: Path, input_ids: torch.Tensor) -> None:
    eng = load_engine(tiny_bias_dir)
    allowed = ("public", "code", "math")
    before = eng.forward(input_ids, allowed=allowed).logits
    with torch.no_grad():
        for layer in eng.model.model.layers:
            layer.mlp.gate.bias[IDS.index("news")] = 1e9
    after = eng.forward(input_ids, allowed=allowed).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    # a huge bias on an allowed expert does change things
    with torch.no_grad():
        for layer in eng.model.model.layers:
            layer.mlp.gate.bias[IDS.index("math")] = 1e9
    assert (eng.forward(input_ids, allowed=allowed).logits - before).abs().max() > 1e-3


def test_routing_control_validates_masks() -> None:
    with pytest.raises(ExpertSetError, match=r"rows \[1\]"):
        RoutingControl(torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="BoolTensor"):
        RoutingControl(torch.ones(2, 2))
    with pytest.raises(ValueError, match="token_mask must be a BoolTensor"):
        RoutingControl(token_mask=torch.ones(2, 3))


def test_mask_batch_mismatch_is_an_error(eng: Engine, input_ids: torch.Tensor) -> None:
    ctl = RoutingControl(eng.mask_for(None, 2))
    with pytest.raises(ValueError, match="2 rows but the batch has 3"):
        eng.model(input_ids=input_ids, routing=ctl)
