"""Physical backups: the runbook, as Prefect flows (full-backup and incremental-backup).

1. Inspect the cluster (version, system identifier, timeline, REPLICATION, summarize_wal).
2. Take the cluster's backup lock (a Prefect global concurrency limit of 1 per cluster).
3. Plan: a full, or an incremental on the newest backup; a broken chain forces a full.
4. Stream pg_basebackup into every storage; write the manifest last.
5. Publish the summary and the chain overview.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, datetime
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger

from pgbackflow.blocks.database import PostgresDatabase
from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.flows.common import (
    RETRY_DELAYS,
    ProgressArtifact,
    StorageBlock,
    artifact_key,
    in_parallel,
    open_storages,
    publish_everywhere,
    publish_summary,
    raise_if_incomplete,
    resolve_keyring,
    resolve_master_key,
    retry_if_transient,
    tag_run,
    write_statuses,
)
from pgbackflow.flows.maintenance import refresh_backups_table
from pgbackflow.flows.outcome import announce_success
from pgbackflow.tasks.catalog import Backup, DatabaseCatalog, read_catalog
from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.errors import PgBackflowError, ToolsetError
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.manifest import new_backup_id
from pgbackflow.tasks.physical import (
    BackupPlan,
    BaseBackupResult,
    ClusterFacts,
    IncrementalChainBroken,
    PhysicalManifest,
    backup_prefix,
    build_manifest,
    check_physical_source,
    parent_manifest_file,
    plan_backup_in,
    read_cluster_facts,
    take_base_backup,
    write_manifest,
)
from pgbackflow.tasks.reports import (
    ChainLink,
    DestinationStatus,
    PhysicalBackupReport,
    chain_markdown,
)
from pgbackflow.tasks.storage import Storage, prepare_backup_storages
from pgbackflow.tasks.toolsets import Toolset, find_toolset, toolset_for_server

_RETRYING: dict[str, Any] = {
    "retries": len(RETRY_DELAYS),
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_condition_fn": retry_if_transient,
    "cache_policy": NONE,
}
DEFAULT_LOCK_TIMEOUT_S = 3600.0


class ConcurrentBackupError(PgBackflowError):
    """Another backup of the same cluster holds the lock."""


def backup_lock_name(db_id: str) -> str:
    """The Prefect global concurrency limit that serialises a cluster's backups."""
    return f"pgbackflow-physical-backup-{db_id}"


@contextmanager
def cluster_backup_lock(db_id: str, timeout_s: float) -> Iterator[None]:
    """Hold the cluster's backup slot (limit 1) for the duration of the block.

    Outside a flow run (plain function calls in tests and scripts) there is no API to ask,
    and nothing is locked.
    """
    if FlowRunContext.get() is None:
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = backup_lock_name(db_id)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            # Another backup may create it at the same moment.
            with suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
    with ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True)
            )
        except TimeoutError:
            raise ConcurrentBackupError(
                f"another backup of cluster {db_id} is running (concurrency limit {name!r}); "
                f"this one waited {timeout_s:.0f} s and gave up: retry when it has finished"
            ) from None
        yield


@task(name="inspect-cluster", **_RETRYING)
def inspect_cluster(settings: ConnectionSettings) -> ClusterFacts:
    """Read the cluster's identity and check a physical backup can run against it."""
    facts = read_cluster_facts(settings)
    check_physical_source(facts, settings)
    get_run_logger().info(
        "cluster %s:%s: PostgreSQL %s, system identifier %s, timeline %s",
        settings.host, settings.port, facts.version, facts.system_identifier, facts.timeline,
    )
    return facts


def choose_toolset(major: int, what: str) -> Toolset:
    """Binaries of the server's major (incrementals and combining need exactly it)."""
    try:
        return find_toolset(major)
    except ToolsetError:
        try:
            return toolset_for_server(major)
        except ToolsetError as exc:
            raise ToolsetError(f"{what}: {exc}") from None


@task(name="plan-backup", **_RETRYING)
def plan_backup_task(
    storages: list[Storage], facts: ClusterFacts, incremental: bool, keyring: Keyring
) -> BackupPlan:
    """Full or incremental; every storage must hold the parent (with a manifest that
    verifies), else a full."""
    plans = [plan_backup_in(s, facts, keyring, incremental=incremental) for s in storages]
    parents = {p.parent.backup_id if p.parent else None for p in plans}
    if len(parents) > 1:
        return BackupPlan(
            "full", full_reason="the storages disagree on the newest backup of this cluster"
        )
    plan = plans[0]
    if plan.full_reason and incremental:
        get_run_logger().warning("taking a full backup instead: %s", plan.full_reason)
    return plan


