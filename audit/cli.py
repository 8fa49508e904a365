"""`flexgate db …` and `flexgate audit …` commands.

Exit codes are `contracts.exit_codes.ExitCode`: 0 success (verify: intact); 1 only when the
ledger, an export or a checkpoint does not verify (a checkpoint refused because the ledger
does not extend its anchor included); 2 bad input (arguments, filters, files); 3 a dependency
is unusable (database unreachable, schema out of date, signing key unreadable); 4 valid
input that the state refuses (nothing to export, a downgrade that would destroy the ledger
without consent). Every bad input is validated before anything is signed or written: an
error is a message on stderr, never a traceback.
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
from typing import IO, Any, NoReturn, TypeVar

import click

from audit.errors import (
    AuditError,
    DatabaseUnavailable,
    InvalidQuery,
    SchemaOutOfDate,
    SigningKeyError,
)
from contracts.exit_codes import ExitCode
from contracts.settings import Settings, SettingsError

T = TypeVar("T")
MAX_SEQ = 2**63 - 1  # a bigint: larger numbers are bad input, not a database error


def _fail(code: ExitCode, message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(int(code))


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        _fail(ExitCode.USAGE, str(exc))


@click.group()
def db() -> None:
    """Create, migrate and inspect the database schema (one Alembic history)."""


def _migrate(work: Callable[[], None]) -> None:
    from alembic.util.exc import CommandError

    from audit.db import LedgerDestructionRefused

    try:
        work()
    except CommandError as exc:
        _fail(ExitCode.USAGE, str(exc))
    except LedgerDestructionRefused as exc:
        _fail(ExitCode.REFUSED, str(exc))
    except (DatabaseUnavailable, SchemaOutOfDate) as exc:
        _fail(ExitCode.UNAVAILABLE, str(exc))
    except (OSError, ConnectionError) as exc:
        _fail(ExitCode.UNAVAILABLE, f"database unreachable: {exc}")
    except Exception as exc:
        from sqlalchemy.exc import DBAPIError, OperationalError

        if isinstance(exc, OperationalError | DBAPIError):
            _fail(ExitCode.UNAVAILABLE, f"database unreachable: {exc.orig or exc}")
        raise


@db.command()
@click.argument("revision", default="head")
def upgrade(revision: str) -> None:
    """Migrate the database up to REVISION (default: head)."""
    from audit.db import upgrade as run_upgrade

    url = _settings().database_url
    _migrate(lambda: run_upgrade(url, revision))
    click.echo(f"database at {revision} ({_redacted(url)})")


@db.command()
@click.argument("revision")
@click.option(
    "--i-understand-this-destroys-the-ledger",
    "destroy_ledger",
    is_flag=True,
    help="Allow a downgrade below the ledger's creation while it holds records.",
)
def downgrade(revision: str, destroy_ledger: bool) -> None:
    """Migrate the database down to REVISION (`base` removes every table).

    Going below the ledger's creation while it holds records is refused (exit 4) unless
    --i-understand-this-destroys-the-ledger is given: it deletes the evidence.
    """
    from audit.db import downgrade as run_downgrade

    url = _settings().database_url
    _migrate(lambda: run_downgrade(url, revision, destroy_ledger=destroy_ledger))
    click.echo(f"database at {revision}")


@db.command()
def current() -> None:
    """Print the schema revision of the database and the code's head."""
    from audit.db import current_revision, head_revision, make_engine

    url = _settings().database_url

    async def _run() -> str | None:
        engine = make_engine(url)
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
    from audit.anchor import AnchorError, AnchorRefused
    from audit.export import NothingToExport

    try:
        return asyncio.run(make())
    except InvalidQuery as exc:
        _fail(ExitCode.USAGE, str(exc))
    except (AnchorRefused, AnchorError) as exc:
        _fail(ExitCode.TAMPERED, str(exc))
    except NothingToExport as exc:
        _fail(ExitCode.REFUSED, str(exc))
    except (DatabaseUnavailable, SchemaOutOfDate, SigningKeyError) as exc:
        _fail(ExitCode.UNAVAILABLE, str(exc))
    except AuditError as exc:  # e.g. stored data a proof cannot be built from
        _fail(ExitCode.TAMPERED, str(exc))


async def _with_session(work: Callable[[Any], Awaitable[T]]) -> T:
    """A session on a database whose schema is current (refused otherwise)."""
    from audit.db import ensure_schema_current, make_engine, make_sessionmaker, translate_errors

    engine = make_engine(_settings().database_url)
    try:
        await ensure_schema_current(engine)
        async with translate_errors(), make_sessionmaker(engine)() as session:
            return await work(session)
    finally:
        await engine.dispose()


def _given_keys(paths: tuple[str, ...]) -> dict[str, Any] | None:
    """The --public-key files (which replace every other key), or None: FLEXGATE_HOME's."""
    if not paths:
        return None
    from audit.offline import UsageError, keys_of

    try:
        return keys_of(paths)
    except UsageError as exc:
        _fail(ExitCode.USAGE, str(exc))


