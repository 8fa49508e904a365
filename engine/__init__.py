"""FlexGate engine: FlexOlmo loading, governed MoE routing, usage accounting, placement.

The engine knows nothing of HTTP, databases or policy: it takes an allowed set of expert ids
and returns logits (or text) and per-expert usage. See DESIGN.md, "Engine contract".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Engine", "ExpertSetError", "ForwardResult", "load_engine"]

if TYPE_CHECKING:
    from engine.api import Engine, ForwardResult, load_engine
    from engine.errors import ExpertSetError


def __getattr__(name: str) -> Any:
    # Lazy: `import engine` must not pay for importing torch and transformers.
    if name in ("Engine", "ForwardResult", "load_engine"):
        from engine import api

        return getattr(api, name)
    if name == "ExpertSetError":
        from engine.errors import ExpertSetError

        return ExpertSetError
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
