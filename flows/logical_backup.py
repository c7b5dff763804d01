"""Logical backup: the runbook, as a Prefect flow.

1. Look at the source: version and identity; pick the pg_dump of the server's major (or
   the nearest newer).
2. Dump in an exported snapshot, streaming the encrypted archive into every storage; while
   it streams, count every table's rows in that snapshot and capture the globals (roles,
   memberships, tablespaces).
3. Store the globals next to the dump.
4. Write the manifest, last, where both objects are complete.
5. Publish the summary.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger

from pgbackflow import __version__
from pgbackflow.blocks.database import PostgresDatabase, checked_db_id
from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.flows.common import (
    RETRY_DELAYS,
    Background,
    ProgressArtifact,
    StorageBlock,
    artifact_key,
    in_parallel,
    open_storages,
    publish_everywhere,
    publish_summary,
    published_backups,
    raise_if_incomplete,
    resolve_keyring,
    resolve_master_key,
    retry_if_transient,
    tag_run,
    write_statuses,
)
from pgbackflow.flows.maintenance import refresh_backups_table, verified_backups
from pgbackflow.flows.outcome import announce_success
from pgbackflow.tasks.catalog import read_catalog
from pgbackflow.tasks.database import ConnectionSettings, query_error
from pgbackflow.tasks.errors import ConfigError, ToolsetError
from pgbackflow.tasks.inventory import SourceIdentity, read_identity
from pgbackflow.tasks.keys import MasterKey
from pgbackflow.tasks.logical import (
    DUMP_NAME,
    GLOBALS_NAME,
    DumpResult,
    ObjectWrite,
    dump_database,
)
from pgbackflow.tasks.manifest import (
    DatabaseInfo,
    LogicalManifest,
    TableRows,
    backup_prefix,
    new_backup_id,
    write_manifest,
)
from pgbackflow.tasks.pipeline import store_bytes
from pgbackflow.tasks.reports import BackupReport, DestinationStatus
from pgbackflow.tasks.storage import Storage, prepare_backup_storages
from pgbackflow.tasks.toolsets import Toolset, toolset_for_server

_RETRYING: dict[str, Any] = {
    "retries": len(RETRY_DELAYS),
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_condition_fn": retry_if_transient,
    "cache_policy": NONE,
}


@task(name="inspect-source", **_RETRYING)
def inspect_source(settings: ConnectionSettings) -> tuple[SourceIdentity, Toolset]:
    """Read the source's version and identity; pick pg_dump of its major (or newer)."""
    try:
        identity = read_identity(settings)
    except psycopg.Error as exc:
        # A session lost between connecting and reading (a restart) is worth a retry.
        raise query_error(settings, "reading its identity", exc) from None
    try:
        toolset = toolset_for_server(identity.major)
    except ToolsetError as exc:
        raise ToolsetError(f"database {settings.display}: {exc}") from None
    get_run_logger().info(
        "source %s: PostgreSQL %s, db id %s; using pg_dump %s from %s", settings.display,
        identity.server_version, identity.db_id, toolset.version, toolset.bin_dir,
    )
    return identity, toolset


@task(name="dump-database", **_RETRYING)
def dump_database_task(
    settings: ConnectionSettings,
    toolset: Toolset,
    storages: list[Storage],
    master_key: MasterKey,
    key: str,
    progress_key: str,
) -> DumpResult:
    """Stream pg_dump, encrypted, into every storage; meanwhile count rows in the same
    snapshot and capture the globals."""
    with ProgressArtifact(progress_key, f"dump of {settings.dbname}", None) as progress:
        result = dump_database(
            settings, toolset, storages, master_key, key, progress=progress.update
        )
        progress.finish(result.write.info.raw_size)
    return result


@task(name="store-globals", **_RETRYING)
def store_globals_task(
    script: bytes, storages: list[Storage], master_key: MasterKey, key: str
) -> ObjectWrite:
    """The globals, encrypted, as the backup's second object."""
    return store_bytes(script, storages, key, master_key)


