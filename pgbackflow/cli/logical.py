"""Logical backups (pg_dump): backup, list, restore, verify, schedule-verification, decrypt."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from pgbackflow.cli import render
from pgbackflow.cli.common import (
    AsJson,
    CreatedKeyFile,
    Destinations,
    KeyBlock,
    KeyFile,
    ListedStorage,
    MacKeyFile,
    ReportAsJson,
    catalog_of,
    completed_despite_api,
    database_block,
    key_file_or_default,
    storage_block,
    user_errors,
    user_errors_without_flows,
)
from pgbackflow.cli.render import err, out
from pgbackflow.tasks.errors import PgBackflowError


@user_errors
def backup(
    db: Annotated[str, typer.Option("--db", help="Source database DSN (URI or key=value).")],
    to: Destinations,
    key_file: CreatedKeyFile = None,
    verify_after: Annotated[
        bool, typer.Option("--verify-after", help="Queue a restore verification of it.")
    ] = False,
    db_id: Annotated[
        str | None,
        typer.Option("--db-id", help="Id of the database in pgbackflow (default: derived)."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Back up one database (pg_dump, encrypted) into one or more storages."""
    database = database_block(db, "--db")
    storages = [storage_block(url, f"--to {url}") for url in to]
    key_path = key_file_or_default(key_file)
    from pgbackflow.flows.common import published_backups
    from pgbackflow.flows.logical_backup import logical_backup

    published_backups.clear()  # only this command's backup counts as done despite the API
    with render.progress_bar(not as_json):
        try:
            report = logical_backup(database=database, storages=storages, key_file=key_path,
                                    verify_after_backup=verify_after, db_id=db_id)
        except Exception as exc:
            report = completed_despite_api(exc)
    render.backup_report(report, as_json)


@user_errors_without_flows
def list_command(
    source: ListedStorage,
    db_id: Annotated[str | None, typer.Option("--db-id", help="Only this database.")] = None,
    key_file: MacKeyFile = None,
    as_json: AsJson = False,
) -> None:
    """List the complete backups in a storage, oldest first; refused manifests last."""
    catalog, location = catalog_of(source, key_file, db_id, "logical")
    backups, refused = catalog.listing("logical")
    render.backup_listing(backups, refused, location, verified=key_file is not None,
                          as_json=as_json)


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
    key_file: KeyFile = None,
    as_json: AsJson = False,
) -> None:
    """Restore a backup into a database, then compare row counts with the backup's."""
    from pgbackflow.tasks.logical import RestoreOptions

    options = RestoreOptions(
        jobs=jobs, clean=clean, create=create, no_owner=no_owner, with_globals=with_globals
    )
    storage = storage_block(source, f"--from {source}")
    storage.open().check_exists()  # a mistyped path is not "no backups"
    database = database_block(target, "--target")
    key_path = key_file_or_default(key_file)
    from pgbackflow.flows.logical_restore import logical_restore

    with render.progress_bar(not as_json):
        summary = logical_restore(
            storage=storage, target=database, backup_id=backup_id, db_id=db_id, options=options,
            key_file=key_path,
        )
    render.restore_summary(summary, as_json)


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
    key_file: KeyFile = None,
    as_json: ReportAsJson = False,
) -> None:
    """Restore a backup into a throwaway sandbox and compare every table's rows."""
    if sandbox not in ("docker", "local"):
        raise PgBackflowError(f"--sandbox {sandbox!r} is unknown: use docker or local")
    kind: Literal["docker", "local"] = "docker" if sandbox == "docker" else "local"
    if "{major}" not in image:
        raise PgBackflowError(f"--image {image!r} has no {{major}}: e.g. postgres:{{major}}")
    storage = storage_block(source, f"--from {source}")
    storage.open().check_exists()  # a mistyped path is not "no backups"
    key_path = key_file_or_default(key_file)
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
        from pgbackflow.tasks.process import unwound_by

        if unwound_by():  # Ctrl-C or a stop: end as every command does then
            raise KeyboardInterrupt from None
        raise PgBackflowError(f"verification canceled: {canceled}") from None
    render.verification_report(report, as_json)
    if report.status != "Successful":
        raise PgBackflowError(f"verification {report.status.lower()}: {report.failure}")


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
    key_block: KeyBlock = None,
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
    problem = _nothing_to_verify(source, db_id)
    if problem:
        err.print(f"warning: {problem}", highlight=False, markup=False, soft_wrap=True)


def _nothing_to_verify(source: str, db_id: str) -> str | None:
    """Why the deployment's runs would find no backup, as seen from this host (the agents
    may see another folder of the same name: a warning, not a refusal)."""
    try:
        entry = catalog_of(source, None, db_id, "logical")[0].database(db_id, "logical")
    except PgBackflowError as exc:
        return (f"--from {source} cannot be read from this host ({exc}); the verification "
                "agents must be able to")
    if entry is None or not entry.backups:
        return (f"--from {source} holds no logical backup of {db_id} (seen from this host): "
                "its verifications fail until one is stored there; `pgbackflow list --from "
                f"{source}` shows the database ids it holds")
    return None


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
