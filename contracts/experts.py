"""``experts.json`` and the expert id grammar: the one schema engine and governance both read.

The engine maps ids to router rows; governance turns the same ids into Casbin rules. A file one
of them accepts and the other refuses, or an id that means one expert to the engine and a rule
pattern to the policy, would let the two disagree about which expert a decision is about. So
both read the file through `read_experts_file` / `model_experts` and check ids with `check_id`,
and each wraps `ExpertsFileError` / `InvalidIdError` in its own error type.

Format (DESIGN.md, "Engine contract"), beside the checkpoint, in router-row order::

    {"experts": [{"id": "public", "owner": "...", "description": "..."}, ...]}

- ``experts``: a non-empty list; ids unique.
- ``id``: 1-128 of ``A-Z a-z 0-9 . _ @ -``, starting with a letter or digit. The policy gives
  ``:`` (``group:``/``role:`` prefixes), ``*`` (anyone), ``|`` (purpose separator) and ``,``
  (Casbin's field separator) a meaning, so an id never contains them.
- ``owner``: optional string (the principal id of the data owner); ``""`` or null = none.
- ``description``: optional string.
- other keys are ignored (room for later fields).

Without the file the ids are ``expert-0``, ``expert-1``, ... (``num_experts`` from the caller
or from ``config.json``); expert 0 is the public expert by convention.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXPERTS_FILE = "experts.json"
CONFIG_FILE = "config.json"

ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}"
"""The grammar of expert ids (and of principal and group ids, which share the policy)."""
ID_RULE = "1-128 of A-Z a-z 0-9 . _ @ - (starting with a letter or digit)"
_ID_RE = re.compile(ID_PATTERN)


class InvalidIdError(ValueError):
    """A string that is not an id of the grammar above; the message says which and why."""


class ExpertsFileError(ValueError):
    """A model folder's ``experts.json`` (or ``config.json`` fallback) is unusable; the message
    names the file and the fault."""


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def check_id(value: object, what: str = "expert id") -> str:
    """Return ``value`` if it is a valid id, else raise InvalidIdError naming ``what``."""
    if not is_valid_id(value):
        raise InvalidIdError(f"invalid {what} {value!r}: use {ID_RULE}")
    assert isinstance(value, str)
    return value


@dataclass(frozen=True)
class ExpertEntry:
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


def parse_experts(data: object, source: str = EXPERTS_FILE) -> tuple[ExpertEntry, ...]:
    """Validate decoded ``experts.json`` content; ``source`` names it in errors."""
    entries = data.get("experts") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ExpertsFileError(f'{source}: expected an object {{"experts": [...]}}')
    if not entries:
        raise ExpertsFileError(f"{source}: the experts list is empty")
    experts: list[ExpertEntry] = []
    for pos, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise ExpertsFileError(f'{source}: entry {pos} has no string "id"')
        eid = entry["id"]
        if not is_valid_id(eid):
            raise ExpertsFileError(f"{source}: entry {pos} has an invalid id {eid!r} ({ID_RULE})")
        owner, desc = entry.get("owner"), entry.get("description")
        if owner is not None and not isinstance(owner, str):
            raise ExpertsFileError(f'{source}: entry {pos} ("{eid}"): "owner" must be a string')
        if desc is not None and not isinstance(desc, str):
            raise ExpertsFileError(
                f'{source}: entry {pos} ("{eid}"): "description" must be a string'
            )
        experts.append(ExpertEntry(eid, owner or None, desc))
    ids = [e.id for e in experts]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ExpertsFileError(f"{source}: duplicate expert ids {dupes}")
    return tuple(experts)


def read_experts_file(model_dir: str | Path) -> tuple[ExpertEntry, ...] | None:
    """The experts ``model_dir/experts.json`` lists, validated; None when there is no file."""
    path = Path(model_dir) / EXPERTS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExpertsFileError(f"{path}: not readable JSON ({exc})") from None
    return parse_experts(data, str(path))


def config_num_experts(model_dir: str | Path) -> int:
    """``num_experts`` of ``model_dir/config.json`` (a positive integer)."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExpertsFileError(f"{path}: not readable JSON ({exc})") from None
    num = config.get("num_experts") if isinstance(config, dict) else None
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise ExpertsFileError(f"{path}: num_experts must be a positive integer, got {num!r}")
    return num


def model_experts(model_dir: str | Path, num_experts: int | None = None) -> tuple[ExpertEntry, ...]:
    """The experts of a model folder in router-row order.

    ``num_experts`` is the config's count when the caller has read it (the engine); without
    it, ``config.json`` is read only when there is no ``experts.json``. When given, the file
    must list exactly that many experts.
    """
    listed = read_experts_file(model_dir)
    if listed is None:
        count = config_num_experts(model_dir) if num_experts is None else num_experts
        return tuple(ExpertEntry(i) for i in default_expert_ids(count))
    if num_experts is not None and len(listed) != num_experts:
        raise ExpertsFileError(
            f"{Path(model_dir) / EXPERTS_FILE}: lists {len(listed)} experts but config.json "
            f"has num_experts={num_experts}"
        )
    return listed


def write_experts_file(
    model_dir: str | Path, experts: tuple[ExpertEntry, ...] | list[ExpertEntry]
) -> Path:
    """Write ``experts.json`` into ``model_dir`` (validated first); returns its path."""
    data = {"experts": [e.to_json() for e in experts]}
    parse_experts(data, "experts to write")
    path = Path(model_dir) / EXPERTS_FILE
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


__all__ = [
    "CONFIG_FILE",
    "EXPERTS_FILE",
    "ID_PATTERN",
    "ID_RULE",
    "ExpertEntry",
    "ExpertsFileError",
    "InvalidIdError",
    "check_id",
    "config_num_experts",
    "default_expert_ids",
    "is_valid_id",
    "model_experts",
    "parse_experts",
    "read_experts_file",
    "write_experts_file",
]