@task(name="take-base-backup", **_RETRYING)
def take_base_backup_task(
    settings: ConnectionSettings,
    toolset: Toolset,
    storages: list[Storage],
    master_key: MasterKey,
    keyring: Keyring,
    prefix: str,
    parent: PhysicalManifest | None,
    size_hint: int,
    progress_key: str,
    tablespaces: bool,
) -> BaseBackupResult:
    """Stream pg_basebackup (full, or incremental on ``parent``) into every storage."""
    mode = "incremental" if parent else "full"
    with ProgressArtifact(progress_key, f"{mode} backup", size_hint or None) as progress:
        if parent is None:
            result = take_base_backup(
                settings, toolset, storages, master_key, prefix, progress=progress.update,
                tablespaces=tablespaces,
            )
        else:
            with parent_manifest_file(storages[0], parent, keyring) as manifest_path:
                result = take_base_backup(
                    settings, toolset, storages, master_key, prefix,
                    incremental_from=manifest_path, progress=progress.update,
                    tablespaces=tablespaces,
                )
        progress.finish(result.base.info.raw_size)
    return result


@task(name="publish-manifest", **_RETRYING)
def publish_physical_manifest(
    storages: list[Storage], manifest: PhysicalManifest, master_key: MasterKey
) -> list[DestinationStatus]:
    """Write the manifest (sealed with a MAC under ``master_key``) where every object is
    complete: the backup exists from now on."""
    return publish_everywhere(
        storages, lambda storage: write_manifest(storage, manifest, master_key),
        f"backup {manifest.backup_id}",
    )


def _chain_links(chain: Sequence[PhysicalManifest | Backup]) -> list[ChainLink]:
    return [
        ChainLink(
            backup_id=b.backup_id, mode="incremental" if b.mode == "incremental" else "full",
            parent_id=b.parent_id, finished_at=b.finished_at,
            start_lsn=b.start_lsn, end_lsn=b.end_lsn, timeline=b.timeline,
            stored_size=b.data_size if isinstance(b, Backup) else b.stored_size,
        )
        for b in chain
    ]


def _run_physical_backup(
    database: PostgresDatabase,
    storages: list[StorageBlock],
    encryption_key: BackupEncryptionKey | None,
    key_file: str | None,
    *,
    incremental: bool,
    lock_timeout_s: float,
) -> PhysicalBackupReport:
    started_at = datetime.now(UTC)
    job = "incremental" if incremental else "full"
    tag_run(job, database.db_id)
    master_key = resolve_master_key(encryption_key, key_file)
    keyring = resolve_keyring(encryption_key, key_file)
    targets = open_storages(storages)
    # Before anything is written: mistyped folders refused, leftovers of killed runs removed.
    for level, message in prepare_backup_storages(targets).messages():
        get_run_logger().log(level, "%s", message)

    # Every connection (the facts query, pg_basebackup) goes through the database's SSH
    # tunnel when it names a bastion.
    with database.connection_settings() as settings, \
            _locked_cluster(settings, job, lock_timeout_s) as (facts, toolset):
        plan = plan_backup_task(targets, facts, incremental, keyring)
        backup_id = new_backup_id()
        prefix = backup_prefix(facts.db_id, backup_id)
        progress_key = artifact_key("physical-backup-progress", facts.db_id)
        try:
            result = take_base_backup_task(
                settings, toolset, targets, master_key, keyring, prefix, plan.parent,
                facts.cluster_size, progress_key, bool(facts.extra_tablespaces),
            )
        except IncrementalChainBroken as exc:
            plan = BackupPlan("full", full_reason=f"the server cannot build on the chain: {exc}")
            get_run_logger().warning("taking a full backup instead: %s", plan.full_reason)
            result = take_base_backup_task(
                settings, toolset, targets, master_key, keyring, prefix, None,
                facts.cluster_size, progress_key, bool(facts.extra_tablespaces),
            )
        manifest = build_manifest(
            backup_id, facts, settings, toolset, master_key, plan, result, started_at
        )
        complete = [
            s for s in targets if all(s.location in w.completed_in for w in result.writes)
        ]
        published = {
            d.location: d for d in publish_physical_manifest(complete, manifest, master_key)
        }
    statuses = [
        published.get(s.location, s) for s in write_statuses(targets, *result.writes)
    ]
    chain: list[PhysicalManifest | Backup] = [manifest]
    stored = (read_catalog(complete[0], keyring, db_id=facts.db_id, kinds=("physical",))
              .database(facts.db_id, "physical") if complete else None)
    published_backup = stored.by_id().get(backup_id) if stored is not None else None
    if stored is not None and published_backup is not None:
        chain = [*reversed(stored.ancestors(published_backup)), published_backup]
    report = PhysicalBackupReport(
        backup_id=backup_id,
        status="complete" if all(s.status == "complete" for s in statuses) else "partial",
        mode=manifest.mode,
        requested="incremental" if incremental else "full",
        full_reason=manifest.full_reason,
        db_id=facts.db_id,
        parent_id=manifest.parent_id,
        server_version=facts.version,
        timeline=manifest.timeline,
        start_lsn=manifest.start_lsn,
        end_lsn=manifest.end_lsn,
        started_at=started_at,
        finished_at=manifest.finished_at,
        raw_size=manifest.raw_size,
        stored_size=manifest.stored_size,
        cluster_size=facts.cluster_size,
        destinations=statuses,
        chain=_chain_links(chain),
    )
    calls = [lambda: publish_summary("physical-backup", facts.db_id, report.markdown(),
                                     f"backup {backup_id}")]
    if stored is not None:
        catalog = stored
        calls += [lambda: publish_chain_overview(catalog),
                  lambda: refresh_backups_table(facts.db_id, lambda: catalog)]
    # Independent API calls, at once: the run ends (and a user's command returns) sooner.
    in_parallel(*calls)
    raise_if_incomplete(backup_id, statuses)
    return report


