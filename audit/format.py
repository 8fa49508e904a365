"""Ledger format v1 as a verifier elsewhere needs it: signed checkpoints (docs/audit.md).

Standard library and `cryptography` only, like everything `audit.offline` imports: a
checkpoint `{size, root, at, key_id, signature}` commits to the first `size` records; `root`
is the RFC 9162 Merkle tree hash (SHA-256, leaf `0x00 || record hash`, node
`0x01 || left || right`) over their 32-byte record hashes, and `signature` is Ed25519 over
`b"flexgate-checkpoint/v1\\n"` + JCS of `{size, root, at, key_id}`. The first line of the
signed message names the format, so a checkpoint of another version never verifies as v1.
key_id = SHA-256 of the raw 32-byte Ed25519 public key, hex.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.jcs import canonicalize

SIGNING_DOMAIN = b"flexgate-checkpoint/v1\n"
CHECKPOINT_FIELDS = frozenset({"size", "root", "at", "key_id", "signature"})
_HEX = frozenset("0123456789abcdef")
MAX_SIZE = 2**53 - 1


def is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX


def is_hex_hash(value: Any) -> bool:
    return is_hex(value, 64)


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


class KeyFormatError(ValueError):
    """Not an Ed25519 public key in PEM."""


def parse_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text; KeyFormatError if it is anything else."""
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except (ValueError, TypeError) as exc:
        raise KeyFormatError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFormatError("the public key is not an Ed25519 key")
    return key


def verify_signature(public_key: Ed25519PublicKey, message: bytes, signature_hex: str) -> bool:
    try:
        public_key.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class Checkpoint:
    size: int
    root: str
    at: str
    key_id: str
    signature: str

    def as_dict(self) -> dict[str, Any]:
        """The contract's shape, also the payload of the `checkpoint` ledger record."""
        return {
            "size": self.size,
            "root": self.root,
            "at": self.at,
            "signature": self.signature,
            "key_id": self.key_id,
        }

    def signed_message(self) -> bytes:
        body = {"size": self.size, "root": self.root, "at": self.at, "key_id": self.key_id}
        return SIGNING_DOMAIN + canonicalize(body)

    def check_signature(self, keys: Mapping[str, Ed25519PublicKey]) -> str | None:
        """None when signed by a trusted key, else why not."""
        key = keys.get(self.key_id)
        if key is None:
            return f"checkpoint of size {self.size} is signed by unknown key {self.key_id[:16]}…"
        if not verify_signature(key, self.signed_message(), self.signature):
            return f"checkpoint of size {self.size} has an invalid signature (forged or altered)"
        return None

    @classmethod
    def from_dict(cls, data: Any) -> Checkpoint:
        """Parse the contract's shape strictly; ValueError if a field is missing, extra or
        malformed."""
        if not isinstance(data, dict):
            raise ValueError("a checkpoint is a JSON object")
        keys = set(data)
        if keys != CHECKPOINT_FIELDS:
            missing, extra = CHECKPOINT_FIELDS - keys, keys - CHECKPOINT_FIELDS
            raise ValueError(
                "checkpoint fields: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {', '.join(sorted(missing))}" if missing else "",
                        f"unexpected {', '.join(sorted(extra))}" if extra else "",
                    )
                    if part
                )
            )
        size = data["size"]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_SIZE:
            raise ValueError("checkpoint size must be an integer between 0 and 2**53 - 1")
        if not is_hex(data["root"], 64) or not is_hex(data["key_id"], 64):
            raise ValueError("checkpoint root and key_id must be 64 lower-case hex digits")
        if not is_hex(data["signature"], 128):
            raise ValueError("checkpoint signature must be 128 lower-case hex digits")
        if not isinstance(data["at"], str) or len(data["at"]) != 27:
            raise ValueError("checkpoint at must be a time like 2026-11-28T12:00:00.123456Z")
        return cls(size, data["root"], data["at"], data["key_id"], data["signature"])


__all__ = [
    "CHECKPOINT_FIELDS",
    "SIGNING_DOMAIN",
    "Checkpoint",
    "KeyFormatError",
    "is_hex_hash",
    "key_id_of",
    "parse_public_key",
    "verify_signature",
]
