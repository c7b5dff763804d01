"""Storage maintenance as a Prefect flow: expire backups by policy, sweep orphans.

maintenance:
1. Read the storage's catalog (manifests authenticated with the key).
2. Find which backups a restore verification proved (the verification artifacts).
3. Plan: the retention rules per database, then the safety rules (tasks/retention.py).
4. Publish the plan (markdown + table artifact) and one "backups of <db>" table per database.
5. Unless it is a dry run, delete: per batch a sealed journal, manifests, objects; then WAL,
   orphans past the grace period and the killed writers' temporaries. Every deleted object
   is logged.

`pgbackflow deploy` creates one scheduled ``maintenance/maintenance-<storage>`` deployment
per storage of the config; ``pgbackflow retention`` runs the same functions without Prefect.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, cast

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger

from pgbackflow.blocks.database import PostgresDatabase
from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.blocks.storage import storage_block_from_url
from pgbackflow.deployments.paging import read_all
from pgbackflow.flows.common import (
    RETRY_DELAYS,
    StorageBlock,
    artifact_key,
    publish_summary,
    resolve_keyring,
    retry_if_transient,
    tag_run,
)
from pgbackflow.flows.outcome import announce_success
from pgbackflow.tasks.catalog import DatabaseCatalog, StorageCatalog, backup_rows, read_catalog
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.retention import (
    RetentionLock,
    RetentionPlan,
    RetentionResult,
    RetentionSettings,
    execute_plan,
    plan_retention,
    policy_lookup,
)
from pgbackflow.tasks.storage import Storage, sweep_grace

_RETRYING: dict[str, Any] = {
    "retries": len(RETRY_DELAYS),
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_condition_fn": retry_if_transient,
    "cache_policy": NONE,
}
_VERIFIED = {
    # The descriptions flows/verification.py and flows/physical_verification.py publish.
    "verification": re.compile(r"^Successful: verification of (?P<backup_id>\S+)$"),
    "physical-verification": re.compile(r"^passed: verification of (?P<backup_id>\S+)$"),
}


@task(name="read-catalog", **_RETRYING)
def read_catalog_task(storage: Storage, keyring: Keyring, db_id: str | None,
                      grace_hours: float | None) -> StorageCatalog:
    """Everything the storage holds, per database; manifests authenticated."""
    storage.check_exists()
    catalog = read_catalog(storage, keyring, db_id=db_id, grace=sweep_grace(grace_hours))
    get_run_logger().info(
        "%s: %d databases/clusters, %d backups", storage.location, len(catalog.databases),
        sum(len(d.backups) for d in catalog.databases),
    )
    return catalog


def verified_backups(db_ids: Iterable[str]) -> dict[str, set[str]]:
    """``{db_id: backup ids}`` whose restore verification succeeded, from the summaries the
    Prefect API keeps, every version of them: ``verification-<db_id>`` of restore-verification
    ("Successful: verification of <id>") and ``physical-verification-<db_id>`` of
    verify-physical ("passed: verification of <id>"). The API failing is no reason to fail a
    maintenance run: nothing counts as verified."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.objects import Artifact
    from prefect.client.schemas.sorting import ArtifactSort

    found: dict[str, set[str]] = {}
    wanted = {artifact_key(kind, db_id): (db_id, pattern) for db_id in db_ids
              for kind, pattern in _VERIFIED.items()}
    if not wanted:
        return found
    try:
        with get_client(sync_client=True) as client:
            # Every version: each verification run adds one. Newest first by creation: one
            # published meanwhile shifts the pages by one (a repeat, dropped, never a loss).
            keys = ArtifactFilter(key=ArtifactFilterKey(any_=list(wanted)))
            artifacts: list[Artifact] = read_all(lambda offset: client.read_artifacts(
                artifact_filter=keys, sort=ArtifactSort.CREATED_DESC, offset=offset),
                key=lambda artifact: artifact.id)
    except Exception as exc:
        get_run_logger().warning("verification history unavailable (%s): no backup counts as "
                                 "verified", str(exc).splitlines()[0] if str(exc) else exc)
        return found
    for artifact in artifacts:
        if artifact.key not in wanted:
            continue
        db_id, pattern = wanted[artifact.key]
        match = pattern.match(artifact.description or "")
        if match:
            found.setdefault(db_id, set()).add(match["backup_id"])
    return found