@contextmanager
def _locked_cluster(
    settings: ConnectionSettings, job: str, lock_timeout_s: float
) -> Iterator[tuple[ClusterFacts, Toolset]]:
    """The cluster's facts and toolset, holding its backup lock (one backup at a time)."""
    facts = inspect_cluster(settings)
    tag_run(job, facts.db_id)
    toolset = choose_toolset(facts.major, f"database {settings.display}")
    with cluster_backup_lock(facts.db_id, lock_timeout_s):
        yield facts, toolset


def publish_chain_overview(entry: DatabaseCatalog) -> None:
    """The newest chain (full + incrementals, sizes, LSNs) and the WAL coverage window."""
    db_id = entry.db_id
    backups = [b for b in entry.backups if b.kind == "physical"]
    if not backups:
        return
    chain = [*reversed(entry.ancestors(backups[-1])), backups[-1]]
    inventory = entry.wal_inventory()
    fulls = [b for b in backups if b.mode == "full"]
    window = None
    if fulls:
        end = max([backups[-1].finished_at, *([inventory.newest] if inventory.newest else [])])
        window = f"{fulls[0].finished_at:%Y-%m-%d %H:%M:%S} to {end:%Y-%m-%d %H:%M:%S} UTC"
    publish_summary(
        "physical-chain", db_id, "# Backup chain\n\n" + chain_markdown(_chain_links(chain), window),
        f"chain of {db_id}",
    )


@flow(name="full-backup", log_prints=False, on_completion=[announce_success])
def full_backup(
    database: PostgresDatabase,
    storages: list[StorageBlock],
    encryption_key: BackupEncryptionKey | None = None,
    key_file: str | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> PhysicalBackupReport:
    """Full physical backup of a cluster (pg_basebackup), encrypted, into every storage.

    Args:
        database: The source server (the role needs REPLICATION).
        storages: Where to write the backup.
        encryption_key: Master key block; else ``key_file``; else the default key file.
        key_file: Path of a master key file.
        lock_timeout_s: How long to wait for another backup of this cluster to finish.
    """
    return _run_physical_backup(
        database, storages, encryption_key, key_file, incremental=False,
        lock_timeout_s=lock_timeout_s,
    )


@flow(name="incremental-backup", log_prints=False, on_completion=[announce_success])
def incremental_backup(
    database: PostgresDatabase,
    storages: list[StorageBlock],
    encryption_key: BackupEncryptionKey | None = None,
    key_file: str | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> PhysicalBackupReport:
    """Incremental backup on the newest one (PostgreSQL 17+, summarize_wal=on).

    A broken chain (no parent, another system identifier, a timeline switch, missing WAL
    summaries) makes this a full backup; the report says why.
    """
    return _run_physical_backup(
        database, storages, encryption_key, key_file, incremental=True,
        lock_timeout_s=lock_timeout_s,
    )
