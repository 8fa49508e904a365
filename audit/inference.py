"""The payload of an `inference` ledger record (DESIGN.md, "Ledger record contract").

One function builds it, so every inference record has the same fields, types and rounding,
and the operator switch for raw text (FLEXGATE_AUDIT_STORE_TEXT, `Settings.audit_store_text`)
is applied in one place: by default only the prompt's SHA-256 is kept; with the switch on,
the prompt and completion text are added to the payload and so are covered by its hash.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from audit.canonical import canonical_json
from contracts.settings import Settings

STATUSES = frozenset({"ok", "error", "cancelled"})
Prompt = str | Sequence[Mapping[str, Any]]


def prompt_sha256(prompt: Prompt) -> str:
    """SHA-256 of a completion prompt (UTF-8) or of chat messages (their canonical JSON)."""
    data = prompt.encode("utf-8") if isinstance(prompt, str) else canonical_json(list(prompt))
    return hashlib.sha256(data).hexdigest()


def _usage_item(expert: str, value: Any) -> dict[str, Any]:
    tokens, raw_weight = (
        (value.get("tokens"), value.get("weight")) if isinstance(value, Mapping) else value
    )
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"usage[{expert!r}].tokens must be an int >= 0")
    if isinstance(raw_weight, bool) or not isinstance(raw_weight, int | float):
        raise ValueError(f"usage[{expert!r}].weight must be a number")
    weight = float(raw_weight)
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"usage[{expert!r}].weight must be a finite number >= 0")
    return {"tokens": tokens, "weight": round(weight, 6)}


def inference_payload(
    *,
    request_id: str,
    endpoint: str,
    model: str,
    purpose: str,
    policy_version: int | str | None,
    experts_allowed: Iterable[str],
    experts_excluded: Mapping[str, str],
    usage: Mapping[str, Any],
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: str | None,
    status: str,
    prompt: Prompt,
    completion: str | None = None,
    duration_ms: float,
    trace_id: str | None = None,
    store_raw_text: bool | None = None,
) -> dict[str, Any]:
    """Build an inference payload; ValueError on a value the contract does not allow.

    `usage` maps expert id -> (tokens, weight) as the engine returns it, or
    {"tokens", "weight"}; weights are rounded to 6 decimals. `prompt` is the completion prompt
    or the chat messages; it is hashed, and stored (with `completion`) only when
    `store_raw_text` (default: the operator setting) is on.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(sorted(STATUSES))}")
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 0:
        raise ValueError("prompt_tokens must be an int >= 0")
    if (
        isinstance(completion_tokens, bool)
        or not isinstance(completion_tokens, int)
        or completion_tokens < 0
    ):
        raise ValueError("completion_tokens must be an int >= 0")
    payload: dict[str, Any] = {
        "request_id": request_id,
        "endpoint": endpoint,
        "model": model,
        "purpose": purpose,
        "policy_version": policy_version,
        "experts_allowed": list(experts_allowed),
        "experts_excluded": dict(experts_excluded),
        "usage": {expert: _usage_item(expert, value) for expert, value in usage.items()},
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "finish_reason": finish_reason,
        "status": status,
        "prompt_sha256": prompt_sha256(prompt),
        "duration_ms": round(float(duration_ms), 3),
        "trace_id": trace_id,
    }
    if Settings.from_env().audit_store_text if store_raw_text is None else store_raw_text:
        payload["prompt"] = prompt if isinstance(prompt, str) else [dict(m) for m in prompt]
        payload["completion"] = completion
    return payload
