"""Physical backups, continuous WAL and point-in-time restore: the runbooks, as Prefect flows.

full_backup / incremental_backup:
1. Inspect the cluster (version, system identifier, timeline, REPLICATION, summarize_wal).
2. Take the cluster's backup lock (a Prefect global concurrency limit of 1 per cluster).
3. Plan: a full, or an incremental on the newest backup; a broken chain forces a full.
4. Stream pg_basebackup into every storage; write the manifest last.
5. Publish the summary and the chain overview.

wal_stream: pg_receivewal on a replication slot, every segment shipped; runs until stopped.
A deployment with a short interval schedule and a concurrency limit of 1 (new runs cancelled
while one runs) restarts it after a crash; the slot keeps the WAL meanwhile.

pitr_restore: plan → unpack/combine → fetch WAL → configure recovery → restore.sh → start.
"""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
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
    open_storages,
    publish_everywhere,
    publish_summary,
    raise_if_incomplete,
    resolve_keyring,
    resolve_master_key,
    retry_if_transient,
    stage_as_task,
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
    resolve_db_id,
    take_base_backup,
    write_manifest,
)
from pgbackflow.tasks.pitr import (
    PitrPlan,
    StartedServer,
    allow_recovery_start,
    build_data_dir,
    configure_recovery,
    finish_restore,
    free_port,
    parse_target_time,
    plan_pitr,
    remove_wal_cache,
    restore_dir_of,
    start_and_wait,
    write_restore_script,
)
from pgbackflow.tasks.pitr_docker import restore_into_docker_volume
from pgbackflow.tasks.process import OsUser
from pgbackflow.tasks.reports import (
    ChainLink,
    DestinationStatus,
    PhysicalBackupReport,
    PitrReport,
    WalStreamReport,
    chain_markdown,
)
from pgbackflow.tasks.storage import Storage, prepare_backup_storages
from pgbackflow.tasks.toolsets import Toolset, find_toolset, toolset_for_server
from pgbackflow.tasks.verify_physical import (
    AmcheckMode,
    PhysicalVerificationReport,
    verify_physical_backup,
)
from pgbackflow.tasks.wal import (
    DEFAULT_PARTIAL_INTERVAL_S,
    DEFAULT_SLOT,
    ShippingStatus,
    WalShipper,
    WalStreamer,
)

logger = logging.getLogger("pgbackflow.flows.physical")

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


# ---------------------------------------------------------------------------------------
# Backups


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
        storages, lambda storage: write_manifest(storage, manifest, master_key)
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
    publish_summary("physical-backup", facts.db_id, report.markdown(), f"backup {backup_id}")
    if stored is not None:
        publish_chain_overview(stored)
        refresh_backups_table(facts.db_id, lambda: stored)
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


# ---------------------------------------------------------------------------------------
# WAL


def default_spool_dir(db_id: str) -> Path:
    """Where pg_receivewal writes before shipping: kept across restarts (it is the resume point).

    ``PGBACKFLOW_SPOOL_DIR`` overrides the base folder.
    """
    base = os.environ.get("PGBACKFLOW_SPOOL_DIR")
    if base:
        return Path(base) / db_id
    if os.geteuid() == 0:
        return Path("/var/lib/pgbackflow/wal-spool") / db_id
    return Path.home() / ".local/share/pgbackflow/wal-spool" / db_id


