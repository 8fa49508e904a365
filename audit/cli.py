"""`flexgate db …` and `flexgate audit …` commands.

Exit codes: 0 success (verify: intact); 1 verification found tampering (verify,
verify-export); 2 bad usage or a malformed filter/cursor; 3 the database is unreachable or its
schema is out of date (`flexgate db upgrade`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from audit.errors import DatabaseUnavailable, InvalidQuery, SchemaOutOfDate, SigningKeyError
from contracts.settings import Settings

T = TypeVar("T")


@click.group()
def db() -> None:
    """Create, migrate and inspect the database schema (one Alembic history)."""


@db.command()
@click.argument("revision", default="head")
def upgrade(revision: str) -> None:
    """Migrate the database up to REVISION (default: head)."""
    from audit.db import upgrade as run_upgrade

    run_upgrade(None, revision)
    click.echo(f"database at {revision} ({_redacted(Settings.from_env().database_url)})")


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
    from audit.db import current_revision, head_revision, make_engine

    async def _run() -> str | None:
        engine = make_engine()
        try:
            return await current_revision(engine)
        finally:
            await engine.dispose()

    cur = _run_db(_run)
    head = head_revision()
    state = "up to date" if cur == head else "out of date: run `flexgate db upgrade`"
    click.echo(f"current: {cur or 'none'}\nhead: {head}\n{state}")


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _run_db(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a database coroutine; typed errors become clear messages and exit codes."""
    try:
        return asyncio.run(make())
    except InvalidQuery as exc:
        raise click.UsageError(str(exc)) from exc
    except (DatabaseUnavailable, SchemaOutOfDate, SigningKeyError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(3)


async def _with_session(work: Callable[[Any], Awaitable[T]]) -> T:
    """A session on a database whose schema is current (refused otherwise)."""
    from audit.db import ensure_schema_current, make_engine, make_sessionmaker, translate_errors

    engine = make_engine()
    try:
        await ensure_schema_current(engine)
        async with translate_errors(), make_sessionmaker(engine)() as session:
            return await work(session)
    finally:
        await engine.dispose()


def _public_keys(paths: tuple[str, ...]) -> dict[str, Any] | None:
    """Trusted keys: FLEXGATE_HOME's plus each --public-key file; None means the default."""
    if not paths:
        return None
    from audit.signing import load_public_key, trusted_public_keys

    extra = [load_public_key(Path(p).read_bytes()) for p in paths]
    return trusted_public_keys(extra=extra)


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


@click.group()
def audit() -> None:
    """Verify, query and export the audit ledger."""


_public_key_option = click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="PEM public key to trust besides FLEXGATE_HOME's (repeatable).",
)


@audit.command()
@click.option("--from-seq", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes checking chunks of records (default: one per CPU, at most 8; 1: none).",
)
@_public_key_option
def verify(from_seq: int, workers: int | None, public_keys: tuple[str, ...]) -> None:
    """Verify chain, checkpoints and head; exit 0 intact, 1 tampered (first bad seq shown)."""
    from audit.verify import verify as run_verify

    keys = _public_keys(public_keys)
    report = _run_db(
        lambda: _with_session(
            lambda s: run_verify(s, from_seq=from_seq, public_keys=keys, workers=workers)
        )
    )
    _echo_json(report.as_dict())
    sys.exit(0 if report.ok else 1)


@audit.command()
@click.option("--kind")
@click.option("--principal")
@click.option("--expert")
@click.option(
    "--expert-mode",
    type=click.Choice(["used", "allowed", "excluded", "any"]),
    default="used",
    show_default=True,
)
@click.option("--purpose")
@click.option("--status", type=click.Choice(["ok", "error", "cancelled"]))
@click.option("--since", help="ISO 8601 time or date (UTC when no offset), inclusive.")
@click.option("--until", help="ISO 8601 time or date, exclusive.")
@click.option("--after", help="Cursor: the seq after which to start (a page's next_after).")
@click.option("--limit", default="100", show_default=True, help="1..1000")
def query(**params: Any) -> None:
    """Print matching records as JSON lines; the next cursor goes to stderr."""
    from audit.query import RecordQuery, query_records

    try:
        parsed = RecordQuery.from_params(params)
    except InvalidQuery as exc:
        raise click.UsageError(str(exc)) from exc
    page = _run_db(lambda: _with_session(lambda s: query_records(s, parsed)))
    for record in page.records:
        _echo_json(record.as_dict())
    if page.next_after is not None:
        click.echo(f"more: --after {page.next_after}", err=True)


@audit.command()
@click.option("--by", type=click.Choice(["expert", "principal", "day"]), default="expert")
@click.option("--since")
@click.option("--until")
@click.option("--expert", "experts", multiple=True, help="Only these experts (repeatable).")
@click.option("--principal")
@click.option("--purpose")
def usage(
    by: str,
    since: str | None,
    until: str | None,
    experts: tuple[str, ...],
    principal: str | None,
    purpose: str | None,
) -> None:
    """Usage (requests, tokens, weight) per expert, principal or day, as JSON lines."""
    from audit.query import usage as run_usage

    rows = _run_db(
        lambda: _with_session(
            lambda s: run_usage(
                s,
                by=by,
                since=since,
                until=until,
                experts=list(experts) or None,
                principal=principal,
                purpose=purpose,
            )
        )
    )
    for row in rows:
        _echo_json(row.as_dict())


