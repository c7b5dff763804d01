"""Point-in-time restore: the runbook, as a Prefect flow (pitr-restore).

plan → unpack/combine → fetch WAL → configure recovery → restore.sh → start.
"""

from __future__ import annotations

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
from pgbackflow.tasks.keys import Keyring
from pgbackflow.tasks.physical import resolve_db_id
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
from pgbackflow.tasks.reports import PitrReport
from pgbackflow.tasks.storage import Storage
from pgbackflow.tasks.toolsets import Toolset


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
