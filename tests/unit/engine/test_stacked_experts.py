"""The stacked expert path (engine.stacked_experts) on the CPU: exact against the physically
pruned model, excluded experts never computed, withdrawal frees the stacked memory, offloaded
experts keep their placement, and the path reads nothing back to the host (static shapes)."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, FlexOlmoForCausalLM

from engine import Engine, load_engine, stacked_experts
from engine.checkpoints import tiny_config
from engine.errors import PlacementError
from engine.modeling import GovernedSparseMoeBlock
from engine.routing import RoutingControl
from engine.sampling import SamplingParams
from engine.stacked_experts import StackedExperts, kernel_for, resolve_expert_path

from .conftest import BIAS, IDS, prune

ATOL = 1e-5
Ref = Callable[[Path], FlexOlmoForCausalLM]
CPU = torch.device("cpu")


@pytest.fixture(params=["grouped_mm", "capacity"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test with each of the stacked path's kernels."""
    monkeypatch.setattr(stacked_experts, "FORCE_KERNEL", request.param)
    yield request.param


@pytest.fixture(scope="module")
def stacked(tiny_dir: Path) -> Engine:
    return load_engine(tiny_dir, expert_path="stacked")


@pytest.fixture(scope="module")
def grouped(tiny_dir: Path) -> Engine:
    return load_engine(tiny_dir, expert_path="grouped")


def ref_logits(model: FlexOlmoForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def blocks(eng: Engine) -> list[GovernedSparseMoeBlock]:
    return [layer.mlp for layer in eng.model.model.layers]


def poison(eng: Engine, *experts: int, router_row: bool = False) -> None:
    """NaN in every weight of ``experts`` (through the parameters, i.e. in the stacks)."""
    with torch.no_grad():
        for block in blocks(eng):
            for e in experts:
                for p in block.experts[e].parameters():
                    p.fill_(float("nan"))
                if router_row:
                    block.gate.weight[e].fill_(float("nan"))


# -- the option ---------------------------------------------------------------------------------


def test_expert_path_option(stacked: Engine, grouped: Engine, tiny_dir: Path) -> None:
    assert stacked.expert_path == "stacked" and grouped.expert_path == "grouped"
    for block in blocks(stacked):
        assert block.stacked is not None
        [stack] = block.stacked.stacks  # one device, one stack
        assert stack.experts == (0, 1, 2, 3) and stack.device == CPU
        assert tuple(stack.gate_up.shape) == (4, 2 * 64, 32)
        # the experts' parameters are views of the stack: the weights are in memory once
        for s, expert in enumerate(block.experts):
            assert expert.gate_proj.weight.data_ptr() == stack.gate_up[s].data_ptr()
            assert expert.down_proj.weight.data_ptr() == stack.down[s].data_ptr()
    assert all(b.stacked is None for b in blocks(grouped))
    # on a CPU the default is the grouped path; on CUDA the stacked one
    assert load_engine(tiny_dir).expert_path == "grouped"
    assert resolve_expert_path("auto", torch.device("cuda", 0)) == "grouped"  # until measured
    assert resolve_expert_path("auto", CPU) == "grouped"
    assert resolve_expert_path("stacked", CPU) == "stacked"


def test_bad_expert_path_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    for bad in ("fast", "", None):
        with pytest.raises(PlacementError, match="invalid expert_path"):
            load_engine(tmp_path / "no-such-model", expert_path=bad)  # type: ignore[arg-type]


def test_kernel_choice() -> None:
    assert kernel_for(CPU, torch.float32, 32, 64) == "grouped_mm"
    assert kernel_for(CPU, torch.bfloat16, 32, 64) == "grouped_mm"
    assert kernel_for(CPU, torch.float16, 32, 64) == "capacity"
    assert kernel_for(torch.device("meta"), torch.bfloat16, 32, 64) == "capacity"


# -- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "allowed", [None, ("public",), ("math",), ("public", "news"), ("code", "news", "math")]
)
def test_allowed_set_equals_pruned_model(
    stacked: Engine,
    tiny_dir: Path,
    reference_for: Ref,
    input_ids: torch.Tensor,
    allowed: tuple[str, ...] | None,
    kernel: str,
) -> None:
    keep = [IDS.index(i) for i in allowed] if allowed is not None else list(range(4))
    expected = ref_logits(prune(reference_for(tiny_dir), keep), input_ids)
    got = stacked.forward(input_ids, allowed=allowed).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("seq_len", [1, 9, 40])
