"""OpenAI parameters checked and mapped onto the engine's SamplingParams.

Every parameter this server does not implement is refused with a 400 naming it unless it holds
its neutral value (penalties 0, `logit_bias` {}, `best_of` = n, `response_format` text, ...).
`n` choices of one prompt are n engine sequences of one batch; with a `seed`, sequence i gets
`derive_seed(seed, i)`, so a seeded request reproduces every choice and no two choices repeat
each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.errors import ApiError, bad_request, unsupported
from gateway.inference.prompts import (
    MAX_ROWS,
    Prompt,
    Tokenizer,
    chat_messages,
    chat_prompt,
    check_window,
    completion_prompts,
)
from gateway.schemas.openai import ChatCompletionRequest, CompletionRequest, _InferenceRequest
from governance.names import DEFAULT_PURPOSE

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
_SEED_BITS = (1 << 63) - 1


@dataclass(frozen=True)
class Plan:
    """A checked request: what to run, how to sample, what to return and record."""

    endpoint: str
    prompts: tuple[Prompt, ...]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    logprobs: int | None
    """Top alternatives per generated token (None: no logprobs)."""
    echo: bool
    stream: bool
    include_usage: bool
    user: str | None
    purpose: str
    narrowing: dict[str, list[str]] | None
    audit_prompt: str | list[dict[str, str]]
    """What the ledger hashes: the completion prompt(s) or the chat messages."""

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def chat(self) -> bool:
        return self.endpoint == CHAT


def derive_seed(seed: int, index: int) -> int:
    """The seed of sequence `index` of a request seeded with `seed` (63 bits)."""
    digest = hashlib.sha256(f"flexgate-seed:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & _SEED_BITS


def check_model(requested: str, served: str) -> None:
    if requested != served:
        raise ApiError(
            404,
            f"the model `{requested}` does not exist; this server serves `{served}`",
            type="not_found_error",
            code="model_not_found",
            param="model",
        )


def _common_unsupported(req: _InferenceRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value not in (None, 0, 0.0):
            raise unsupported(name, "only 0")
    if req.logit_bias:
        raise unsupported("logit_bias")
    if req.stream_options is not None and not req.stream:
        raise bad_request("`stream_options` is only allowed with `stream: true`", "stream_options")


def _narrowing(req: _InferenceRequest) -> dict[str, list[str]] | None:
    if req.experts is None:
        return None
    given = {
        k: v
        for k, v in (("exclude", req.experts.exclude), ("only", req.experts.only))
        if v is not None
    }
    if len(given) != 1:
        raise bad_request('`experts` must be {"exclude": [ids]} or {"only": [ids]}', "experts")
    return given


def _stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    items = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not s for s in items):
        raise bad_request("`stop` strings must not be empty", "stop")
    return items


def _sampling_common(req: _InferenceRequest) -> dict[str, Any]:
    return {
        "temperature": 1.0 if req.temperature is None else float(req.temperature),
        "top_p": 1.0 if req.top_p is None else float(req.top_p),
        "seed": req.seed,
        "stop": _stop(req.stop),
        "stream": req.stream,
        "include_usage": bool(req.stream_options and req.stream_options.include_usage),
        "user": req.user,
        "purpose": req.purpose or DEFAULT_PURPOSE,
        "narrowing": _narrowing(req),
        "n": req.n,
    }


def completion_plan(req: CompletionRequest, tk: Tokenizer, served: str) -> Plan:
    check_model(req.model, served)
    _common_unsupported(req)
    if req.suffix:
        raise unsupported("suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise unsupported("best_of", "only equal to n")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens == 0 and not req.echo:
        raise bad_request("`max_tokens` may be 0 only with `echo: true`", "max_tokens")
    prompts = completion_prompts(tk, req.prompt)
    if len(prompts) * req.n > MAX_ROWS:
        raise bad_request(f"prompts x n may be at most {MAX_ROWS}", "n")
    check_window(tk, prompts, max_tokens, "max_tokens")
    if isinstance(req.prompt, str):
        audit: str | list[dict[str, str]] = req.prompt
    else:
        audit = "\n".join(p.text for p in prompts) if len(prompts) > 1 else prompts[0].text
    return Plan(
        endpoint=COMPLETIONS,
        prompts=tuple(prompts),
        max_tokens=max_tokens,
        logprobs=req.logprobs,
        echo=req.echo,
        audit_prompt=audit,
        **_sampling_common(req),
    )


def chat_plan(req: ChatCompletionRequest, tk: Tokenizer, served: str) -> Plan:
    check_model(req.model, served)
    _common_unsupported(req)
    for name in ("tools", "functions", "audio", "prediction", "modalities"):
        if getattr(req, name):
            raise unsupported(name)
    for name in ("tool_choice", "function_call"):
        if getattr(req, name) not in (None, "none"):
            raise unsupported(name)
    if req.parallel_tool_calls:
        raise unsupported("parallel_tool_calls")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise unsupported("response_format", 'only {"type": "text"}')
    if req.reasoning_effort is not None:
        raise unsupported("reasoning_effort")
    if req.store:
        raise unsupported("store")
    if req.service_tier not in (None, "auto", "default"):
        raise unsupported("service_tier")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("`top_logprobs` needs `logprobs: true`", "top_logprobs")
    if (
        req.max_completion_tokens is not None
        and req.max_tokens is not None
        and req.max_completion_tokens != req.max_tokens
    ):
        raise bad_request(
            "`max_tokens` is an alias of `max_completion_tokens`: give one, or equal values",
            "max_tokens",
        )
    messages = chat_messages(req.messages)
    prompt = chat_prompt(tk, messages)
    if req.n > MAX_ROWS:
        raise bad_request(f"n may be at most {MAX_ROWS}", "n")
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if requested == 0:
        raise bad_request(f"`{param}` must be at least 1", param)
    max_tokens = requested if requested is not None else max(tk.window - len(prompt.ids), 1)
    check_window(tk, [prompt], max_tokens, param)
    return Plan(
        endpoint=CHAT,
        prompts=(prompt,),
        max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        echo=False,
        audit_prompt=messages,
        **_sampling_common(req),
    )


def engine_supports_logprobs() -> bool:
    from engine.sampling import SamplingParams

    return "logprobs" in {f.name for f in dataclasses.fields(SamplingParams)}


def sampling_params(plan: Plan, row: int) -> Any:
    """The engine SamplingParams of sequence `row` (prompt row // n, choice row % n)."""
    from engine.sampling import SamplingParams

    kwargs: dict[str, Any] = {
        "max_tokens": plan.max_tokens,
        "temperature": plan.temperature,
        "top_p": plan.top_p,
        "seed": None if plan.seed is None else derive_seed(plan.seed, row),
        "stop": plan.stop,
    }
    wants_prompt_logprobs = plan.echo and (plan.logprobs is not None or plan.max_tokens == 0)
    if plan.logprobs is not None or wants_prompt_logprobs:
        if not engine_supports_logprobs():
            raise unsupported("logprobs", "this engine build computes no logprobs")
        if plan.logprobs is not None:
            kwargs["logprobs"] = plan.logprobs
        if wants_prompt_logprobs:
            kwargs["prompt_logprobs"] = plan.logprobs or 0
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise bad_request(str(exc), _param_of(str(exc))) from None


def _param_of(message: str) -> str | None:
    for name in ("max_tokens", "temperature", "top_p", "seed", "stop", "logprobs"):
        if message.startswith(name):
            return name
    return None


def usage_of(results: Sequence[Any], prompts: Sequence[Prompt]) -> Mapping[str, int]:
    prompt_tokens = sum(len(p.ids) for p in prompts)
    completion = sum(int(r.completion_tokens) for r in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
