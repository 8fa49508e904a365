"""engine and governance read experts.json through one schema and one id grammar
(contracts.experts): a file or id one accepts, the other accepts too, and each refuses in its
own error type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts.experts import ID_PATTERN, ExpertsFileError, check_id, model_experts
from engine.errors import CheckpointError
from engine.experts import read_experts
from governance.errors import InvalidId, ModelError
from governance.experts import read_model_experts
from governance.names import check_id as governance_check_id
from governance.names import parse_grantee

GOOD_IDS = ["public", "a", "code-v2", "news_2026", "olga@example.org", "x.y", "9lives", "a" * 128]
# `:` `*` `|` `,` mean something in a Casbin rule (group:/role: prefixes, anyone, purpose
# separator, field separator); the others are simply outside the grammar.
BAD_IDS = ["", "group:x", "role:admin", "*", "a|b", "a,b", "a b", "-a", ".a", "a" * 129, "é", "a\n"]


def _folder(tmp_path: Path, experts: object, name: str = "m") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "experts.json").write_text(json.dumps(experts))
    return folder


def test_one_grammar() -> None:
    assert ID_PATTERN == "[A-Za-z0-9][A-Za-z0-9._@-]{0,127}"
    for good in GOOD_IDS:
        assert check_id(good) == good == governance_check_id(good)
    for bad in BAD_IDS:
        with pytest.raises(ValueError, match="invalid expert id"):
            check_id(bad)
        with pytest.raises(InvalidId):
            governance_check_id(bad, "expert id")


@pytest.mark.parametrize("eid", GOOD_IDS)
def test_both_packages_accept_the_same_ids(tmp_path: Path, eid: str) -> None:
    folder = _folder(tmp_path, {"experts": [{"id": "row-0"}, {"id": eid, "owner": "olga"}]})
    assert [e.id for e in read_experts(folder, 2)] == ["row-0", eid]
    assert [e.id for e in read_model_experts(folder)] == ["row-0", eid]
    assert parse_grantee(eid) == ("principal", eid)  # an id is never read as a rule pattern


@pytest.mark.parametrize("eid", BAD_IDS)
def test_both_packages_refuse_the_same_ids(tmp_path: Path, eid: str) -> None:
    folder = _folder(tmp_path, {"experts": [{"id": "public"}, {"id": eid}]})
    with pytest.raises(CheckpointError, match="invalid id"):
        read_experts(folder, 2)
    with pytest.raises(ModelError, match="invalid id"):
        read_model_experts(folder)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"experts": []}, "empty"),
        ({"experts": [{"id": "a"}, {"id": "a"}]}, r"duplicate expert ids \['a'\]"),
        ({"experts": [{"owner": "x"}]}, 'entry 0 has no string "id"'),
        ({"experts": [{"id": "a", "owner": 3}]}, '"owner" must be a string'),
        ({"experts": [{"id": "a", "description": ["x"]}]}, '"description" must be a string'),
        (["a"], "expected an object"),
        ({"expert": [{"id": "a"}]}, "expected an object"),
    ],
)
def test_both_packages_refuse_the_same_files(tmp_path: Path, content: object, message: str) -> None:
    folder = _folder(tmp_path, content)
    with pytest.raises(ExpertsFileError, match=message):
        model_experts(folder)
    with pytest.raises(CheckpointError, match=message):
        read_experts(folder, 1)
    with pytest.raises(ModelError, match=message):
        read_model_experts(folder)


def test_same_entries_and_owner_conventions(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path,
        {
            "experts": [
                {"id": "public", "owner": "", "description": "shared"},
                {"id": "code", "owner": "olga", "extra": "ignored"},
            ]
        },
    )
    engine_side = read_experts(folder, 2)
    governance_side = read_model_experts(folder)
    assert [(e.id, e.owner) for e in engine_side] == [("public", None), ("code", "olga")]
    assert [(e.id, e.owner) for e in governance_side] == [("public", None), ("code", "olga")]
    assert [e.description for e in governance_side] == ["shared", ""]
    with pytest.raises(CheckpointError, match=r"lists 2 experts but .* num_experts=3"):
        read_experts(folder, 3)


def test_default_ids_from_config(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_experts": 2}))
    assert [e.id for e in read_model_experts(folder)] == ["expert-0", "expert-1"]
    assert [e.id for e in read_experts(folder, 2)] == ["expert-0", "expert-1"]
    (folder / "config.json").write_text(json.dumps({"num_experts": True}))
    with pytest.raises(ModelError, match="num_experts must be a positive integer"):
        read_model_experts(folder)
