"""Logical restore: the runbook, as a Prefect flow.

1. Find the backup (an id or the latest) and check the target can take it.
2. Optionally replay the backup's roles.
3. Decrypt and pg_restore, checking the checksum of every stored byte.
4. Count the restored tables and compare with the manifest.
"""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger

from pgbackflow.blocks.database import PostgresDatabase
from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.flows.common import (
    RETRY_DELAYS,
    StorageBlock,
    publish_summary,
    resolve_keyring,
    retry_if_transient,
    tag_run,
)
from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.errors import PgBackflowError
from pgbackflow.tasks.inventory import Inventory
from pgbackflow.tasks.keys import Keyring
from pgbackflow.tasks.logical import (
    RestoreOptions,
    check_archive_database,
    check_restore_target,
    count_restored,
    create_missing_target,
    drop_unfinished_database,
    replay_globals,
    restore_dump,
    restore_target_database,
)
from pgbackflow.tasks.manifest import LogicalManifest, find_backup
from pgbackflow.tasks.reports import RestoreSummary
from pgbackflow.tasks.storage import Storage
from pgbackflow.tasks.toolsets import Toolset, toolset_for_server


class RowCountMismatchError(PgBackflowError):
    """The restored tables do not hold the rows the backup's manifest recorded."""


@task(name="find-backup", retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_if_transient, cache_policy=NONE)
def find_backup_task(
    storage: Storage, backup_id: str, db_id: str | None, keyring: Keyring
) -> LogicalManifest:
    """Read the manifest of the requested backup; only one whose MAC verifies is used."""
    manifest = find_backup(storage, backup_id, db_id, keyring)
    get_run_logger().info(
        "restoring backup %s of %s (PostgreSQL %s, %d tables)", manifest.backup_id,
        manifest.database.name, manifest.server_version, manifest.table_count,
    )
    return manifest


@task(name="check-target", cache_policy=NONE)
def check_target_task(
    target: ConnectionSettings,
    manifest: LogicalManifest,
    options: RestoreOptions,
    storage: Storage,
    keyring: Keyring,
) -> tuple[Toolset, str | None]:
    """Refuse an older or non-empty target; pick pg_restore for the newer of the two majors.

    With --create, also refuse a dump that would create another database than the manifest
    names (pg_restore takes the name from the dump). Nothing is written before this passes.
    Also returns the database this made (None: it existed), to drop if the restore does not
    finish. (Not one pg_restore --create makes: which run made it is not known for sure,
    and a drop could hit another run's.)
    """
    fresh = None
    if not options.create and create_missing_target(target):
        get_run_logger().info("target database %s did not exist: created it", target.display)
        fresh = target.dbname
    try:
        target_major = check_restore_target(target, manifest, options)
        pg_dump_major = int(manifest.pg_dump_version.split(".")[0])
        toolset = toolset_for_server(max(target_major, pg_dump_major))
        if options.create:
            check_archive_database(storage, manifest, keyring, toolset)
    except BaseException:
        if fresh is not None:
            _drop_unfinished(target, fresh)
        raise
    return toolset, fresh


def _drop_unfinished(server: ConnectionSettings, dbname: str) -> None:
    """Drop the database an unfinished restore made: a rerun then starts afresh."""
    problem = drop_unfinished_database(server, dbname)
    logger = get_run_logger()
    if problem is None:
        logger.info("dropped database %s, which this unfinished restore had made", dbname)
    else:
        logger.warning("could not drop database %s, which this unfinished restore made (%s): "
                       "drop it by hand before restoring again", dbname, problem)


