"""Physical backups (pg_basebackup) and WAL: physical-backup, wal-stream, pitr,
verify-physical, physical-list, schedule-physical, physical-retire."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Annotated

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
    PhysicalStorage,
    ReportAsJson,
    catalog_of,
    confirmed,
    database_block,
    key_file_or_default,
    prefect_api_errors,
    storage_block,
    user_errors,
    user_errors_without_flows,
)
from pgbackflow.cli.render import err, out
from pgbackflow.tasks.errors import PgBackflowError


@user_errors
def physical_backup(
    db: Annotated[str, typer.Option("--db", help="Source server DSN (role with REPLICATION).")],
    to: Destinations,
    incremental: Annotated[
        bool, typer.Option("--incremental", help="Incremental on the newest backup (PG 17+).")
    ] = False,
    key_file: CreatedKeyFile = None,
    as_json: AsJson = False,
) -> None:
    """Physical backup of a whole cluster: pg_basebackup full or incremental, encrypted."""
    database = database_block(db, "--db")
    storages = [storage_block(url, f"--to {url}") for url in to]
    key_path = key_file_or_default(key_file)
    from pgbackflow.flows.physical_backup import full_backup, incremental_backup

    run = incremental_backup if incremental else full_backup
    with render.progress_bar(not as_json):
        report = run(database=database, storages=storages, key_file=key_path)
    render.physical_backup_report(report, incremental=incremental, as_json=as_json)


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
    key_file: KeyFile = None,
    as_json: AsJson = False,
) -> None:
    """Stream the cluster's WAL into storage until stopped (Ctrl-C or SIGTERM)."""
    if partial_interval <= 0:
        raise PgBackflowError(f"--partial-interval {partial_interval} is invalid: use seconds > 0")
    database = database_block(db, "--db")
    storages = [storage_block(url, f"--to {url}") for url in to]
    key_path = key_file_or_default(key_file)
    from pgbackflow.flows.wal_stream import wal_stream

    report = wal_stream(
        database=database, storages=storages, key_file=key_path, slot=slot,
        spool_dir=str(spool_dir) if spool_dir else None, partial_interval_s=partial_interval,
        max_runtime_s=max_runtime,
    )
    render.wal_stream_report(report, as_json)
    if report.gaps and not as_json:
        raise typer.Exit(2)


@user_errors
def pitr(
    source: PhysicalStorage,
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
    key_file: KeyFile = None,
    as_json: AsJson = False,
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
        parent = to_dir.absolute().parent
        if not to_dir.exists() and not parent.is_dir():
            # As `backup --to`: a typo is an error, not a new tree of folders.
            raise PgBackflowError(
                f"--to-dir {to_dir} does not exist, nor does its parent folder {parent}: "
                "check the path (for a new tree, create the parent first); nothing was written")
    storage = storage_block(source, f"--from {source}")
    storage.open().check_exists()  # a mistyped path is not "no backups"
    key_path = key_file_or_default(key_file)
    from pgbackflow.flows.pitr_restore import pitr_restore

    try:
        with render.progress_bar(not as_json):
            report = pitr_restore(
                storage=storage, to_dir=str(to_dir or ""), db_id=db_id,
                target_time=target_time or "latest", start=start, port=port,
                storage_ref=source, key_file=key_path, docker_volume=docker,
                docker_image=image, docker_network=network,
            )
    except KeyboardInterrupt:
        from pgbackflow.tasks.pitr import INCOMPLETE_MARKER

        # Interrupted while the flow run was being closed: the restore itself is done (an
        # unfinished one keeps its marker), which the exit status alone would not tell.
        if (to_dir is not None and (to_dir / "PG_VERSION").is_file()
                and not (to_dir / INCOMPLETE_MARKER).exists()):
            running = ""
            with suppress(OSError, IndexError):  # postmaster.pid: pid, dir, start, port, ...
                port_line = (to_dir / "postmaster.pid").read_text().splitlines()[3]
                running = (f"; its server runs on port {port_line.strip()} (stop it with "
                           f"pg_ctl -D {to_dir} stop)")
            err.print(f"the restore into {to_dir} had finished: the directory is complete"
                      f"{running}")
        raise
    render.pitr_report(report, docker=bool(docker), as_json=as_json)


@user_errors
def verify_physical(
    source: PhysicalStorage,
    db_id: Annotated[
        str | None, typer.Option("--db-id", help="Cluster id, if the storage holds several.")
    ] = None,
    backup_id: Annotated[
        str | None, typer.Option("--backup-id", help="Backup to verify (default: newest).")
    ] = None,
    amcheck: Annotated[
        str, typer.Option("--amcheck", help="sample (largest tables + catalogs) or all.")
    ] = "sample",
    key_file: KeyFile = None,
    as_json: ReportAsJson = False,
) -> None:
    """Prove a physical chain restores: replay, pg_amcheck and row counts in a sandbox."""
    if amcheck not in ("sample", "all"):
        raise PgBackflowError(f"--amcheck {amcheck!r} is invalid: use sample or all")
    storage = storage_block(source, f"--from {source}")
    key_path = key_file_or_default(key_file)
    from pgbackflow.flows.physical_verification import physical_verification

    report = physical_verification(
        storage=storage, db_id=db_id, backup_id=backup_id,
        amcheck="all" if amcheck == "all" else "sample", key_file=key_path,
    )
    render.physical_verification_report(report, as_json)


@user_errors_without_flows
def physical_list(
    source: ListedStorage,
    db_id: Annotated[str | None, typer.Option("--db-id", help="Only this cluster.")] = None,
    key_file: MacKeyFile = None,
    as_json: AsJson = False,
) -> None:
    """Physical backup chains and WAL coverage (gaps included) in a storage."""
    catalog, location = catalog_of(source, key_file, db_id, "physical")
    render.physical_listing(catalog, location, verified=key_file is not None, as_json=as_json)


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
    key_block: KeyBlock = None,
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


@user_errors
def physical_retire(
    db_id: Annotated[str, typer.Option("--db-id", help="Cluster id of the deployments.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Stop a cluster's WAL streamer for good and drop its replication slot."""
    from pgbackflow.deployments.physical import retire_cluster, retirement_plan

    with prefect_api_errors():
        plan = retirement_plan(db_id)
        out.print(plan.describe(), highlight=False, markup=False)
        if not yes and not confirmed("retire this cluster?"):
            raise PgBackflowError(f"cluster {db_id} not retired: nothing was changed (confirm, "
                                  "or pass --yes)")
        for line in retire_cluster(plan):
            out.print(line, highlight=False, markup=False)


