"""A revocation committed elsewhere (its own session, as another process would) narrows a
running stream, and the stream's record says when: `revoked_at` (after the revocation was
committed, before the stream ended) and `revoked_after_tokens` (the tokens delivered by
then). bench/revocation.py times the same thing across two servers."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import httpx
from gw_helpers import OWNER_CODE, completion, grant, records

from governance.licenses import revoke_license


def _time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_the_record_of_a_narrowed_stream_says_when_and_after_how_many_tokens(
    gw_live: Any, gw_world: Any
) -> None:
    license_id = await grant(gw_world.sm, "code")
    # only the expert that will be revoked: losing it leaves nothing, so the stream ends
    body = completion(prompt="The", max_tokens=600, stream=True, experts={"only": ["code"]})
    events: list[Any] = []
    before: float | None = None
    async with (
        httpx.AsyncClient(base_url=gw_live.base_url, timeout=60) as client,
        client.stream(
            "POST", "/v1/completions", json=body, headers=gw_world.headers("application")
        ) as r,
    ):
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            events.append(None if data == "[DONE]" else json.loads(data))
            if before is None and len(events) >= 2:
                before = time.time()
                async with gw_world.sm() as s:
                    await revoke_license(s, actor=OWNER_CODE, license_id=license_id)
        ended = time.time()
    assert before is not None and events[-1] is None
    finish = [c["finish_reason"] for e in events if e for c in e.get("choices", [])]
    assert finish[-1] == "cancelled"  # narrowed to no expert at all
    fg = events[-2]["flexgate"]
    (rec,) = [e for e in await records(gw_world.sm, "inference") if e.seq == fg["audit_seq"]]
    payload = rec.payload
    assert payload["revoked"] == {"code": "revoked-no-license"}
    assert payload["status"] == "cancelled"
    at = _time(payload["revoked_at"])
    # narrowed after the revocation was asked for (its commit comes later still), and before
    # the stream ended
    assert before <= at <= ended
    assert 1 <= payload["revoked_after_tokens"] <= payload["completion_tokens"] < 600


async def test_a_stream_that_lost_nothing_has_no_revocation_fields(
    gw_client: Any, gw_world: Any
) -> None:
    r = await gw_client.post(
        "/v1/completions", json=completion(stream=True), headers=gw_world.headers("application")
    )
    assert r.status_code == 200
    seq = [
        json.loads(line[6:])["flexgate"]["audit_seq"]
        for line in r.text.splitlines()
        if line.startswith("data: {") and '"flexgate"' in line
    ]
    (rec,) = [e for e in await records(gw_world.sm, "inference") if e.seq == seq[0]]
    assert not {"revoked", "revoked_at", "revoked_after_tokens"} & set(rec.payload)
