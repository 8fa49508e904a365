"""`flexgate db …` and `flexgate audit …` commands."""

from __future__ import annotations

import click

from audit import settings


@click.group()
def db() -> None:
    """Create, migrate and inspect the database schema (one Alembic history)."""


@db.command()
@click.argument("revision", default="head")
def upgrade(revision: str) -> None:
    """Migrate the database up to REVISION (default: head)."""
    from audit.db import upgrade as run_upgrade

    run_upgrade(None, revision)
    click.echo(f"database at {revision} ({_redacted(settings.database_url())})")


@db.command()
@click.argument("revision")
def downgrade(revision: str) -> None:
    """Migrate the database down to REVISION (`base` removes every table)."""
    from audit.db import downgrade as run_downgrade

    run_downgrade(None, revision)
    click.echo(f"database at {revision}")


@db.command()
def current() -> None:
    """Print the schema revision of the database and the code's head."""
    import asyncio

    from audit.db import current_revision, head_revision, make_engine

    async def _run() -> str | None:
        engine = make_engine()
        try:
            return await current_revision(engine)
        finally:
            await engine.dispose()

    cur = asyncio.run(_run())
    head = head_revision()
    state = "up to date" if cur == head else "out of date: run `flexgate db upgrade`"
    click.echo(f"current: {cur or 'none'}\nhead: {head}\n{state}")


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@click.group()
def audit() -> None:
    """Verify, query and export the audit ledger."""
