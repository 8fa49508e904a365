"""Ledger format v1: known-answer vectors (the values in docs/audit.md, computed once with
hashlib, the `rfc8785` package and `cryptography` directly, never with this project's code),
and RFC 8785 equality of `audit.jcs` against the maintained `rfc8785` package."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from audit import merkle
from audit.canonical import body_text, canonical_json, record_hash, stored_record_hash
from audit.format import Checkpoint
from audit.jcs import JCSError, canonicalize, number
from audit.signing import Signer

GENESIS = "0" * 64
RECORDS: list[dict[str, Any]] = [
    {
        "seq": 1,
        "id": "00000000-0000-4000-8000-000000000001",
        "kind": "inference",
        "at": "2026-11-28T12:00:00.123456Z",
        "principal": "app-1",
        "payload": {
            "purpose": "research",
            "usage": {"public": {"tokens": 3, "weight": 1.5}, "code": {"tokens": 0, "weight": 0.0}},
            "note": 'é\u2028"x"\n',
            "big": 1e21,
            "small": 1e-7,
            "n": -0.0,
        },
    },
    {
        "seq": 2,
        "id": "00000000-0000-4000-8000-000000000002",
        "kind": "license.granted",
        "at": "2026-11-28T12:00:00.500000Z",
        "principal": "owner-1",
        "payload": {"expert": "code", "grantee": "app-1", "purposes": ["research"]},
    },
    {
        "seq": 3,
        "id": "00000000-0000-4000-8000-000000000003",
        "kind": "expert.withdrawn",
        "at": "2026-11-28T12:00:01.000000Z",
        "principal": None,
        "payload": {"expert": "\U0001f600", "\u00e9": 1, "\U0001f600k": 2, "\uffee": 3},
    },
]
BODY_1 = (
    '{"at":"2026-11-28T12:00:00.123456Z","id":"00000000-0000-4000-8000-000000000001",'
    '"kind":"inference","payload":{"big":1e+21,"n":0,"note":"é\u2028\\"x\\"\\n",'
    '"purpose":"research","small":1e-7,"usage":{"code":{"tokens":0,"weight":0},'
    '"public":{"tokens":3,"weight":1.5}}},"principal":"app-1","seq":1}'
).encode()
BODY_3 = (
    '{"at":"2026-11-28T12:00:01.000000Z","id":"00000000-0000-4000-8000-000000000003",'
    '"kind":"expert.withdrawn","payload":{"expert":"\U0001f600","é":1,"\U0001f600k":2,'
    '"\uffee":3},"principal":null,"seq":3}'
).encode()
HASHES = [
    "5d5514d0df2499eda0719479f25e7349ba7e04bbcbe4b358b44133418a1da819",
    "ac2ef469d3faa372a882ed0160a4a1cf3ad10f683df36cd757e15575b4260805",
    "1ced4326b10971d9a34160076381d6c471dc6abf6a3d43dbf7bc519c40fc6c85",
]
LEAVES = [
    "7f31029b03f3f8722028439967b645dc70266d7b8a2f979ecbf3c4063152f56d",
    "fdd0cf4a2fedc472e319c219ffb5a7415c5c0ea0dff17c2ed093cabc92f0a167",
    "f8e24f6ef193fa2aa798e4351ffa80a51bbd053825eefb34c10124279328dd6f",
]
NODE_01 = "e46c4d042f803b7b788c1b85a9a9d4ee59a4ee7ef8fe08a90c0fe1952daf51cc"
ROOT = "bdea16351783071e7c2f4d124243f93d0186f6d15868e4f55238726b6a1078b3"
SEED = bytes(range(32))  # the Ed25519 private key of the vectors (never use it for anything)
KEY_ID = "56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c"
CHECKPOINT_AT = "2026-11-28T12:00:02.000000Z"
SIGNED_MESSAGE = (
    b'flexgate-checkpoint/v1\n{"at":"2026-11-28T12:00:02.000000Z","key_id":"'
    + KEY_ID.encode()
    + b'","root":"'
    + ROOT.encode()
    + b'","size":3}'
)
SIGNATURE = (
    "664b9078c102d1c47a55d3072c3c7ef61f70ea640fc3eadc27020d03cfbc6279"
    "443c710cd91cd6918210cd444b081c3332be5753ff0cdbda3bc14a02fd91bc05"
)


def _body(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in ("seq", "id", "kind", "at", "principal", "payload")}


def test_record_vectors() -> None:
    assert canonical_json(_body(RECORDS[0])) == BODY_1
    assert canonical_json(_body(RECORDS[2])) == BODY_3  # member names in UTF-16 order
    prev = GENESIS
    for rec, expected in zip(RECORDS, HASHES, strict=True):
        assert record_hash(prev_hash=prev, **rec) == expected
        text = canonical_json(rec["payload"]).decode()
        assert (
            stored_record_hash(
                prev, rec["seq"], rec["id"], rec["kind"], rec["at"], rec["principal"], text
            )
            == expected
        )
        prev = expected


def test_tree_vectors() -> None:
    leaves = [merkle.leaf_hash(bytes.fromhex(h)) for h in HASHES]
    assert [leaf.hex() for leaf in leaves] == LEAVES
    assert merkle.node_hash(leaves[0], leaves[1]).hex() == NODE_01
    assert merkle.root_of(leaves).hex() == ROOT
    frontier = merkle.Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    assert frontier.root().hex() == ROOT


def test_checkpoint_vectors() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signer = Signer.from_private_key(Ed25519PrivateKey.from_private_bytes(SEED))
    assert signer.key_id == KEY_ID
    unsigned = Checkpoint(3, ROOT, CHECKPOINT_AT, KEY_ID, "")
    assert unsigned.signed_message() == SIGNED_MESSAGE
    assert signer.sign(SIGNED_MESSAGE) == SIGNATURE  # Ed25519 is deterministic
    cp = Checkpoint(3, ROOT, CHECKPOINT_AT, KEY_ID, SIGNATURE)
    assert cp.check_signature({KEY_ID: signer.public_key}) is None
    assert cp.check_signature({KEY_ID: signer.public_key}) is None
    forged = Checkpoint(4, ROOT, CHECKPOINT_AT, KEY_ID, SIGNATURE)
    assert forged.check_signature({KEY_ID: signer.public_key}) is not None


# --- RFC 8785 against the maintained implementation ---

SCALAR_TEXT = st.text(st.characters(blacklist_categories=("Cs",)))
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | SCALAR_TEXT,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(SCALAR_TEXT, kids, max_size=4),
    max_leaves=20,
)


@given(JSON)
@settings(max_examples=400)
def test_jcs_equals_rfc8785(value: Any) -> None:
    assert canonicalize(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    "value", [2.0**53, -(2.0**53), 2.0**53 + 2, 2.0**53 - 1, 1e16 - 2, 123.0, -7.0]
)
def test_integral_floats_on_the_fast_path_are_written_as_ecmascript_does(value: float) -> None:
    """Found by the property test above: json.dumps writes 2**53 as a float (`...992.0`), and
    the fast path once let it through because 2**53 lies beyond the safe-integer range."""
    for doc in ({"weight": value}, [value], value):
        assert canonicalize(doc) == rfc8785.dumps(doc)


@given(st.integers(0, 2**64 - 1))
@settings(max_examples=2000)
def test_every_double_is_written_as_ecmascript_does(bits: int) -> None:
    """Any IEEE 754 bit pattern (subnormals, huge and tiny exponents included)."""
    value = struct.unpack("<d", bits.to_bytes(8, "little"))[0]
    if not math.isfinite(value):
        with pytest.raises(JCSError):
            number(value)
        return
    assert number(value).encode() == rfc8785.dumps(value)
    assert float(number(value)) == value


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0"),
        (-0.0, "0"),
        (1.0, "1"),
        (51.0, "51"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (1e-6, "0.000001"),
        (1e-7, "1e-7"),
        (123.456, "123.456"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (2**53 - 1, "9007199254740991"),
    ],
)
def test_number_examples(value: float, text: str) -> None:
    assert number(value) == text


@pytest.mark.parametrize(
    "bad", [2**53, -(2**53), float("nan"), float("inf"), "\ud800", {"\udfff": 1}, {1: 2}, b"x"]
)
def test_values_without_an_encoding_are_refused(bad: Any) -> None:
    with pytest.raises(JCSError):
        canonicalize(bad)


@given(
    st.integers(1, 2**53 - 1),
    SCALAR_TEXT,
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1),
    SCALAR_TEXT,
    st.none() | st.text(st.characters(blacklist_categories=("Cs",)), min_size=1),
    st.dictionaries(SCALAR_TEXT, JSON, max_size=4),
)
@settings(max_examples=300)
def test_concatenation_fast_path_is_rfc8785(
    seq: int, rid: str, kind: str, at: str, principal: str | None, payload: dict[str, Any]
) -> None:
    """The verifier hashes `body_text` (stored columns concatenated); it is byte-equal to
    RFC 8785 of the body as the maintained implementation writes it."""
    body = {"seq": seq, "id": rid, "kind": kind, "at": at, "principal": principal}
    body["payload"] = payload
    text = body_text(
        seq=seq, id=rid, kind=kind, at=at, principal=principal,
        payload_text=rfc8785.dumps(payload).decode(),
    )  # fmt: skip
    assert text.encode() == rfc8785.dumps(body)
