"""`flexgate demo principals`: the demo's principals, keys and licenses, created once.

`make run` calls it after `flexgate demo build`. It creates an application (`demo-app`), two
data owners (`alice` owns the code and legal experts, `bob` literature and biomedical, as the
demo model's experts.json declares), a compliance officer (`officer`) and an admin (`admin`),
one API key each, registers the served model's experts (assigning the declared owners), and
has each owner license their experts to the application. The keys are kept in
`$FLEXGATE_HOME/demo-keys.json` (mode 0600); a second run finds them and only prints them.
Everything goes through governance's own services, so the ledger records it all.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import click

from contracts.settings import settings
from governance.identity import Identity

__all__ = ["KEYS_FILE", "PRINCIPALS", "ensure_demo_principals", "principals"]

KEYS_FILE = "demo-keys.json"
APP = "demo-app"
PRINCIPALS: dict[str, list[str]] = {
    APP: ["application"],
    "alice": ["data_owner"],
    "bob": ["data_owner"],
    "officer": ["compliance_officer"],
    "admin": ["admin"],
}


async def _create(model_dir: Path) -> dict[str, Any]:
    from sqlalchemy import select

    from audit.db import ensure_schema_current, make_engine, make_sessionmaker
    from governance.experts import sync_experts
    from governance.keys import create_key
    from governance.licenses import grant_license
    from governance.models import Expert, Principal
    from governance.principals import add_principal

    operator = Identity.operator("operator:demo")
    engine = make_engine()
    try:
        await ensure_schema_current(engine)
        async with make_sessionmaker(engine)() as session:
            existing = set((await session.execute(select(Principal.id))).scalars())
            for pid, roles in PRINCIPALS.items():
                if pid not in existing:
                    await add_principal(session, actor=operator, principal_id=pid, roles=roles)
            keys = {}
            for pid in PRINCIPALS:
                _, token = await create_key(session, actor=operator, principal_id=pid)
                keys[pid] = token
            await sync_experts(session, actor=operator, model_dir=model_dir)
            experts = (await session.execute(select(Expert))).scalars().all()
            licenses: dict[str, str] = {}
            for expert in experts:
                if expert.owner_id is None or expert.position is None:
                    continue
                owner = Identity(expert.owner_id, frozenset({"data_owner"}), via="operator")
                lic = await grant_license(
                    session, actor=owner, expert_id=expert.id, grantee=APP, note="demo"
                )
                licenses[expert.id] = lic.id
            owners = {e.id: e.owner_id for e in experts if e.position is not None}
    finally:
        await engine.dispose()
    return {"keys": keys, "licenses": licenses, "owners": owners}


def ensure_demo_principals(home: Path, model_dir: Path) -> tuple[dict[str, Any], bool]:
    """The demo's keys and licenses: read from ``home/KEYS_FILE``, else created and written
    there (mode 0600). Returns them and whether they were created now."""
    path = home / KEYS_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")), False
    data = asyncio.run(_create(model_dir))
    home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return data, True


def examples(data: dict[str, Any], base: str) -> str:
    """Ready-to-paste curl and openai-client examples for the demo principals."""
    k = data["keys"]
    lic = data["licenses"].get("code", "LICENSE_ID")
    owner = data.get("owners", {}).get("code") or "alice"
    body = (
        '{"model": "demo-model", "prompt": "if __name__ == ", "max_tokens": 16, "temperature": 0}'
    )
    return f"""\
Demo principals (keys in $FLEXGATE_HOME/{KEYS_FILE}, mode 0600):
  application        {APP:<9} {k[APP]}
  data owner         alice     {k["alice"]}   (experts: code, legal)
  data owner         bob       {k["bob"]}   (experts: literature, biomedical)
  compliance officer officer   {k["officer"]}
  admin              admin     {k["admin"]}

export APP_KEY={k[APP]} OWNER_KEY={k[owner]} OFFICER_KEY={k["officer"]}

# 1. infer as the application (see "flexgate.experts.allowed" and the usage per expert)
curl -s {base}/v1/completions -H "Authorization: Bearer $APP_KEY" \\
  -H 'Content-Type: application/json' -d '{body}'

# 2. the code expert's owner revokes the application's license
curl -s -X DELETE {base}/v1/experts/code/licenses/{lic} -H "Authorization: Bearer $OWNER_KEY"

# 3. infer again: "code" is now under "excluded" ("no-license") and the completion changes
curl -s {base}/v1/completions -H "Authorization: Bearer $APP_KEY" \\
  -H 'Content-Type: application/json' -d '{body}'

# 4. read the ledger as the compliance officer, and verify it
curl -s "{base}/v1/audit/records?limit=5" -H "Authorization: Bearer $OFFICER_KEY"
curl -s {base}/v1/audit/verify -H "Authorization: Bearer $OFFICER_KEY"

# the same with the openai client (pip install openai)
python - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{k[APP]}")
r = client.completions.create(model="demo-model", prompt="if __name__ == ",
                              max_tokens=16, temperature=0,
                              extra_body={{"experts": {{"exclude": ["literature"]}}}})
print(r.choices[0].text)
print(r.model_extra["flexgate"]["experts"])
EOF"""


@click.command("principals")
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True)
def principals(base_url: str) -> None:
    """Create the demo principals, keys and licenses once; print them with examples."""
    from audit.errors import AuditError
    from governance.errors import GovernanceError

    cfg = settings()
    if not (cfg.model_dir / "config.json").is_file():
        raise click.ClickException(f"{cfg.model_dir}: no model (run `flexgate demo build` first)")
    try:
        data, created = ensure_demo_principals(cfg.home, cfg.model_dir)
    except (GovernanceError, AuditError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        ("created" if created else "reusing") + f" the demo principals in {cfg.home}", err=True
    )
    click.echo(examples(data, base_url))