@task(name="publish-manifest", **_RETRYING)
def publish_manifest(
    storages: list[Storage], manifest: LogicalManifest, master_key: MasterKey
) -> list[DestinationStatus]:
    """Write the manifest, sealed, to every storage where the backup's objects are complete."""
    return publish_everywhere(
        storages, lambda storage: write_manifest(storage, manifest, master_key),
        f"backup {manifest.backup_id}",
    )


def _build_manifest(
    backup_id: str,
    db_id: str,
    identity: SourceIdentity,
    toolset: Toolset,
    master_key: MasterKey,
    dump: DumpResult,
    globals_write: ObjectWrite,
    started_at: datetime,
) -> LogicalManifest:
    inventory = dump.inventory
    return LogicalManifest(
        backup_id=backup_id,
        database=DatabaseInfo(
            db_id=db_id, name=identity.dbname, host=identity.host, port=identity.port,
            system_identifier=identity.system_identifier, database_oid=identity.database_oid,
        ),
        server_version=identity.server_version,
        server_version_num=identity.server_version_num,
        pg_dump_version=toolset.version,
        compression=dump.compression.description,
        started_at=started_at,
        finished_at=datetime.now(UTC),
        dump=dump.write.info,
        globals=globals_write.info,
        key_id=master_key.key_id_hex,
        snapshot=dump.snapshot,
        tables=tuple(
            TableRows(schema_name=t.schema, table=t.table, key=t.key, rows=t.rows)
            for t in inventory.tables
        ),
        schema_count=inventory.schema_count,
        table_count=inventory.table_count,
        database_size=inventory.database_size,
        tool_version=f"pgbackflow {__version__}",
    )


#: Seconds a backup's concurrency slots outlive a killed run (see backup_slots).
LEASE_S = 60


def backup_limit_name(db_id: str) -> str:
    """The Prefect global concurrency limit (1) that keeps one backup per database at a time."""
    return f"pgbackflow-backup-{db_id}"


def server_limit_name(host: str, port: int) -> str:
    """The Prefect global concurrency limit of logical backups on one PostgreSQL server."""
    return "pgbackflow-server-" + re.sub(r"[^A-Za-z0-9._-]+", "-", f"{host}-{port}")


@contextmanager
def backup_slots(db_id: str, database: PostgresDatabase) -> Iterator[None]:
    """Hold a slot of the database's and of its server's concurrency limits while dumping.

    The limits are created by ``pgbackflow deploy`` (one per database, a per-server count);
    where they do not exist (a one-off CLI backup against a fresh API) nothing waits. Outside
    a flow run there is no API to ask.
    """
    if FlowRunContext.get() is None:
        yield
        return
    from prefect.concurrency.sync import concurrency

    names = [backup_limit_name(db_id), server_limit_name(database.host, database.port)]
    # A killed run's slots come back when its lease expires: 60 s (renewed every 45 s while
    # it runs), not Prefect's 300 s that held the database's next backup back for 5 minutes.
    with concurrency(names, occupy=1, strict=False, lease_duration=LEASE_S):
        yield


