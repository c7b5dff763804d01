"""What every command group shares: the error guards, the Prefect API failure handling and
the reading of the common arguments (a database DSN, a storage, a key file).

Errors print one line naming the input and what to do, and exit non-zero; ``--debug`` shows
the traceback as well. Imports nothing of Prefect or the flows at load time.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, ParamSpec, TypeVar

import typer
from rich.markup import escape
from typer.exceptions import TyperException

from pgbackflow.cli.render import err
from pgbackflow.tasks.errors import PgBackflowError

if TYPE_CHECKING:
    from pgbackflow.blocks.database import PostgresDatabase
    from pgbackflow.blocks.storage import LocalStorage, S3Storage
    from pgbackflow.tasks.catalog import Kind, StorageCatalog
    from pgbackflow.tasks.reports import BackupReport
    from pgbackflow.tasks.storage import Storage

P = ParamSpec("P")
R = TypeVar("R")

state = {"debug": False, "api_lost": False}
#: The environment before any command changed it (what `pgbackflow worker` hands on).
ORIGINAL_ENV = dict(os.environ)

# Options several commands share: one flag, one help text.
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
ReportAsJson = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]
KeyFile = Annotated[Path | None, typer.Option("--key-file", help="Master key file.")]
CreatedKeyFile = Annotated[
    Path | None, typer.Option("--key-file", help="Master key file (default: created).")
]
MacKeyFile = Annotated[Path | None, typer.Option(
    "--key-file", help="Verify each manifest's MAC with this master key (else: unverified).",
)]
KeyBlock = Annotated[
    str | None, typer.Option("--key-block", help="BackupEncryptionKey block name.")
]
Destinations = Annotated[
    list[str],
    typer.Option("--to", help="Storage: PATH, file://…, s3://bucket/prefix, block:slug/name."),
]
ListedStorage = Annotated[str, typer.Option("--from", help="Storage to list.")]
PhysicalStorage = Annotated[str, typer.Option("--from", help="Storage holding backups and WAL.")]


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
        prefect_env_defaults(state["debug"])
        from pgbackflow.tasks.process import forget_done

        forget_done()
        try:
            if not runs_flows:
                return func(*args, **kwargs)
            from pgbackflow.flows.common import cli_heartbeats, retry_listeners

            def retry_line(line: str) -> None:
                err.print(escape(line), style="yellow", highlight=False, soft_wrap=True)

            retry_listeners.append(retry_line)
            try:
                with _terminate_as_interrupt(), cli_heartbeats():
                    result = func(*args, **kwargs)
            finally:
                retry_listeners.remove(retry_line)
            if state["api_lost"]:
                _leave_dead_api(0)
            return result
        except PgBackflowError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            _end_interrupted()
        except (typer.Exit, typer.Abort, TyperException):
            raise  # typer's own exits and usage errors (typer 0.29 vendors its own click)
        except Exception as exc:
            from pgbackflow.tasks.process import unwound_by

            if unwound_by():
                # The interruption, caught and wrapped by a library on its way out (pydantic
                # reports one raised in its serializer as a PydanticSerializationError).
                if state["debug"]:
                    err.print_exception()
                _end_interrupted()
            api = _api_failure(exc)
            if api is not None:
                state["api_lost"] = True
                fail(api_unreachable_message(api))
            first = (str(exc).strip().splitlines() or ["no message"])[0]
            fail(f"unexpected {type(exc).__name__}: {first}; rerun with --debug for the "
                 "traceback")

    return wrapper


def _end_interrupted() -> NoReturn:
    """End as an interrupted command does: Ctrl-C exits 130; a stop (SIGTERM) dies of it."""
    from pgbackflow.tasks.process import done_before_interrupt, unwound_by

    for done in done_before_interrupt():
        err.print(done)
    if signal.SIGTERM in unwound_by():
        err.print("terminated")
        _die_of(signal.SIGTERM)
    err.print("interrupted")
    raise typer.Exit(130) from None


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a stop, a supervisor, ``timeout``) unwinds a command as Ctrl-C does: the
    flow's clean-up runs (a database a restore made is dropped, a sandbox is removed, an
    upload is aborted), then the process ends by SIGTERM (`_die_of`). Flows with their own
    SIGTERM handling (WAL streaming, verification) replace it while they run. A SIGTERM the
    command was started ignoring stays ignored."""
    from pgbackflow.tasks.process import signal_handler, unwind

    # Ctrl-C goes through `unwind` too, so a flow that ends Cancelled on either (verify)
    # still lets the command tell which one it was.
    with (signal_handler(signal.SIGTERM, unwind, unless_ignored=True),
          signal_handler(signal.SIGINT, unwind, unless_ignored=True)):
        yield


