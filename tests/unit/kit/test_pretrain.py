from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from kit.documents import read_documents
from kit.errors import KitError
from kit.pretrain import pretrain
from tests.unit.kit.conftest import MICRO


def test_public_model_shapes_and_tokenizer(public_dir: Path) -> None:
    config = json.loads((public_dir / "config.json").read_text())
    assert config["model_type"] == "flex_olmo"
    assert (config["num_experts"], config["num_experts_per_tok"]) == (1, 1)
    assert config["hidden_size"] == MICRO.hidden_size
    weights = load_file(str(public_dir / "model.safetensors"))
    assert weights["model.layers.0.mlp.gate.weight"].shape == (1, MICRO.hidden_size)
    assert weights["model.layers.1.mlp.experts.0.up_proj.weight"].shape == (64, 32)
    # the public router row is the public data's unit-norm embedding, not zeros
    assert abs(float(weights["model.layers.0.mlp.gate.weight"].norm()) - 1.0) < 1e-4
    tok = AutoTokenizer.from_pretrained(str(public_dir))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id == config["eos_token_id"]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>\nhi\n<|assistant|>\n"
    assert tok.decode(tok("any text, even ünïcode")["input_ids"]) == "any text, even ünïcode"
    experts = json.loads((public_dir / "experts.json").read_text())["experts"]
    assert experts == [{"id": "public", "owner": "public", "description": "public model"}]


def test_resume_after_interruption_equals_uninterrupted(tmp_path: Path, public_data: Path) -> None:
    docs = read_documents([public_data])
    whole = pretrain(docs, tmp_path / "whole", size=MICRO, steps=6, checkpoint_every=2)
    part = tmp_path / "part"
    pretrain(docs, part, size=MICRO, steps=6, checkpoint_every=2, stop_after=3)
    assert not part.exists() and (tmp_path / "part.partial" / "checkpoint.pt").is_file()
    # the interruption after step 3 lost step 3 (checkpoint at 2): resume from 2
    pretrain(docs, part, size=MICRO, steps=6, checkpoint_every=2)
    assert not (tmp_path / "part.partial").exists()
    a = load_file(str(whole / "model.safetensors"))
    b = load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(bool((a[k] == b[k]).all()) for k in a), "resumed weights differ"
    assert json.loads((part / "pretrain.json").read_text())["tokens_seen"] == 6 * 4 * 32


def test_deterministic_under_seed(tmp_path: Path, public_data: Path, public_dir: Path) -> None:
    docs = read_documents([public_data])
    again = pretrain(docs, tmp_path / "again", size=MICRO, steps=6, seed=0)
    other = pretrain(docs, tmp_path / "other", size=MICRO, steps=6, seed=1)
    ref = (public_dir / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == ref
    assert (other / "model.safetensors").read_bytes() != ref


def test_existing_output_is_refused_without_force(tmp_path: Path, public_data: Path) -> None:
    docs = read_documents([public_data])
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(KitError, match="exists; pass --force"):
        pretrain(docs, out, size=MICRO, steps=1)
    assert (out / "keep.txt").read_text() == "mine"
    pretrain(docs, out, size=MICRO, steps=1, force=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_other_settings_than_the_interrupted_run_are_refused(
    tmp_path: Path, public_data: Path
) -> None:
    docs = read_documents([public_data])
    pretrain(docs, tmp_path / "m", size=MICRO, steps=4, checkpoint_every=1, stop_after=1)
    with pytest.raises(KitError, match="interrupted run with other settings"):
        pretrain(docs, tmp_path / "m", size=MICRO, steps=5)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_range_checks_and_bad_paths(tmp_path: Path, public_data: Path) -> None:
    out = str(tmp_path / "m")
    r = _cli("model", "pretrain", "--data", str(public_data), "--out", out, "--steps", "0")
    assert r.returncode == 2 and "'--steps': 0 is not in the range" in r.stderr
    r = _cli("model", "pretrain", "--data", str(public_data), "--out", out, "--size", "huge")
    assert r.returncode == 2 and "'--size'" in r.stderr
    r = _cli("model", "pretrain", "--data", str(tmp_path / "none"), "--out", out)
    assert r.returncode == 2 and "no such file or folder" in r.stderr
    assert "Traceback" not in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli("model", "pretrain", "--data", str(empty), "--out", out)
    assert r.returncode == 2 and "no text to train on" in r.stderr
    assert not Path(out).exists()


def test_cli_existing_output_is_refused_with_4(tmp_path: Path, public_data: Path) -> None:
    """An output that exists is the state refusing the command (4), not bad input, and not
    the audit's 1; the folder is left as it was."""
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _cli("model", "pretrain", "--data", str(public_data), "--out", str(out), "--steps", "2")
    assert r.returncode == 4 and "exists; pass --force" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
