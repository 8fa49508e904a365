"""How a weight meets a few tokens on the CPU: the form of matmul, chosen per machine, kept.

A decoding step gives each selected expert one token (batch 1) or a few (a batched step: ~2
each), and each attention projection and the LM head the batch's rows. ``F.linear(x, W)``
computes ``x @ W.T``; for such skinny products torch's CPU BLAS can be far from the memory
bandwidth the product needs, and how far depends on the machine: on one AMD EPYC development
machine MKL's matrix-vector product (one token through ``F.linear``) ran ~3x slower than the
same product as ``W @ X.T`` with ``X`` two rows (the token and a zero row); on an Intel Xeon
the transposed form was slightly slower at one thread (docs/benchmarks.md has the figures). So
the form is measured, not assumed, per weight shape, dtype, thread count and case (one token,
or a few), on the model's own weights of that shape (read from memory, as decoding does).

The same machine must get the same answer in every process, or the same request runs at
different speeds in different workers (a best-of-5 measure with a 20 % margin flipped in 7 of
20 fresh processes on one machine). Two things make it so:

- **A robust measure.** The two forms run in interleaved pairs (alternating which goes first,
  after a warm-up of each), and the decision is the median of the per-pair time ratios, so a
  burst of load hits both forms of a pair and cannot pick the winner. The transposed form is
  taken only when that median says it is at least 20 % faster; a median within a dead band
  around that threshold is measured again with three times the pairs and decided on all of
  them, and whatever is not clearly faster stays ``F.linear`` (torch's own form).
- **A cache file**, ``$FLEXGATE_HOME/engine-kernels.json``, which keeps each decision keyed by
  the CPU model (``/proc/cpuinfo``'s model name), the torch version, the thread count, the
  dtype, the weight shape and the case. A process reads the file before measuring; the first
  process to measure a key writes it, and every later one (and every worker started beside it)
  uses that answer. The read-measure-write runs under an exclusive ``flock`` on a lock file
  beside it and re-reads the file once the lock is held, so processes starting at once measure
  one at a time (undisturbed by each other) and end with one answer; the file itself is
  replaced atomically (a temporary file and ``os.replace``), so a reader never sees half of
  it. A file that cannot be parsed is ignored with a warning and rewritten; with
  ``FLEXGATE_HOME`` unset, or a home that cannot be written or locked, the decisions stay in
  the process's memory (measured robustly all the same). Deleting the file re-measures.

Both forms compute the same products (they differ in the order of float additions, ~1e-7
relative); the exactness tests run both (:data:`FORCE_TRANSPOSED`).

The transposed form's operand layout matters as much: ``torch.mm(W, X.t())`` with ``X`` a
contiguous ``[n, k]`` is the fast case, so the hidden activations between ``up`` and ``down``
are made contiguous as ``[n, inter]`` and passed transposed too (a row-major ``[inter, n]``
right operand ran ~4x slower for ``n = 2`` on the machine above).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:
    import fcntl
except ImportError:  # not on this platform: decisions stay in memory
    fcntl = None  # type: ignore[assignment]

SKINNY_MAX = 64
"""Up to this many tokens a product may take the transposed form (more: a prefill, where
``F.linear`` is a proper matrix product)."""

FORCE_TRANSPOSED: bool | None = None
"""Tests set this to run one form whatever the machine prefers; None: measured."""

CACHE_NAME = "engine-kernels.json"
"""The cache file's name in ``$FLEXGATE_HOME``."""

CACHE_FORMAT = 1

MARGIN = 0.8
"""The transposed form is taken when its median time is at most this fraction of
``F.linear``'s."""
DEAD_BAND = 0.1
"""A median ratio within this distance of :data:`MARGIN` is measured again, longer."""
PAIRS = 9
"""Interleaved pairs in a first measure (three times as many when it lands in the dead band)."""

Key = tuple[bool, tuple[int, ...], torch.dtype, int]
"""(one token, weight shape, dtype, thread count)."""

_choices: dict[Key, bool] = {}
_lock = threading.Lock()


def transposed_is_faster(
    weight: torch.Tensor, tokens: int, sample: Callable[[], Sequence[torch.Tensor]]
) -> bool:
    """Whether ``W @ X.T`` beats ``F.linear`` here for ``tokens`` tokens on a CPU weight
    shaped as ``weight``. ``sample`` gives the weights to time when that is not known yet
    (the model's weights of that shape, e.g. a layer's experts' ``gate_proj``, timed in turn
    so that the measure reads weights from memory as decoding does)."""
    if FORCE_TRANSPOSED is not None:
        return FORCE_TRANSPOSED
    key: Key = (tokens == 1, tuple(weight.shape), weight.dtype, torch.get_num_threads())
    choice = _choices.get(key)
    if choice is None:
        with _lock:
            choice = _choices.get(key)
            if choice is None:

                def measure() -> float:
                    weights = [
                        w for w in sample() if w.shape == weight.shape and w.dtype == weight.dtype
                    ]
                    return measure_ratio(weights or [weight], key[0])

                choice = _choices[key] = _cached_choice(key, measure)
    return choice


def decide(ratio: float) -> bool:
    """The decision for a median time ratio (transposed / linear): transposed only when it
    is at most :data:`MARGIN` (anything closer to 1 stays ``F.linear``)."""
    return ratio <= MARGIN


