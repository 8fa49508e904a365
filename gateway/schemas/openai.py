"""OpenAI-compatible request and response bodies (Completions, Chat Completions, Models).

Requests forbid unknown fields, so a parameter this server does not know is a 400 naming it,
never silently ignored. Parameters it knows but does not implement are declared (so the
message can say "not supported" and the schema documents them) and refused in
`gateway.inference.params` unless they hold their neutral value. FlexGate's own extensions
(`purpose`, `experts`) arrive in the body, where the `openai` client puts `extra_body`.
"""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, Struct

MAX_N = 16
MAX_STOP = 4
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

NonNegInt = Annotated[int, Meta(ge=0)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
N = Annotated[int, Meta(ge=1, le=MAX_N)]
Seed = Annotated[int, Meta(ge=SEED_MIN, le=SEED_MAX)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
StopList = Annotated[list[str], Meta(max_length=MAX_STOP)]
ExpertIds = Annotated[list[str], Meta(max_length=256)]


class _Request(Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    pass


class StreamOptions(_Request, kw_only=True):
    include_usage: bool = False


class ExpertNarrowing(_Request, kw_only=True):
    """Narrow the caller's allowed set: `{"exclude": [ids]}` or `{"only": [ids]}`."""

    exclude: ExpertIds | None = None
    only: ExpertIds | None = None


class _InferenceRequest(_Request, kw_only=True):
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: N = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | StopList | None = None
    seed: Seed | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    # FlexGate extensions (extra_body)
    purpose: Annotated[str, Meta(max_length=64)] | None = None
    experts: ExpertNarrowing | None = None


PromptItem = str | int | list[int]


class CompletionRequest(_InferenceRequest, kw_only=True):
    """POST /v1/completions."""

    model: str
    prompt: str | list[PromptItem]
    max_tokens: NonNegInt | None = 16
    logprobs: Annotated[int, Meta(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(Struct, omit_defaults=True):
    type: str
    text: str | None = None


class ChatMessage(_Request, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_InferenceRequest, kw_only=True):
    """POST /v1/chat/completions."""

    model: str
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: NonNegInt | None = None
    max_tokens: NonNegInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_CHAT_TOP_LOGPROBS)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None


# -- responses ------------------------------------------------------------------------------


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ExpertUsage(Struct):
    tokens: int
    weight: float


class FlexGateExperts(Struct):
    allowed: list[str]
    excluded: dict[str, str]


class FlexGateBlock(Struct):
    """Which experts served the request, what each contributed, and its ledger record."""

    audit_seq: int
    request_id: str
    policy_version: int
    experts: FlexGateExperts
    usage: dict[str, ExpertUsage]


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class _Reply(Struct, kw_only=True):
    """What every completion reply and stream chunk opens with."""

    id: str
    created: int
    model: str


class CompletionResponse(_Reply, kw_only=True):
    choices: list[CompletionChoice]
    usage: Usage
    flexgate: FlexGateBlock
    object: str = "text_completion"
    system_fingerprint: str | None = None


class CompletionChunk(_Reply, kw_only=True, omit_defaults=True):
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Usage | None = None
    flexgate: FlexGateBlock | None = None


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(Struct):
    content: list[TokenLogprobEntry] | None


class ChatResponseMessage(Struct):
    content: str
    role: str = "assistant"


class ChatChoice(Struct):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(_Reply, kw_only=True):
    choices: list[ChatChoice]
    usage: Usage
    flexgate: FlexGateBlock
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class ChatDelta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(_Reply, kw_only=True, omit_defaults=True):
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None
    flexgate: FlexGateBlock | None = None


class ModelExpert(Struct):
    id: str
    owner: str | None
    status: str
    description: str


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str
    max_model_len: int
    experts: list[ModelExpert]
    object: str = "model"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorDetail(Struct):
    message: str
    type: str
    code: str | None
    param: str | None


class ErrorResponse(Struct):
    """Every error: OpenAI's shape."""

    error: ErrorDetail
