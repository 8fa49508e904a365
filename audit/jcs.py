"""RFC 8785 JSON Canonicalization Scheme (JCS), standard library only.

The one canonical encoding of ledger format v1 (docs/audit.md, "Ledger format v1"): object
members sorted by the UTF-16 code units of their names, no whitespace, strings escaped only
where JSON requires it (`"`, `\\`, U+0000..U+001F; the two-letter forms for \\b \\t \\n \\f \\r,
`\\u00xx` in lower-case hex for the rest), numbers as ECMAScript's Number.prototype.toString
writes an IEEE 754 double. Integers outside +-(2**53 - 1) and NaN/infinities are refused
(I-JSON, RFC 7493), as are strings that are not Unicode scalar values (lone surrogates).

Written here rather than imported because the standalone verifier (`python -m audit.offline`)
depends on nothing but the standard library and `cryptography`; tests/unit/audit hold it
byte-equal to the maintained `rfc8785` package on generated documents, floats included.

The encoder is a short recursion over the value (about as fast as `json.dumps` with
sort_keys for ledger payloads): strings go through the C `json` string encoder, whose escapes
are exactly JCS's for valid strings.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_SAFE_INTEGER = 2**53 - 1

_encode_string = json.encoder.encode_basestring
try:  # the C implementation, ~10x faster
    from _json import encode_basestring as _c_encode_string

    _encode_string = _c_encode_string
except ImportError:  # pragma: no cover - every CPython has it
    pass


class JCSError(ValueError):
    """A value that has no RFC 8785 encoding (or that I-JSON forbids)."""


def number(value: int | float) -> str:
    """An integer or double as ECMAScript writes it (RFC 8785 section 3.2.2.3)."""
    if isinstance(value, bool):
        raise JCSError("a boolean is not a number")
    if isinstance(value, int):
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return str(value)
        raise JCSError(f"integer {value} is outside I-JSON's range +-(2**53 - 1)")
    if not math.isfinite(value):
        raise JCSError(f"{value} has no JSON encoding")
    if value == 0:
        return "0"  # and -0 too
    text = repr(float(value))  # the shortest digits that round-trip, as ECMAScript picks
    sign = ""
    if text[0] == "-":
        sign, text = "-", text[1:]
    mantissa, _, exp = text.partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = whole + frac
    n = len(whole) + (int(exp) if exp else 0)  # value = 0.digits * 10**n
    stripped = digits.lstrip("0")
    n -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        out = "0." + "0" * -n + digits
    else:
        e = n - 1
        mant = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        out = f"{mant}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + out


def _key(name: str) -> bytes:
    return name.encode("utf-16-be", "surrogatepass")


def _string(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise JCSError("a string holds a lone surrogate (not a Unicode scalar value)") from None
    return _encode_string(value)


def _encode(value: Any, out: list[str]) -> None:
    cls = value.__class__
    if cls is str:
        out.append(_string(value))
    elif cls is dict:
        if not value:
            out.append("{}")
            return
        for name in value:
            if name.__class__ is not str:
                raise JCSError(f"object member names must be strings, not {name!r}")
        names = sorted(value) if all(n.isascii() for n in value) else sorted(value, key=_key)
        sep = "{"
        for name in names:
            out.append(sep)
            out.append(_string(name))
            out.append(":")
            _encode(value[name], out)
            sep = ","
        out.append("}")
    elif cls is list or cls is tuple:
        if not value:
            out.append("[]")
            return
        sep = "["
        for item in value:
            out.append(sep)
            _encode(item, out)
            sep = ","
        out.append("]")
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif cls is int or cls is float:
        out.append(number(value))
    elif isinstance(value, str):
        _encode(str(value), out)
    elif isinstance(value, dict):
        _encode(dict(value), out)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        out.append(number(value))
    else:
        raise JCSError(f"{cls.__name__} is not a JSON value")


class _Slow(Exception):
    """The value needs the full encoder (see `_plain`)."""


_dumps = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
).encode


def _float(value: float) -> float | int:
    if value.is_integer():
        # json.dumps writes an integral float as `2.0`; ECMAScript as `2`. Within the safe
        # range the int has the same digits; beyond it (2**53 and up) only number() is right.
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return int(value)
        raise _Slow
    if 1e-4 <= abs(value) < 1e16:
        return value
    raise _Slow


def _plain(value: Any) -> Any:
    """`value` with integral floats made ints, when `json.dumps(sort_keys=True)` then writes
    exactly JCS's bytes: member names ASCII (code-point order is UTF-16 order), other floats
    between 1e-4 and 1e16 (where Python's repr and ECMAScript agree digit for digit), ints
    within I-JSON's range. Raises _Slow for anything else. Scalars are checked inline (no
    call per leaf): this runs for every appended record."""
    cls = value.__class__
    if cls is dict:
        out = None
        for name, item in value.items():
            if name.__class__ is not str or not name.isascii():
                raise _Slow
            c = item.__class__
            if c is str or item is None or c is bool:
                continue
            if c is int:
                if not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                    raise _Slow
                continue
            new = _float(item) if c is float else _plain(item)
            if new is not item:
                if out is None:
                    out = dict(value)
                out[name] = new
        return value if out is None else out
    if cls is list:
        items = None
        for i, item in enumerate(value):
            c = item.__class__
            if c is str or item is None or c is bool:
                continue
            if c is int:
                if not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                    raise _Slow
                continue
            new = _float(item) if c is float else _plain(item)
            if new is not item:
                if items is None:
                    items = list(value)
                items[i] = new
        return value if items is None else items
    if cls is float:
        return _float(value)
    if cls is int:
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return value
        raise _Slow
    if cls is str or value is None or cls is bool:
        return value
    raise _Slow


def canonicalize(value: Any) -> bytes:
    """The RFC 8785 encoding of `value` (dict, list, str, int, float, bool, None), UTF-8."""
    try:
        text = _dumps(_plain(value))
    except _Slow:
        out: list[str] = []
        _encode(value, out)
        text = "".join(out)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise JCSError("a string holds a lone surrogate (not a Unicode scalar value)") from None


__all__ = ["MAX_SAFE_INTEGER", "JCSError", "canonicalize", "number"]
