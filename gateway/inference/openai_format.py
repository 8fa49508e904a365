"""Engine results as OpenAI response bodies and stream chunks.

Logprobs are the engine's (raw log_softmax of the pruned model's logits). Completions'
legacy shape: per token its text, logprob, its top alternatives as {text: logprob} (the chosen
token included, as vLLM does) and its character offset in prompt + completion (offsets start
at 0 with `echo`, else after the prompt). With `echo` the prompt's tokens come first; the
first has no logprob (null), as there is nothing before it to predict it from. Chat's shape:
`{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
An engine finish reason `cancelled` (revoked to no expert, or cancelled) is passed through.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from audit.ledger import Entry
from gateway.inference.admission import Admission
from gateway.inference.params import Plan, usage_of
from gateway.inference.prompts import Prompt, Tokenizer
from gateway.schemas.openai import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    ExpertUsage,
    FlexGateBlock,
    FlexGateExperts,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)


def now() -> int:
    return int(time.time())


def response_id(plan: Plan, request_id: str) -> str:
    return ("chatcmpl-" if plan.chat else "cmpl-") + request_id


def flexgate_block(
    state: Any, record: Entry, request_id: str, admission: Admission
) -> FlexGateBlock:
    payload = record.payload
    return FlexGateBlock(
        audit_seq=record.seq,
        request_id=request_id,
        policy_version=admission.policy_version,
        experts=FlexGateExperts(
            allowed=list(payload["experts_allowed"]),
            excluded=dict(payload["experts_excluded"]),
        ),
        usage={
            e: ExpertUsage(tokens=int(u["tokens"]), weight=float(u["weight"]))
            for e, u in payload["usage"].items()
        },
    )


def usage_struct(results: Sequence[Any], prompts: Sequence[Prompt]) -> Usage:
    return Usage(**usage_of(results, prompts))


# -- completions ----------------------------------------------------------------------------


class OffsetLogprobs:
    """Builds a CompletionLogprobs incrementally (streams get slices of it)."""

    def __init__(self, tk: Tokenizer, offset: int) -> None:
        self.tk = tk
        self.offset = offset

    def build(self, token_ids: Sequence[int], logprobs: Sequence[Any | None]) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for tid, lp in zip(token_ids, logprobs, strict=True):
            text = self.tk.token_str(tid)
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            if lp is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(float(lp.logprob))
            top: dict[str, float] = {}
            for alt_id, alt_lp in lp.top:
                top.setdefault(self.tk.token_str(alt_id), float(alt_lp))
            top.setdefault(text, float(lp.logprob))
            out.top_logprobs.append(top)
        return out


def _completion_logprobs(
    tk: Tokenizer, plan: Plan, prompt: Prompt, result: Any
) -> CompletionLogprobs:
    builder = OffsetLogprobs(tk, 0 if plan.echo else len(prompt.text))
    ids: list[int] = []
    lps: list[Any] = []
    if plan.echo:
        prompt_lps = list(result.prompt_logprobs or [None] * len(prompt.ids))
        ids.extend(prompt.ids)
        lps.extend(prompt_lps)
    if plan.max_tokens > 0:
        ids.extend(result.token_ids)
        lps.extend(result.logprobs or [None] * len(result.token_ids))
    return builder.build(ids, lps)


def completion_response(
    state: Any,
    tk: Tokenizer,
    plan: Plan,
    request_id: str,
    admission: Admission,
    results: Sequence[Any],
    record: Entry,
) -> CompletionResponse:
    choices: list[CompletionChoice] = []
    for row, result in enumerate(results):
        prompt = plan.prompts[row // plan.n]
        generated = result.text if plan.max_tokens > 0 else ""
        choices.append(
            CompletionChoice(
                index=row,
                text=(prompt.text if plan.echo else "") + generated,
                logprobs=(
                    _completion_logprobs(tk, plan, prompt, result)
                    if plan.logprobs is not None
                    else None
                ),
                finish_reason=result.finish_reason if plan.max_tokens > 0 else "length",
            )
        )
    return CompletionResponse(
        id=response_id(plan, request_id),
        created=now(),
        model=state.model_name,
        choices=choices,
        usage=usage_struct(results, plan.prompts),
        flexgate=flexgate_block(state, record, request_id, admission),
    )


# -- chat -----------------------------------------------------------------------------------


def chat_logprobs(
    tk: Tokenizer, token_ids: Sequence[int], logprobs: Sequence[Any], k: int
) -> ChatChoiceLogprobs:
    content: list[TokenLogprobEntry] = []
    for tid, lp in zip(token_ids, logprobs, strict=True):
        text = tk.token_str(tid)
        top = [
            TopLogprob(
                token=(alt := tk.token_str(alt_id)), logprob=float(alt_lp), bytes=list(alt.encode())
            )
            for alt_id, alt_lp in lp.top[:k]
        ]
        content.append(
            TokenLogprobEntry(
                token=text, logprob=float(lp.logprob), bytes=list(text.encode()), top_logprobs=top
            )
        )
    return ChatChoiceLogprobs(content=content)


def chat_response(
    state: Any,
    tk: Tokenizer,
    plan: Plan,
    request_id: str,
    admission: Admission,
    results: Sequence[Any],
    record: Entry,
) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=row,
            message=ChatResponseMessage(content=result.text),
            logprobs=(
                chat_logprobs(tk, result.token_ids, result.logprobs or (), plan.logprobs)
                if plan.logprobs is not None
                else None
            ),
            finish_reason=result.finish_reason,
        )
        for row, result in enumerate(results)
    ]
    return ChatCompletionResponse(
        id=response_id(plan, request_id),
        created=now(),
        model=state.model_name,
        choices=choices,
        usage=usage_struct(results, plan.prompts),
        flexgate=flexgate_block(state, record, request_id, admission),
    )


def response_headers(record: Entry, request_id: str) -> Mapping[str, str]:
    return {"X-FlexGate-Audit-Seq": str(record.seq), "X-Request-Id": request_id}