def _home_keys() -> dict[str, Any]:
    from audit.signing import trusted_public_keys

    try:
        return trusted_public_keys(_settings().home)
    except SigningKeyError as exc:
        _fail(ExitCode.UNAVAILABLE, str(exc))


def _auditor_checkpoint(path: str | None) -> Any:
    if path is None:
        return None
    from audit.offline import UsageError, read_checkpoint

    try:
        return read_checkpoint(path)
    except UsageError as exc:
        _fail(ExitCode.USAGE, str(exc))


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


@click.group()
def audit() -> None:
    """Verify, query and export the audit ledger."""


_public_key_option = click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="PEM public key trusted to sign checkpoints (repeatable); replaces FLEXGATE_HOME's.",
)
_checkpoint_file_option = click.option(
    "--checkpoint",
    "checkpoint_file",
    type=click.Path(dir_okay=False),
    help="A checkpoint you kept (JSON, as `audit checkpoint` prints it): must be extended.",
)


@audit.command()
@click.option("--from-seq", type=click.IntRange(min=1, max=MAX_SEQ), default=1, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1, max=64),
    default=None,
    help="Worker processes checking chunks of records (default: one per CPU, at most 8; 1: none).",
)
@_public_key_option
@_checkpoint_file_option
@click.option("--no-derived", is_flag=True, help="Skip recomputing the derived tables.")
def verify(
    from_seq: int,
    workers: int | None,
    public_keys: tuple[str, ...],
    checkpoint_file: str | None,
    no_derived: bool,
) -> None:
    """Verify chain, checkpoints, anchors and derived state; exit 0 intact, 1 not (first bad
    seq shown)."""
    from audit.anchor import Anchors
    from audit.verify import verify as run_verify

    keys = _given_keys(public_keys)
    if keys is None:
        keys = _home_keys()
    auditor = _auditor_checkpoint(checkpoint_file)
    anchors = Anchors.from_settings(_settings())
    report = _run_db(
        lambda: _with_session(
            lambda s: run_verify(
                s,
                from_seq=from_seq,
                public_keys=keys,
                workers=workers,
                anchors=anchors,
                checkpoints=[auditor] if auditor else [],
                derived=not no_derived,
            )
        )
    )
    _echo_json(report.as_dict())
    sys.exit(int(ExitCode.OK if report.ok else ExitCode.TAMPERED))


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
        _fail(ExitCode.USAGE, str(exc))
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


def _open_output(output: str) -> tuple[IO[str], str, Path]:
    """A private temporary file beside `output` (so the export appears whole or not at all);
    exit 2 at once if it cannot be made there."""
    target = Path(output)
    if target.is_dir():
        _fail(ExitCode.USAGE, f"{output} is a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.")
    except OSError as exc:
        _fail(ExitCode.USAGE, f"cannot write {output}: {exc.strerror or exc}")
    return os.fdopen(fd, "w", encoding="utf-8", newline=""), tmp, target


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
@click.option(
    "--consistency-from",
    "consistency_from",
    multiple=True,
    type=click.IntRange(min=0, max=2**53 - 1),
    help="Carry a consistency proof from this checkpoint size (one an auditor kept).",
)
def export(
    fmt: str,
    since: str | None,
    until: str | None,
    output: str | None,
    checkpoint: bool,
    consistency_from: tuple[int, ...],
) -> None:
    """Stream the records with since <= at < until, with seq and hash on every line.

    The export carries a header (checkpoint, Merkle subtree hashes, consistency proofs) and a
    trailer, so `flexgate audit verify-export FILE` can check it offline. It stops at the
    checkpoint's own record. An empty range is refused (exit 4). With --output the file
    appears whole or not at all. Arguments are checked before any checkpoint is signed.
    """
    from audit.export import export_lines
    from audit.query import parse_when
    from audit.signing import Signer

    try:  # bad input is refused before anything is signed or written
        start, end = parse_when(since, "since"), parse_when(until, "until")
        if start is not None and end is not None and start >= end:
            raise InvalidQuery("since must be earlier than until")
    except InvalidQuery as exc:
        _fail(ExitCode.USAGE, str(exc))
    settings = _settings()
    sink = _open_output(output) if output is not None else None
    try:
        try:
            signer = Signer.load_or_create(settings.home) if checkpoint else None
        except SigningKeyError as exc:
            _fail(ExitCode.UNAVAILABLE, str(exc))

        async def work(session: Any) -> None:
            if signer is not None:
                await _checkpoint_if_behind(session, signer, settings)
            lines = await export_lines(
                session,
                fmt=fmt,
                since=start,
                until=end,
                public_key_pem=signer.public_key_pem if signer else _published_key(settings),
                consistency_from=consistency_from,
            )
            if sink is None:
                await _to_stdout(lines)
                return
            fh = sink[0]
            async for line in lines:
                fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

        _run_db(lambda: _with_session(work))
        if sink is not None:
            sink[0].close()
            os.replace(sink[1], sink[2])
            sink = None
    finally:
        if sink is not None:
            sink[0].close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sink[1])


