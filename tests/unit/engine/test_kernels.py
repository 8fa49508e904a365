"""engine.kernels: the transposed few-token forms equal the plain ones; the per-machine choice
is measured once, kept in a cache file shared by processes, and can be forced."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import kernels


def plain(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


@pytest.mark.parametrize("tokens", [1, 2, 3, 17])
@pytest.mark.parametrize("threads", [1, 2])
def test_transposed_form_equals_linear(tokens: int, threads: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    gate, up = torch.randn(96, 40, generator=g), torch.randn(96, 40, generator=g)
    down = torch.randn(40, 96, generator=g)
    x = torch.randn(tokens, 40, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernels.expert_ffn_transposed(x, gate, up, down, F.silu)
    finally:
        torch.set_num_threads(old)
    assert got.shape == (tokens, 40)
    torch.testing.assert_close(got, plain(x, gate, up, down), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 2, 5])
def test_linear_form_equals_f_linear(tokens: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    w, x = torch.randn(48, 40, generator=g), torch.randn(tokens, 40, generator=g)
    for transposed in (False, True):
        got = kernels.linear(x, w, transposed)
        assert got.shape == (tokens, 48) and got.is_contiguous()
        torch.testing.assert_close(got, F.linear(x, w), atol=1e-5, rtol=1e-5)


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """No decision in memory (as in a new process); call it again to forget them again."""

    def forget() -> None:
        monkeypatch.setattr(kernels, "_choices", {})

    forget()
    monkeypatch.setattr(kernels, "FORCE_TRANSPOSED", None)
    return forget


def counting(monkeypatch: pytest.MonkeyPatch, ratio: float | None = None) -> list[bool]:
    """Record every measure (its case); with ``ratio``, return it instead of timing."""
    calls: list[bool] = []
    real = kernels.measure_ratio

    def measure(weights: list[torch.Tensor], single: bool) -> float:
        calls.append(single)
        return real(weights, single) if ratio is None else ratio

    monkeypatch.setattr(kernels, "measure_ratio", measure)
    return calls


def entries(home: Path) -> dict[str, dict[str, object]]:
    data = json.loads((home / kernels.CACHE_NAME).read_text())
    assert data["format"] == kernels.CACHE_FORMAT
    result: dict[str, dict[str, object]] = data["entries"]
    return result


def test_choice_is_measured_once_per_key_and_can_be_forced(
    monkeypatch: pytest.MonkeyPatch, fresh: Callable[[], None], tmp_path: Path
) -> None:
    monkeypatch.delenv("FLEXGATE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    calls = counting(monkeypatch)
    w = torch.randn(64, 32)
    pool = [w, torch.randn(64, 32), torch.randn(8, 8)]  # another shape is left out
    first = kernels.transposed_is_faster(w, 1, lambda: pool)
    assert kernels.transposed_is_faster(w, 1, lambda: pool) is first
    kernels.transposed_is_faster(w, 2, lambda: pool)
    kernels.transposed_is_faster(w, 5, lambda: pool)  # the same case as 2 tokens
    assert calls == [True, False]
    assert isinstance(first, bool)
    assert list(tmp_path.iterdir()) == []  # FLEXGATE_HOME unset: in memory only
    monkeypatch.setattr(kernels, "FORCE_TRANSPOSED", True)
    assert kernels.transposed_is_faster(torch.randn(3, 3), 1, lambda: []) is True
    monkeypatch.setattr(kernels, "FORCE_TRANSPOSED", False)
    assert kernels.transposed_is_faster(w, 1, lambda: pool) is False
    assert calls == [True, False]


@pytest.mark.parametrize(("ratio", "transposed"), [(0.5, True), (0.8, True), (0.81, False)])
def test_transposed_only_when_clearly_faster(ratio: float, transposed: bool) -> None:
    assert kernels.decide(ratio) is transposed
    assert kernels.decide(1.0) is False and kernels.decide(1.3) is False


def test_a_ratio_in_the_dead_band_is_measured_longer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The median is first taken over PAIRS pairs; one near the threshold takes 4x as many."""
    counts: list[int] = []
    near = kernels.MARGIN + kernels.DEAD_BAND / 2
    real_median = statistics.median

    def median(values: list[float]) -> float:
        counts.append(len(values))
        real_median(values)
        return near if len(counts) == 1 else 1.0

    monkeypatch.setattr(statistics, "median", median)
    assert kernels.measure_ratio([torch.randn(16, 8)], True) == 1.0
    assert counts == [kernels.PAIRS, 4 * kernels.PAIRS]
    counts.clear()
    near = kernels.MARGIN + 2 * kernels.DEAD_BAND  # clear of the band: measured once
    assert kernels.measure_ratio([torch.randn(16, 8)], True) == near
    assert counts == [kernels.PAIRS]