@audit.command()
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), required=True)
@click.option("--since", help="ISO 8601 time or date, inclusive.")
@click.option("--until", help="ISO 8601 time or date, exclusive.")
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False), help="File (default: standard output)."
)
@click.option(
    "--checkpoint/--no-checkpoint",
    default=True,
    show_default=True,
    help="Sign a fresh checkpoint first, so every exported record is covered by one.",
)
def export(
    fmt: str, since: str | None, until: str | None, output: str | None, checkpoint: bool
) -> None:
    """Stream the records with since <= at < until, with seq and hash on every line.

    The export carries a header (latest checkpoint, public key, Merkle subtree hashes) and a
    trailer, so `flexgate audit verify-export FILE` can check it offline. An empty range is an
    empty file. With --output the file appears whole or not at all.
    """
    from audit.export import export_lines
    from audit.signing import Signer

    signer = Signer.load_or_create() if checkpoint else None

    async def work(session: Any) -> None:
        if signer is not None:
            await _checkpoint_if_behind(session, signer)
        lines = await export_lines(
            session,
            fmt=fmt,
            since=since,
            until=until,
            public_key_pem=signer.public_key_pem if signer else _published_key(),
        )
        if output is None:
            try:
                async for line in lines:
                    sys.stdout.write(line)
                sys.stdout.flush()
            except BrokenPipeError:  # `| head`: the reader has what it wanted
                sys.stderr.close()
                os._exit(0)
            return
        target = Path(output)
        fd, tmp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                async for line in lines:
                    fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    _run_db(lambda: _with_session(work))


async def _checkpoint_if_behind(session: Any, signer: Any) -> None:
    from audit.checkpoints import create_checkpoint, latest_checkpoint
    from audit.ledger import head

    async with session.begin():
        seq, _ = await head(session)
        last = await latest_checkpoint(session)
        if seq > (last.size + 1 if last else 0):
            await create_checkpoint(session, signer)


def _published_key() -> str | None:
    from audit.signing import PUBLIC_KEY_FILE

    path = Settings.from_env().home / PUBLIC_KEY_FILE
    return path.read_text() if path.exists() else None


@audit.command()
def checkpoint() -> None:
    """Sign a checkpoint over every record now; print it (the public key is in FLEXGATE_HOME)."""
    from audit.checkpoints import create_checkpoint
    from audit.signing import PUBLIC_KEY_FILE, Signer

    signer = Signer.load_or_create()

    async def work(session: Any) -> Any:
        async with session.begin():
            return await create_checkpoint(session, signer)

    cp = _run_db(lambda: _with_session(work))
    _echo_json(
        {
            "checkpoint": cp.as_dict(),
            "public_key_file": str(Settings.from_env().home / PUBLIC_KEY_FILE),
        }
    )


@audit.command("verify-export")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@_public_key_option
@click.option(
    "--allow-unanchored",
    is_flag=True,
    help="Accept an export whose records are not all covered by a signed checkpoint.",
)
def verify_export_command(file: str, public_keys: tuple[str, ...], allow_unanchored: bool) -> None:
    """Check an export offline: chain, Merkle root and signature of its checkpoint.

    Exit 0 when intact and anchored to a checkpoint signed by a trusted key (FLEXGATE_HOME's
    or --public-key), 1 otherwise. Without a trusted key the file's own key is used and
    reported as such: compare its key_id with the published one.
    """
    from audit.export import verify_export

    keys = _public_keys(public_keys)
    with open(file, encoding="utf-8", newline="") as fh:
        report = verify_export(fh, public_keys=keys)
    result = report.as_dict()
    ok = report.ok
    if ok and report.records and not allow_unanchored:
        covered = report.merkle_checked and report.checkpoint_size is not None
        if not covered:
            ok = False
            result["reason"] = (
                "the records are not anchored to a signed checkpoint "
                "(export with --checkpoint, or pass --allow-unanchored)"
            )
    result["ok"] = ok
    _echo_json(result)
    if ok and report.key_source == "export file":
        click.echo(
            f"warning: checked with the key in the file itself ({report.key_id}); "
            "compare it with the published key",
            err=True,
        )
    sys.exit(0 if ok else 1)


@audit.command()
@click.argument("seq", type=click.IntRange(min=1))
@click.option("--checkpoint", "size", type=click.IntRange(min=0), help="Checkpoint size.")
def proof(seq: int, size: int | None) -> None:
    """Print the inclusion proof of record SEQ against a checkpoint (default: the latest)."""
    from audit.checkpoints import inclusion_proof

    result = _run_db(lambda: _with_session(lambda s: inclusion_proof(s, seq, checkpoint_size=size)))
    _echo_json(result.as_dict())


@audit.command()
@click.argument("old_size", type=click.IntRange(min=0))
@click.argument("new_size", type=click.IntRange(min=0), required=False)
def consistency(old_size: int, new_size: int | None) -> None:
    """Print the consistency proof between two checkpoints (NEW default: the latest)."""
    from audit.checkpoints import consistency_proof

    result = _run_db(lambda: _with_session(lambda s: consistency_proof(s, old_size, new_size)))
    _echo_json(result.as_dict())
