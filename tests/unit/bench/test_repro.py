"""The reproduction's own helpers (bench/repro): BTM, the derived numbers, the similarity."""

from __future__ import annotations

import math

import pytest
import torch

from bench.repro.btm import btm_logprobs, btm_perplexity, perplexity_of
from bench.repro.report import claims, geomean, method_row


def _logp(seed: int, shape: tuple[int, int] = (3, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(shape, generator=g, dtype=torch.float64) * 4


def test_btm_is_the_mixture_of_sequence_probabilities() -> None:
    a, b, c = _logp(0), _logp(1), _logp(2)
    mix = btm_logprobs([a, b, c])
    # with a uniform prior, the posterior-weighted ensemble scores a block as the mean of its
    # members' probabilities of the whole block
    want = torch.logsumexp(torch.stack([a.sum(-1), b.sum(-1), c.sum(-1)]), 0) - math.log(3)
    torch.testing.assert_close(mix.sum(-1), want)
    # its first token is the plain average (no context yet)
    first = torch.logsumexp(torch.stack([a[:, 0], b[:, 0], c[:, 0]]), 0) - math.log(3)
    torch.testing.assert_close(mix[:, 0], first)
    torch.testing.assert_close(btm_logprobs([a]), a)
    assert btm_perplexity([a, a]) == pytest.approx(perplexity_of(a))
    assert perplexity_of(torch.full((2, 4), -math.log(5), dtype=torch.float64)) == pytest.approx(5)
    with pytest.raises(ValueError, match="at least one member"):
        btm_logprobs([])


def test_btm_follows_the_member_that_predicts_the_context() -> None:
    good = torch.full((1, 50), math.log(0.9), dtype=torch.float64)
    bad = torch.full((1, 50), math.log(0.1), dtype=torch.float64)
    mix = btm_logprobs([good, bad])
    assert float(mix[0, 0]) == pytest.approx(math.log(0.5))
    assert float(mix[0, -1]) == pytest.approx(math.log(0.9), abs=1e-6)


def test_rows_and_claims() -> None:
    domains = ["code", "legal"]
    base = {"public": 10.0, "code": 40.0, "legal": 20.0}

    def scaled(f: dict[str, float]) -> dict[str, float]:
        return {d: base[d] * f.get(d, 1.0) for d in base}

    ppl = {
        "public": base,
        "soup": scaled({"code": 0.9, "legal": 0.9}),
        "btm": scaled({"code": 0.8, "legal": 0.8}),
        "flexolmo": scaled({"code": 0.5, "legal": 0.5}),
        "flexolmo-minus:code": scaled({"code": 1.0, "legal": 0.5}),
        "flexolmo-minus:legal": scaled({"code": 0.5, "legal": 0.75}),
    }
    ppl["flexolmo-tuned"] = ppl["flexolmo"]
    ppl["flexolmo-tuned-minus:code"] = ppl["flexolmo-minus:code"]
    ppl["flexolmo-tuned-minus:legal"] = ppl["flexolmo-minus:legal"]
    rows = {k: method_row(k, k, "g", v, base) for k, v in ppl.items()}
    assert rows["public"]["relative_to_public"] == 0.0
    assert rows["flexolmo"]["average"] == pytest.approx(geomean([10.0, 20.0, 10.0]))
    assert rows["flexolmo"]["relative_to_public"] == pytest.approx(1 - 0.5 ** (2 / 3))
    assert rows["flexolmo"]["relative_to_public_by_domain"]["code"] == pytest.approx(0.5)
    c = claims(rows, domains)["flexolmo"]
    assert "relative_to_joint_moe" not in c
    assert c["relative_to_prior_merging"]["btm"] == pytest.approx(1 - (0.5 / 0.8) ** (2 / 3))
    code = c["opt_out"]["code"]
    assert code["own_gain_removed"] == pytest.approx(1.0)  # back to the public model's
    assert code["own_domain_change"] == pytest.approx(1.0) and code["others_max_abs_change"] == 0
    assert c["opt_out"]["legal"]["own_gain_removed"] == pytest.approx(0.5)


def test_similarity_is_normalised_levenshtein() -> None:
    from bench.repro.extraction import THRESHOLD, similarity

    assert similarity("abcdefghij", "abcdefghij") == 1.0
    assert similarity("abcdefghij", "abcdefghiX") == pytest.approx(0.9)  # one edit in ten
    assert similarity("abcdefghij", "abcdefghiX") >= THRESHOLD
    assert similarity("abcdefghij", "abcdefgXYZ") < THRESHOLD
    assert similarity("", "abc") == 0.0
