"""kit.dense: the dense fine-tune of the public FFN, dense models and the model soup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import load_engine
from kit.dense import dense_model, train_dense
from kit.documents import read_documents
from kit.errors import KitError
from kit.expert import ExpertRun
from kit.merge import merge

KW = dict(steps=3, batch_size=4, seq_len=32, lr=1e-2)


@pytest.fixture(scope="module")
def dense_code(
    public_dir: Path,
    code_data: Path,
    embedding_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> ExpertRun:
    out = tmp_path_factory.mktemp("dense") / "code"
    return train_dense(
        public_dir,
        read_documents([code_data]),
        embedding_file,
        out,
        expert_id="code",
        owner="alice",
        **KW,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def dense_fortune(
    public_dir: Path,
    public_data: Path,
    embedding_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> ExpertRun:
    out = tmp_path_factory.mktemp("dense") / "fortune"
    return train_dense(
        public_dir,
        read_documents([public_data]),
        embedding_file,
        out,
        expert_id="fortune",
        owner="bob",
        seed=3,
        **KW,  # type: ignore[arg-type]
    )


def test_only_the_public_ffn_trains(
    dense_code: ExpertRun, public_dir: Path, embedding_file: Path
) -> None:
    public = load_file(str(public_dir / "model.safetensors"))
    trained = dense_code.model.state_dict()
    moved = []
    for key, value in trained.items():
        if ".mlp.experts.0." in key:
            moved.append(not torch.equal(value, public[key]))
        else:  # embeddings, attention, norms, lm_head, the router row
            assert torch.equal(value, public[key]), f"{key} changed"
    assert moved and all(moved)
    tensors = load_file(str(dense_code.path / "expert.safetensors"))
    emb = load_file(str(embedding_file))["embedding"]
    assert not any(k.endswith(".bias") for k in tensors)
    for i in range(2):
        assert torch.equal(tensors[f"layers.{i}.router"], emb[i])
        key = f"model.layers.{i}.mlp.experts.0.up_proj.weight"
        assert torch.equal(tensors[f"layers.{i}.up_proj.weight"], trained[key])
    manifest = json.loads((dense_code.path / "manifest.json").read_text())
    assert manifest["training"] == "dense" and manifest["id"] == "code"
    assert manifest["tokens_seen"] == 3 * 4 * 32 and manifest["router_bias"] is False


def test_dense_model_serves_the_trained_model(
    dense_code: ExpertRun, public_dir: Path, tmp_path: Path
) -> None:
    out = dense_model(public_dir, [dense_code.path], tmp_path / "m", model_id="code")
    eng = load_engine(out)
    assert eng.expert_ids == ("code",) and eng.config.num_experts == 1
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense_code.model(input_ids=ids).logits
    torch.testing.assert_close(eng.forward(ids).logits, want, atol=1e-5, rtol=1e-5)
    eng.close()


def test_soup_is_the_mean_ffn(
    dense_code: ExpertRun, dense_fortune: ExpertRun, public_dir: Path, tmp_path: Path
) -> None:
    out = dense_model(
        public_dir, [dense_code.path, dense_fortune.path], tmp_path / "soup", model_id="soup"
    )
    soup = load_file(str(out / "model.safetensors"))
    a = load_file(str(dense_code.path / "expert.safetensors"))
    b = load_file(str(dense_fortune.path / "expert.safetensors"))
    for i in range(2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got = soup[f"model.layers.{i}.mlp.experts.0.{proj}.weight"]
            want = (a[f"layers.{i}.{proj}.weight"] + b[f"layers.{i}.{proj}.weight"]) / 2
            torch.testing.assert_close(got, want)
    public = load_file(str(public_dir / "model.safetensors"))
    assert torch.equal(soup["lm_head.weight"], public["lm_head.weight"])
    experts = json.loads((out / "experts.json").read_text())["experts"]
    assert experts[0]["id"] == "soup" and "code, fortune" in experts[0]["description"]


def test_dense_artifacts_merge_as_experts(
    dense_code: ExpertRun, public_dir: Path, tmp_path: Path
) -> None:
    out = merge(public_dir, [dense_code.path], tmp_path / "merged")
    eng = load_engine(out)
    assert eng.expert_ids == ("public", "code")
    eng.close()


def test_resume_equals_uninterrupted(
    tmp_path: Path, public_dir: Path, code_data: Path, embedding_file: Path
) -> None:
    docs = read_documents([code_data])
    kw = dict(expert_id="code", owner="a", steps=4, batch_size=4, seq_len=32, checkpoint_every=2)
    whole = train_dense(public_dir, docs, embedding_file, tmp_path / "a", **kw)  # type: ignore[arg-type]
    part = train_dense(public_dir, docs, embedding_file, tmp_path / "b", stop_after=2, **kw)  # type: ignore[arg-type]
    assert not part.complete and not (tmp_path / "b").exists()
    resumed = train_dense(public_dir, docs, embedding_file, tmp_path / "b", **kw)  # type: ignore[arg-type]
    a = load_file(str(whole.path / "expert.safetensors"))
    b = load_file(str(resumed.path / "expert.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs(
    dense_code, public_dir: Path, code_data: Path, embedding_file: Path, tmp_path: Path
) -> None:
    docs = read_documents([code_data])
    with pytest.raises(KitError, match="invalid expert id"):
        train_dense(public_dir, docs, embedding_file, tmp_path / "x", expert_id="public", owner="a")
    with pytest.raises(KitError, match="no expert artifact"):
        dense_model(public_dir, [], tmp_path / "x", model_id="m")
    with pytest.raises(KitError, match="invalid model id"):
        dense_model(public_dir, [dense_code.path], tmp_path / "x", model_id="bad id!")
    other = tmp_path / "other"
    shutil.copytree(dense_code.path, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["public_fingerprint"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KitError, match="another public model"):
        dense_model(public_dir, [other], tmp_path / "x", model_id="m")
    with pytest.raises(KitError, match="not an expert artifact"):
        dense_model(public_dir, [tmp_path], tmp_path / "x", model_id="m")
    assert not (tmp_path / "x").exists()