def test_mixed_batch_each_row_equals_its_pruned_model(
    stacked: Engine, tiny_dir: Path, reference_for: Ref, seq_len: int, kernel: str
) -> None:
    ids = torch.randint(5, 320, (3, seq_len), generator=torch.Generator().manual_seed(seq_len))
    rows = [("public", "code"), ("math",), ("code", "news", "math")]
    got = stacked.forward(ids, allowed=rows).logits
    ref = reference_for(tiny_dir)
    for r, allowed in enumerate(rows):
        expected = ref_logits(prune(ref, [IDS.index(i) for i in allowed]), ids[r : r + 1])
        torch.testing.assert_close(got[r : r + 1], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "allowed", [("public",), ("a", "d"), ("public", "b", "c"), ("a", "b", "c", "d")]
)
def test_top_k_above_set_size_and_norm_topk(
    tiny_norm_dir: Path,
    reference_for: Ref,
    input_ids: torch.Tensor,
    allowed: tuple[str, ...],
    kernel: str,
) -> None:
    eng = load_engine(tiny_norm_dir, expert_path="stacked")
    keep = [eng.expert_ids.index(i) for i in allowed]
    expected = ref_logits(prune(reference_for(tiny_norm_dir), keep), input_ids)
    got = eng.forward(input_ids, allowed=allowed).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_router_bias(
    tiny_bias_dir: Path, reference_for: Ref, input_ids: torch.Tensor, kernel: str
) -> None:
    eng = load_engine(tiny_bias_dir, expert_path="stacked")
    ref = reference_for(tiny_bias_dir)
    for allowed in (IDS, ("public", "news"), ("math",)):
        keep = [IDS.index(i) for i in allowed]
        expected = ref_logits(prune(ref, keep, bias=BIAS), input_ids)
        got = eng.forward(input_ids, allowed=allowed).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_kv_cache_decode_matches_full_forward(
    stacked: Engine, grouped: Engine, input_ids: torch.Tensor, kernel: str
) -> None:
    """Prefill then token-by-token decode (a decoding step: one token per row) equals one
    forward, and the usage equals the grouped path's."""
    rows = [("public", "code"), ("math",), IDS]
    mask = stacked.mask_for(rows, 3)
    with torch.no_grad():
        full_ctl = RoutingControl(mask)
        full = grouped.model(input_ids=input_ids, routing=full_ctl).logits
        ctl = RoutingControl(mask)
        cache = DynamicCache(config=stacked.config)
        out = stacked.model(input_ids=input_ids[:, :5], cache=cache, use_cache=True, routing=ctl)
        steps = [out.logits]
        for t in range(5, input_ids.shape[1]):
            out = stacked.model(
                input_ids=input_ids[:, t : t + 1], cache=out.cache, use_cache=True, routing=ctl
            )
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    assert torch.equal(ctl.tokens, full_ctl.tokens)
    torch.testing.assert_close(ctl.weight, full_ctl.weight, atol=1e-5, rtol=0)


