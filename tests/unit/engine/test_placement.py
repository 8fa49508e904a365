"""Expert-level placement on CPU: explicit and automatic device maps, disk offload (from the
checkpoint and from an offload folder), unloading and loading experts at run time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Engine, ExpertSetError, load_engine
from engine.errors import PlacementError
from engine.placement import expert_unit, placement_units
from engine.routing import RoutingControl

from .conftest import IDS

ATOL = 1e-5


@pytest.fixture(scope="module")
def cpu_engine(tiny_dir: Path) -> Engine:
    return load_engine(tiny_dir)


def test_cpu_default(cpu_engine: Engine) -> None:
    assert cpu_engine.device == torch.device("cpu")
    assert set(cpu_engine.device_map.values()) == {"cpu"}
    assert set(cpu_engine.device_map) == set(placement_units(cpu_engine.model))
    assert not cpu_engine.placement.dispatched
    assert all(p.device.type == "cpu" for p in cpu_engine.model.parameters())


def disk_map(*experts: tuple[int, int]) -> dict[str, str]:
    spec = {"": "cpu"}
    for layer, e in experts:
        spec[expert_unit(layer, e)] = "disk"
    return spec


@pytest.mark.parametrize("folder", [False, True])
def test_disk_offloaded_experts_give_identical_output(
    tiny_dir: Path, tmp_path: Path, cpu_engine: Engine, input_ids: torch.Tensor, folder: bool
) -> None:
    spec = disk_map((0, 1), (1, 1), (1, 3))
    eng = load_engine(
        tiny_dir, device_map=spec, offload_folder=tmp_path / "off" if folder else None
    )
    assert eng.placement.dispatched
    assert (
        eng.device_map[expert_unit(0, 1)] == "disk" and eng.device_map[expert_unit(0, 0)] == "cpu"
    )
    # offloaded weights are not in memory
    assert all(
        p.device.type == "meta" for p in eng.model.model.layers[0].mlp.experts[1].parameters()
    )
    assert all(
        p.device.type == "cpu" for p in eng.model.model.layers[0].mlp.experts[0].parameters()
    )
    if folder:
        assert (tmp_path / "off" / "index.json").is_file()
    for allowed in (None, ("code", "math"), [("public",), ("code",), ("news", "math")]):
        expected = cpu_engine.forward(input_ids, allowed=allowed)
        got = eng.forward(input_ids, allowed=allowed)
        torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
        assert [{k: t for k, (t, _) in u.items()} for u in got.usage] == [
            {k: t for k, (t, _) in u.items()} for u in expected.usage
        ]


def test_disk_expert_file_is_not_read_when_excluded(
    tiny_dir: Path, tmp_path: Path, input_ids: torch.Tensor
) -> None:
    """Poison the offloaded copy of 'code' on disk: excluded, the output is finite; allowed,
    the poison shows, so the weights really come from that file."""
    folder = tmp_path / "off"
    eng = load_engine(tiny_dir, device_map=disk_map((0, 1), (1, 1)), offload_folder=folder)
    for dat in folder.glob("model.layers.*.mlp.experts.1.*.dat"):
        arr = np.memmap(dat, dtype=np.float32, mode="r+")
        arr[:] = np.nan
        arr.flush()
    assert torch.isfinite(eng.forward(input_ids, allowed=("public", "news", "math")).logits).all()
    assert torch.isnan(eng.forward(input_ids, allowed=("code",)).logits).any()


def test_auto_with_memory_budget_offloads_low_priority_experts(
    tiny_dir: Path, cpu_engine: Engine, input_ids: torch.Tensor
) -> None:
    sizes = {
        name: sum(p.numel() * 4 for p in m.parameters())
        for name, m in cpu_engine.model.named_modules()
    }
    trunk = sum(sizes[u] for u in placement_units(cpu_engine.model) if ".mlp.experts." not in u)
    one_expert_all_layers = 2 * sizes[expert_unit(0, 0)]
    budget = trunk + one_expert_all_layers + 100
    eng = load_engine(
        tiny_dir, device_map="auto", max_memory={"cpu": budget}, expert_priority=["math"]
    )
    dm = eng.device_map
    assert dm["model.embed_tokens"] == "cpu" and dm["lm_head"] == "cpu"
    assert dm[expert_unit(0, 3)] == dm[expert_unit(1, 3)] == "cpu"  # the priority expert fits
    assert {dm[expert_unit(layer, e)] for layer in (0, 1) for e in (0, 1, 2)} == {"disk"}
    torch.testing.assert_close(
        eng.forward(input_ids).logits, cpu_engine.forward(input_ids).logits, atol=ATOL, rtol=0
    )
    # without a budget everything fits in RAM
    assert set(load_engine(tiny_dir, device_map="auto").device_map.values()) == {"cpu"}


def test_coarse_explicit_map(tiny_dir: Path, cpu_engine: Engine, input_ids: torch.Tensor) -> None:
    eng = load_engine(
        tiny_dir, device_map={"model": "cpu", "lm_head": "cpu", "model.layers.1.mlp": "disk"}
    )
    assert (
        eng.device_map[expert_unit(1, 2)] == "disk"
        and eng.device_map["model.layers.1.mlp.gate"] == "disk"
    )
    assert eng.device_map["model.layers.1.self_attn"] == "cpu"
    torch.testing.assert_close(
        eng.forward(input_ids).logits, cpu_engine.forward(input_ids).logits, atol=ATOL, rtol=0
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"": "cpu", "model.layers.9": "disk"}, "'model.layers.9' is not a module"),
        ({"": "cpu", "model.layers.0.mlp.experts.1.up_proj": "disk"}, "inside placement unit"),
        ({"model": "cpu"}, "places no device for \\['lm_head'\\]"),
        ({"": "cuda:7"}, r"GPU\(s\) \[7\] not available"),
        ({"": "tpu"}, "invalid device 'tpu'"),
        ("disk", "nothing to compute on"),
    ],
)
def test_bad_device_maps(tiny_dir: Path, spec: object, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        load_engine(tiny_dir, device_map=spec)  # type: ignore[arg-type]


def test_bad_expert_priority(tiny_dir: Path) -> None:
    with pytest.raises(ExpertSetError, match="sports"):
        load_engine(tiny_dir, device_map="auto", expert_priority=["sports"])


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_unload_and_load_expert_at_run_time(
    tiny_dir: Path, cpu_engine: Engine, input_ids: torch.Tensor, where: str
) -> None:
    spec = {"": "cpu"} if where == "cpu" else disk_map((0, 2), (1, 2))
    eng = load_engine(tiny_dir, device_map=spec)
    before = eng.forward(input_ids).logits
    eng.unload_expert("news")
    assert eng.loaded_expert_ids == ("public", "code", "math")
    for layer in eng.model.model.layers:
        assert all(p.device.type == "meta" for p in layer.mlp.experts[2].parameters())
    with pytest.raises(ExpertSetError, match=r"\['news'\] are unloaded") as info:
        eng.forward(input_ids, allowed=("public", "news"))
    assert info.value.ids == ("news",)
    # allowed=None now means every loaded expert: the model without 'news'
    without = cpu_engine.forward(input_ids, allowed=("public", "code", "math"))
    got = eng.forward(input_ids)
    torch.testing.assert_close(got.logits, without.logits, atol=ATOL, rtol=0)
    assert got.usage[0]["news"] == (0, 0.0)
    # the bare model refuses to route to an unloaded expert rather than touching meta weights
    with pytest.raises(ExpertSetError, match="unloaded"), torch.no_grad():
        eng.model(input_ids=input_ids, routing=RoutingControl(torch.ones(3, 4, dtype=torch.bool)))
    eng.load_expert("news")
    assert eng.loaded_expert_ids == IDS
    torch.testing.assert_close(eng.forward(input_ids).logits, before, atol=0, rtol=0)
    with pytest.raises(ExpertSetError, match="sports"):
        eng.unload_expert("sports")
