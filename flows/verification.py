"""Restore verification: the runbook, as a Prefect flow.

1. Pick the backup (newest complete one of the database, or a given id).
2. Restore it into a throwaway sandbox of the same major, with its roles (the
   logical restore's stages: start-sandbox, replay-globals, pg-restore, count-rows).
3. Count every table and compare with the counts taken in the dump's snapshot.
4. Destroy the sandbox (also on failure and cancellation) and publish the report.

Prefect states map the report's status: Successful → Completed, Failed → Failed,
Canceled → Cancelled (the sandbox is removed before the run ends).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Literal, cast

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Cancelled

from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.blocks.storage import storage_block_from_url
from pgbackflow.flows.common import (
    RETRY_DELAYS,
    StorageBlock,
    publish_summary,
    resolve_keyring,
    retry_if_transient,
    stage_as_task,
    tag_run,
)
from pgbackflow.flows.outcome import announce_success
from pgbackflow.tasks.budget import job_share_from_environment
from pgbackflow.tasks.errors import PgBackflowError
from pgbackflow.tasks.keys import Keyring
from pgbackflow.tasks.manifest import LogicalManifest, find_backup
from pgbackflow.tasks.process import signal_handler, unwind
from pgbackflow.tasks.sandbox import DEFAULT_IMAGE_TEMPLATE, SandboxResources, sandbox_for
from pgbackflow.tasks.storage import Storage
from pgbackflow.tasks.verify import (
    Timeline,
    VerificationFailedError,
    VerificationReport,
    verify_backup,
)


class VerificationFailed(VerificationFailedError):
    """Raised by the flow when the report says Failed; carries the report."""

    def __init__(self, report: VerificationReport) -> None:
        self.report = report
        super().__init__(f"verification of {report.backup_id} failed: {report.failure}")


@task(name="pick-backup", retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_if_transient, cache_policy=NONE)
def pick_backup(
    storage: Storage, backup_id: str, db_id: str | None, keyring: Keyring
) -> LogicalManifest:
    """The backup to verify: ``latest`` is the newest complete backup of the database
    (only manifests whose MAC verifies with ``keyring`` are considered)."""
    manifest = find_backup(storage, backup_id, db_id, keyring)
    get_run_logger().info(
        "verifying backup %s of %s (PostgreSQL %s, %d tables, %.1f MB stored)",
        manifest.backup_id, manifest.database.name, manifest.server_version,
        manifest.table_count, manifest.stored_size / 1e6,
    )
    return manifest


def restore_and_count(
    storage: Storage,
    manifest: LogicalManifest,
    keyring: Keyring,
    sandbox_kind: str,
    image_template: str,
    resources: SandboxResources,
    timeline: Timeline,
    timeout_s: int,
) -> VerificationReport:
    """Restore into a fresh sandbox, count every table, destroy the sandbox: each stage
    (start-sandbox, replay-globals, pg-restore, count-rows) a task run of its own."""
    sandbox = sandbox_for(sandbox_kind, manifest.server_major, resources, image_template)
    with _terminate_as_interrupt(timeout_s):
        report = verify_backup(storage, manifest, keyring, sandbox, timeline=timeline,
                               run_stage=stage_as_task)
    logger = get_run_logger()
    for problem in report.problems[:20]:
        logger.warning(problem)
    return report


class VerificationTimeoutError(PgBackflowError):
    """The verification ran longer than allowed."""


@contextmanager
def _terminate_as_interrupt(timeout_s: int) -> Iterator[None]:
    """Unwind (destroying the sandbox) on SIGTERM or when the time is up.

    A worker stops a cancelled run with SIGTERM: that becomes KeyboardInterrupt (Canceled).
    The timeout becomes a PgBackflowError, so the report says Failed, timed out.
    """

    def time_up(signum: int, frame: FrameType | None) -> None:
        raise VerificationTimeoutError(
            f"verification timed out after {timeout_s} s: give it more time (timeout) or "
            "more CPUs"
        )

    with (signal_handler(signal.SIGTERM, unwind),
          signal_handler(signal.SIGALRM, time_up) as timed):
        if not timed:  # not the main thread: the caller owns signal handling
            yield
            return
        signal.alarm(timeout_s)
        try:
            yield
        finally:
            signal.alarm(0)


def publish_verification_artifacts(report: VerificationReport) -> None:
    """The report's summary and per-table counts, keyed per database."""
    publish_summary(
        "verification", report.db_id, report.markdown(),
        f"{report.status}: verification of {report.backup_id}",
        [{"table": t.table, "expected": t.expected, "restored": t.restored,
          "ok": "yes" if t.ok else "NO"} for t in report.tables],
    )


