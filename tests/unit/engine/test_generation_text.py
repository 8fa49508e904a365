"""Incremental detokenisation and stop strings (tokenizer only, no model)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from engine.checkpoints import build_tokenizer
from engine.generation import TextAssembler


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer()


def _run(
    tok: Any, text: str, stop: tuple[str, ...] = (), prompt: str = "Hi"
) -> tuple[list[str], TextAssembler]:
    ids = tok(text)["input_ids"]
    asm = TextAssembler(tok, tok(prompt)["input_ids"], stop)
    deltas = []
    for i in ids:
        deltas.append(asm.push(i))
        if asm.stop_string is not None:
            break
    deltas.append(asm.finish())
    return deltas, asm


def test_multibyte_characters_split_over_tokens_are_never_emitted_broken(tok: Any) -> None:
    text = "caf\u00e9 \U0001f642 \u4e2d\u6587 ok"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text)  # some characters do span several tokens
    deltas, asm = _run(tok, text)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == asm.text
    # the emoji's bytes arrive over several tokens but come out in one piece
    assert any("\U0001f642" in d for d in deltas)


def test_leading_spaces_survive_after_the_prompt(tok: Any) -> None:
    deltas, _ = _run(tok, " the quick brown fox", prompt="Once upon a time,")
    assert "".join(deltas) == " the quick brown fox"


def test_a_stop_string_spanning_tokens_cuts_the_text_and_nothing_past_it_leaks(tok: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    stop = "own fox j"
    assert len(tok(stop)["input_ids"]) > 1
    deltas, asm = _run(tok, text, (stop, "never"))
    assert asm.stop_string == stop
    assert "".join(deltas) == asm.text == "The quick br"
    emitted = ""
    for d in deltas:
        emitted += d
        assert "own" not in emitted


def test_held_back_text_is_released_when_the_stop_string_does_not_follow(tok: Any) -> None:
    deltas, asm = _run(tok, "abc abd abc", ("abx",))
    assert asm.stop_string is None
    assert "".join(deltas) == "abc abd abc"


def test_the_earliest_stop_string_wins(tok: Any) -> None:
    _, asm = _run(tok, "one two three four", ("four", "two"))
    assert asm.stop_string == "two"
    assert asm.text == "one "


def test_a_stop_string_at_the_very_start_gives_empty_text(tok: Any) -> None:
    deltas, asm = _run(tok, "STOP and more", ("STOP",))
    assert asm.text == "" and "".join(deltas) == ""


def test_random_texts_and_stops_match_plain_truncation(tok: Any) -> None:
    rng = random.Random(0)
    alphabet = "ab \u00e9\U0001f642x"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        stops = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(0, 3))
        )
        deltas, asm = _run(tok, text, stops)
        cut = min((text.find(s) for s in stops if s in text), default=len(text))
        assert "".join(deltas) == text[:cut] == asm.text, (text, stops)