@contextmanager
def _stop_on_sigterm(stop: threading.Event) -> Iterator[None]:
    """A cancelled run (SIGTERM) stops streaming gracefully: the last WAL is shipped first."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: the caller owns signals
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@task(name="stream-wal", **_RETRYING)
def stream_wal_task(
    settings: ConnectionSettings,
    toolset: Toolset,
    storages: list[Storage],
    master_key: MasterKey,
    db_id: str,
    spool: Path,
    slot: str,
    partial_interval_s: float,
    max_runtime_s: float | None,
) -> ShippingStatus:
    """Run pg_receivewal on the slot and ship every segment until stopped."""
    logger = get_run_logger()
    shipper = WalShipper(spool, storages, master_key, db_id, partial_interval=partial_interval_s)

    def report(status: ShippingStatus) -> None:
        logger.info(
            "shipped %d segments (last %s) and %d partial uploads, %.1f MB stored",
            status.segments_shipped, status.last_segment, status.partials_shipped,
            status.bytes_shipped / 1e6,
        )
        emit_wal_alive(db_id, slot, status)

    stop = threading.Event()
    streamer = WalStreamer(settings, toolset, shipper, slot=slot, on_status=report)
    with _stop_on_sigterm(stop), _alive_events(db_id, slot, shipper, stop):
        return streamer.run(stop, max_seconds=max_runtime_s)


def emit_wal_alive(db_id: str, slot: str, status: ShippingStatus) -> None:
    """Tell Prefect this cluster's streamer lives (the restart automation waits for these)."""
    from prefect.events import emit_event

    from pgbackflow.deployments.automations import WAL_ALIVE_EVENT, wal_resource_id

    emit_event(
        event=WAL_ALIVE_EVENT,
        resource={"prefect.resource.id": wal_resource_id(db_id),
                  "prefect.resource.name": f"WAL of {db_id}", "pgbackflow.slot": slot},
        payload={"segments_shipped": status.segments_shipped,
                 "partials_shipped": status.partials_shipped,
                 "last_segment": status.last_segment, "bytes_shipped": status.bytes_shipped},
    )


@contextmanager
def _alive_events(
    db_id: str, slot: str, shipper: WalShipper, stop: threading.Event
) -> Iterator[None]:
    """An alive event now and every WAL_ALIVE_S while streaming, even when no WAL is written."""
    from pgbackflow.deployments.automations import WAL_ALIVE_S

    done = threading.Event()

    def beat() -> None:
        while True:
            try:
                emit_wal_alive(db_id, slot, shipper.status)
            except Exception as exc:  # events are for supervision: never stop the stream
                logger.warning("WAL alive event not sent: %s", exc)
            if done.wait(WAL_ALIVE_S) or stop.is_set():
                return

    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,),
                              name="pgbackflow-wal-alive", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)


@flow(name="wal-stream", log_prints=False)
def wal_stream(
    database: PostgresDatabase,
    storages: list[StorageBlock],
    encryption_key: BackupEncryptionKey | None = None,
    key_file: str | None = None,
    slot: str = DEFAULT_SLOT,
    spool_dir: str | None = None,
    partial_interval_s: float = DEFAULT_PARTIAL_INTERVAL_S,
    max_runtime_s: float | None = None,
) -> WalStreamReport:
    """Stream the cluster's WAL into every storage until cancelled (or ``max_runtime_s``).

    Args:
        database: The source server (the role needs REPLICATION).
        storages: Where WAL goes.
        encryption_key: Master key block; else ``key_file``; else the default key file.
        key_file: Path of a master key file.
        slot: Physical replication slot (created if missing).
        spool_dir: pg_receivewal's folder; default under /var/lib/pgbackflow/wal-spool.
        partial_interval_s: Seconds between uploads of the segment in progress (the RPO).
        max_runtime_s: Stop after this long (None: run until cancelled).
    """
    tag_run("wal", database.db_id)
    master_key = resolve_master_key(encryption_key, key_file)
    targets = open_storages(storages)
    # Leftovers of killed writers go before streaming starts; a running streamer's uploads
    # are younger than the grace period (local ones are also locked by their writer).
    for level, message in prepare_backup_storages(targets).messages():
        get_run_logger().log(level, "%s", message)
    # pg_receivewal and the slot's queries go through the SSH tunnel when there is one.
    with database.connection_settings() as settings:
        facts = inspect_cluster(settings)
        tag_run("wal", facts.db_id)
        toolset = choose_toolset(facts.major, f"database {settings.display}")
        spool = Path(spool_dir) if spool_dir else default_spool_dir(facts.db_id)
        status = stream_wal_task(
            settings, toolset, targets, master_key, facts.db_id, spool, slot,
            partial_interval_s, max_runtime_s,
        )
    stored = read_catalog(targets[0], resolve_keyring(encryption_key, key_file),
                          db_id=facts.db_id, kinds=("physical",)).database(facts.db_id)
    gaps = list(stored.wal_gaps) if stored else []
    report = WalStreamReport(
        db_id=facts.db_id, slot=slot, segments_shipped=status.segments_shipped,
        partials_shipped=status.partials_shipped, last_segment=status.last_segment,
        bytes_shipped=status.bytes_shipped, gaps=gaps,
    )
    if gaps:
        get_run_logger().warning("WAL of %s has gaps: %s", facts.db_id, ", ".join(gaps[:5]))
    if stored is not None:
        publish_chain_overview(stored)
    return report