def test_generation_equals_the_grouped_path(stacked: Engine, grouped: Engine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompt = list(range(5, 17))
    for allowed in (None, ("public", "math")):
        a = stacked.generate(prompt, params, allowed=allowed)
        b = grouped.generate(prompt, params, allowed=allowed)
        assert a.token_ids == b.token_ids
        assert a.usage is not None and b.usage is not None
        for eid in IDS:
            assert a.usage[eid][0] == b.usage[eid][0]
            assert a.usage[eid][1] == pytest.approx(b.usage[eid][1], abs=1e-5)


def test_bfloat16_equals_transformers(tiny_dir: Path, input_ids: torch.Tensor) -> None:
    """In bfloat16 the grouped_mm kernel does what transformers' default (grouped_mm) experts
    do, op for op: the logits are the same."""
    eng = load_engine(tiny_dir, dtype=torch.bfloat16, expert_path="stacked")
    first = blocks(eng)[0].stacked
    assert first is not None and first.stacks[0].kernel == "grouped_mm"
    ref = FlexOlmoForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    expected = ref_logits(ref, input_ids)
    got = eng.forward(input_ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


# -- excluded experts are never computed --------------------------------------------------------


def test_excluded_expert_weights_are_never_read(
    tiny_dir: Path, reference_for: Ref, input_ids: torch.Tensor, kernel: str
) -> None:
    eng = load_engine(tiny_dir, expert_path="stacked")
    poison(eng, IDS.index("news"), router_row=True)
    allowed = ("public", "code", "math")
    got = eng.forward(input_ids, allowed=allowed).logits
    assert torch.isfinite(got).all()
    expected = ref_logits(prune(reference_for(tiny_dir), [0, 1, 3]), input_ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert torch.isnan(eng.forward(input_ids).logits).any()  # the poison is really there


@pytest.mark.parametrize("seq_len", [1, 9, 40])
def test_rows_allowed_fewer_than_top_k_beside_rows_with_more(
    tiny_dir: Path, reference_for: Ref, seq_len: int, kernel: str
) -> None:
    """Rows allowed one expert (|S| = 1 < top-k = 2) beside a row allowed the NaN-weighted
    experts: their second selection is not real and must never be computed."""
    eng = load_engine(tiny_dir, expert_path="stacked")
    poison(eng, IDS.index("code"), IDS.index("news"))
    ids = torch.randint(5, 320, (3, seq_len), generator=torch.Generator().manual_seed(7))
    rows = [("public",), ("public", "code", "news"), ("math",)]
    got = eng.forward(ids, allowed=rows).logits
    assert torch.isnan(got[1]).any()  # the NaN experts really are in the batch's union
    ref = reference_for(tiny_dir)
    for r in (0, 2):
        assert torch.isfinite(got[r]).all(), f"row {r} computed an expert it may not use"
        expected = ref_logits(prune(ref, [IDS.index(i) for i in rows[r]]), ids[r : r + 1])
        torch.testing.assert_close(got[r : r + 1], expected, atol=ATOL, rtol=0)


# -- withdrawal and placement -------------------------------------------------------------------


def _storages(block: GovernedSparseMoeBlock) -> dict[int, int]:
    """data pointer -> bytes of every storage the block's expert parameters live in."""
    out: dict[int, int] = {}
    for p in block.experts.parameters():
        if p.device.type != "meta":
            storage = p.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def test_withdrawal_frees_the_stacked_memory(
    tiny_dir: Path, grouped: Engine, input_ids: torch.Tensor
) -> None:
    eng = load_engine(tiny_dir, expert_path="stacked")
    before = eng.forward(input_ids).logits
    per_expert = sum(p.nbytes for p in blocks(eng)[0].experts[0].parameters())
    old = []
    for block in blocks(eng):
        assert block.stacked is not None
        [stack] = block.stacked.stacks
        old += [StorageWeakRef(t.untyped_storage()) for t in (stack.gate_up, stack.down)]
        assert sum(_storages(block).values()) == 4 * per_expert
        # restacking with nothing changed keeps the stack (no copy)
        block.reset_placement_cache()
        assert block.stacked.stacks == [stack]
    del stack
    eng.unload_expert("news")
    gc.collect()
    assert all(ref.expired() for ref in old), "a withdrawn expert's old stack is still alive"
    for block in blocks(eng):
        assert block.stacked is not None
        [stack] = block.stacked.stacks
        assert stack.experts == (0, 1, 3) and stack.gate_up.shape[0] == 3
        assert sum(_storages(block).values()) == 3 * per_expert  # nothing holds 'news'
    without = grouped.forward(input_ids, allowed=("public", "code", "math")).logits
    torch.testing.assert_close(eng.forward(input_ids).logits, without, atol=ATOL, rtol=0)
    eng.load_expert("news")
    for block in blocks(eng):
        assert block.stacked is not None and block.stacked.stacks[0].experts == (0, 1, 2, 3)
    torch.testing.assert_close(eng.forward(input_ids).logits, before, atol=0, rtol=0)


def test_offloaded_expert_keeps_its_placement(
    tiny_dir: Path, grouped: Engine, input_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An expert on disk is in no stack; a batch that may route to it runs that layer on the
    grouped path (which streams it), one that may not runs every layer stacked."""
    eng = load_engine(
        tiny_dir,
        device_map={"": "cpu", "model.layers.0.mlp.experts.1": "disk"},
        expert_path="stacked",
    )
    first, second = blocks(eng)
    assert first.stacked is not None and second.stacked is not None
    assert first.stacked.stacked == {0, 2, 3} and second.stacked.stacked == {0, 1, 2, 3}
    grouped_calls: list[int] = []
    original = GovernedSparseMoeBlock._dispatch
    layer_of = {id(b): i for i, b in enumerate(blocks(eng))}

    def spy(self: GovernedSparseMoeBlock, *args: Any) -> torch.Tensor:
        if id(self) in layer_of:  # not the grouped engine's blocks
            grouped_calls.append(layer_of[id(self)])
        return original(self, *args)

    monkeypatch.setattr(GovernedSparseMoeBlock, "_dispatch", spy)
    for allowed, calls in (
        (None, [0]),
        ([("public",), ("code", "math"), ("news",)], [0]),
        (("public", "news", "math"), []),
    ):
        grouped_calls.clear()
        got = eng.forward(input_ids, allowed=allowed).logits
        assert grouped_calls == calls
        expected = grouped.forward(input_ids, allowed=allowed).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_one_stack_per_device_group(
    tiny_dir: Path, reference_for: Ref, input_ids: torch.Tensor, kernel: str
) -> None:
    """Experts in different stacks (as on different devices; here two groups on the CPU) add
    up to the same output, row by row equal to the pruned model."""
    eng = load_engine(tiny_dir, expert_path="stacked")
    for block in blocks(eng):
        assert block.stacked is not None
        block.stacked.restack(block.experts, block.unloaded, groups=[(CPU, (0, 2)), (CPU, (1, 3))])
        assert [s.experts for s in block.stacked.stacks] == [(0, 2), (1, 3)]
    rows = [("public", "code"), ("math",), ("code", "news", "math")]
    got = eng.forward(input_ids, allowed=rows).logits
    ref = reference_for(tiny_dir)
    for r, allowed in enumerate(rows):
        expected = ref_logits(prune(ref, [IDS.index(i) for i in allowed]), input_ids[r : r + 1])
        torch.testing.assert_close(got[r : r + 1], expected, atol=ATOL, rtol=0)


# -- no host read: static shapes ----------------------------------------------------------------


def meta_block(kernel: str) -> GovernedSparseMoeBlock:
    """A MoE block whose weights (and so every tensor it computes) are on ``meta``: no value
    exists, so any read of one (``.item()``, ``.tolist()``, ``bool()``, ``nonzero()``, a
    boolean index, a shape that depends on the data) raises."""
    config = tiny_config(4)
    with torch.device("meta"):
        block = GovernedSparseMoeBlock(config)
    if kernel == "grouped_mm":  # torch's meta grouped_mm is bfloat16 only, as the CUDA kernel
        block.to(torch.bfloat16)
    block.stacked = StackedExperts(4)
    meta = torch.device("meta")
    block.stacked.restack(block.experts, block.unloaded, groups=[(meta, (0, 1, 2, 3))])
    return block


@pytest.mark.parametrize("seq_len", [1, 9])
def test_the_stacked_path_runs_without_values(kernel: str, seq_len: int) -> None:
    block = meta_block(kernel)
    dtype = block.gate.weight.dtype
    h = torch.empty((3, seq_len, 32), device="meta", dtype=dtype)
    everyone = torch.tensor([[True, False, False, False], [True] * 4, [False] * 3 + [True]])
    some = torch.tensor([[True, False, False, False], [True, False, False, True]] * 2)[:3]
    with torch.no_grad():
        for ctl in (RoutingControl(everyone), RoutingControl(some), None):
            out = block(h, routing=ctl)
            assert out.shape == h.shape and out.device.type == "meta"
        ctl = RoutingControl(everyone)
    # the grouped path reads the selections on the host: on meta it cannot run at all
    block.stacked = None
    with pytest.raises((RuntimeError, NotImplementedError)), torch.no_grad():
        block(h, routing=ctl)


_HOST_READS = {
    "aten::_local_scalar_dense",  # .item(), bool(), int(), float()
    "aten::nonzero",
    "aten::masked_select",
    "aten::bincount",  # its length is the largest value
    "aten::unique_consecutive",
    "aten::_unique2",
}


class _HostReads(TorchDispatchMode):
    """Records the aten ops that read a tensor's values back to the host, or whose result's
    shape depends on them (a boolean index among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._schema.name
        if name in _HOST_READS or (name == "aten::index" and _bool_index(args)):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _bool_index(args: Any) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


@pytest.mark.parametrize("seq_len", [1, 9, 40])
def test_no_host_read_on_real_values(
    stacked: Engine, kernel: str, seq_len: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stacked MoE block with real values on the CPU: no aten op that reads values to the
    host, and no ``tolist()`` (which reads memory without an op). The grouped path, run the
    same way, does read (so the check can fail)."""
    block = blocks(stacked)[0]
    h = torch.randn(3, seq_len, 32, generator=torch.Generator().manual_seed(1))
    ctl = RoutingControl(stacked.mask_for([("public",), IDS, ("code", "math")], 3))
    tolist_calls: list[int] = []
    original = torch.Tensor.tolist

    def spy(self: torch.Tensor) -> Any:
        tolist_calls.append(1)
        return original(self)

    with torch.no_grad():
        block(h, routing=ctl)  # the routing plan is made once (on the host, from the host mask)
        monkeypatch.setattr(torch.Tensor, "tolist", spy)
        with _HostReads() as mode:
            block(h, routing=ctl)
        assert mode.seen == [] and tolist_calls == []
        saved, block.stacked = block.stacked, None
        try:
            with _HostReads() as mode:
                block(h, routing=ctl)
        finally:
            block.stacked = saved
    assert tolist_calls, "the grouped path reads the selections: the spy must see it"