def test_cache_file_keeps_the_decision_for_the_next_process(
    monkeypatch: pytest.MonkeyPatch, fresh: Callable[[], None], tmp_path: Path
) -> None:
    monkeypatch.setenv("FLEXGATE_HOME", str(tmp_path / "home"))
    calls = counting(monkeypatch, ratio=0.5)
    w = torch.randn(24, 16)
    assert kernels.transposed_is_faster(w, 1, lambda: [w]) is True
    assert calls == [True]
    stored = entries(tmp_path / "home")
    (name,) = stored
    assert stored[name]["form"] == "transposed"
    for part in (
        f"cpu={kernels.cpu_model()}",
        f"torch={torch.__version__}",
        f"threads={torch.get_num_threads()}",
        "dtype=float32",
        "shape=24x16",
        "case=one",
    ):
        assert part in name.split("|")
    fresh()  # a new process: the file answers, nothing is measured
    calls2 = counting(monkeypatch, ratio=2.0)
    assert kernels.transposed_is_faster(w, 1, lambda: [w]) is True
    assert calls2 == []
    # another case and another dtype are other keys
    assert kernels.transposed_is_faster(w, 3, lambda: [w]) is False
    assert kernels.transposed_is_faster(w.double(), 1, lambda: [w]) is False
    assert calls2 == [False, True]
    assert len(entries(tmp_path / "home")) == 3


def test_an_entry_of_another_torch_version_is_not_used(
    monkeypatch: pytest.MonkeyPatch, fresh: Callable[[], None], tmp_path: Path
) -> None:
    monkeypatch.setenv("FLEXGATE_HOME", str(tmp_path))
    w = torch.randn(24, 16)
    key: kernels.Key = (True, (24, 16), torch.float32, torch.get_num_threads())
    monkeypatch.setattr(torch, "__version__", "0.1.0-other")
    other = kernels.cache_key(key)
    monkeypatch.undo()
    monkeypatch.setenv("FLEXGATE_HOME", str(tmp_path))
    fresh()
    assert other != kernels.cache_key(key)
    kernels.write_cache(tmp_path / kernels.CACHE_NAME, {other: {"form": "transposed"}})
    calls = counting(monkeypatch, ratio=1.0)
    assert kernels.transposed_is_faster(w, 1, lambda: [w]) is False
    assert calls == [True]
    stored = entries(tmp_path)
    assert stored[other]["form"] == "transposed"  # kept, for that version
    assert stored[kernels.cache_key(key)]["form"] == "linear"


@pytest.mark.parametrize(
    "content", ["{not json", "[]", '{"format": 99, "entries": {}}', '{"format": 1}', ""]
)
def test_a_corrupt_cache_file_is_ignored_and_rewritten(
    monkeypatch: pytest.MonkeyPatch, fresh: Callable[[], None], tmp_path: Path, content: str
) -> None:
    monkeypatch.setenv("FLEXGATE_HOME", str(tmp_path))
    (tmp_path / kernels.CACHE_NAME).write_text(content)
    calls = counting(monkeypatch, ratio=0.5)
    w = torch.randn(24, 16)
    with pytest.warns(RuntimeWarning, match="unreadable cache file"):
        assert kernels.transposed_is_faster(w, 1, lambda: [w]) is True
    assert calls == [True]
    (entry,) = entries(tmp_path).values()
    assert entry["form"] == "transposed"


def test_a_cache_file_that_is_not_text_is_ignored_and_rewritten(
    monkeypatch: pytest.MonkeyPatch, fresh: Callable[[], None], tmp_path: Path
) -> None:
    """Bytes that are not UTF-8 (a torn or foreign file) are a corrupt file, not a crash at
    the first decoding step of every process."""
    monkeypatch.setenv("FLEXGATE_HOME", str(tmp_path))
    (tmp_path / kernels.CACHE_NAME).write_bytes(b"\xff\xfe{garbage")
    calls = counting(monkeypatch, ratio=0.5)
    w = torch.randn(24, 16)
    with pytest.warns(RuntimeWarning, match="unreadable cache file"):
        assert kernels.transposed_is_faster(w, 1, lambda: [w]) is True
    assert calls == [True]
    assert entries(tmp_path)


