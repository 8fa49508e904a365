"""Loading: the checkpoint format, strict validation with errors naming the tensor, experts.json."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, FlexOlmoForCausalLM

from engine import load_engine
from engine.checkpoints import build_tiny_checkpoint
from engine.errors import CheckpointError

from .conftest import IDS

Ref = Callable[[Path], FlexOlmoForCausalLM]


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = path / "model.safetensors"
    state = load_file(str(file))
    edit(state)
    save_file(state, str(file), metadata={"format": "pt"})


def test_checkpoint_has_per_expert_keys_and_transformers_loads_it(
    tiny_dir: Path, reference_for: Ref
) -> None:
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for layer in range(2):
        assert f"model.layers.{layer}.mlp.gate.weight" in keys
        for e in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "flex_olmo" and config["num_experts"] == 4
    _, info = FlexOlmoForCausalLM.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert json.loads((tiny_dir / "experts.json").read_text())["experts"][1]["id"] == "code"


def test_build_is_deterministic(tmp_path: Path, tiny_dir: Path) -> None:
    again = build_tiny_checkpoint(tmp_path / "again", IDS, seed=0)
    other = build_tiny_checkpoint(tmp_path / "other", IDS, seed=1)
    same = (tiny_dir / "model.safetensors").read_bytes() == (
        again / "model.safetensors"
    ).read_bytes()
    assert same
    assert (tiny_dir / "model.safetensors").read_bytes() != (
        other / "model.safetensors"
    ).read_bytes()
    assert (tiny_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_tokenizer_offline_with_chat_template(tiny_dir: Path) -> None:
    eng = load_engine(tiny_dir)
    tok = eng.tokenizer
    assert tok is not None and tok.chat_template
    text = "def add(a, b):\n    return a + b  # ünïcode"
    ids = tok(text)["input_ids"]
    assert max(ids) < eng.config.vocab_size
    assert tok.decode(ids) == text
    assert tok.eos_token_id == eng.config.eos_token_id
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|user|>\nhi\n<|assistant|>\n"
    assert AutoTokenizer.from_pretrained(tiny_dir).eos_token == "<|endoftext|>"


def test_sharded_checkpoint_loads(
    tiny_norm_dir: Path, reference_for: Ref, input_ids: torch.Tensor
) -> None:
    assert (tiny_norm_dir / "model.safetensors.index.json").is_file()
    eng = load_engine(tiny_norm_dir)
    with torch.no_grad():
        expected = reference_for(tiny_norm_dir)(input_ids).logits
    torch.testing.assert_close(eng.forward(input_ids).logits, expected, atol=1e-5, rtol=0)


def test_missing_tensor_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_ckpt(tiny_dir, tmp_path / "m")
    rewrite(path, lambda s: s.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    with pytest.raises(
        CheckpointError,
        match=r"missing tensor\(s\) model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight",
    ):
        load_engine(path)


def test_missing_router_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_ckpt(tiny_dir, tmp_path / "m")
    rewrite(path, lambda s: s.pop("model.layers.0.mlp.gate.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate\.weight"):
        load_engine(path)


def test_misshaped_tensor_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_ckpt(tiny_dir, tmp_path / "m")

    def edit(s: dict[str, torch.Tensor]) -> None:
        s["model.layers.0.mlp.experts.3.down_proj.weight"] = torch.zeros(32, 60)

    rewrite(path, edit)
    with pytest.raises(CheckpointError) as info:
        load_engine(path)
    msg = str(info.value)
    assert "model.layers.0.mlp.experts.3.down_proj.weight has shape [32, 60]" in msg
    assert "[32, 64]" in msg


def test_config_that_disagrees_with_tensors(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_ckpt(tiny_dir, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["num_experts"] = 3
    (path / "config.json").write_text(json.dumps(config))
    (path / "experts.json").unlink()
    with pytest.raises(CheckpointError) as info:
        load_engine(path)
    msg = str(info.value)
    assert "model.layers.0.mlp.gate.weight has shape [4, 32]" in msg
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in msg  # unexpected
    assert "num_experts=3" in msg


def test_unexpected_tensor_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_ckpt(tiny_dir, tmp_path / "m")

    def edit(s: dict[str, torch.Tensor]) -> None:
        s["model.layers.0.mlp.shared_expert.weight"] = torch.zeros(2)

    rewrite(path, edit)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.shared_expert\.weight"):
        load_engine(path)


def test_partial_router_bias_is_an_error(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_ckpt(tiny_dir, tmp_path / "m")

    def edit(s: dict[str, torch.Tensor]) -> None:
        s["model.layers.0.mlp.gate.bias"] = torch.zeros(4)

    rewrite(path, edit)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.gate\.bias"):
        load_engine(path)


def test_not_flex_olmo(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_ckpt(tiny_dir, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "olmoe"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'olmoe'"):
        load_engine(path)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_engine(tmp_path / "nowhere")


def test_no_safetensors(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_ckpt(tiny_dir, tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_engine(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"experts": [{"id": "a"}, {"id": "b"}]}',
            "lists 2 experts but config.json has num_experts=4",
        ),
        (
            '{"experts": [{"id": "a"}, {"id": "b"}, {"id": "a"}, {"id": "c"}]}',
            r"duplicate expert ids \['a'\]",
        ),
        ("{not json", "not readable JSON"),
        (
            '{"experts": [{"owner": "x"}, {"id": "b"}, {"id": "c"}, {"id": "d"}]}',
            'entry 0 has no string "id"',
        ),
        ('["a", "b"]', "expected an object"),
        ('{"experts": [{"id": "a b"}, {"id": "b"}, {"id": "c"}, {"id": "d"}]}', "invalid id 'a b'"),
    ],
)
def test_bad_experts_json(tiny_dir: Path, tmp_path: Path, content: str, message: str) -> None:
    path = copy_ckpt(tiny_dir, tmp_path / "m")
    (path / "experts.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        load_engine(path)


def test_default_ids_without_experts_json(
    tiny_dir: Path, tmp_path: Path, input_ids: torch.Tensor
) -> None:
    path = copy_ckpt(tiny_dir, tmp_path / "m")
    (path / "experts.json").unlink()
    eng = load_engine(path)
    assert eng.expert_ids == ("expert-0", "expert-1", "expert-2", "expert-3")
    assert eng.forward(input_ids[:1], allowed=["expert-3"]).usage[0]["expert-3"][0] > 0


def test_dtype_bfloat16(tiny_dir: Path, input_ids: torch.Tensor) -> None:
    eng = load_engine(tiny_dir, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in eng.model.parameters())
    res = eng.forward(input_ids, allowed=("public", "code"))
    assert res.logits.dtype == torch.bfloat16 and torch.isfinite(res.logits).all()
    full = load_engine(tiny_dir).forward(input_ids, allowed=("public", "code")).logits
    assert (res.logits.float() - full).abs().max() < 0.1
    with pytest.raises(ValueError, match="unknown dtype"):
        load_engine(tiny_dir, dtype="float7")


def test_missing_tokenizer_names_the_files(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_ckpt(tiny_dir, tmp_path / "m")
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files") as info:
        load_engine(path)
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        assert name in str(info.value)
    (path / "vocab.json").write_text("{}")  # half of a BPE tokenizer
    with pytest.raises(CheckpointError, match=r"merges\.txt missing beside vocab\.json"):
        load_engine(path)


def test_unreadable_tokenizer_is_a_checkpoint_error(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_ckpt(tiny_dir, tmp_path / "m")
    (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer files cannot be loaded"):
        load_engine(path)