@task(name="plan-retention", cache_policy=NONE)
def plan_retention_task(catalog: StorageCatalog, policies: dict[str, RetentionSettings],
                        grace_hours: float | None, prefer_verified: bool,
                        appendix: str = "") -> tuple[RetentionPlan, dict[str, set[str]]]:
    """What goes and why, what stays and by which rule; and the verified backups."""
    verified = (verified_backups(d.db_id for d in catalog.databases)
                if prefer_verified and FlowRunContext.get() else {})
    plan = plan_retention(catalog, policy_lookup(policies), grace=sweep_grace(grace_hours),
                          verified=verified)
    get_run_logger().info("%s", plan.render())
    publish_summary("retention", catalog.location, "```\n" + plan.render() + "\n```" + appendix,
                    f"retention plan for {catalog.location}", plan.rows())
    return plan, verified


def _publish_tables(plan: RetentionPlan, verified: dict[str, set[str]],
                    deleted: Iterable[str] | None) -> None:
    """After the run, one "backups of <db>" table per database: what is left and why it was
    kept (``deleted``: ``db/backup`` ids gone); a dry run lists what it would delete too."""
    gone = set(deleted or ())
    for db_plan in plan.databases:
        entry = db_plan.catalog
        reasons = db_plan.kept_reasons()
        if deleted is None:
            reasons |= {d.backup.backup_id: f"to be deleted: {d.why}" for d in db_plan.deleted}
        publish_backups_table(entry, reasons, verified.get(entry.db_id, ()),
                              {b.split("/", 1)[1] for b in gone
                               if b.split("/", 1)[0] == entry.db_id})


