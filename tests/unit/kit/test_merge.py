from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import FlexOlmoForCausalLM

from engine import load_engine
from kit.documents import read_documents
from kit.errors import KitError
from kit.expert import train_expert
from kit.merge import merge


@pytest.fixture(scope="module")
def second_expert(
    tmp_path_factory: pytest.TempPathFactory,
    public_dir: Path,
    public_data: Path,
    embedding_file: Path,
) -> Path:
    out = tmp_path_factory.mktemp("e2") / "fortune"
    return train_expert(
        public_dir,
        read_documents([public_data]),
        embedding_file,
        out,
        expert_id="fortune",
        owner="bob",
        description="more fortunes",
        steps=2,
        batch_size=4,
        seq_len=32,
    ).path


def test_merged_loads_in_transformers_and_equals_the_engine(
    tmp_path: Path, public_dir: Path, code_expert: Path, second_expert: Path
) -> None:
    out = merge(public_dir, [code_expert, second_expert], tmp_path / "merged", top_k=2)
    experts = json.loads((out / "experts.json").read_text())["experts"]
    assert [(e["id"], e.get("owner")) for e in experts] == [
        ("public", "public"),
        ("code", "alice"),
        ("fortune", "bob"),
    ]
    ref, info = FlexOlmoForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    eng = load_engine(out)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.eval()(input_ids=ids).logits
    got = eng.forward(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the merged public expert and the expert's FFN are the trained weights, unchanged
    merged = load_file(str(out / "model.safetensors"))
    art = load_file(str(code_expert / "expert.safetensors"))
    pub = load_file(str(public_dir / "model.safetensors"))
    assert torch.equal(
        merged["model.layers.1.mlp.experts.1.down_proj.weight"], art["layers.1.down_proj.weight"]
    )
    assert torch.equal(
        merged["model.layers.0.mlp.experts.0.gate_proj.weight"],
        pub["model.layers.0.mlp.experts.0.gate_proj.weight"],
    )
    assert torch.equal(merged["model.layers.0.mlp.gate.weight"][1], art["layers.0.router"])
    assert not any(k.endswith("gate.bias") for k in merged)


def test_keep_bias_writes_router_biases(
    tmp_path: Path, public_dir: Path, code_expert: Path
) -> None:
    out = merge(public_dir, [code_expert], tmp_path / "m", keep_bias=True)
    merged = load_file(str(out / "model.safetensors"))
    art = load_file(str(code_expert / "expert.safetensors"))
    assert merged["model.layers.0.mlp.gate.bias"].tolist() == [0.0, float(art["layers.0.bias"])]
    eng = load_engine(out)
    assert eng.model.model.layers[0].mlp.gate.bias is not None


def test_kept_bias_is_served_as_trained(
    tmp_path: Path, public_dir: Path, code_data: Path, embedding_file: Path
) -> None:
    """The public model plus one expert, biases kept, is the 2-expert model that trained: the
    engine adds the trained bias to the router logits exactly as training did. Dropped, the
    (negative) bias no longer acts and the logits move."""
    run = train_expert(
        public_dir,
        read_documents([code_data]),
        embedding_file,
        tmp_path / "e",
        expert_id="code",
        owner="alice",
        steps=2,
        batch_size=4,
        seq_len=32,
    )
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = run.model(input_ids=ids).logits  # train() ends with the model in eval mode
    kept = load_engine(merge(public_dir, [run.path], tmp_path / "kept", keep_bias=True))
    dropped = load_engine(merge(public_dir, [run.path], tmp_path / "dropped"))
    trained_bias = run.model.model.layers[0].mlp.gate.bias
    served_bias = kept.model.model.layers[0].mlp.gate.bias
    assert trained_bias is not None and served_bias is not None
    assert torch.equal(served_bias.detach(), trained_bias.detach())
    assert float(served_bias[1]) < 0.0
    torch.testing.assert_close(kept.forward(ids).logits, trained, atol=1e-5, rtol=1e-5)
    assert float((dropped.forward(ids).logits - trained).abs().max()) > 1e-3


def _assert_nothing_written(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_refuses_an_expert_of_another_public_model(
    tmp_path: Path, public_dir: Path, code_expert: Path
) -> None:
    other = tmp_path / "other-public"
    shutil.copytree(public_dir, other)
    state = load_file(str(other / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"] + 1e-3
    save_file(state, str(other / "model.safetensors"))
    with pytest.raises(KitError, match="trained on another public model"):
        merge(other, [code_expert], tmp_path / "m")
    _assert_nothing_written(tmp_path, "m")


def test_refuses_two_experts_with_one_id(
    tmp_path: Path, public_dir: Path, code_expert: Path
) -> None:
    with pytest.raises(KitError, match="two experts with id 'code'"):
        merge(public_dir, [code_expert, code_expert], tmp_path / "m")
    _assert_nothing_written(tmp_path, "m")


def test_refuses_mismatched_shapes(tmp_path: Path, public_dir: Path, code_expert: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(code_expert, bad)
    tensors = load_file(str(bad / "expert.safetensors"))
    tensors["layers.1.up_proj.weight"] = torch.zeros(65, 32)
    save_file(tensors, str(bad / "expert.safetensors"))
    with pytest.raises(KitError, match=r"layers.1.up_proj.weight has shape \[65, 32\]"):
        merge(public_dir, [bad], tmp_path / "m")
    _assert_nothing_written(tmp_path, "m")


def test_refuses_existing_output_and_non_artifacts(
    tmp_path: Path, public_dir: Path, code_expert: Path
) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(KitError, match="exists; pass --force"):
        merge(public_dir, [code_expert], tmp_path / "m")
    with pytest.raises(KitError, match="not an expert artifact"):
        merge(public_dir, [tmp_path], tmp_path / "n", force=True)
    out = merge(public_dir, [code_expert], tmp_path / "m", force=True)
    assert (out / "config.json").is_file()


def test_refuses_a_merged_model_as_public(
    tmp_path: Path, public_dir: Path, code_expert: Path
) -> None:
    merged = merge(public_dir, [code_expert], tmp_path / "m")
    with pytest.raises(KitError, match="--public is the dense model"):
        merge(merged, [code_expert], tmp_path / "n")
