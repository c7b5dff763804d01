"""Point-in-time restore: the runbook, as a Prefect flow (pitr-restore).

plan → build the data directory (unpack/combine, fetch WAL, recovery settings) → into a
Docker volume, if that is the destination → start and wait for the promotion.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger

from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.flows.common import (
    RETRY_DELAYS,
    ProgressArtifact,
    StorageBlock,
    artifact_key,
    publish_summary,
    resolve_keyring,
    retry_if_transient,
    stage_as_task,
    tag_run,
)
from pgbackflow.flows.physical_backup import choose_toolset
from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.keys import Keyring
from pgbackflow.tasks.physical import resolve_db_id
from pgbackflow.tasks.pitr import (
    DirectoryDestination,
    PitrPlan,
    free_port,
    parse_target_time,
    plan_pitr,
    restore_to,
)
from pgbackflow.tasks.pitr_docker import restore_into_docker_volume
from pgbackflow.tasks.reports import PitrReport
from pgbackflow.tasks.storage import Storage


@task(name="plan-restore", retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_if_transient, cache_policy=NONE)
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
    if start and port is not None:
        from pgbackflow.tasks.cluster import check_port_free

        check_port_free(port)
    source = storage.open()
    keyring = resolve_keyring(encryption_key, key_file)
    directory = Path(to_dir).absolute()
    tag_run("pitr", db_id)
    plan = plan_restore_task(source, db_id, target_time, keyring)
    tag_run("pitr", plan.db_id)
    toolset = choose_toolset(plan.newest.server_major, f"restore of {plan.db_id}")
    target = "latest" if plan.target is None else plan.target.isoformat()
    chain = [f"{b.mode} {b.backup_id}" for b in plan.chain]
    total = sum(b.base.raw_size for b in plan.chain)
    logger = get_run_logger()
    # One restore, two destinations; each stage (build-data-dir, copy-into-volume,
    # start-restored-server) is a task run of its own.
    with ProgressArtifact(
        artifact_key("pitr-progress", plan.db_id), "restore of the backup chain", total
    ) as progress:
        if docker_volume:
            result = restore_into_docker_volume(
                source, plan, keyring, volume=docker_volume, image=docker_image,
                network=docker_network, start=start, port=port, toolset=toolset,
                on_step=logger.info, run_stage=stage_as_task,
            )
            report = PitrReport(
                db_id=plan.db_id, target=target, chain=chain, wal_segments=result.wal_files,
                data_dir=f"docker volume {result.volume} ({result.pgdata})",
                script=result.run_command, window=plan.window,
                started=result.container_id is not None,
                port=result.port if result.container_id else None,
                last_transaction=result.last_transaction,
                reached_target=result.reached_target,
                container=result.container_name if result.container_id else None,
                duration_s=time.monotonic() - began,
            )
        else:
            user = None
            if start or os.geteuid() == 0:
                from pgbackflow.tasks.cluster import resolve_os_user

                # Root restoring without starting: the directory still goes to the user
                # that will run it (pg_ctl refuses root, and root's directory refuses the
                # postgres user); with no such user, root keeps it, as root asked.
                try:
                    user = resolve_os_user(os_user)
                except ConfigError:
                    if start or os_user:
                        raise
            destination = DirectoryDestination(
                directory, port=(port or free_port()) if start else None, user=user,
                script=(storage_ref or source.location, Path(key_file) if key_file else None),
            )
            outcome = restore_to(source, plan, keyring, destination, toolset=toolset,
                                 start=start, on_step=logger.info, progress=progress.update,
                                 run_stage=stage_as_task)
            recovery = outcome.recovery
            if recovery is not None and not recovery.reached_target:
                logger.info("no transaction committed after the target time: replayed to the "
                            "end of the WAL, which holds the same data")
            report = PitrReport(
                db_id=plan.db_id, target=target, chain=chain, wal_segments=outcome.wal_files,
                data_dir=str(directory), script=str(destination.script_path),
                window=plan.window, started=recovery is not None,
                port=destination.port if recovery is not None else None,
                last_transaction=recovery.last_transaction if recovery else None,
                reached_target=recovery.reached_target if recovery else None,
                os_user=user.name if user is not None and not start else None,
                duration_s=time.monotonic() - began,
            )
        progress.finish(total)
    publish_summary("pitr-restore", plan.db_id, report.markdown(), f"restore of {plan.db_id}")
    return report
