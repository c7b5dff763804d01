"""The ``pgbackflow`` command line.

Commands run the same code the flows run. Errors print one line naming the input and what
to do, and exit non-zero; ``--debug`` shows the traceback as well.

One module per command group (``logical``, ``physical``, ``operate``, ``retention``, and the
``key`` and ``toolsets`` sub-commands); what they share is in ``common``, what they print in
``render``. Nothing here imports Prefect or the flows at load time: the commands that run no
flow (``list``, ``physical-list``, ``retention``, ``key seal-manifests``, ``key rotate``)
answer without it.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Annotated, Any

import typer
import typer.main

from pgbackflow import __version__
from pgbackflow.cli import logical, operate, physical, retention
from pgbackflow.cli.common import (
    quiet_prefect_console,
    state,
    user_errors,
    user_errors_without_flows,
)
from pgbackflow.cli.keys import key_app
from pgbackflow.cli.render import out
from pgbackflow.cli.toolsets import toolsets_app

__all__ = ["app", "main", "user_errors", "user_errors_without_flows"]

try:  # typer 0.2x parses with a click of its own (constraints.txt); before, with click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, UsageError  # type: ignore[assignment]

app = typer.Typer(
    name="pgbackflow",
    help="PostgreSQL backups, point-in-time recovery and restore verification on Prefect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(toolsets_app, name="toolsets")
app.add_typer(key_app, name="key")


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
    state["debug"] = debug
    quiet_prefect_console(debug)


# The order of `pgbackflow --help` (typer lists the commands as they are added).
app.command()(logical.backup)
app.command("list")(logical.list_command)
app.command()(logical.restore)
app.command()(logical.verify)
app.command("schedule-verification")(logical.schedule_verification)
app.command("schedule-physical")(physical.schedule_physical)
app.command()(operate.deploy)
app.command()(operate.doctor)
app.command("physical-retire")(physical.physical_retire)
app.command(hidden=True, context_settings={"allow_extra_args": True,
                                           "ignore_unknown_options": True})(operate.notify)
app.command()(operate.status)
app.command()(operate.daemon)
app.command()(operate.agent)
app.command()(operate.worker)
app.command()(operate.demo)
app.command()(logical.decrypt)
app.command("physical-backup")(physical.physical_backup)
app.command("wal-stream")(physical.wal_stream_command)
app.command()(physical.pitr)
app.command("verify-physical")(physical.verify_physical)
app.command("physical-list")(physical.physical_list)
app.command("retention")(retention.retention_command)


@cache
def click_command() -> Any:
    """The click command typer builds from ``app`` at every call (~20 ms): built once per
    process; the CLI's daemon builds it while it warms up, so its commands find it made."""
    return typer.main.get_command(app)


def main(prog_name: str | None = None) -> None:
    """Console-script entry point (and the CLI daemon's, per command): ``app()``, with its
    click command built once."""
    if sys.excepthook is not typer.main.except_hook:
        sys.excepthook = typer.main.except_hook  # as ``app()`` sets it
    # Not standalone: click's own error printing is a box of usage lines; ours is one line
    # (the exit codes stay click's: 2 for usage, the command's own otherwise).
    try:
        code = click_command().main(prog_name=prog_name, standalone_mode=False)
    except UsageError as exc:
        message = exc.format_message().rstrip(".")
        if message:  # none when no arguments printed the help (no_args_is_help)
            where = f": see '{exc.ctx.command_path} --help'" if exc.ctx is not None else ""
            print(f"error: {message}{where}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