def _die_of(signum: int) -> NoReturn:
    """End by ``signum`` after the unwinding and the exit handlers (Prefect's log flush), as
    a process without the handler would have ended: a service manager counts a SIGTERM
    death as a clean stop, and the daemon's launcher dies of the same signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum)  # not reached: the signal ends the process


def fail(message: str) -> NoReturn:
    """Print ``error: MESSAGE`` (the traceback too with --debug) and exit 1."""
    if state["debug"]:
        err.print_exception()
    # The message is text, not markup: "[servers]" in it must print as written.
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False,
              soft_wrap=True)
    if state["api_lost"]:
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


def api_unreachable_message(cause: BaseException) -> str:
    from prefect.settings import PREFECT_API_URL

    reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return (f"Prefect API at {PREFECT_API_URL.value() or '(temporary local server)'} is not "
            f"reachable: {reason}; start it or fix PREFECT_API_URL")


def completed_despite_api(exc: Exception) -> BackupReport:
    """The report of the backup this command published, when only the Prefect API failed
    after it: the backup is good, and saying "failed" would send someone to redo it."""
    from pgbackflow.flows.common import published_backups

    api = _api_failure(exc)
    if api is None or not published_backups:
        raise exc
    report = published_backups[-1]
    state["api_lost"] = True
    where = ", ".join(d.location for d in report.destinations if d.status == "complete")
    err.print(f"[bold yellow]warning:[/] {escape(api_unreachable_message(api))}; backup "
              f"{escape(report.backup_id)} is complete in {escape(where)}, but its run is not "
              "recorded as completed there", markup=True, highlight=False, soft_wrap=True)
    return report


@contextmanager
def prefect_api_errors() -> Iterator[None]:
    """An unreachable Prefect API is one line, not a traceback."""
    import httpx

    try:
        yield
    except httpx.HTTPError as exc:
        raise PgBackflowError(api_unreachable_message(exc)) from None


def prefect_env_defaults(debug: bool) -> None:
    """The Prefect settings every command runs with (unless the user set them), set before
    Prefect is imported (it reads its settings then); the daemon sets them the same way."""
    quiet_prefect_console(debug)
    # Prefect's client retries each failed request 5 times with exponential backoff: a
    # dead API made a command hang for minutes. Two retries still ride out a busy server.
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "2")
    if not debug:
        # Prefect's machinery logs each event it cannot send to a dead API on stderr, and
        # its API log handler reports each batch it could not send (when raiseExceptions).
        os.environ.setdefault("PREFECT_INTERNAL_LOGGING_LEVEL", "CRITICAL")
        logging.raiseExceptions = False


def quiet_prefect_console(debug: bool) -> None:
    """Prefect's console logs (tracebacks included) stay out of the CLI unless --debug.

    Run logs still reach the Prefect API and UI. Must run before prefect is imported.
    """
    if not debug:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "CRITICAL")
    # The embedded (ephemeral) API needs more than the default 20 s on small machines.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def database_block(dsn: str, what: str) -> PostgresDatabase:
    from pydantic import SecretStr

    from pgbackflow.blocks.database import PostgresDatabase

    try:
        block = PostgresDatabase.from_dsn(dsn)
    except PgBackflowError as exc:
        raise PgBackflowError(f"{what}: {exc}") from None
    if block.password is None and os.environ.get("PGPASSWORD"):
        block = block.model_copy(update={"password": SecretStr(os.environ["PGPASSWORD"])})
    return block


def storage_block(url: str, what: str) -> LocalStorage | S3Storage:
    from pgbackflow.blocks.storage import storage_block_from_url

    try:
        return storage_block_from_url(url)
    except PgBackflowError as exc:
        raise PgBackflowError(f"{what}: {exc}") from None


def open_storage(url: str, what: str) -> Storage:
    """The storage of a CLI argument, for commands that run no flow: a path or URL opens
    without importing Prefect (~3 s of a read-only command); ``block:`` loads the block."""
    if url.strip().startswith("block:"):
        return storage_block(url, what).open()
    from pgbackflow.tasks.storage import parse_storage_url

    try:
        return parse_storage_url(url).open()
    except PgBackflowError as exc:
        raise PgBackflowError(f"{what}: {exc}") from None


def catalog_of(source: str, key_file: Path | None, db_id: str | None,
               kind: Kind) -> tuple[StorageCatalog, str]:
    """The catalog of the ``kind`` backups in the storage ``--from`` names, manifests verified
    with ``key_file`` when given, and the storage's location (``list``, ``physical-list``)."""
    from pgbackflow.tasks.catalog import read_catalog
    from pgbackflow.tasks.keys import Keyring, load_key_file

    storage = open_storage(source, f"--from {source}")
    storage.check_exists()  # a mistyped path is an error, not "0 backups"
    keyring = Keyring([load_key_file(key_file)]) if key_file else None
    return read_catalog(storage, keyring, db_id=db_id, kinds=(kind,)), storage.location


def key_file_or_default(key_file: Path | None) -> str:
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


def confirmed(question: str) -> bool:
    """Ask on the terminal; no answer (no terminal, end of input) is a no."""
    try:
        return typer.confirm(question, err=True)
    except typer.Abort:
        return False
