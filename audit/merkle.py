"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and proof verification (SHA-256).

Written by hand, not taken from a library. The one maintained Python library that implements
these trees (pymerkle) is not installed in the project's environment, and what the ledger
needs is short and fully specified: RFC 9162 §2.1.1 defines MTH, §2.1.3.1 PATH and §2.1.4.1
SUBPROOF as small recursions, and §2.1.3.2 and §2.1.4.2 give the verification algorithms,
reproduced below step by step. The ledger also needs things a generic library does not
offer: an incremental frontier kept in the chain-head row, and proofs assembled from
subtree hashes stored in the database. tests/unit/audit/test_merkle.py runs the published
RFC 6962 reference vectors (roots of sizes 0..8, inclusion and consistency proofs) and
property tests against the naive recursive definition.

Conventions: leaves are 0-based; `leaf_hash(d) = SHA-256(0x00 || d)`,
`node_hash(l, r) = SHA-256(0x01 || l || r)`, the root of the empty tree is SHA-256("").
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2): RFC 9162's k."""
    if n < 2:
        raise ValueError("split_point needs n >= 2")
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over already-hashed leaves, by the recursive definition (the reference)."""
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaf_hashes[0]
    k = split_point(n)
    return node_hash(root_of(leaf_hashes[:k]), root_of(leaf_hashes[k:]))


def perfect_subtrees(start: int, end: int) -> list[tuple[int, int]]:
    """Split [start, end) into aligned perfect subtrees, left to right: (first leaf, level).

    For start = 0 these are the roots of the binary decomposition of `end` (the frontier).
    """
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        level = (end - pos).bit_length() - 1
        if pos:
            level = min(level, (pos & -pos).bit_length() - 1)
        out.append((pos, level))
        pos += 1 << level
    return out


class Frontier:
    """The compact range [0, size): roots of the perfect subtrees of size's binary form.

    O(log size) hashes, largest subtree first. Appending a leaf merges equal-sized neighbours
    (one hash per append, amortised); the root folds the list from the right. The ledger keeps
    one in its chain-head row, so a checkpoint's root costs O(log n), not a pass over n records.
    """

    __slots__ = ("nodes", "size")

    def __init__(self, size: int = 0, nodes: Iterable[bytes] = ()) -> None:
        self.size = size
        self.nodes = list(nodes)
        if len(self.nodes) != size.bit_count():
            raise ValueError(f"a frontier of size {size} has {size.bit_count()} nodes")

    def copy(self) -> Frontier:
        return Frontier(self.size, self.nodes)

    def append(self, leaf: bytes, min_level: int | None = None) -> list[tuple[int, int, bytes]]:
        """Append one leaf hash; return the completed subtrees (level, index, hash) whose
        level is >= min_level (none when min_level is None)."""
        return self.append_subtree(0, leaf, min_level)

    def append_subtree(
        self, level: int, digest: bytes, min_level: int | None = None
    ) -> list[tuple[int, int, bytes]]:
        """Append an aligned perfect subtree of 2**level leaves (size must be a multiple)."""
        if self.size & ((1 << level) - 1):
            raise ValueError(f"a subtree of level {level} cannot start at leaf {self.size}")
        nodes = self.nodes
        completed: list[tuple[int, int, bytes]] = []
        new_size = self.size + (1 << level)
        s = self.size >> level
        while s & 1:
            digest = node_hash(nodes.pop(), digest)
            s >>= 1
            level += 1
            if min_level is not None and level >= min_level:
                completed.append((level, (new_size >> level) - 1, digest))
        nodes.append(digest)
        self.size = new_size
        return completed

    def root(self) -> bytes:
        nodes = self.nodes
        if not nodes:
            return EMPTY_ROOT
        digest = nodes[-1]
        for node in reversed(nodes[:-1]):
            digest = node_hash(node, digest)
        return digest

    def to_text(self) -> str:
        return "".join(node.hex() for node in self.nodes)

    @classmethod
    def from_text(cls, size: int, text: str) -> Frontier:
        raw = bytes.fromhex(text)
        return cls(size, [raw[i : i + 32] for i in range(0, len(raw), 32)])


# --- proof shapes: which subtree ranges a proof consists of (RFC 9162 §2.1.3.1, §2.1.4.1) ---


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """PATH(index, D[0:size]) as leaf ranges [a, b) whose MTH form the audit path, leaf first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    out: list[tuple[int, int]] = []
    a, b = 0, size
    while b - a > 1:
        k = split_point(b - a)
        if index < a + k:
            out.append((a + k, b))
            b = a + k
        else:
            out.append((a, a + k))
            a = a + k
    out.reverse()
    return out


def consistency_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """PROOF(old_size, D[0:new_size]) = SUBPROOF(m, D[n], true) as leaf ranges, in order."""
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to {new_size}")
    if old_size in (0, new_size):
        return []
    out: list[tuple[int, int]] = []
    m, a, b, complete = old_size, 0, new_size, True
    while True:
        n = b - a
        if m == n:
            if not complete:
                out.append((a, b))
            break
        k = split_point(n)
        if m <= k:
            out.append((a + k, b))
            b = a + k
        else:
            out.append((a, a + k))
            m -= k
            a += k
            complete = False
    out.reverse()
    return out


def inclusion_proof(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Audit path of leaf `index` in the tree over `leaf_hashes` (in memory)."""
    return [root_of(leaf_hashes[a:b]) for a, b in inclusion_ranges(index, len(leaf_hashes))]


def consistency_proof(old_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Consistency proof from the first `old_size` leaves to all of `leaf_hashes`."""
    return [root_of(leaf_hashes[a:b]) for a, b in consistency_ranges(old_size, len(leaf_hashes))]


# --- verification (RFC 9162 §2.1.3.2 and §2.1.4.2, step by step) ---


def _shift_until_lsb_or_zero(fn: int, sn: int) -> tuple[int, int]:
    while fn and not fn & 1:
        fn >>= 1
        sn >>= 1
    return fn, sn


def root_from_inclusion_proof(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes]
) -> bytes | None:
    """The root that `proof` implies for `leaf` at `index`, or None if the proof is malformed."""
    if index >= size or index < 0:
        return None
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                fn, sn = _shift_until_lsb_or_zero(fn, sn)
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> bool:
    """True when `proof` shows leaf hash `leaf` at `index` in the tree of `size` with `root`."""
    return root_from_inclusion_proof(index, size, leaf, proof) == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True when `proof` shows the tree (old_size, old_root) is a prefix of (new_size, new_root)."""
    if old_size < 0 or old_size > new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof  # every tree extends the empty one
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # an exact power of two
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                fn, sn = _shift_until_lsb_or_zero(fn, sn)
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
