"""POST /tokenize and /detokenize: vLLM's request and response shapes."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from gateway.schemas.openai import ChatMessage


class TokenizeRequest(Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """Either `prompt` (text) or `messages` (rendered through the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    """Default true for `prompt`, false for `messages` (the template adds them)."""
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(Struct, omit_defaults=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    tokens: Annotated[list[int], Meta(max_length=1_000_000)]
    model: str | None = None


class DetokenizeResponse(Struct):
    prompt: str
