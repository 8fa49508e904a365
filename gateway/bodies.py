"""Request bodies, decoded strictly: a wrong type is a 400 naming the field, never coerced.

Litestar parses a handler's `data` leniently (msgspec with strict=False: `"5"` becomes 5,
`"true"` becomes True), and that parse is also what documents the body in the OpenAPI schema.
So a handler declares `data: SomeStruct` for the schema and reads its body with `strict_body`,
the one decoder of every JSON body the gateway accepts (inference and management alike).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from litestar import Request

from gateway.errors import bad_request, decode_error

T = TypeVar("T")


def _decode(raw: bytes, kind: Any) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind, strict=True)
    except msgspec.ValidationError as exc:
        raise decode_error(exc) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from None


async def strict_body(request: Request[Any, Any, Any], kind: type[T]) -> T:
    """The body as `kind`, decoded strictly (400 on malformed JSON or a wrong type)."""
    body: T = _decode(await request.body(), kind)
    return body


async def optional_body(request: Request[Any, Any, Any], kind: type[T]) -> T | None:
    """`strict_body` for a route whose body may be left out (None when empty or `null`)."""
    raw = await request.body()
    if not raw.strip():
        return None
    body: T | None = _decode(raw, kind | None)
    return body
