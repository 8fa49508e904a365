"""Signed checkpoints kept outside the database: the anchor file and witnesses.

A checkpoint in `ledger_checkpoints` proves nothing against someone who can write to the
database: they can delete it, rewrite and rechain the records, and wait for the next one to
be signed over their history. So every checkpoint, once committed, is also appended to an
append-only file in FLEXGATE_HOME (`audit-anchor.jsonl`, one JSON checkpoint per line, mode
0600, fsynced) and sent to each configured witness (FLEXGATE_AUDIT_WITNESSES):

- `dir:PATH` — appended to `PATH/flexgate-anchor.jsonl` (another disk, a mounted share);
- `cmd:PROGRAM [ARGS]` — PROGRAM runs with the checkpoint JSON on stdin; exit 0 accepts it;
- `http://…` / `https://…` — the checkpoint JSON is POSTed; a 2xx status accepts it.

Before a new checkpoint is signed (`audit.checkpoints`, the writer and `flexgate audit
checkpoint`), the ledger must prove with an RFC 9162 consistency proof that its tree extends
the latest anchored one; otherwise signing is refused (`AnchorRefused`), logged as an error,
and `health()` turns not-ready until a checkpoint is anchored again. `audit verify` checks
the records against the latest anchored checkpoint (and the directory witnesses) as well.

The file starts with a signed checkpoint of the empty tree, written when the signing key is
made: a signing key with no anchor file means the checkpoints were lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import threading
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.canonical import format_time
from audit.errors import AuditError
from audit.format import Checkpoint
from audit.jcs import canonicalize
from audit.merkle import EMPTY_ROOT
from contracts.settings import Settings

log = logging.getLogger(__name__)

ANCHOR_FILE = "audit-anchor.jsonl"
WITNESS_FILE = "flexgate-anchor.jsonl"


class AnchorError(AuditError):
    """The anchor file or a directory witness cannot be read, or holds something that is not a
    checkpoint signed by the trusted key."""


class AnchorRefused(AuditError):
    """The ledger does not extend its latest anchored checkpoint: nothing was signed."""


@dataclass
class AnchorHealth:
    """What the gateway's /readyz reads (`health()`): `ok` is False once a checkpoint was
    refused because the ledger does not extend its anchor, until one is anchored again."""

    ok: bool = True
    detail: str | None = None
    witness_errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail, "witness_errors": list(self.witness_errors)}


_health = AnchorHealth()
_health_lock = threading.Lock()


def health() -> AnchorHealth:
    """This process's anchoring state (a copy)."""
    with _health_lock:
        return AnchorHealth(_health.ok, _health.detail, list(_health.witness_errors))


def refused(detail: str) -> None:
    with _health_lock:
        _health.ok, _health.detail = False, detail
    log.error("ledger checkpoint refused: %s", detail)


def _anchored() -> None:
    with _health_lock:
        _health.ok, _health.detail = True, None


def _witness_failed(detail: str) -> None:
    with _health_lock:
        _health.witness_errors = [*_health.witness_errors[-9:], detail]
    log.error("ledger witness failed: %s", detail)


def reset_health() -> None:
    """Back to ready (tests; a process that re-anchored)."""
    with _health_lock:
        _health.ok, _health.detail, _health.witness_errors = True, None, []


def checkpoint_line(cp: Checkpoint) -> bytes:
    return canonicalize(cp.as_dict()) + b"\n"


