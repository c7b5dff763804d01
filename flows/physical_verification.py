"""Physical verification: the runbook, as a Prefect flow (physical-verification).

Restore the chain into a throwaway server, replay its WAL to the end, amcheck it, count its rows.
"""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.flows.common import (
    StorageBlock,
    publish_summary,
    resolve_keyring,
    stage_as_task,
    tag_run,
)
from pgbackflow.flows.outcome import announce_success
from pgbackflow.tasks.errors import PgBackflowError
from pgbackflow.tasks.verify_physical import (
    AmcheckMode,
    PhysicalVerificationReport,
    verify_physical_backup,
)


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