def measure_ratio(weights: Sequence[torch.Tensor], single: bool) -> float:
    """Median over interleaved pairs of (transposed time / ``F.linear`` time) for one token
    (``single``) or two through each of ``weights`` in turn; when the median lands in the
    dead band, three times as many pairs more, and the median of all of them."""
    x = torch.randn(1 if single else 2, weights[0].shape[1], dtype=weights[0].dtype)
    xp = torch.cat([x, torch.zeros_like(x)]) if single else x

    def linear() -> None:
        for w in weights:
            F.linear(x, w)

    def transposed() -> None:
        for w in weights:
            torch.mm(w, xp.t())

    def timed(form: Callable[[], None]) -> float:
        start = time.perf_counter()
        form()
        return time.perf_counter() - start

    ratios: list[float] = []

    def pairs(count: int) -> float:
        for i in range(count):
            if i % 2 == 0:
                lin = timed(linear)
                tr = timed(transposed)
            else:
                tr = timed(transposed)
                lin = timed(linear)
            ratios.append(tr / max(lin, 1e-9))
        return statistics.median(ratios)

    with torch.inference_mode():
        linear()  # warm-up: first calls allocate and page weights in
        transposed()
        median = pairs(PAIRS)
        if abs(median - MARGIN) < DEAD_BAND:
            median = pairs(3 * PAIRS)
    return median


# -- the cache file ------------------------------------------------------------------------------


@functools.cache
def cpu_model() -> str:
    """``/proc/cpuinfo``'s model name, else what ``platform`` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def cache_key(key: Key) -> str:
    """The cache file's key for ``key`` on this machine and torch."""
    single, shape, dtype, threads = key
    return "|".join(
        [
            f"cpu={cpu_model()}",
            f"torch={torch.__version__}",
            f"threads={threads}",
            f"dtype={str(dtype).removeprefix('torch.')}",
            f"shape={'x'.join(map(str, shape))}",
            f"case={'one' if single else 'few'}",
        ]
    )


def cache_path() -> Path | None:
    """``$FLEXGATE_HOME/engine-kernels.json``, or None when FLEXGATE_HOME is unset."""
    home = os.environ.get("FLEXGATE_HOME")
    if not home:
        return None
    return Path(home).expanduser() / CACHE_NAME


def _warn(message: str) -> None:
    warnings.warn(f"engine.kernels: {message}", RuntimeWarning, stacklevel=3)


def read_cache(path: Path) -> dict[str, Any]:
    """The entries of the cache file (empty when there is none); a file that cannot be read
    or parsed is ignored with a warning (it is rewritten by the next decision)."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # no file (a home that cannot exist)
        return {}
    except OSError as exc:
        _warn(f"cannot read {path} ({exc}); ignoring it")
        return {}
    try:
        data = json.loads(raw)  # bytes: a file that is not UTF-8 is a ValueError here
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError("not a kernel cache of format 1")
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise ValueError("entries is not an object")
    except (ValueError, KeyError, RecursionError) as exc:
        _warn(f"ignoring unreadable cache file {path} ({exc}); it will be rewritten")
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict) and _form(v) is not None}


def _form(entry: dict[str, Any]) -> bool | None:
    form = entry.get("form")
    return True if form == "transposed" else False if form == "linear" else None


def write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Replace the cache file with ``entries`` atomically (a temporary file beside it, then
    ``os.replace``)."""
    data = {"format": CACHE_FORMAT, "entries": dict(sorted(entries.items()))}
    fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_NAME}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _lock_file(path: Path) -> int:
    """An open descriptor holding an exclusive ``flock`` on ``path``'s lock file (released
    when it is closed, or by the kernel if the process dies); OSError when that fails."""
    assert fcntl is not None
    # a home this creates is private, as the database's (audit.db.create_private_file)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _cached_choice(key: Key, measure: Callable[[], float]) -> bool:
    """The file's decision for ``key``, else the decision on ``measure()``'s ratio, written
    for the next process."""
    path = cache_path()
    if path is None:
        return decide(measure())
    if fcntl is None:
        _warn("no file locking on this platform: kernel choices stay in memory")
        return decide(measure())
    try:
        fd = _lock_file(path)
    except OSError as exc:
        # A read-only home still has the decisions made before (the file is only ever
        # replaced whole, so reading it unlocked is safe): only a miss is measured here.
        _warn(f"cannot lock {path} ({exc}): new kernel choices stay in memory")
        found = _form(read_cache(path).get(cache_key(key)) or {})
        return decide(measure()) if found is None else found
    try:
        name = cache_key(key)
        entries = read_cache(path)  # read once the lock is held: another process may have written
        hit = entries.get(name)
        if hit is not None:
            found = _form(hit)
            assert found is not None
            return found
        ratio = measure()
        choice = decide(ratio)
        entries[name] = {"form": "transposed" if choice else "linear", "ratio": round(ratio, 4)}
        try:
            write_cache(path, entries)
        except OSError as exc:
            _warn(f"cannot write {path} ({exc}): this choice stays in memory")
        return choice
    finally:
        os.close(fd)


def linear(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``F.linear(x, weight)`` for ``x`` ``[n, in]``, as ``W @ X.T`` when ``transposed`` (a
    single token beside a zero row); the result is ``[n, out]``, contiguous."""
    if not transposed:
        return F.linear(x, weight)
    n = x.shape[0]
    if n == 1:
        x = torch.cat([x, torch.zeros_like(x)])
    out = torch.mm(weight, x.t()).t()
    return out[:1].contiguous() if n == 1 else out.contiguous()


def expert_ffn_transposed(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` for a few tokens ``x`` ``[n, hidden]``, as ``W @ X.T``
    products; a single token is computed beside a zero row (see the module docstring)."""
    n = x.shape[0]
    if n == 1:
        x = torch.cat([x, torch.zeros_like(x)])
    xt = x.t()
    hidden = (act(torch.mm(gate, xt)) * torch.mm(up, xt)).t().contiguous()
    out = torch.mm(down, hidden.t()).t()
    return out[:1] if n == 1 else out
