"""Several processes (torchrun, gloo on the CPU) train to the weights of one process.

The one-process run is the same command through the entry point in this test's process (one
torch thread, as OMP_NUM_THREADS=1 gives the ranks): a third interpreter would only add its
start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from gateway.cli import cli


def _run(args: list[str], procs: int | None) -> None:
    if not procs:
        assert torch.get_num_threads() == 1  # the kit's conftest sets it for every test
        result = CliRunner().invoke(cli, args, prog_name="flexgate", catch_exceptions=False)
        assert result.exit_code == 0, result.stderr[-3000:]
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        "-m",
        "gateway.cli",
    ]
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
        # The two runs sum the same gradients in another order (two half-batches all-reduced
        # against one batch), and AdamW's normalised update amplifies that rounding where a
        # gradient is near zero: single elements drift apart by a few 1e-5 after 3 steps on
        # some CPUs. A rank that trained on the wrong shard (or a different batch) moves
        # whole tensors, by 1e-2 of their norm or more after 3 steps: the norm of the difference
        # tells the two apart where one element does not.
        diff = (a[key] - b[key]).norm() / a[key].norm()
        assert diff < 1e-4, f"{key}: relative difference {diff:.2e}"
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3, msg=key)
    assert not (tmp_path / "two.partial").exists()