@flow(name="logical-backup", log_prints=False, on_completion=[announce_success])
def logical_backup(
    database: PostgresDatabase,
    storages: list[StorageBlock],
    encryption_key: BackupEncryptionKey | None = None,
    key_file: str | None = None,
    verify_after_backup: bool = False,
    database_name: str | None = None,
    db_id: str | None = None,
) -> BackupReport:
    """Back up one database with pg_dump into one or more storages, encrypted.

    Args:
        database: The source database (or its server, with ``database_name``).
        storages: Where to write the backup (all at once, from one dump).
        encryption_key: Master key block; else ``key_file``; else the default key file.
        key_file: Path of a master key file.
        verify_after_backup: Queue a restore verification of this backup on the database's
            verification deployment (older waiting verifications are cancelled).
        database_name: Back up this database of the block's server instead of the block's.
        db_id: The database's id in pgbackflow (storage folder, tags); default: the block's,
            else derived from the server's identity.
    """
    started_at = datetime.now(UTC)
    if db_id is not None:
        checked_db_id(db_id)
    if database_name:
        database = database.model_copy(update={"database": database_name, "db_id": None})
    tag_run("logical", db_id or database.db_id)
    master_key = resolve_master_key(encryption_key, key_file)
    targets = open_storages(storages)
    # Before anything is written: mistyped folders refused, leftovers of killed runs removed.
    for level, message in prepare_backup_storages(targets).messages():
        get_run_logger().log(level, "%s", message)

    # Every connection (the identity query, pg_dump, pg_dumpall) goes through the database's
    # SSH tunnel when it names a bastion.
    with database.connection_settings() as settings:
        identity, toolset = inspect_source(settings)
        db_id = known_id = db_id or database.db_id or identity.db_id
        # Sent while pg_dump runs, not before it: the run's tag of the database (waited for
        # before the run can end) and which of its backups were verified (for the backups
        # table at the end).
        tagging = Background(lambda: tag_run("logical", known_id))
        verified = Background(lambda: verified_backups([known_id]))
        backup_id = new_backup_id(started_at)
        prefix = backup_prefix(db_id, backup_id)
        try:
            with backup_slots(db_id, database):
                dump = dump_database_task(
                    settings, toolset, targets, master_key, prefix + DUMP_NAME,
                    artifact_key("backup-progress", db_id),
                )
        finally:
            tagging.result()
    # Only storages that hold a complete dump get the rest of the backup.
    holding_dump = [s for s in targets if s.location in dump.write.completed_in]
    globals_write = store_globals_task(
        dump.globals_script, holding_dump, master_key, prefix + GLOBALS_NAME
    )
    manifest = _build_manifest(
        backup_id, db_id, identity, toolset, master_key, dump, globals_write, started_at
    )
    complete = [s for s in holding_dump if s.location in globals_write.completed_in]
    published = {s.location: s for s in publish_manifest(complete, manifest, master_key)}
    statuses = [
        published.get(s.location, s) for s in write_statuses(targets, dump.write, globals_write)
    ]
    report = BackupReport.from_manifest(manifest, statuses)
    if any(status.status == "complete" for status in published.values()):
        # From here the backup exists whatever the Prefect API does (see published_backups).
        published_backups.append(report)
    holding = [s for s in complete if published[s.location].status == "complete"]

    def summary() -> None:
        publish_summary(
            "backup", report.db_id, report.markdown(), f"backup {report.backup_id}",
            [{"table": name, "rows": rows} for name, rows in report.tables.items()],
        )

    def backups_table() -> None:
        if holding:
            refresh_backups_table(report.db_id, lambda: read_catalog(
                holding[0], resolve_keyring(encryption_key, key_file), db_id=report.db_id,
                kinds=("logical",)).database(report.db_id, "logical"), verified.result)

    in_parallel(summary, backups_table)

    raise_if_incomplete(backup_id, statuses)
    if verify_after_backup:
        stored_in = [d.location for d in report.destinations if d.status == "complete"]
        report = report.model_copy(update={"verification": request_verification(
            report.db_id, report.backup_id, stored_in)})
    return report


@task(name="request-verification", cache_policy=NONE)
def request_verification(db_id: str, backup_id: str, stored_in: list[str]) -> str:
    """Queue a verification of the new backup; what became of the request, in a line.

    Not queued (no deployment, or one that reads another storage) is a warning, not a
    failure: the backup itself is good."""
    from pgbackflow.deployments.verification import deployment_name, queue_verification

    logger = get_run_logger()
    try:
        outcome = f"queued (flow run {queue_verification(db_id, backup_id, stored_in)})"
    except ObjectNotFound:
        outcome = (f"not queued: no verification deployment {deployment_name(db_id)} for "
                   f"database {db_id}: create it with pgbackflow schedule-verification")
    except ConfigError as exc:
        outcome = f"not queued: {exc}"
    log = logger.info if outcome.startswith("queued") else logger.warning
    log("verification of %s %s", backup_id, outcome)
    return outcome
