"""The inference flow of one OpenAI request, shared by /v1/completions and /chat/completions.

plan (400/404, no compute) -> admission (400/403) -> engine -> ledger (503 if it fails, and
then no text) -> response with the `flexgate` block, X-FlexGate-Audit-Seq and X-Request-Id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from litestar import Request, Response
from litestar.response import Stream

from gateway.bodies import strict_body
from gateway.deps import provide_identity
from gateway.errors import request_id_of
from gateway.inference.admission import admit
from gateway.inference.openai_format import chat_response, completion_response, response_headers
from gateway.inference.params import Plan
from gateway.inference.prompts import Tokenizer
from gateway.inference.run import Run
from gateway.inference.streaming import sse_stream
from gateway.limits import RateLimited
from gateway.request_ids import new_request_id
from governance.store import PolicySnapshot

B = TypeVar("B")


def tokenizer_of(state: Any) -> Tokenizer:
    tk: Tokenizer = state.tokenizer
    return tk


async def serve(
    request: Request[Any, Any, Any],
    snapshot: PolicySnapshot,
    kind: type[B],
    make_plan: Callable[[B, Tokenizer, str], Plan],
) -> Response[Any]:
    """Serve one inference request whose body is a `kind` (strictly decoded), planned by
    `make_plan(body, tokenizer, served model name)`. The caller is taken from the request
    here rather than injected beside the snapshot (two injected values at one level cost
    Litestar a task group per request)."""
    identity = provide_identity(request)
    body = await strict_body(request, kind)
    state = request.app.state
    tk = tokenizer_of(state)
    plan = make_plan(body, tk, state.model_name)
    telemetry = state.telemetry
    with telemetry.span("policy", **{"flexgate.purpose": plan.purpose}):
        admission = admit(snapshot, identity, plan)
    request_id = request_id_of(request) or new_request_id()
    try:
        rate = await state.limiter.admit(
            identity, identity.key_id, estimated_tokens(plan), policy_version=snapshot.version
        )
    except RateLimited as exc:
        telemetry.record_rejection(exc.limit, identity.key_id)
        raise
    run = Run(state, plan, admission, identity, request_id, rate=rate)
    try:
        if plan.stream:
            await run.start_stream()
            assert run.started is not None
            return Stream(
                sse_stream(run, tk),
                media_type="text/event-stream",
                headers={
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                    "X-FlexGate-Audit-Started-Seq": str(run.started.seq),
                    **rate.headers(),
                },
            )
        run.submit()
        try:
            results = await run.collect()
            record = await run.finish()
        except BaseException:
            run.abandon()
            raise
    except BaseException:
        if run.group is None:  # nothing ran: give the tokens back (the run releases otherwise)
            rate.release_soon(0)
        raise
    build = chat_response if plan.chat else completion_response
    reply = build(state, tk, plan, request_id, admission, results, record)
    return Response(reply, headers={**response_headers(record, request_id), **rate.headers()})


def estimated_tokens(plan: Plan) -> int:
    """What a request may use at most, for the tokens-per-minute bucket: every prompt token
    once, and max_tokens for each of its rows (settled with the real count at its end)."""
    return sum(len(p.ids) for p in plan.prompts) + plan.max_tokens * plan.rows
