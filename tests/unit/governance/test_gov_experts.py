"""The expert registry: experts.json or config.json, owners reported not invented, the public
expert's `*` license on first registration, re-syncs, withdrawal by the owner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gov_helpers import EXPERTS, OLGA, OPERATOR, write_model
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from governance.errors import ModelError
from governance.experts import (
    ensure_registered,
    list_experts,
    read_model_experts,
    sync_experts,
    withdraw_expert,
)
from governance.licenses import list_licenses, revoke_license
from governance.principals import add_principal
from governance.store import PolicyStore


def test_reading_model_folders(tmp_path: Path) -> None:
    listed = read_model_experts(write_model(tmp_path / "a"))
    assert [(e.id, e.owner) for e in listed] == [
        ("public", None),
        ("code", "olga"),
        ("news", "oscar"),
        ("math", "nobody-yet"),
    ]
    plain = tmp_path / "b"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "flex_olmo", "num_experts": 3}))
    assert [e.id for e in read_model_experts(plain)] == ["expert-0", "expert-1", "expert-2"]
    bad = {
        "missing": None,
        "not json": "{",
        "no experts": json.dumps({"experts": []}),
        "bad id": json.dumps({"experts": [{"id": "a,b"}]}),
        "dup ids": json.dumps({"experts": [{"id": "a"}, {"id": "a"}]}),
        "no id": json.dumps({"experts": [{"owner": "x"}]}),
    }
    for name, text in bad.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        if text is not None:
            (folder / "experts.json").write_text(text)
        with pytest.raises(ModelError):
            read_model_experts(folder)


async def test_first_registration_and_later_syncs(
    sm: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    model = write_model(tmp_path / "model")
    async with sm() as s:
        await add_principal(s, actor=OPERATOR, principal_id="olga", roles=["data_owner"])
        await add_principal(s, actor=OPERATOR, principal_id="oscar", roles=["application"])
        report = await ensure_registered(s, actor=OPERATOR, model_dir=model)
        assert report is not None
        assert report.registered == ["public", "code", "news", "math"]
        assert report.owners_assigned == {"code": "olga"}
        assert report.owners_without_role == {"news": "oscar"}  # reported, not assigned
        assert report.unknown_owners == {"math": "nobody-yet"}  # reported, not invented
        assert await ensure_registered(s, actor=OPERATOR, model_dir=model) is None
        (public,) = await list_licenses(s)
        assert (public.expert_id, public.grantee, public.purposes) == ("public", "*", ["*"])
        # the operator may take the public license back; a re-sync does not re-grant it
        await revoke_license(s, actor=OPERATOR, license_id=public.id)
        # the missing owner is created: the next sync assigns them
        await add_principal(s, actor=OPERATOR, principal_id="nobody-yet", roles=["data_owner"])
        again = await sync_experts(s, actor=OPERATOR, model_dir=model)
        assert again.owners_assigned == {"math": "nobody-yet"} and again.registered == []
        # the model changes: a new expert, one gone, the rest moved
        grown = write_model(
            tmp_path / "grown",
            [EXPERTS[1], EXPERTS[0], {"id": "law", "owner": "olga", "description": "laws"}],
        )
        changed = await sync_experts(s, actor=OPERATOR, model_dir=grown)
        assert changed.registered == ["law"] and changed.owners_assigned == {"law": "olga"}
        assert set(changed.absent) == {"news", "math"}
        assert changed.public_license is None
        rows = await list_experts(s)
        assert [(e.id, e.position, e.owner_id) for e in rows] == [
            ("code", 0, "olga"),
            ("public", 1, None),
            ("law", 2, "olga"),
            ("math", None, "nobody-yet"),
            ("news", None, None),
        ]
        assert [lic.grantee for lic in await list_licenses(s, include_revoked=False)] == []
        snap = await PolicyStore().snapshot(s)
        assert snap.expert_ids == ("code", "public", "law")
        assert snap.allowed_experts("anyone").excluded == {
            "code": "no-license",
            "public": "no-license",
            "law": "no-license",
        }
        # the owner may withdraw their own expert
        await withdraw_expert(s, actor=OLGA, expert_id="law")
        snap = await PolicyStore().snapshot(s)
        assert snap.allowed_experts("anyone").excluded["law"] == "withdrawn"


async def test_config_only_model_licenses_expert_zero(
    sm: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_experts": 2}))
    async with sm() as s:
        report = await sync_experts(s, actor=OPERATOR, model_dir=tmp_path)
        assert report.registered == ["expert-0", "expert-1"]
        snap = await PolicyStore().snapshot(s)
        assert snap.allowed_experts("anyone").allowed == ("expert-0",)
