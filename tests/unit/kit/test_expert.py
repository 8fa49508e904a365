from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from kit.documents import read_documents
from kit.errors import KitError
from kit.expert import BIAS_INIT, ExpertRun, train_expert
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
            assert value[0] == 0.0 and value[1] < 0.0
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


def test_bias_starts_below_zero_trains_and_stays_below_zero(code_expert: Path) -> None:
    """The bias that a start at 0 left inert (the clamp held it at 0 on the owner's data):
    it starts at BIAS_INIT, moves (it is learned) and ends strictly below 0 in every layer."""
    tensors = load_file(str(code_expert / "expert.safetensors"))
    manifest = json.loads((code_expert / "manifest.json").read_text())
    assert manifest["router_bias"] is True and manifest["router_bias_init"] == BIAS_INIT
    assert BIAS_INIT < 0.0
    for i in range(2):
        value = float(tensors[f"layers.{i}.bias"])
        assert value < 0.0, f"layer {i}: bias {value} is not below 0"
        assert value != BIAS_INIT, f"layer {i}: bias did not train"
        # 4 steps at a tenth of lr 2e-3: Adam moves it by about 1e-3 at most
        assert abs(value - BIAS_INIT) < 0.05


def _train(
    root: Path, public_dir: Path, code_data: Path, embedding_file: Path, **kw: Any
) -> ExpertRun:
    return train_expert(
        public_dir,
        read_documents([code_data]),
        embedding_file,
        root,
        expert_id="code",
        owner="alice",
        steps=3,
        batch_size=4,
        seq_len=32,
        **kw,
    )


def test_no_bias_trains_another_expert(
    tmp_path: Path, public_dir: Path, code_data: Path, embedding_file: Path
) -> None:
    """--no-bias writes no bias and, the same batches otherwise, another FFN: the bias changes
    the weight the new expert gets in training, so what it learns."""
    with_bias = _train(tmp_path / "b", public_dir, code_data, embedding_file)
    without = _train(tmp_path / "n", public_dir, code_data, embedding_file, bias=False)
    a = load_file(str(with_bias.path / "expert.safetensors"))
    b = load_file(str(without.path / "expert.safetensors"))
    assert not any(k.endswith(".bias") for k in b)
    assert json.loads((without.path / "manifest.json").read_text())["router_bias_init"] is None
    for i in range(2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            key = f"layers.{i}.{proj}.weight"
            diff = float((a[key] - b[key]).abs().max())
            assert diff > 1e-5, f"{key}: the same with and without the bias ({diff})"
    assert with_bias.losses != without.losses


def test_bias_init_must_be_below_zero(
    tmp_path: Path, public_dir: Path, code_data: Path, embedding_file: Path
) -> None:
    for value in (0.0, 0.5):
        with pytest.raises(KitError, match="must be below 0"):
            _train(tmp_path / "x", public_dir, code_data, embedding_file, bias_init=value)
        assert not (tmp_path / "x").exists()
    # without the bias its start does not matter
    run = _train(tmp_path / "n", public_dir, code_data, embedding_file, bias=False, bias_init=0.0)
    assert run.complete


def test_cli_bias_init(
    tmp_path: Path, public_dir: Path, code_data: Path, embedding_file: Path
) -> None:
    from click.testing import CliRunner

    from gateway.cli import cli
    from kit.cli import expert_train

    option = next(p for p in expert_train.params if p.name == "bias_init")
    assert option.default == BIAS_INIT
    args = ["expert", "train", "--public", str(public_dir), "--data", str(code_data)]
    args += ["--embedding", str(embedding_file), "--id", "code", "--owner", "alice"]
    args += ["--steps", "1", "--batch-size", "4"]
    bad = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "x"), "--bias-init", "0"])
    assert bad.exit_code == 2 and "--bias-init" in bad.output
    assert not (tmp_path / "x").exists()
    out = tmp_path / "e"
    good = CliRunner().invoke(cli, [*args, "--out", str(out), "--bias-init", "-2.5"])
    assert good.exit_code == 0, good.output
    assert json.loads((out / "manifest.json").read_text())["router_bias_init"] == -2.5
    tensors = load_file(str(out / "expert.safetensors"))
    assert all(-2.6 < float(tensors[f"layers.{i}.bias"]) < -2.4 for i in range(2))


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


def test_resume_with_other_initial_settings_is_refused(
    tmp_path: Path, public_dir: Path, code_data: Path, embedding_file: Path, public_data: Path
) -> None:
    """An interrupted run resumed with another bias start (or none), sequence length or
    corpus would continue from the checkpoint's weights as if nothing had changed: refused,
    the checkpoint kept."""
    docs = read_documents([code_data])
    kw: dict[str, Any] = dict(
        expert_id="code", owner="alice", steps=5, batch_size=4, seq_len=32, checkpoint_every=2
    )
    out = tmp_path / "e"
    run = train_expert(public_dir, docs, embedding_file, out, stop_after=2, **kw)
    assert not run.complete
    for other in ({"bias_init": -2.0}, {"bias": False}, {"seq_len": 16}):
        with pytest.raises(KitError, match="a checkpoint of a run with other settings"):
            train_expert(public_dir, docs, embedding_file, out, **{**kw, **other})
    other_docs = read_documents([public_data])  # another corpus, same settings
    with pytest.raises(KitError, match="a checkpoint of a run with other settings or data"):
        train_expert(public_dir, other_docs, embedding_file, out, **kw)
    assert not out.exists() and (tmp_path / "e.partial").is_dir()
    done = train_expert(public_dir, docs, embedding_file, out, **kw)  # the same settings
    assert done.complete and (out / "expert.safetensors").is_file()


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