async def _to_stdout(lines: Any) -> None:
    """Lines to stdout; the first is awaited before anything is written, so a refusal
    (nothing to export) leaves stdout empty."""
    try:
        async for line in lines:
            sys.stdout.write(line)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        sys.stderr.close()
        os._exit(0)


async def _checkpoint_if_behind(session: Any, signer: Any, settings: Settings) -> None:
    from audit.anchor import Anchors
    from audit.checkpoints import create_checkpoint, latest_checkpoint
    from audit.ledger import head

    async with session.begin():
        seq, _ = await head(session)
        last = await latest_checkpoint(session)
        if seq > (last.size + 1 if last else 0):
            anchors = Anchors.from_settings(settings, wait=True)
            await create_checkpoint(session, signer, anchors=anchors)


def _published_key(settings: Settings) -> str | None:
    from audit.signing import PUBLIC_KEY_FILE

    path = settings.home / PUBLIC_KEY_FILE
    try:
        return path.read_text() if path.exists() else None
    except OSError:
        return None


@audit.command()
@click.option(
    "--reanchor",
    is_flag=True,
    help="Sign without the consistency proof against the anchor, and anchor the ledger as it "
    "is now (after checking it: for a ledger that predates anchoring, or a lost anchor).",
)
def checkpoint(reanchor: bool) -> None:
    """Sign a checkpoint over every record now and anchor it; print it.

    Refused (exit 1, nothing signed) when the ledger does not extend the latest anchored
    checkpoint, unless --reanchor.
    """
    from audit.anchor import Anchors
    from audit.checkpoints import create_checkpoint
    from audit.signing import PUBLIC_KEY_FILE, Signer

    settings = _settings()
    try:
        signer = Signer.load_or_create(settings.home)
    except SigningKeyError as exc:
        _fail(ExitCode.UNAVAILABLE, str(exc))
    anchors = Anchors.from_settings(settings, wait=True)

    async def work(session: Any) -> Any:
        async with session.begin():
            return await create_checkpoint(session, signer, anchors=anchors, reanchor=reanchor)

    cp = _run_db(lambda: _with_session(work))
    _echo_json(
        {
            "checkpoint": cp.as_dict(),
            "public_key_file": str(settings.home / PUBLIC_KEY_FILE),
            "anchor_file": str(anchors.path),
        }
    )


@audit.command("verify-export")
@click.argument("file", type=click.Path(dir_okay=False))
@_public_key_option
@_checkpoint_file_option
def verify_export_command(
    file: str, public_keys: tuple[str, ...], checkpoint_file: str | None
) -> None:
    """Check an export offline: chain, Merkle root and signature of its checkpoint.

    The key must be trusted explicitly: --public-key (which replaces any other), else
    FLEXGATE_HOME's; the key inside the file is never used. Exit 0 verified, 1 not, 2 bad
    input (no trusted key, unreadable file). `python -m audit.offline` does the same with
    nothing but the standard library and `cryptography`.
    """
    from audit.offline import UsageError, verify_file

    keys = _given_keys(public_keys)
    if keys is None:
        keys = _home_keys()
    if not keys:
        _fail(
            ExitCode.USAGE,
            "no trusted public key: pass --public-key (FLEXGATE_HOME holds no signing key)",
        )
    auditor = _auditor_checkpoint(checkpoint_file)
    try:
        report = verify_file(file, keys, auditor)
    except UsageError as exc:
        _fail(ExitCode.USAGE, str(exc))
    _echo_json(report.as_dict())
    sys.exit(int(ExitCode.OK if report.ok else ExitCode.TAMPERED))


@audit.command()
@click.argument("seq", type=click.IntRange(min=1, max=MAX_SEQ))
@click.option(
    "--checkpoint", "size", type=click.IntRange(min=0, max=MAX_SEQ), help="Checkpoint size."
)
def proof(seq: int, size: int | None) -> None:
    """Print the inclusion proof of record SEQ against a checkpoint (default: the latest)."""
    from audit.checkpoints import inclusion_proof

    result = _run_db(lambda: _with_session(lambda s: inclusion_proof(s, seq, checkpoint_size=size)))
    _echo_json(result.as_dict())


@audit.command()
@click.argument("old_size", type=click.IntRange(min=0, max=MAX_SEQ))
@click.argument("new_size", type=click.IntRange(min=0, max=MAX_SEQ), required=False)
def consistency(old_size: int, new_size: int | None) -> None:
    """Print the consistency proof between two checkpoints (NEW default: the latest)."""
    from audit.checkpoints import consistency_proof

    result = _run_db(lambda: _with_session(lambda s: consistency_proof(s, old_size, new_size)))
    _echo_json(result.as_dict())
