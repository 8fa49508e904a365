"""Server-Sent Events in OpenAI's chunk format, ending `data: [DONE]`.

Per choice: text chunks as the engine releases text (with the logprobs of their tokens when
asked), then a chunk with its finish reason. When every choice has finished, the inference
record is appended and one last chunk (no choices) carries the `flexgate` block with its
audit seq, and `usage` when `stream_options.include_usage` is set. If that append fails the
stream ends with an error event instead, and no `[DONE]`. If the client goes away the run
is abandoned: its sequences are cancelled and the record (status cancelled) still appended.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from gateway.errors import ApiError, error_body
from gateway.inference.openai_format import (
    OffsetLogprobs,
    chat_logprobs,
    flexgate_block,
    now,
    response_id,
    usage_struct,
)
from gateway.inference.prompts import Tokenizer
from gateway.inference.run import Run
from gateway.schemas.openai import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
)

_encoder = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + _encoder.encode(obj) + b"\n\n"


async def sse_stream(run: Run, tk: Tokenizer) -> AsyncIterator[bytes]:
    from engine.generation import Finished

    plan, state = run.plan, run.state
    rid = response_id(plan, run.request_id)
    created = now()
    model = state.model_name
    offsets = [
        OffsetLogprobs(tk, len(plan.prompts[row // plan.n].text)) for row in range(plan.rows)
    ]
    try:
        if plan.chat:
            yield sse(
                ChatCompletionChunk(
                    id=rid,
                    created=created,
                    model=model,
                    choices=[
                        ChatChunkChoice(
                            index=row,
                            delta=ChatDelta(role="assistant", content=""),
                            logprobs=None,
                            finish_reason=None,
                        )
                        for row in range(plan.rows)
                    ],
                )
            )
        async for row, event in run.events():
            if isinstance(event, Finished):
                result = event.result
                if plan.chat:
                    chunk: Any = ChatCompletionChunk(
                        id=rid,
                        created=created,
                        model=model,
                        choices=[
                            ChatChunkChoice(
                                index=row,
                                delta=ChatDelta(),
                                logprobs=None,
                                finish_reason=result.finish_reason,
                            )
                        ],
                    )
                else:
                    chunk = CompletionChunk(
                        id=rid,
                        created=created,
                        model=model,
                        choices=[
                            CompletionChoice(
                                index=row,
                                text="",
                                logprobs=None,
                                finish_reason=result.finish_reason,
                            )
                        ],
                    )
                yield sse(chunk)
                continue
            lps = getattr(event, "logprobs", None)
            if not event.text and not (plan.logprobs is not None and event.token_ids):
                continue
            if plan.chat:
                logprobs = (
                    chat_logprobs(tk, event.token_ids, lps or (), plan.logprobs)
                    if plan.logprobs is not None
                    else None
                )
                chunk = ChatCompletionChunk(
                    id=rid,
                    created=created,
                    model=model,
                    choices=[
                        ChatChunkChoice(
                            index=row,
                            delta=ChatDelta(content=event.text),
                            logprobs=logprobs,
                            finish_reason=None,
                        )
                    ],
                )
            else:
                clp = (
                    offsets[row].build(event.token_ids, list(lps or [None] * len(event.token_ids)))
                    if plan.logprobs is not None
                    else None
                )
                chunk = CompletionChunk(
                    id=rid,
                    created=created,
                    model=model,
                    choices=[
                        CompletionChoice(
                            index=row, text=event.text, logprobs=clp, finish_reason=None
                        )
                    ],
                )
            yield sse(chunk)
        results = [r.result for r in run.rows]
        record = await run.finish()
        block = flexgate_block(state, record, run.request_id, run.admission)
        usage = usage_struct(results, plan.prompts) if plan.include_usage else None
        final: Any = (
            ChatCompletionChunk(
                id=rid, created=created, model=model, choices=[], usage=usage, flexgate=block
            )
            if plan.chat
            else CompletionChunk(
                id=rid, created=created, model=model, choices=[], usage=usage, flexgate=block
            )
        )
        yield sse(final)
        yield DONE
    except ApiError as exc:
        # Headers are gone; the error travels as an event (OpenAI clients raise on it).
        yield sse(error_body(exc.message, exc.type, exc.code, exc.param))
    finally:
        run.abandon()  # a no-op once the record is appended
