"""``experts.json``: the ids of a checkpoint's experts, in router-row order.

Format (DESIGN.md, "Engine contract")::

    {"experts": [{"id": "public", "owner": "...", "description": "..."}, ...]}

Without the file the ids are ``expert-0``, ``expert-1``, ...; expert 0 is the public expert by
convention.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError

EXPERTS_FILE = "experts.json"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class ExpertInfo:
    """One expert as ``experts.json`` describes it."""

    id: str
    owner: str | None = None
    description: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.owner is not None:
            out["owner"] = self.owner
        if self.description is not None:
            out["description"] = self.description
        return out


def default_expert_ids(num_experts: int) -> tuple[str, ...]:
    """``expert-0`` ... ``expert-{n-1}``."""
    return tuple(f"expert-{i}" for i in range(num_experts))


def read_experts(model_dir: str | Path, num_experts: int) -> tuple[ExpertInfo, ...]:
    """Read and validate ``experts.json`` in ``model_dir``; default ids when it is absent.

    Raises CheckpointError when the file is not valid JSON, lacks an ``experts`` list, has an
    entry without a string ``id``, repeats an id, or lists a different number of experts than
    the config's ``num_experts``.
    """
    path = Path(model_dir) / EXPERTS_FILE
    if not path.exists():
        return tuple(ExpertInfo(i) for i in default_expert_ids(num_experts))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc
    entries = data.get("experts") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CheckpointError(f'{path}: expected an object {{"experts": [...]}}')
    experts: list[ExpertInfo] = []
    for pos, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise CheckpointError(f'{path}: entry {pos} has no string "id"')
        eid = entry["id"]
        if not _ID_RE.match(eid):
            raise CheckpointError(
                f"{path}: entry {pos} has an invalid id {eid!r} (letters, digits, '._:-', "
                "starting with a letter or digit, at most 128 characters)"
            )
        owner, desc = entry.get("owner"), entry.get("description")
        if owner is not None and not isinstance(owner, str):
            raise CheckpointError(f'{path}: entry {pos} ("{eid}"): "owner" must be a string')
        if desc is not None and not isinstance(desc, str):
            raise CheckpointError(f'{path}: entry {pos} ("{eid}"): "description" must be a string')
        experts.append(ExpertInfo(eid, owner, desc))
    ids = [e.id for e in experts]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise CheckpointError(f"{path}: duplicate expert ids {dupes}")
    if len(experts) != num_experts:
        raise CheckpointError(
            f"{path}: lists {len(experts)} experts but config.json has num_experts={num_experts}"
        )
    return tuple(experts)


def write_experts(
    model_dir: str | Path, experts: list[ExpertInfo] | tuple[ExpertInfo, ...]
) -> Path:
    """Write ``experts.json`` into ``model_dir``; returns its path."""
    path = Path(model_dir) / EXPERTS_FILE
    path.write_text(
        json.dumps({"experts": [e.to_json() for e in experts]}, indent=2) + "\n", encoding="utf-8"
    )
    return path
