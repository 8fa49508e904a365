from __future__ import annotations

import subprocess
import sys

import pytest

import engine


@pytest.mark.parametrize("name", engine.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(engine, name).__name__ == name


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = engine.nope  # type: ignore[attr-defined]


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, engine; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_engine_error_is_exported() -> None:
    import inspect

    import engine.errors

    defined = {
        name
        for name, obj in vars(engine.errors).items()
        if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == "engine.errors"
    }
    assert {"PromptError", "GenerationError", "CheckpointError", "ExpertSetError"} <= defined
    assert defined <= set(engine.__all__)
    for name in defined:
        assert getattr(engine, name) is getattr(engine.errors, name)
        assert issubclass(getattr(engine, name), engine.EngineError)


def test_errors_raised_deeper_are_the_exported_ones() -> None:
    from engine.generation import PromptError
    from engine.sampling import SamplingParams
    from engine.scheduler import GenerationError

    assert PromptError is engine.PromptError and GenerationError is engine.GenerationError
    with pytest.raises(engine.SamplingError, match="temperature"):
        SamplingParams(temperature=float("nan"))


def test_catching_engine_errors_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from engine import CheckpointError, GenerationError, PromptError, SamplingError\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
