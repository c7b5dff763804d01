"""Continuous WAL: the runbook, as a Prefect flow (wal-stream).

pg_receivewal on a replication slot, every segment shipped; runs until stopped.
A deployment with a short interval schedule and a concurrency limit of 1 (new runs cancelled
while one runs) restarts it after a crash; the slot keeps the WAL meanwhile.
"""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger

from pgbackflow.blocks.database import PostgresDatabase
from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.flows.common import (
    RETRY_DELAYS,
    StorageBlock,
    open_storages,
    resolve_keyring,
    resolve_master_key,
    retry_if_transient,
    tag_run,
)
from pgbackflow.flows.physical_backup import choose_toolset, inspect_cluster, publish_chain_overview
from pgbackflow.tasks.catalog import read_catalog
from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.process import signal_handler
from pgbackflow.tasks.reports import WalStreamReport
from pgbackflow.tasks.storage import Storage, prepare_backup_storages
from pgbackflow.tasks.toolsets import Toolset
from pgbackflow.tasks.wal import (
    DEFAULT_PARTIAL_INTERVAL_S,
    DEFAULT_SLOT,
    ShippingStatus,
    WalShipper,
    WalStreamer,
)

logger = logging.getLogger("pgbackflow.flows.wal_stream")


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

    with signal_handler(signal.SIGTERM, handler):
        yield


@task(name="stream-wal", retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_if_transient, cache_policy=NONE)
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
