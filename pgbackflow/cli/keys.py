"""The ``key`` group: the master encryption key (init, seal-manifests, rotate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pgbackflow.cli import render
from pgbackflow.cli.common import (
    confirmed,
    open_storage,
    user_errors,
    user_errors_without_flows,
)
from pgbackflow.cli.render import err, out
from pgbackflow.tasks.errors import PgBackflowError

key_app = typer.Typer(help="The master encryption key.")


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
    storage = open_storage(source, f"--from {source}")
    storage.check_exists()
    question = (f"seal every manifest without a MAC in {storage.location} with key "
                f"{key.key_id_hex}? Only if nobody else could have written to it")
    if not yes and not confirmed(question):
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
    storage = open_storage(source, f"--from {source}")
    report = rotate_storage(storage, old, new, render.plain_line)
    render.rotation_report(report, new.key_id_hex)
