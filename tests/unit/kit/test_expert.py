from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kit.documents import read_documents
from kit.errors import KitError
from kit.expert import train_expert
from tests.unit.kit.conftest import CODE_TEXT


def test_frozen_parameters_bitwise_unchanged(
    tmp_path: Path, public_dir: Path, code_data: Path, embedding_file: Path
) -> None:
    public = load_file(str(public_dir / "model.safetensors"))
    run = train_expert(
        public_dir,
        read_documents([code_data]),
        embedding_file,
        tmp_path / "e",
        expert_id="code",
        owner="alice",
        steps=5,
        batch_size=4,
        seq_len=32,
        lr=1e-2,
    )
    trained = run.model.state_dict()
    emb = load_file(str(embedding_file))["embedding"]
    changed = []
    for key, value in trained.items():
        if ".mlp.experts.1." in key:
            changed.append(
                not torch.equal(value, public[key.replace(".experts.1.", ".experts.0.")])
            )
        elif key.endswith(".mlp.gate.weight"):
            layer = int(key.split(".")[2])
            assert torch.equal(value[0], public[key][0]), f"{key}: public row moved"
            changed.append(not torch.equal(value[1], emb[layer]))
        elif key.endswith(".mlp.gate.bias"):
            assert value[0] == 0.0 and value[1] <= 0.0
        else:  # embeddings, attention, norms, lm_head, the public FFN
            assert torch.equal(value, public[key]), f"{key} changed"
    assert changed and all(changed), "the new expert and its router row must train"


def test_artifact_holds_only_the_new_expert(code_expert: Path, public_dir: Path) -> None:
    tensors = load_file(str(code_expert / "expert.safetensors"))
    assert sorted(tensors) == sorted(
        [f"layers.{i}.{p}.weight" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
        + [f"layers.{i}.router" for i in range(2)]
        + [f"layers.{i}.bias" for i in range(2)]
    )
    assert tensors["layers.0.up_proj.weight"].shape == (64, 32)
    assert all(float(tensors[f"layers.{i}.bias"]) <= 0.0 for i in range(2))
    manifest = json.loads((code_expert / "manifest.json").read_text())
    assert manifest["id"] == "code" and manifest["owner"] == "alice"
    assert len(manifest["public_fingerprint"]) == 64
    assert manifest["documents"] == len(CODE_TEXT) and manifest["tokens_seen"] == 4 * 4 * 32
    assert manifest["settings"]["weight_decay"] == 0.0 and manifest["settings"]["top_k"] == 2
    text = (code_expert / "manifest.json").read_text()
    assert not any(
        line.strip() and line.strip() in text for d in CODE_TEXT for line in d.splitlines()
    )
    assert sorted(p.name for p in code_expert.iterdir()) == ["expert.safetensors", "manifest.json"]


def test_no_bias(tmp_path: Path, public_dir: Path, code_data: Path, embedding_file: Path) -> None:
    run = train_expert(
        public_dir,
        read_documents([code_data]),
        embedding_file,
        tmp_path / "e",
        expert_id="code",
        owner="alice",
        steps=1,
        batch_size=4,
        seq_len=32,
        bias=False,
    )
    assert not any(k.endswith(".bias") for k in load_file(str(run.path / "expert.safetensors")))


def test_resume_equals_uninterrupted(
    tmp_path: Path, public_dir: Path, code_data: Path, embedding_file: Path
) -> None:
    docs = read_documents([code_data])
    kw = dict(
        expert_id="code", owner="alice", steps=5, batch_size=4, seq_len=32, checkpoint_every=2
    )
    whole = train_expert(public_dir, docs, embedding_file, tmp_path / "a", **kw)  # type: ignore[arg-type]
    train_expert(public_dir, docs, embedding_file, tmp_path / "b", stop_after=3, **kw)  # type: ignore[arg-type]
    resumed = train_expert(public_dir, docs, embedding_file, tmp_path / "b", **kw)  # type: ignore[arg-type]
    a = load_file(str(whole.path / "expert.safetensors"))
    b = load_file(str(resumed.path / "expert.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs(
    tmp_path: Path, public_dir: Path, code_data: Path, embedding_file: Path
) -> None:
    docs = read_documents([code_data])
    with pytest.raises(KitError, match="invalid expert id"):
        train_expert(
            public_dir, docs, embedding_file, tmp_path / "x", expert_id="public", owner="a"
        )
    with pytest.raises(KitError, match="no such embedding file"):
        train_expert(public_dir, docs, tmp_path / "none", tmp_path / "x", expert_id="c", owner="a")
    bad = tmp_path / "bad.safetensors"
    save_file({"embedding": torch.zeros(3, 7)}, str(bad))
    with pytest.raises(KitError, match=r"shape \[3, 7\]"):
        train_expert(public_dir, docs, bad, tmp_path / "x", expert_id="c", owner="a")
    with pytest.raises(KitError, match="steps must be between"):
        train_expert(
            public_dir, docs, embedding_file, tmp_path / "x", expert_id="c", owner="a", steps=0
        )
    with pytest.raises(KitError, match=r"config\.json: missing"):
        train_expert(tmp_path, docs, embedding_file, tmp_path / "x", expert_id="c", owner="a")
    assert not (tmp_path / "x").exists()


def test_random_router_init(tmp_path: Path, public_dir: Path, code_data: Path) -> None:
    from kit.expert import random_rows

    docs = read_documents([code_data])
    kw = dict(expert_id="code", owner="alice", steps=1, batch_size=4, seq_len=32, lr=1e-9)
    run = train_expert(public_dir, docs, None, tmp_path / "r", router_init="random", seed=5, **kw)  # type: ignore[arg-type]
    rows = random_rows(2, 32, 5)
    assert torch.allclose(rows.norm(dim=-1), torch.ones(2))
    assert torch.equal(rows, random_rows(2, 32, 5)) and not torch.equal(rows, random_rows(2, 32, 6))
    tensors = load_file(str(run.path / "expert.safetensors"))
    for i in range(2):  # one step at a negligible rate: the row is still (almost) its start
        torch.testing.assert_close(tensors[f"layers.{i}.router"], rows[i], atol=1e-6, rtol=0)
    assert json.loads((run.path / "manifest.json").read_text())["router_init"] == "random"
    with pytest.raises(KitError, match="router_init must be one of"):
        train_expert(public_dir, docs, None, tmp_path / "x", router_init="zeros", **kw)  # type: ignore[arg-type]
    with pytest.raises(KitError, match="embedding file is needed"):
        train_expert(public_dir, docs, None, tmp_path / "x", **kw)  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()