def wal_gaps(storage: Storage, db_id: str, keyring: Keyring | None = None) -> list[str]:
    """Where the stored WAL a restore replays has holes: ``<segment(s)> (LSN a to b)``
    (the catalog's :attr:`~pgbackflow.tasks.catalog.DatabaseCatalog.wal_gaps`: from the
    oldest full the WAL reaches back to, across timeline switches as replay follows them)."""
    entry = read_catalog(storage, keyring, db_id=db_id, kinds=("physical",)).database(db_id)
    return list(entry.wal_gaps) if entry else []


# ---------------------------------------------------------------------------------------
# Point-in-time restore


@task(name="plan-restore", **_RETRYING)
def plan_restore_task(
    storage: Storage, db_id: str | None, target_time: str, keyring: Keyring
) -> PitrPlan:
    """Pick the chain and WAL for the target (only manifests that verify with ``keyring``);
    refuse targets outside the window."""
    plan = plan_pitr(
        storage, resolve_db_id(storage, db_id), parse_target_time(target_time), keyring
    )
    get_run_logger().info(
        "restoring %s: chain %s, %d WAL files, window %s", plan.db_id,
        " -> ".join(b.backup_id for b in plan.chain), len(plan.wal_segments), plan.window,
    )
    return plan


@task(name="build-data-dir", cache_policy=NONE)
def build_data_dir_task(
    storage: Storage, plan: PitrPlan, keyring: Keyring, to_dir: Path, toolset: Toolset
) -> int:
    """Unpack (checksums checked) and combine the chain into the target directory, fetching
    (and checking) the WAL the replay needs meanwhile; returns the WAL files fetched."""
    logger = get_run_logger()
    total = sum(b.base.raw_size for b in plan.chain)
    with ProgressArtifact(
        artifact_key("pitr-progress", plan.db_id), "restore of the backup chain", total
    ) as progress:
        fetched = build_data_dir(
            storage, plan, keyring, to_dir, toolset, on_step=logger.info,
            progress=progress.update, mark_incomplete=True,
        )
        progress.finish(total)
    return len(fetched)


@task(name="start-restored-server", cache_policy=NONE)
def start_server_task(to_dir: Path, toolset: Toolset, user: OsUser, port: int) -> StartedServer:
    """Start the server and wait until it finished recovery and is promoted."""
    server = start_and_wait(to_dir, toolset, user, port)
    remove_wal_cache(to_dir)
    if not server.reached_target:
        get_run_logger().info(
            "no transaction committed after the target time: replayed to the end of the WAL, "
            "which holds the same data"
        )
    return server


