"""Text <-> token ids of the served model (vLLM's /tokenize and /detokenize)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post
from litestar.datastructures import State
from litestar.openapi import ResponseSpec

from gateway.bodies import strict_body
from gateway.errors import bad_request
from gateway.inference.params import check_model
from gateway.inference.prompts import Tokenizer, chat_messages
from gateway.schemas.openai import ErrorResponse
from gateway.schemas.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

ERRORS = {
    c: ResponseSpec(ErrorResponse, description="error (OpenAI shape)")
    for c in (400, 401, 403, 404, 413)
}


class TokenizeController(Controller):
    tags = ["tokenize"]  # noqa: RUF012 (Litestar declares it a list)

    @post("/tokenize", status_code=200, responses=ERRORS, summary="Text or messages to token ids")
    async def tokenize(
        self, state: State, request: Request[Any, Any, Any], data: TokenizeRequest
    ) -> TokenizeResponse:
        data = await strict_body(request, TokenizeRequest)
        tk: Tokenizer = state.tokenizer
        if data.model is not None:
            check_model(data.model, state.model_name)
        if (data.prompt is None) == (data.messages is None):
            raise bad_request("give exactly one of `prompt` and `messages`", "prompt")
        if data.prompt is not None:
            ids = tk.encode(data.prompt, special=data.add_special_tokens is not False)
        else:
            messages = chat_messages(data.messages or [])
            if not getattr(tk.tok, "chat_template", None):
                raise bad_request(
                    "the served model has no chat template", "messages", "no_chat_template"
                )
            try:
                text = str(
                    tk.tok.apply_chat_template(
                        messages, add_generation_prompt=data.add_generation_prompt, tokenize=False
                    )
                )
            except Exception as exc:
                raise bad_request(
                    f"the chat template cannot render these messages: {exc}", "messages"
                ) from None
            ids = tk.encode(text, special=bool(data.add_special_tokens))
        return TokenizeResponse(
            count=len(ids),
            max_model_len=tk.window,
            tokens=list(ids),
            token_strs=[tk.token_str(i) for i in ids] if data.return_token_strs else None,
        )

    @post("/detokenize", status_code=200, responses=ERRORS, summary="Token ids to text")
    async def detokenize(
        self, state: State, request: Request[Any, Any, Any], data: DetokenizeRequest
    ) -> DetokenizeResponse:
        data = await strict_body(request, DetokenizeRequest)
        tk: Tokenizer = state.tokenizer
        if data.model is not None:
            check_model(data.model, state.model_name)
        tk.check_ids(data.tokens, "tokens")
        return DetokenizeResponse(prompt=tk.decode(data.tokens))
