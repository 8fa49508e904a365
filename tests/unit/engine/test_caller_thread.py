"""Submitting a request does no torch work on the caller's thread (DESIGN.md, "Threads"):
the gateway submits from its event loop, and any torch operator there would give that
thread an OpenMP team of its own beside the scheduler's."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from engine import ExpertSetError, load_engine


def test_submit_builds_no_tensor_on_the_callers_thread(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = load_engine(tiny_dir)
    try:
        ids = eng.expert_ids
        calls: list[str] = []
        real = type(eng).mask_for

        def spy(self: object, allowed: object, batch_size: int) -> object:
            calls.append(threading.current_thread().name)
            return real(eng, allowed, batch_size)  # type: ignore[arg-type]

        monkeypatch.setattr(type(eng), "mask_for", spy)
        result = eng.generate("def add(a, b):", allowed=[ids[0], ids[2]], max_tokens=3)
        assert result.allowed == (ids[0], ids[2])
        assert threading.current_thread().name not in calls
    finally:
        eng.close()


def test_resolve_allowed_checks_as_mask_for(tiny_dir: Path) -> None:
    eng = load_engine(tiny_dir)
    try:
        ids = eng.expert_ids
        assert eng.resolve_allowed(None) == ids
        assert eng.resolve_allowed({ids[3], ids[1]}) == (ids[1], ids[3])
        for bad in ([], ["nope"]):
            with pytest.raises(ExpertSetError):
                eng.resolve_allowed(bad)
            with pytest.raises(ExpertSetError):
                eng.mask_for(bad, 1)
        with pytest.raises(TypeError):
            eng.resolve_allowed(ids[0])
        eng.unload_expert(ids[2])
        assert eng.resolve_allowed(None) == (ids[0], ids[1], ids[3])
        with pytest.raises(ExpertSetError, match="unloaded"):
            eng.resolve_allowed([ids[2]])
    finally:
        eng.close()