def publish_backups_table(entry: DatabaseCatalog, kept: dict[str, str] | None = None,
                          verified: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
    """The "backups of <db>" artifacts (markdown + table ``backups-tables-<db>``): id, kind,
    time, size, verified?, kept because (filled in by retention runs); ``exclude``: ids of
    backups no longer there."""
    rows = backup_rows(entry, kept, verified, exclude)
    lines = [f"# Backups of {entry.db_id}", "", "| id | kind | finished (UTC) | stored | "
             "verified | kept because |", "|---|---|---|---:|---|---|"]
    lines += [f"| {r['backup_id']} | {r['kind']} | {r['finished_at']} | {r['stored_bytes']} | "
              f"{r['verified']} | {r['kept_because']} |" for r in rows]
    if kept is None:
        lines += ["", "*kept because*: decided by the storage's next maintenance run."]
    publish_summary("backups", entry.db_id, "\n".join(lines), f"backups of {entry.db_id}", rows)


def refresh_backups_table(db_id: str, read: Callable[[], DatabaseCatalog | None],
                          verified: Callable[[], dict[str, set[str]]] | None = None) -> None:
    """After a backup: the database's "backups of <db>" table from the catalog entry
    ``read()`` returns (of a storage that holds the backup) and ``verified()`` (default:
    :func:`verified_backups` of ``db_id``, asked now). Outside a flow run nothing; a
    failure is a warning, never the backup's failure (the backup is already published)."""
    if FlowRunContext.get() is None:
        return
    try:
        entry = read()
        if entry is not None:
            known = verified() if verified is not None else verified_backups([db_id])
            publish_backups_table(entry, None, known.get(db_id, ()))
    except Exception as exc:
        get_run_logger().warning("backups table of %s not refreshed: %s", db_id,
                                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


@task(name="delete-expired", **_RETRYING)
def delete_expired_task(storage: Storage, plan: RetentionPlan, master_key: MasterKey,
                        lock: RetentionLock) -> RetentionResult:
    """Carry the plan out; one log line per deleted object. A retry re-reads nothing: what
    is already gone is skipped by the storage (deleting a missing object is no error)."""
    logger = get_run_logger()
    return execute_plan(storage, plan, master_key, logger.info, lock)


_SLOTS_QUERY = """
SELECT slot_name, slot_type, pg_wal_lsn_diff(
         CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
              ELSE pg_current_wal_lsn() END, restart_lsn)::bigint
  FROM pg_replication_slots WHERE NOT active ORDER BY slot_name"""


@task(name="check-replication-slots", cache_policy=NONE)
def inactive_slots_task(clusters: dict[str, PostgresDatabase]) -> list[dict[str, Any]]:
    """Inactive replication slots of the deployed clusters and the WAL each keeps on its
    server (an inactive slot holds WAL back until the disk fills). One warning line per
    slot; an unreachable server is one warning too, never the run's failure."""
    from pgbackflow.tasks.database import connect

    logger = get_run_logger()
    found: list[dict[str, Any]] = []
    for db_id, database in sorted(clusters.items()):
        try:
            with database.connection_settings() as settings, connect(settings) as conn:
                rows = conn.execute(_SLOTS_QUERY).fetchall()
        except Exception as exc:
            logger.warning("cluster %s: replication slots not checked (%s)", db_id,
                           str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        for name, kind, retained in rows:
            slot = {"db_id": db_id, "server": settings.display, "slot": name, "type": kind,
                    "retained_bytes": int(retained or 0)}
            found.append(slot)
            logger.warning(
                "cluster %s: replication slot %r (%s) on %s is inactive and keeps %.1f MB of WAL "
                "on the server: restart its WAL streamer, or drop the slot if nothing uses it "
                "(pgbackflow physical-retire)", db_id, name, kind, settings.display,
                slot["retained_bytes"] / 1e6)
    return found


def _slots_markdown(slots: list[dict[str, Any]]) -> str:
    lines = ["", "## Inactive replication slots", ""]
    if not slots:
        return "\n".join([*lines, "none"])
    lines += ["| cluster | server | slot | type | WAL retained |", "|---|---|---|---|---:|"]
    lines += [f"| {s['db_id']} | {s['server']} | {s['slot']} | {s['type']} | "
              f"{s['retained_bytes'] / 1e6:.1f} MB |" for s in slots]
    return "\n".join(lines)


@flow(name="maintenance", log_prints=False, on_completion=[announce_success])
def maintenance(
    storage: StorageBlock | str,
    policies: dict[str, RetentionSettings] | None = None,
    db_id: str | None = None,
    dry_run: bool = False,
    grace_hours: float | None = None,
    prefer_verified: bool = True,
    encryption_key: BackupEncryptionKey | None = None,
    key_file: str | None = None,
    encryption_key_block: str | None = None,
    clusters: dict[str, PostgresDatabase] | None = None,
) -> dict[str, Any]:
    """Expire backups by policy (the safety rules first), sweep orphans, publish the plan,
    and report the inactive replication slots of the deployed clusters.

    Args:
        storage: A storage block, or a URL / ``block:slug/name`` resolved where the run runs.
        policies: Retention settings per database id or pattern (``db1-all-*``); databases
            without one keep everything.
        db_id: Only this database or cluster.
        dry_run: Plan and publish; delete nothing.
        grace_hours: Orphans younger than this stay (default: PGBACKFLOW_SWEEP_GRACE_HOURS,
            else 24).
        prefer_verified: In a GFS period keep the newest verified backup (see
            tasks/retention.py).
        encryption_key: Master key block; else ``key_file``; else the default key file.
        key_file: Path of a master key file.
        encryption_key_block: Name of a saved BackupEncryptionKey block.
        clusters: ``{cluster id: server}`` of the clusters stored here, whose inactive
            replication slots are reported with the WAL they keep.
    """
    tag_run("maintenance", db_id)
    if encryption_key is None and encryption_key_block:
        encryption_key = cast(BackupEncryptionKey, BackupEncryptionKey.load(encryption_key_block))
    keyring = resolve_keyring(encryption_key, key_file)
    block = storage_block_from_url(storage) if isinstance(storage, str) else storage
    source = block.open()
    run = FlowRunContext.get()
    name = run.flow_run.name if run is not None and run.flow_run is not None else "?"
    lock = RetentionLock(source, f"maintenance run {name}")
    if not dry_run:  # one deleting run per storage, from the catalog read to the last delete
        source.check_exists()
        lock.acquire()
    try:
        catalog = read_catalog_task(source, keyring, db_id, grace_hours)
        slots = inactive_slots_task(clusters or {})
        plan, verified = plan_retention_task(catalog, dict(policies or {}), grace_hours,
                                             prefer_verified, _slots_markdown(slots))
        summary: dict[str, Any] = {"storage": source.location, "dry_run": dry_run,
                                   "planned_bytes_freed": plan.bytes_freed,
                                   "inactive_slots": slots}
        if dry_run:
            _publish_tables(plan, verified, None)
            return summary
        result = delete_expired_task(source, plan, keyring.current, lock)
        _publish_tables(plan, verified, result.deleted_backups)
    finally:
        if not dry_run:
            lock.release()
    summary.update(deleted_backups=result.deleted_backups,
                   deleted_objects=len(result.deleted_objects), bytes_freed=result.bytes_freed,
                   temporaries=len(result.temporaries))
    return summary


__all__ = ["maintenance", "publish_backups_table", "refresh_backups_table",
           "verified_backups"]
