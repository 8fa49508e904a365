"""Several processes (torchrun, gloo on the CPU) train to the weights of one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def _run(args: list[str], procs: int | None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            "-m",
            "gateway.cli",
        ]
        if procs
        else [sys.executable, "-m", "gateway.cli"]
    )
    r = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_processes_match_one(tmp_path: Path, public_data: Path) -> None:
    common = [
        "model",
        "pretrain",
        "--data",
        str(public_data),
        "--size",
        "tiny",
        "--steps",
        "3",
        "--device",
        "cpu",
    ]
    _run([*common, "--out", str(tmp_path / "one")], None)
    _run([*common, "--out", str(tmp_path / "two")], 2)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4, msg=key)
    assert not (tmp_path / "two.partial").exists()
