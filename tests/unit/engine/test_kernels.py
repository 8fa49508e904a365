"""engine.kernels: the transposed few-token expert form equals the plain one; the per-machine
choice is measured once and can be forced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import kernels


def plain(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


@pytest.mark.parametrize("tokens", [1, 2, 3, 17])
@pytest.mark.parametrize("threads", [1, 2])
def test_transposed_form_equals_linear(tokens: int, threads: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    gate, up = torch.randn(96, 40, generator=g), torch.randn(96, 40, generator=g)
    down = torch.randn(40, 96, generator=g)
    x = torch.randn(tokens, 40, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernels.expert_ffn_transposed(x, gate, up, down, F.silu)
    finally:
        torch.set_num_threads(old)
    assert got.shape == (tokens, 40)
    torch.testing.assert_close(got, plain(x, gate, up, down), atol=1e-4, rtol=1e-5)


def test_choice_is_measured_once_per_key_and_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_choices", {})
    calls: list[bool] = []
    real = kernels._measure

    def counting(weights: list[torch.Tensor], single: bool) -> bool:
        calls.append(single)
        return real(weights, single)

    monkeypatch.setattr(kernels, "_measure", counting)
    w = torch.randn(64, 32)
    pool = [w, torch.randn(64, 32), torch.randn(8, 8)]  # another shape is left out
    first = kernels.transposed_is_faster(w, 1, lambda: pool)
    assert kernels.transposed_is_faster(w, 1, lambda: pool) is first
    kernels.transposed_is_faster(w, 2, lambda: pool)
    kernels.transposed_is_faster(w, 5, lambda: pool)  # the same case as 2 tokens
    assert calls == [True, False]
    assert isinstance(first, bool)
    monkeypatch.setattr(kernels, "FORCE_TRANSPOSED", True)
    assert kernels.transposed_is_faster(torch.randn(3, 3), 1, lambda: []) is True
    monkeypatch.setattr(kernels, "FORCE_TRANSPOSED", False)
    assert kernels.transposed_is_faster(w, 1, lambda: pool) is False
    assert calls == [True, False]
