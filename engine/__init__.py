"""FlexGate engine: FlexOlmo loading, governed MoE routing, usage accounting, placement.

The engine knows nothing of HTTP, databases or policy: it takes an allowed set of expert ids
and returns logits (or text) and per-expert usage. See DESIGN.md, "Engine contract".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "Engine",
    "ExpertSetError",
    "Finished",
    "ForwardResult",
    "GenerationResult",
    "GenerationStream",
    "SamplingParams",
    "TextDelta",
    "TokenLogprob",
    "load_engine",
]

# public name -> the module that defines it
_EXPORTS = {
    "Engine": "engine.api",
    "ForwardResult": "engine.api",
    "load_engine": "engine.api",
    "ExpertSetError": "engine.errors",
    "GenerationResult": "engine.generation",
    "SamplingParams": "engine.sampling",
    "GenerationStream": "engine.scheduler",
    "TextDelta": "engine.generation",
    "Finished": "engine.generation",
    "TokenLogprob": "engine.generation",
}

if TYPE_CHECKING:
    from engine.api import Engine, ForwardResult, load_engine
    from engine.errors import ExpertSetError
    from engine.generation import Finished, GenerationResult, TextDelta, TokenLogprob
    from engine.sampling import SamplingParams
    from engine.scheduler import GenerationStream


def __getattr__(name: str) -> Any:
    # Lazy: `import engine` must not pay for importing torch and transformers.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