@flow(name="pitr-restore", log_prints=False)
def pitr_restore(
    storage: StorageBlock,
    to_dir: str,
    db_id: str | None = None,
    target_time: str = "latest",
    start: bool = False,
    port: int | None = None,
    os_user: str | None = None,
    storage_ref: str | None = None,
    encryption_key: BackupEncryptionKey | None = None,
    key_file: str | None = None,
    docker_volume: str | None = None,
    docker_image: str | None = None,
    docker_network: str | None = None,
) -> PitrReport:
    """Restore a cluster to a point in time into an empty directory.

    Args:
        storage: Where the backups and WAL are.
        to_dir: Missing or empty directory for the restored data directory.
        db_id: The cluster (``cluster-<system identifier>``); optional if only one is stored.
        target_time: A timestamp with zone ("2026-11-21 10:15:30+00") or "latest".
        start: Start the server and wait until it is promoted.
        port: Port for the started server (default: a free one).
        os_user: OS user that runs the server (default: postgres when root).
        storage_ref: How restore.sh names the storage (default: its location).
        encryption_key: Master key block; else ``key_file``; else the default key file.
        key_file: Path of a master key file.
        docker_volume: Restore into this Docker volume instead of ``to_dir`` (``--docker``).
        docker_image: Image for the volume's server (default ``postgres:<major>``).
        docker_network: Docker network for the started container.
    """
    began = time.monotonic()
    source = storage.open()
    keyring = resolve_keyring(encryption_key, key_file)
    directory = Path(to_dir).absolute()
    tag_run("pitr", db_id)
    plan = plan_restore_task(source, db_id, target_time, keyring)
    tag_run("pitr", plan.db_id)
    toolset = choose_toolset(plan.newest.server_major, f"restore of {plan.db_id}")
    if docker_volume:
        # Each stage (build, copy into the volume, start) is a task run of its own.
        result = restore_into_docker_volume(
            source, plan, keyring, volume=docker_volume, image=docker_image,
            network=docker_network, start=start, port=port, toolset=toolset,
            on_step=get_run_logger().info, run_stage=stage_as_task,
        )
        report = PitrReport(
            db_id=plan.db_id,
            target="latest" if plan.target is None else plan.target.isoformat(),
            chain=[f"{b.mode} {b.backup_id}" for b in plan.chain],
            wal_segments=result.wal_files,
            data_dir=f"docker volume {result.volume} ({result.pgdata})",
            script=result.run_command,
            window=plan.window,
            started=result.container_id is not None,
            port=result.port if result.container_id else None,
            last_transaction=result.last_transaction,
            reached_target=result.reached_target,
            container=result.container_name if result.container_id else None,
            duration_s=time.monotonic() - began,
        )
        publish_summary("pitr-restore", plan.db_id, report.markdown(), f"restore of {plan.db_id}")
        return report
    wal_count = build_data_dir_task(source, plan, keyring, directory, toolset)
    listen_port = (port or free_port()) if start else None
    configure_recovery(directory, plan.target, port=listen_port)
    script = restore_dir_of(directory) / "restore.sh"
    write_restore_script(
        script, plan, storage_url=storage_ref or source.location,
        key_file=Path(key_file) if key_file else None,
    )
    server: StartedServer | None = None
    if start:
        from pgbackflow.tasks.cluster import resolve_os_user

        assert listen_port is not None
        allow_recovery_start(directory)
        server = start_server_task(directory, toolset, resolve_os_user(os_user), listen_port)
    finish_restore(directory)
    report = PitrReport(
        db_id=plan.db_id,
        target="latest" if plan.target is None else plan.target.isoformat(),
        chain=[f"{b.mode} {b.backup_id}" for b in plan.chain],
        wal_segments=wal_count,
        data_dir=str(directory),
        script=str(script),
        window=plan.window,
        started=server is not None,
        port=server.port if server else None,
        last_transaction=server.last_transaction if server else None,
        reached_target=server.reached_target if server else None,
        duration_s=time.monotonic() - began,
    )
    publish_summary("pitr-restore", plan.db_id, report.markdown(), f"restore of {plan.db_id}")
    return report


# ---------------------------------------------------------------------------------------
# Verification


class PhysicalVerificationFailed(PgBackflowError):
    """The chain did not restore, replay or check cleanly (the report says where)."""


@flow(name="physical-verification", log_prints=False, on_completion=[announce_success])
def physical_verification(
    storage: StorageBlock,
    db_id: str | None = None,
    backup_id: str | None = None,
    amcheck: AmcheckMode = "sample",
    encryption_key: BackupEncryptionKey | None = None,
    key_file: str | None = None,
) -> PhysicalVerificationReport:
    """Prove a physical chain restores: replay it to the end, amcheck it, count its rows.

    Args:
        storage: Where the backups and WAL are.
        db_id: The cluster; optional if only one is stored.
        backup_id: A backup id; None verifies the newest.
        amcheck: "sample" (largest tables + catalogs) or "all" relations.
        encryption_key: Master key block; else ``key_file``; else the default key file.
        key_file: Path of a master key file.
    """
    source = storage.open()
    keyring = resolve_keyring(encryption_key, key_file)
    tag_run("physical-verification", db_id)
    # Each stage (plan, restore, replay, amcheck, counts) is a task run of its own.
    report = verify_physical_backup(
        source, keyring, db_id=db_id, backup_id=backup_id, amcheck=amcheck,
        on_step=get_run_logger().info, run_stage=stage_as_task,
    )
    tag_run("physical-verification", report.db_id)
    rows = [
        {"database": database.name, "table": table, "rows": count}
        for database in report.databases for table, count in database.rows.items()
    ]
    publish_summary("physical-verification", report.db_id, report.markdown(),
                    f"{report.status}: verification of {report.backup_id}", rows)
    if not report.passed:
        raise PhysicalVerificationFailed(
            f"verification of {report.backup_id} ({report.db_id}) failed: {report.error}"
        )
    return report
