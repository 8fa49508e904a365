"""Server-Sent Events in OpenAI's chunk format, ending `data: [DONE]`.

Per choice: with `echo` (completions) first its prompt, with the prompt's logprobs when asked
(the first null), as OpenAI's legacy completions streamed it; then text chunks as the engine
releases text (with the logprobs of their tokens when asked), then a chunk with its finish
reason. When every choice has finished, the inference
record is appended and one last chunk (no choices) carries the `flexgate` block with its
audit seq, and `usage` when `stream_options.include_usage` is set. If that append fails the
stream ends with an error event instead, and no `[DONE]`. If the client goes away the run
is abandoned: its sequences are cancelled and the record (status cancelled) still appended.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
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


class _Chunks:
    """The chunks of one stream (one id, creation time and model for all of them)."""

    def __init__(self, run: Run, tk: Tokenizer) -> None:
        plan = run.plan
        self.plan, self.tk = plan, tk
        self.rid = response_id(plan, run.request_id)
        self.created = now()
        self.model = run.state.model_name
        # With `echo` the prompt's tokens come first, their offsets from 0 (as in one reply).
        self.offsets = [
            OffsetLogprobs(tk, 0 if plan.echo else len(plan.prompts[row // plan.n].text))
            for row in range(plan.rows)
        ]
        self.echoed = [not plan.echo] * plan.rows

    def chunk(self, choices: list[Any], **extra: Any) -> bytes:
        kind = ChatCompletionChunk if self.plan.chat else CompletionChunk
        return sse(
            kind(id=self.rid, created=self.created, model=self.model, choices=choices, **extra)
        )

    def text(
        self, row: int, text: str, token_ids: Sequence[int], lps: Sequence[Any] | None
    ) -> bytes:
        plan = self.plan
        if plan.chat:
            logprobs = (
                chat_logprobs(self.tk, token_ids, lps or (), plan.logprobs)
                if plan.logprobs is not None
                else None
            )
            choice: Any = ChatChunkChoice(
                index=row, delta=ChatDelta(content=text), logprobs=logprobs, finish_reason=None
            )
        else:
            clp = (
                self.offsets[row].build(token_ids, list(lps or [None] * len(token_ids)))
                if plan.logprobs is not None
                else None
            )
            choice = CompletionChoice(index=row, text=text, logprobs=clp, finish_reason=None)
        return self.chunk([choice])

    def finish(self, row: int, reason: str | None) -> bytes:
        if self.plan.chat:
            choice: Any = ChatChunkChoice(
                index=row, delta=ChatDelta(), logprobs=None, finish_reason=reason
            )
        else:
            choice = CompletionChoice(index=row, text="", logprobs=None, finish_reason=reason)
        return self.chunk([choice])

    def echo(self, row: int, prompt_logprobs: Sequence[Any] | None) -> bytes | None:
        """The row's prompt (with its logprobs, the first null), once, before its first text."""
        if self.echoed[row]:
            return None
        self.echoed[row] = True
        prompt = self.plan.prompts[row // self.plan.n]
        lps = list(prompt_logprobs) if prompt_logprobs else [None] * len(prompt.ids)
        return self.text(row, prompt.text, prompt.ids, lps)


async def sse_stream(run: Run, tk: Tokenizer) -> AsyncIterator[bytes]:
    from engine.generation import Finished

    plan, state = run.plan, run.state
    out = _Chunks(run, tk)
    try:
        if plan.chat:
            yield out.chunk(
                [
                    ChatChunkChoice(
                        index=row,
                        delta=ChatDelta(role="assistant", content=""),
                        logprobs=None,
                        finish_reason=None,
                    )
                    for row in range(plan.rows)
                ]
            )
        async for row, event in run.events():
            finished = isinstance(event, Finished)
            if plan.echo:
                scored = event.result.prompt_logprobs if finished else event.prompt_logprobs
                echo = out.echo(row, scored)
                if echo is not None:
                    yield echo
            if finished:
                yield out.finish(row, event.result.finish_reason)
                continue
            if not event.text and not (plan.logprobs is not None and event.token_ids):
                continue
            yield out.text(row, event.text, event.token_ids, event.logprobs)
        results = [r.result for r in run.rows]
        record = await run.finish()
        block = flexgate_block(state, record, run.request_id, run.admission)
        usage = usage_struct(results, plan.prompts) if plan.include_usage else None
        yield out.chunk([], usage=usage, flexgate=block)
        yield DONE
    except ApiError as exc:
        # Headers are gone; the error travels as an event (OpenAI clients raise on it).
        yield sse(error_body(exc.message, exc.type, exc.code, exc.param))
    finally:
        run.abandon()  # a no-op once the record is appended
