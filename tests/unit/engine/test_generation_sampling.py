"""Sampling parameters and next-token selection (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampling import MAX_STOP_STRINGS, SamplingParams, make_generator, select_tokens


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -1.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"stop": ("x",) * (MAX_STOP_STRINGS + 1)}, "stop"),
    ],
)
def test_bad_parameters_are_rejected_with_the_field_named(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_a_single_stop_string_is_one_stop_string() -> None:
    assert SamplingParams(stop="END").stop == ("END",)  # type: ignore[arg-type]
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]


def test_greedy_is_argmax_and_needs_no_generator() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0)] * 5
    assert make_generator(params[0]) is None
    assert select_tokens(logits, params, [None] * 5) == logits.argmax(-1).tolist()


def _draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [select_tokens(logits, [params], [g])[0] for _ in range(n)]


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(2))
    best = int(logits.argmax())
    assert set(_draw(logits, SamplingParams(temperature=1.5, top_k=1), 50)) == {best}
    assert set(_draw(logits, SamplingParams(temperature=1.5, top_p=1e-6), 50)) == {best}


def test_sampling_follows_the_softmax() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0)
    draws = _draw(logits, SamplingParams(temperature=1.0), 4000)
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03), freq
    # temperature 2 flattens: p ~ sqrt(probs)
    hot = probs.sqrt() / probs.sqrt().sum()
    draws = _draw(logits, SamplingParams(temperature=2.0), 4000, seed=1)
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert torch.allclose(freq, hot, atol=0.03), freq


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().unsqueeze(0)
    assert set(_draw(logits, SamplingParams(top_k=2), 500)) == {0, 1}
    # mass before token 1 is 0.4 < 0.5 (kept); before token 2 it is 0.7 >= 0.5 (dropped)
    assert set(_draw(logits, SamplingParams(top_p=0.5), 500)) == {0, 1}
    assert set(_draw(logits, SamplingParams(top_p=0.75), 500)) == {0, 1, 2}
    assert set(_draw(logits, SamplingParams(top_p=0.75, top_k=1), 200)) == {0}


def test_a_seed_reproduces_draws_whatever_the_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 100, generator=gen)
    params = SamplingParams(temperature=1.0, seed=42)
    alone = []
    g = make_generator(params)
    for _ in range(20):
        alone.append(select_tokens(logits[1:2], [params], [g])[0])
    # the same request in row 1 of a batch, next to a greedy row and another seeded row
    other = SamplingParams(temperature=0.7, seed=7)
    g1, g2 = make_generator(params), make_generator(other)
    batched = []
    for _ in range(20):
        batched.append(
            select_tokens(logits, [SamplingParams(temperature=0.0), params, other], [None, g1, g2])[
                1
            ]
        )
    assert alone == batched
    assert len(set(alone)) > 1  # it does sample
    g3 = make_generator(SamplingParams(seed=43))
    assert [select_tokens(logits[1:2], [params], [g3])[0] for _ in range(20)] != alone