def _resources(cpus: float | None, memory_mb: int | None) -> SandboxResources:
    share = job_share_from_environment(SandboxResources())
    return SandboxResources(cpus=cpus or share.cpus, memory_mb=memory_mb or share.memory_mb)


def _run_name() -> str:
    params = flow_run.parameters
    return f"verify-{params.get('db_id') or 'db'}-{params.get('backup_id', 'latest')}"


@flow(name="restore-verification", flow_run_name=_run_name, on_completion=[announce_success])
def restore_verification(
    storage: StorageBlock | str,
    backup_id: str = "latest",
    db_id: str | None = None,
    sandbox: Literal["docker", "local"] = "docker",
    image_template: str = DEFAULT_IMAGE_TEMPLATE,
    cpus: float | None = None,
    memory_mb: int | None = None,
    encryption_key: BackupEncryptionKey | None = None,
    key_file: str | None = None,
    encryption_key_block: str | None = None,
    timeout_s: int = 6 * 3600,
) -> VerificationReport:
    """Prove a backup restores: restore it into a throwaway sandbox and compare every table.

    Args:
        storage: Where the backups are: a storage block, or (for deployments) a URL or
            ``block:slug/name`` resolved where the run executes.
        backup_id: A backup id, or "latest" (the newest complete backup).
        db_id: Which database, when the storage holds several.
        sandbox: "docker" (a ``postgres:<major>`` container) or "local" (an ephemeral cluster).
        image_template: Docker image with ``{major}``.
        cpus: CPU cores for the sandbox (also pg_restore -j); default: the agent's per-job
            share, else 1.
        memory_mb: Memory limit of the sandbox; default: the agent's share, else 1024.
        encryption_key: Master key block; else ``key_file``; else the default key file.
        key_file: Path of a master key file.
        encryption_key_block: Name of a saved BackupEncryptionKey block.
        timeout_s: Fail (and destroy the sandbox) when the verification takes longer.
    """
    tag_run("verification", db_id)
    if encryption_key is None and encryption_key_block:
        encryption_key = cast(BackupEncryptionKey,
                              BackupEncryptionKey.load(encryption_key_block))
    keyring = resolve_keyring(encryption_key, key_file)
    block = storage_block_from_url(storage) if isinstance(storage, str) else storage
    source = block.open()
    timeline = Timeline()
    manifest = pick_backup(source, backup_id, db_id, keyring)
    timeline.mark("picked backup")
    tag_run("verification", manifest.database.db_id)
    try:
        report = restore_and_count(
            source, manifest, keyring, sandbox, image_template,
            _resources(cpus, memory_mb), timeline, timeout_s,
        )
    except KeyboardInterrupt:
        # Cancelled (SIGTERM from the worker, Ctrl-C): the sandbox is already gone.
        timeline.mark("canceled")
        report = canceled_report(manifest, timeline, sandbox)
        publish_verification_artifacts(report)
        return Cancelled(  # type: ignore[return-value]  # Prefect takes a returned state
            message=f"verification of {manifest.backup_id} canceled; sandbox removed"
        )
    publish_verification_artifacts(report)
    if report.status != "Successful":
        raise VerificationFailed(report)
    return report


def canceled_report(
    manifest: LogicalManifest, timeline: Timeline, sandbox: str
) -> VerificationReport:
    """The report of a verification stopped before it finished."""
    return VerificationReport(
        status="Canceled", failure="canceled before it finished; the sandbox was removed",
        backup_id=manifest.backup_id, db_id=manifest.database.db_id,
        database=manifest.database.name, source_server_version=manifest.server_version,
        sandbox=sandbox, timeline=list(timeline.entries), source_size=manifest.database_size,
        expected_schema_count=manifest.schema_count, expected_table_count=manifest.table_count,
    )
