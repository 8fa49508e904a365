"""The Ed25519 key that signs ledger checkpoints (`cryptography`).

The private key lives in FLEXGATE_HOME as `audit-signing-key.pem` (PKCS#8, mode 0600) and is
made on first use; `audit-signing-key.pub.pem` beside it is the public key to publish.
Creation is atomic and race-free across processes: the key is written to a private temporary
file and hard-linked into place, so a second process either wins or reads the first one's
complete key, never a half-written one. A key file readable by anyone else is refused, as
ssh does, because whoever can read it can forge checkpoints.

key_id = SHA-256 of the raw 32-byte public key, in hex.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit.errors import SigningKeyError
from audit.format import KeyFormatError, key_id_of, parse_public_key
from contracts.settings import Settings

PRIVATE_KEY_FILE = "audit-signing-key.pem"
PUBLIC_KEY_FILE = "audit-signing-key.pub.pem"


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text; SigningKeyError if it is anything else."""
    try:
        return parse_public_key(pem)
    except KeyFormatError as exc:
        raise SigningKeyError(str(exc)) from None


@dataclass(frozen=True)
class Signer:
    """The checkpoint signing key and its identity; `home` is the FLEXGATE_HOME it was loaded
    from (where its checkpoints are anchored, `audit.anchor`), None for a key held only in
    memory (then the process's FLEXGATE_HOME)."""

    private_key: Ed25519PrivateKey
    key_id: str
    public_key: Ed25519PublicKey
    home: Path | None = None

    @classmethod
    def from_private_key(cls, key: Ed25519PrivateKey, home: Path | None = None) -> Signer:
        public = key.public_key()
        return cls(key, key_id_of(public), public, home)

    @classmethod
    def load_or_create(cls, home: Path | None = None) -> Signer:
        """The key in `home` (default FLEXGATE_HOME), created there with mode 0600 if absent
        (with the anchor file's first line, a signed empty tree); the public key file is
        (re)written beside it. FLEXGATE_HOME itself is made 0700."""
        home = home or Settings.from_env().home
        path = home / PRIVATE_KEY_FILE
        try:
            ensure_private_dir(home)
            created = not path.exists() and _create_private_key(path)
            signer = cls.from_private_key(_read_private_key(path), home)
            _write_public_key(home / PUBLIC_KEY_FILE, signer.public_key)
            if created:
                from audit.anchor import Anchors

                Anchors(home).write_genesis(signer)
        except OSError as exc:
            raise SigningKeyError(f"cannot use the signing key in {home}: {exc}") from exc
        return signer

    def sign(self, message: bytes) -> str:
        return self.private_key.sign(message).hex()

    @property
    def public_key_pem(self) -> str:
        return public_key_pem(self.public_key)


def trusted_public_keys(
    home: Path | None = None, extra: list[Ed25519PublicKey] | None = None
) -> dict[str, Ed25519PublicKey]:
    """key_id -> key for the keys a verifier trusts: the public half of FLEXGATE_HOME's
    private key (or, on a machine without it, the published public key) and any given
    explicitly. Never creates a key."""
    home = home or Settings.from_env().home
    keys: dict[str, Ed25519PublicKey] = {}
    pub, priv = home / PUBLIC_KEY_FILE, home / PRIVATE_KEY_FILE
    if priv.exists():
        key = _read_private_key(priv).public_key()
        keys[key_id_of(key)] = key
    elif pub.exists():
        key = load_public_key(pub.read_bytes())
        keys[key_id_of(key)] = key
    for key in extra or []:
        keys[key_id_of(key)] = key
    return keys


def ensure_private_dir(path: Path) -> None:
    """Create `path` (and parents) with mode 0700; an existing folder keeps its mode."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def _create_private_key(path: Path) -> bool:
    """Write a new key at `path`; False if another process made one first."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process made one first: use it
            return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:  # group or others may read (or write) it: whoever can, can forge
        raise SigningKeyError(
            f"{path} is readable by others (mode {mode:o}): run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise SigningKeyError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 key")
    return key


def _write_public_key(path: Path, key: Ed25519PublicKey) -> None:
    pem = public_key_pem(key).encode("ascii")
    if path.exists() and path.read_bytes() == pem:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(pem)
    tmp.chmod(0o644)
    os.replace(tmp, path)