@task(name="replay-globals", cache_policy=NONE)
def replay_globals_task(
    storage: Storage, manifest: LogicalManifest, keyring: Keyring, target: ConnectionSettings
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Create the backup's roles that the target lacks; leave existing roles untouched."""
    created, kept, warnings = replay_globals(storage, manifest, keyring, target)
    logger = get_run_logger()
    logger.info("roles created: %s; kept as they were: %s", created or "none", kept or "none")
    for warning in warnings:
        logger.warning(warning)
    return created, kept, warnings


@task(name="pg-restore", cache_policy=NONE)
def restore_dump_task(
    storage: Storage,
    manifest: LogicalManifest,
    keyring: Keyring,
    target: ConnectionSettings,
    toolset: Toolset,
    options: RestoreOptions,
) -> tuple[int, tuple[str, ...]]:
    """Decrypt (checking every chunk and the checksum) and pg_restore."""
    exit_code, missing_roles = restore_dump(storage, manifest, keyring, target, toolset, options)
    if missing_roles:
        get_run_logger().warning(
            "owners/grants skipped: roles missing on the target: %s (use --with-globals)",
            ", ".join(missing_roles),
        )
    return exit_code, missing_roles


@task(name="count-rows", cache_policy=NONE)
def count_rows_task(
    database: ConnectionSettings, manifest: LogicalManifest, jobs: int
) -> tuple[Inventory, tuple[str, ...], tuple[str, ...]]:
    """Count the restored tables (over ``jobs`` connections) and compare with the manifest."""
    inventory, differences, extra = count_restored(database, manifest, jobs)
    logger = get_run_logger()
    for difference in differences:
        logger.error("row count difference: %s", difference)
    if extra:
        logger.warning("tables in the target that are not in the backup: %s", ", ".join(extra))
    return inventory, differences, extra


@flow(name="logical-restore")
def logical_restore(
    storage: StorageBlock,
    target: PostgresDatabase,
    backup_id: str = "latest",
    db_id: str | None = None,
    options: RestoreOptions | None = None,
    encryption_key: BackupEncryptionKey | None = None,
    key_file: str | None = None,
) -> RestoreSummary:
    """Restore a logical backup into a PostgreSQL database.

    Args:
        storage: Where the backup is.
        target: The database to restore into (with ``options.create``: the maintenance
            database; the backed-up database is created next to it).
        backup_id: A backup id, or "latest".
        db_id: Which database's backups, when the storage holds several.
        options: jobs, clean, create, no_owner, with_globals.
        encryption_key: Master key block; else ``key_file``; else the default key file.
        key_file: Path of a master key file.
    """
    started = time.monotonic()
    options = options or RestoreOptions()
    keyring = resolve_keyring(encryption_key, key_file)
    source = storage.open()

    tag_run("restore", db_id)
    manifest = find_backup_task(source, backup_id, db_id, keyring)
    tag_run("restore", manifest.database.db_id)
    created: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    # Through the target's SSH tunnel when it names a bastion (psql, pg_restore, counts).
    with target.connection_settings() as target_settings:
        toolset, fresh = check_target_task(target_settings, manifest, options, source, keyring)
        try:
            if options.with_globals:
                created, kept, warnings = replay_globals_task(
                    source, manifest, keyring, target_settings)
            exit_code, missing_roles = restore_dump_task(
                source, manifest, keyring, target_settings, toolset, options
            )
        except BaseException:
            # Failed, interrupted (Ctrl-C) or refused (a replaced dump): a database this run
            # made goes, so the same command can run again.
            if fresh is not None:
                _drop_unfinished(target_settings, fresh)
            raise
        restored_db = restore_target_database(target_settings, manifest, options)
        inventory, differences, extra = count_rows_task(restored_db, manifest, options.jobs)
    if extra:
        warnings += (f"tables not in the backup were left in place: {', '.join(extra[:10])}",)

    summary = RestoreSummary(
        backup_id=manifest.backup_id,
        target=f"{target_settings.host}:{target_settings.port}",
        database=restored_db.dbname,
        status="restored-with-differences" if differences else "restored",
        pg_restore_exit_code=exit_code,
        duration_s=round(time.monotonic() - started, 2),
        tables=inventory.rows_by_table(),
        expected_tables=manifest.rows_by_table(),
        count_differences=list(differences),
        missing_roles=list(missing_roles),
        roles_created=list(created),
        roles_kept=list(kept),
        warnings=list(warnings),
    )
    publish_summary("restore", manifest.database.db_id, summary.markdown(),
                    f"restore of {manifest.backup_id}")
    if differences:
        raise RowCountMismatchError(
            f"restored {manifest.backup_id} into {restored_db.display} but row counts differ: "
            + "; ".join(differences[:5])
        )
    return summary
