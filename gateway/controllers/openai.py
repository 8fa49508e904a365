"""OpenAI-compatible routes: models, completions, chat completions (thin: see
gateway.inference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import ResponseHeader, State
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema

from gateway.inference.handlers import serve
from gateway.inference.params import chat_plan, completion_plan
from gateway.schemas.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelExpert,
    ModelList,
)
from governance.store import PolicySnapshot


@dataclass
class StreamingOperation(Operation):
    """The 200 of an inference route is JSON, or Server-Sent Events with `stream: true`."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            ok.content["text/event-stream"] = OpenAPIMediaType(
                schema=Schema(
                    type=OpenAPIType.STRING,
                    description="`data: <chunk JSON>` events, the last `data: [DONE]`",
                )
            )


AUDIT_HEADERS = [
    ResponseHeader(
        name="X-FlexGate-Audit-Seq",
        documentation_only=True,
        value="42",
        description="seq of the request's ledger record (plain responses)",
    ),
    ResponseHeader(
        name="X-FlexGate-Audit-Started-Seq",
        documentation_only=True,
        value="42",
        description="seq of the stream's inference.started record (streams)",
    ),
]


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {c: ResponseSpec(ErrorResponse, description="error (OpenAI shape)") for c in codes}


INFERENCE_ERRORS = _errors(400, 401, 403, 404, 413, 429, 503)


class OpenAIController(Controller):
    tags = ["openai"]  # noqa: RUF012 (Litestar declares it a list)

    @get(
        "/v1/models",
        summary="The served model (OpenAI list), its window and experts",
        responses=_errors(401, 403, 503),
    )
    async def models(self, state: State, snapshot: PolicySnapshot) -> ModelList:
        tk = state.tokenizer
        card = ModelCard(
            id=state.model_name,
            created=state.model_created,
            owned_by="flexgate",
            max_model_len=tk.window,
            experts=[
                ModelExpert(id=e.id, owner=e.owner, status=e.status, description=e.description)
                for e in snapshot.experts
            ],
        )
        return ModelList(data=[card])

    @post(
        "/v1/completions",
        status_code=200,
        responses=INFERENCE_ERRORS,
        operation_class=StreamingOperation,
        response_headers=AUDIT_HEADERS,
        summary="OpenAI Completions (stream: Server-Sent Events)",
    )
    async def completions(
        self,
        request: Request[Any, Any, Any],
        data: CompletionRequest,
        snapshot: PolicySnapshot,
    ) -> Response[CompletionResponse]:
        return await serve(request, snapshot, CompletionRequest, completion_plan)

    @post(
        "/v1/chat/completions",
        status_code=200,
        responses=INFERENCE_ERRORS,
        operation_class=StreamingOperation,
        response_headers=AUDIT_HEADERS,
        summary="OpenAI Chat Completions (stream: Server-Sent Events)",
    )
    async def chat_completions(
        self,
        request: Request[Any, Any, Any],
        data: ChatCompletionRequest,
        snapshot: PolicySnapshot,
    ) -> Response[ChatCompletionResponse]:
        return await serve(request, snapshot, ChatCompletionRequest, chat_plan)
