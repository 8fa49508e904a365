"""`flexgate model inspect` and `flexgate generate`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import FlexOlmoForCausalLM

from engine import load_engine
from engine.cli import generate, model
from engine.inspect import summarize
from gateway.cli import cli

from .conftest import IDS, prune

Ref = Callable[[Path], FlexOlmoForCausalLM]


def test_inspect_text(tiny_dir: Path) -> None:
    result = CliRunner().invoke(model, ["inspect", str(tiny_dir)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "model_type: flex_olmo" in out and "num_experts: 4" in out
    for eid in IDS:
        assert eid in out
    s = summarize(tiny_dir)
    assert f"{s.total_params:,}" in out and f"{s.active_params:,}" in out
    assert "bfloat16" in out and "float32" in out


def test_inspect_counts(tiny_dir: Path, reference_for: Ref) -> None:
    s = summarize(tiny_dir)
    ref = reference_for(tiny_dir)
    assert s.total_params == sum(p.numel() for p in ref.parameters())
    c = ref.config
    per_expert_per_layer = 3 * c.hidden_size * c.intermediate_size
    assert s.expert_params == c.num_hidden_layers * per_expert_per_layer
    assert s.active_params == s.total_params - 2 * s.expert_params  # 4 experts, top-2
    assert s.memory_bytes("bfloat16") == 2 * s.total_params
    assert s.memory_bytes("float32") == 4 * s.total_params


def test_inspect_json_and_errors(tiny_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(model, ["inspect", str(tiny_dir), "--json"])
    data = json.loads(result.output)
    assert [e["id"] for e in data["experts"]] == list(IDS)
    assert data["parameters"]["total"] == summarize(tiny_dir).total_params
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    bad = CliRunner().invoke(model, ["inspect", str(tmp_path)])
    assert bad.exit_code == 2 and "'llama'" in bad.output


def test_generate_prints_completion_and_usage(tiny_dir: Path) -> None:
    args = [
        "--model",
        str(tiny_dir),
        "--prompt",
        "def add(a, b):",
        "--exclude",
        "news",
        "--max-tokens",
        "6",
    ]
    result = CliRunner().invoke(generate, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("expert "))) :]
    assert len(table) == 5
    rows = {r.split()[0]: r.split()[1:] for r in table[1:]}
    assert rows["news"] == ["no", "0", "0.000"]
    assert all(rows[e][0] == "yes" and int(rows[e][1]) >= 0 for e in ("public", "code", "math"))
    assert sum(int(r[1]) for r in rows.values()) > 0
    # the same through the flexgate entry point, and deterministic
    again = CliRunner().invoke(cli, ["generate", *args])
    assert again.exit_code == 0 and again.output == result.output


def test_generate_seeded_sampling_is_reproducible(tiny_dir: Path) -> None:
    args = [
        "--model",
        str(tiny_dir),
        "--prompt",
        "The",
        "--temperature",
        "1.5",
        "--max-tokens",
        "8",
    ]
    a = CliRunner().invoke(generate, [*args, "--seed", "7"])
    b = CliRunner().invoke(generate, [*args, "--seed", "7"])
    assert a.exit_code == 0 and a.output == b.output


@pytest.mark.parametrize("flags", [["--only", "sports"], ["--exclude", "sports"]])
def test_generate_unknown_expert(tiny_dir: Path, flags: list[str]) -> None:
    result = CliRunner().invoke(generate, ["--model", str(tiny_dir), "--prompt", "x", *flags])
    assert result.exit_code == 2 and "sports" in result.output


def test_generate_nothing_left(tiny_dir: Path) -> None:
    result = CliRunner().invoke(
        generate, ["--model", str(tiny_dir), "--prompt", "x", "--only", "code", "--exclude", "code"]
    )
    assert result.exit_code == 2 and "no expert left" in result.output


@pytest.mark.parametrize("allowed", [IDS, ("code",), ("public", "math")])
def test_engine_generate_matches_transformers_greedy_generate(
    tiny_dir: Path, reference_for: Ref, allowed: tuple[str, ...]
) -> None:
    eng = load_engine(tiny_dir)
    prompt = [int(i) for i in eng.tokenizer("Shall I compare thee")["input_ids"]]
    out = eng.generate(prompt, allowed=list(allowed), max_tokens=10, temperature=0.0)
    pruned = prune(reference_for(tiny_dir), [IDS.index(i) for i in allowed])
    with torch.no_grad():
        ref_ids = pruned.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=1
        )[0, len(prompt) :].tolist()
    assert out.completion_tokens == len(ref_ids)
    eos = eng.config.eos_token_id
    assert out.text == eng.tokenizer.decode(
        [t for t in ref_ids if t != eos], skip_special_tokens=True
    )
    layers = eng.config.num_hidden_layers
    fed = len(prompt) + out.completion_tokens - 1  # the last token is never fed back
    assert out.usage is not None
    assert sum(t for t, _ in out.usage.values()) == fed * layers * min(2, len(allowed))
