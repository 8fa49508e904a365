"""Prompts to checked token ids, before any compute: text, token ids, chat messages.

The gateway tokenises with its own copy of the model's tokenizer (a fast tokenizer must not be
used from two threads at once, and the engine's scheduler thread decodes with the engine's),
exactly as the engine would (`tokenizer(text)`), then hands the engine token ids, so the
context-window checks here are the engine's own arithmetic and fail with a 400 naming the
parameter rather than inside the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.errors import bad_request, unsupported
from gateway.schemas.openai import ChatMessage, PromptItem

MAX_ROWS = 64
"""Most engine sequences one request may start (prompts x n)."""

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant"})


@dataclass(frozen=True, slots=True)
class Prompt:
    ids: tuple[int, ...]
    text: str
    """The prompt as text (decoded for a token-id prompt): what `echo` returns."""


@dataclass(frozen=True, slots=True)
class Tokenizer:
    """The gateway's tokenizer and the model's limits."""

    tok: Any
    vocab_size: int
    window: int

    def encode(self, text: str, *, special: bool = True) -> tuple[int, ...]:
        return tuple(int(i) for i in self.tok(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=False))

    def token_str(self, token_id: int) -> str:
        return self.decode([token_id])

    def check_ids(self, ids: Sequence[int], param: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise bad_request(
                f"`{param}` holds token ids outside the vocabulary [0, {self.vocab_size}): "
                f"{bad[:8]}",
                param,
                "invalid_token_id",
            )


def completion_prompts(tk: Tokenizer, prompt: str | list[PromptItem]) -> list[Prompt]:
    """One Prompt per choice group: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise bad_request("`prompt` is empty", "prompt", "empty_prompt")
    elif all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        items = [list(prompt)]
    elif all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        items = list(prompt)
    else:
        raise bad_request(
            "`prompt` must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists (not a mixture)",
            "prompt",
        )
    if len(items) > MAX_ROWS:
        raise bad_request(f"at most {MAX_ROWS} prompts per request", "prompt")
    out: list[Prompt] = []
    for n, item in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt[{n}]"
        if isinstance(item, str):
            if not item:
                raise bad_request(f"`{where}` is empty", "prompt", "empty_prompt")
            ids = tk.encode(item)
            text = item
        else:
            if not item:
                raise bad_request(f"`{where}` is an empty token list", "prompt", "empty_prompt")
            tk.check_ids(item, "prompt")
            ids = tuple(item)
            text = tk.decode(ids)
        if not ids:
            raise bad_request(f"`{where}` encodes to no tokens", "prompt", "empty_prompt")
        out.append(Prompt(ids, text))
    return out


def _message_text(n: int, message: ChatMessage) -> str:
    if message.tool_calls is not None or message.tool_call_id is not None:
        raise unsupported(f"messages[{n}].tool_calls", "tools are not supported")
    if message.role not in CHAT_ROLES:
        raise bad_request(
            f"`messages[{n}].role` must be one of {', '.join(sorted(CHAT_ROLES))}",
            f"messages[{n}].role",
        )
    content = message.content
    if content is None:
        raise bad_request(f"`messages[{n}].content` is missing", f"messages[{n}].content")
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for k, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise unsupported(
                f"messages[{n}].content[{k}].type", f"only text parts, not {part.type!r}"
            )
        parts.append(part.text)
    return "".join(parts)


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """The messages as the chat template wants them (and as the ledger hashes them)."""
    if not messages:
        raise bad_request("`messages` is empty", "messages", "empty_prompt")
    out: list[dict[str, str]] = []
    for n, m in enumerate(messages):
        item = {"role": "system" if m.role == "developer" else m.role, "content": ""}
        item["content"] = _message_text(n, m)
        if m.name is not None:
            item["name"] = m.name
        out.append(item)
    return out


def chat_prompt(tk: Tokenizer, messages: list[dict[str, str]]) -> Prompt:
    if not getattr(tk.tok, "chat_template", None):
        raise bad_request(
            "the served model has no chat template: use /v1/completions",
            "messages",
            "no_chat_template",
        )
    try:
        text = str(tk.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    except Exception as exc:  # a template that raises on these messages (e.g. role order)
        raise bad_request(
            f"the chat template cannot render these messages: {exc}", "messages"
        ) from None
    ids = tk.encode(text, special=False)
    if not ids:
        raise bad_request("`messages` render to no tokens", "messages", "empty_prompt")
    return Prompt(ids, text)


def check_window(tk: Tokenizer, prompts: Sequence[Prompt], max_tokens: int, param: str) -> None:
    """400 before any compute when a prompt, or prompt + max_tokens, exceeds the window."""
    for p in prompts:
        if len(p.ids) >= tk.window:
            raise bad_request(
                f"the prompt has {len(p.ids)} tokens; this model's context window holds "
                f"{tk.window}, which leaves no room for a completion",
                "messages" if param == "max_completion_tokens" else "prompt",
                "context_length_exceeded",
            )
        if len(p.ids) + max_tokens > tk.window:
            raise bad_request(
                f"this model's context window holds {tk.window} tokens; the request asks "
                f"for {len(p.ids) + max_tokens} ({len(p.ids)} in the prompt, {max_tokens} "
                f"in the completion)",
                param,
                "context_length_exceeded",
            )
