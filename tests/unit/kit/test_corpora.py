from __future__ import annotations

import pytest

from kit.corpora import CLOSED_DOMAINS, DOMAINS, _norm_lines, is_valid, load_corpus
from kit.errors import KitError


@pytest.mark.parametrize("name", [d for d in DOMAINS if d not in ("public", "math")])
def test_closed_domains_load_offline_with_a_held_out_split(name: str) -> None:
    a = load_corpus(name, 20_000, 5_000)
    b = load_corpus(name, 20_000, 5_000)
    assert a.train == b.train and a.valid == b.valid  # deterministic
    assert a.train and a.valid
    assert not set(a.train) & set(a.valid)
    tr, va = a.chars()
    assert 0 < tr <= 20_000 and 0 < va <= 5_000


def test_public_overlaps_no_closed_text() -> None:
    closed = {d: load_corpus(d, 50_000, 5_000) for d in ("literature", "legal")}
    texts = [t for c in closed.values() for t in c.train + c.valid]
    public = load_corpus("public", 100_000, 10_000, exclude=texts)
    forbidden = set().union(*(_norm_lines(t) for t in texts))
    assert not any(_norm_lines(t) & forbidden for t in public.train + public.valid)
    # the check is real: a fortune's own line makes it excluded
    quoted = public.train[0]
    again = load_corpus("public", 100_000, 10_000, exclude=[*texts, quoted])
    assert quoted not in again.train and again.dropped_overlap > public.dropped_overlap


def test_split_is_a_function_of_the_document() -> None:
    keys = [f"file{i}.py" for i in range(2000)]
    held = [k for k in keys if is_valid("code", k)]
    assert 40 < len(held) < 160  # ~5 %
    assert held == [k for k in keys if is_valid("code", k)]
    assert held != [k for k in keys if is_valid("legal", k)]


def test_unknown_corpus() -> None:
    with pytest.raises(KitError, match="unknown corpus 'news'"):
        load_corpus("news")
    assert set(CLOSED_DOMAINS) == set(DOMAINS) - {"public"}