def read_checkpoints(path: Path) -> list[Checkpoint]:
    """The checkpoints of an anchor file, in file order; [] when it does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise AnchorError(f"cannot read {path}: {exc}") from exc
    out: list[Checkpoint] = []
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(Checkpoint.from_dict(json.loads(line)))
        except ValueError as exc:
            if number == len(lines):  # a torn last line (a crash while appending): ignored
                log.warning("%s: ignoring a torn last line", path)
                continue
            raise AnchorError(f"{path} line {number} is not a checkpoint: {exc}") from exc
    return out


def _append(path: Path, line: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


class Anchors:
    """The anchor file of a FLEXGATE_HOME and its witnesses."""

    def __init__(
        self,
        home: Path,
        witnesses: Iterable[str] = (),
        *,
        timeout_s: float = 10.0,
        wait: bool = False,
    ) -> None:
        self.home = home
        self.path = home / ANCHOR_FILE
        self.witnesses = tuple(witnesses)
        self.timeout_s = timeout_s
        self.wait = wait  # wait for command and HTTP witnesses (the CLI) or not (a server)

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, *, home: Path | None = None, wait: bool = False
    ) -> Anchors:
        s = settings or Settings.from_env()
        return cls(
            home or s.home, s.audit_witnesses, timeout_s=s.audit_witness_timeout_s, wait=wait
        )

    def exists(self) -> bool:
        return self.path.exists()

    def sources(self) -> list[Path]:
        """The files to read anchored checkpoints from: the home file and directory witnesses."""
        out = [self.path]
        for w in self.witnesses:
            if w.startswith("dir:"):
                out.append(Path(w[4:]).expanduser() / WITNESS_FILE)
        return out

    def checkpoints(self, keys: Mapping[str, Ed25519PublicKey]) -> list[Checkpoint]:
        """Every anchored checkpoint (home file and directory witnesses), each checked against
        `keys`; AnchorError for one not signed by a trusted key, or two different roots for
        the same size (a fork)."""
        by_size: dict[int, Checkpoint] = {}
        for source in self.sources():
            for cp in read_checkpoints(source):
                reason = cp.check_signature(keys)
                if reason is not None:
                    raise AnchorError(f"{source}: {reason}")
                seen = by_size.get(cp.size)
                if seen is not None and seen.root != cp.root:
                    raise AnchorError(
                        f"{source}: two checkpoints of size {cp.size} with different roots "
                        "(the ledger forked)"
                    )
                by_size[cp.size] = cp
        return [by_size[s] for s in sorted(by_size)]

    def latest(self, keys: Mapping[str, Ed25519PublicKey]) -> Checkpoint | None:
        cps = self.checkpoints(keys)
        return cps[-1] if cps else None

    def write_genesis(self, sign: object) -> None:
        """Anchor the empty tree (when the signing key is made), if the file does not exist."""
        from audit.signing import Signer

        assert isinstance(sign, Signer)
        if self.path.exists():
            return
        at = format_time(datetime.now(UTC))
        unsigned = Checkpoint(0, EMPTY_ROOT.hex(), at, sign.key_id, "")
        cp = Checkpoint(
            0, unsigned.root, unsigned.at, sign.key_id, sign.sign(unsigned.signed_message())
        )
        _append(self.path, checkpoint_line(cp))

    def publish(self, cp: Checkpoint) -> None:
        """Append `cp` to the anchor file and send it to every witness; failures are logged
        (and kept in `health().witness_errors`), never raised: the checkpoint is committed."""
        line = checkpoint_line(cp)
        try:
            _append(self.path, line)
            _anchored()
        except OSError as exc:
            _witness_failed(f"anchor file {self.path}: {exc}")
        remote: list[str] = []
        for w in self.witnesses:
            if w.startswith("dir:"):
                try:
                    _append(Path(w[4:]).expanduser() / WITNESS_FILE, line)
                except OSError as exc:
                    _witness_failed(f"{w}: {exc}")
            else:
                remote.append(w)
        if not remote:
            return
        thread = threading.Thread(
            target=self._send_all, args=(remote, line), name="ledger-witness", daemon=True
        )
        thread.start()
        if self.wait:
            thread.join()

    def _send_all(self, witnesses: list[str], line: bytes) -> None:
        for w in witnesses:
            try:
                self._send(w, line)
            except Exception as exc:  # one witness failing must not keep the others from it
                _witness_failed(f"{w}: {exc}")

    def _send(self, witness: str, line: bytes) -> None:
        if witness.startswith("cmd:"):
            argv = shlex.split(witness[4:])
            done = subprocess.run(
                argv, input=line, capture_output=True, timeout=self.timeout_s, check=False
            )
            if done.returncode != 0:
                err = done.stderr.decode("utf-8", "replace").strip()[-200:]
                raise AnchorError(f"exit {done.returncode}: {err}")
            return
        request = urllib.request.Request(
            witness, data=line, headers={"Content-Type": "application/json"}, method="POST"
        )
        with contextlib.closing(urllib.request.urlopen(request, timeout=self.timeout_s)) as resp:
            if not 200 <= resp.status < 300:
                raise AnchorError(f"HTTP {resp.status}")


__all__ = [
    "ANCHOR_FILE",
    "WITNESS_FILE",
    "AnchorError",
    "AnchorHealth",
    "AnchorRefused",
    "Anchors",
    "health",
    "read_checkpoints",
    "refused",
    "reset_health",
]
