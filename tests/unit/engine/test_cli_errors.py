"""Exit codes and bad input of `flexgate generate` and `flexgate model inspect` (docs/cli.md),
through the real entry point: one line naming the fault, code 2, no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from contracts.exit_codes import ExitCode
from gateway.cli import cli


@pytest.fixture(scope="module")
def broken(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    out: dict[str, Path] = {}
    for name in ("no-tokenizer", "bad-experts", "colon-id", "not-a-model"):
        out[name] = root / name
        shutil.copytree(tiny_dir, out[name])
    (out["no-tokenizer"] / "tokenizer.json").unlink()
    (out["bad-experts"] / "experts.json").write_text("{")
    ids = json.loads((tiny_dir / "experts.json").read_text())
    ids["experts"][1]["id"] = "group:code"
    (out["colon-id"] / "experts.json").write_text(json.dumps(ids))
    (out["not-a-model"] / "config.json").unlink()
    return out


GENERATE_BAD: list[tuple[list[str], str]] = [
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-tokens", str(10**30) + "x"], "--max-tokens"),
    (["--seed", str(10**30)], "seed must be an integer"),
    (["--temperature", "nan"], "temperature"),
    (["--temperature", "inf"], "temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--dtype", "float7"], "unknown dtype"),
    (["--device-map", "cuda:99"], "not available"),
    (["--device-map", "{'x': 1}"], "invalid device"),
    (["--only", "sports"], "sports"),
    (["--only", "group:x"], "group:x"),
    (["--only", "code", "--exclude", "code"], "no expert left"),
]


@pytest.mark.parametrize(("flags", "message"), GENERATE_BAD, ids=lambda v: str(v)[:30])
def test_generate_bad_options(tiny_dir: Path, flags: list[str], message: str) -> None:
    result = CliRunner().invoke(
        cli, ["generate", "--model", str(tiny_dir), "--prompt", "x", *flags], catch_exceptions=False
    )
    assert result.exit_code == ExitCode.USAGE, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""


def test_generate_empty_prompt(tiny_dir: Path) -> None:
    result = CliRunner().invoke(
        cli, ["generate", "--model", str(tiny_dir), "--prompt", ""], catch_exceptions=False
    )
    assert result.exit_code == ExitCode.USAGE and "prompt is empty" in result.stderr


BROKEN = {
    "no-tokenizer": "no tokenizer files: expected tokenizer.json",
    "bad-experts": "not readable JSON",
    "colon-id": "invalid id 'group:code'",
    "not-a-model": "config.json",
}
# inspect reads only config, experts.json and tensor headers: a missing tokenizer is no fault
CASES = [("generate", f) for f in BROKEN] + [("inspect", f) for f in BROKEN if f != "no-tokenizer"]


@pytest.mark.parametrize(("command", "folder"), CASES)
def test_bad_checkpoint_folders(broken: dict[str, Path], command: str, folder: str) -> None:
    args = (
        ["generate", "--model", str(broken[folder]), "--prompt", "x"]
        if command == "generate"
        else ["model", "inspect", str(broken[folder])]
    )
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert BROKEN[folder] in result.stderr and "Traceback" not in result.output


def test_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    for args in (["model", "inspect", str(tmp_path / "nope")],
                 ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]):  # fmt: skip
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == ExitCode.USAGE and "does not exist" in result.stderr


def test_model_defaults_to_the_served_model(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contracts.settings import settings

    monkeypatch.setenv("FLEXGATE_MODEL", str(tiny_dir))
    settings.cache_clear()
    try:
        ok = CliRunner().invoke(cli, ["generate", "--prompt", "x", "--max-tokens", "2"])
        assert ok.exit_code == 0, ok.output
        monkeypatch.setenv("FLEXGATE_MODEL", str(tmp_path / "gone"))
        settings.cache_clear()
        gone = CliRunner().invoke(cli, ["generate", "--prompt", "x"], catch_exceptions=False)
        assert gone.exit_code == ExitCode.USAGE and "does not exist" in gone.stderr
    finally:
        settings.cache_clear()
