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

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit.errors import SigningKeyError
from contracts.settings import Settings

PRIVATE_KEY_FILE = "audit-signing-key.pem"
PUBLIC_KEY_FILE = "audit-signing-key.pub.pem"


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text; SigningKeyError if it is anything else."""
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise SigningKeyError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError("the public key is not an Ed25519 key")
    return key


def verify_signature(public_key: Ed25519PublicKey, message: bytes, signature_hex: str) -> bool:
    try:
        public_key.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Signer:
    """The checkpoint signing key and its identity."""

    private_key: Ed25519PrivateKey
    key_id: str
    public_key: Ed25519PublicKey

    @classmethod
    def from_private_key(cls, key: Ed25519PrivateKey) -> Signer:
        public = key.public_key()
        return cls(key, key_id_of(public), public)

    @classmethod
    def load_or_create(cls, home: Path | None = None) -> Signer:
        """The key in `home` (default FLEXGATE_HOME), created there with mode 0600 if absent;
        the public key file is (re)written beside it."""
        home = home or Settings.from_env().home
        path = home / PRIVATE_KEY_FILE
        try:
            home.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not path.exists():
                _create_private_key(path)
            signer = cls.from_private_key(_read_private_key(path))
            _write_public_key(home / PUBLIC_KEY_FILE, signer.public_key)
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


def _create_private_key(path: Path) -> None:
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
        with contextlib.suppress(FileExistsError):  # another process made one first: use it
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SigningKeyError(
            f"{path} is readable by others (mode {mode:o}): run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise SigningKeyError(f"{path} is not a PEM private key: {exc}") from exc
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