def test_an_unlockable_home_still_uses_the_decisions_in_its_file(
    monkeypatch: pytest.MonkeyPatch, fresh: Callable[[], None], tmp_path: Path
) -> None:
    """A read-only home (or a lock file it may not open) keeps the file's answers; only a
    key it lacks is measured, in memory."""
    monkeypatch.setenv("FLEXGATE_HOME", str(tmp_path))
    w = torch.randn(24, 16)
    key: kernels.Key = (True, (24, 16), torch.float32, torch.get_num_threads())
    kernels.write_cache(
        tmp_path / kernels.CACHE_NAME, {kernels.cache_key(key): {"form": "transposed"}}
    )

    def refuse(_path: Path) -> int:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(kernels, "_lock_file", refuse)
    calls = counting(monkeypatch, ratio=2.0)  # a measure would say F.linear
    with pytest.warns(RuntimeWarning, match="cannot lock"):
        assert kernels.transposed_is_faster(w, 1, lambda: [w]) is True  # the file's answer
    assert calls == []
    with pytest.warns(RuntimeWarning, match="cannot lock"):
        assert kernels.transposed_is_faster(w, 3, lambda: [w]) is False  # a miss: measured
    assert calls == [False]


def test_an_unwritable_home_keeps_choices_in_memory(
    monkeypatch: pytest.MonkeyPatch, fresh: Callable[[], None], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FLEXGATE_HOME", str(blocker / "home"))  # under a file: cannot exist
    calls = counting(monkeypatch, ratio=0.5)
    w = torch.randn(24, 16)
    with pytest.warns(RuntimeWarning, match="stay in memory"):
        assert kernels.transposed_is_faster(w, 1, lambda: [w]) is True
    assert kernels.transposed_is_faster(w, 1, lambda: [w]) is True
    assert calls == [True]


def test_racing_writers_end_with_one_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two deciders of one key at once whose measures disagree: the second waits on the lock,
    re-reads the file and takes the first's answer; one measure runs."""
    monkeypatch.setenv("FLEXGATE_HOME", str(tmp_path))
    key: kernels.Key = (False, (24, 16), torch.float32, 1)
    started = threading.Event()
    measured: list[float] = []

    def measure(ratio: float) -> Callable[[], float]:
        def run() -> float:
            started.set()
            time.sleep(0.2)  # the other decider arrives meanwhile
            measured.append(ratio)
            return ratio

        return run

    results: dict[str, bool] = {}

    def decide(name: str, ratio: float) -> None:
        results[name] = kernels._cached_choice(key, measure(ratio))

    first = threading.Thread(target=decide, args=("first", 0.5))
    first.start()
    assert started.wait(5)
    second = threading.Thread(target=decide, args=("second", 1.5))
    second.start()
    first.join(10)
    second.join(10)
    assert measured == [0.5]
    assert results == {"first": True, "second": True}
    assert entries(tmp_path)[kernels.cache_key(key)]["form"] == "transposed"


CHILD = """
import json, sys, torch
from engine import kernels
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
shapes = [(1024, 512), (512, 1024), (512, 512)]
pools = {s: [torch.randn(*s, generator=g) for _ in range(4)] for s in shapes}
out = {}
for s, pool in pools.items():
    for tokens in (1, 2):
        out[f"{s}/{tokens}"] = kernels.transposed_is_faster(pool[0], tokens, lambda p=pool: p)
print(json.dumps(out))
"""


def test_fresh_processes_sharing_a_home_agree(tmp_path: Path) -> None:
    """Four new Python processes started at once with one FLEXGATE_HOME, each selecting the
    forms of the same shapes (really measured: nothing is cached beforehand), print one
    answer, the one the cache file holds."""
    env = {**os.environ, "FLEXGATE_HOME": str(tmp_path)}
    root = Path(__file__).resolve().parents[3]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in outs]
    assert not any("engine.kernels" in err for _, err in outs)  # no warning: the file worked
    answers = [json.loads(out) for out, _ in outs]
    assert len(answers[0]) == 6
    assert all(a == answers[0] for a in answers)
    stored = entries(tmp_path)
    assert len(stored) == 6
    forms = sorted(e["form"] == "transposed" for e in stored.values())
    assert forms == sorted(answers[0].values())


def test_a_home_the_cache_creates_is_private(
    monkeypatch: pytest.MonkeyPatch, fresh: Callable[[], None], tmp_path: Path
) -> None:
    home = tmp_path / "new-home"
    monkeypatch.setenv("FLEXGATE_HOME", str(home))
    counting(monkeypatch, ratio=0.5)
    w = torch.randn(24, 16)
    assert kernels.transposed_is_faster(w, 1, lambda: [w]) is True
    assert home.stat().st_mode & 0o777 == 0o700
    assert (home / f"{kernels.CACHE_NAME}.lock").stat().st_mode & 0o777 == 0o600
