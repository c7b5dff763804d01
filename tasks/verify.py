"""Restore verification: prove a backup restores, table by table, in a throwaway sandbox.

1. Pick the backup (newest complete one, or a given id) and check free disk.
2. Start a sandbox of the source's major; replay the backup's globals (roles).
3. Decrypt the dump into the sandbox's work dir (every chunk and the sha256 checked) and
   restore it with the sandbox's own pg_restore, ``-j`` = the sandbox's CPUs.
4. Count every table exactly; compare with the counts taken in the dump's snapshot.
5. Destroy the sandbox, whatever happened. 6. Report.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from psycopg import sql
from pydantic import BaseModel, ConfigDict

from pgbackflow.tasks.budget import disk_budget_from_environment
from pgbackflow.tasks.database import ConnectionSettings, connect
from pgbackflow.tasks.errors import PgBackflowError
from pgbackflow.tasks.keys import Keyring
from pgbackflow.tasks.logical import (
    USER_RELATIONS_SQL,
    count_restored,
    replay_globals,
    run_pg_restore,
)
from pgbackflow.tasks.manifest import LogicalManifest
from pgbackflow.tasks.pipeline import decrypted_chunks
from pgbackflow.tasks.process import ToolResult
from pgbackflow.tasks.runtime import StageRunner, run_directly
from pgbackflow.tasks.sandbox import RESTORE_ARGS, Sandbox, require_free_disk
from pgbackflow.tasks.storage import Storage

HEADROOM_BYTES = 1024**3
DUMP_FILE = "dump.custom"

Status = Literal["Pending", "Running", "Successful", "Failed", "Canceled"]


class VerificationFailedError(PgBackflowError):
    """The backup did not restore, or the data that came back is not what was backed up."""


class TimelineEntry(BaseModel):
    """When a stage of the verification was reached."""

    model_config = ConfigDict(frozen=True)

    stage: str
    at: datetime


class TableCheck(BaseModel):
    """Expected vs restored rows of one table."""

    model_config = ConfigDict(frozen=True)

    table: str
    expected: int | None
    restored: int | None

    @property
    def ok(self) -> bool:
        """Whether the table came back with exactly its rows."""
        return self.expected is not None and self.expected == self.restored


class VerificationReport(BaseModel):
    """Everything a verification found."""

    status: Status
    failure: str | None = None
    backup_id: str
    db_id: str
    database: str
    source_server_version: str
    sandbox: str
    timeline: list[TimelineEntry]
    restore_exit_code: int | None = None
    pg_restore_errors: list[str] = []
    source_size: int
    restored_size: int | None = None
    expected_schema_count: int
    schema_count: int | None = None
    expected_table_count: int
    table_count: int | None = None
    tables: list[TableCheck] = []
    problems: list[str] = []

    def markdown(self) -> str:
        """Summary for the Prefect UI: the failure first when there is one."""
        lines = [f"# Restore verification: {self.status}", ""]
        if self.failure:
            lines += [f"**{self.failure}**", ""]
        restored = f"{self.restored_size / 1e6:.1f} MB" if self.restored_size is not None else "-"
        lines += [
            "| | |",
            "|---|---|",
            f"| backup | `{self.backup_id}` of `{self.database}` (PostgreSQL "
            f"{self.source_server_version}) |",
            f"| sandbox | {self.sandbox} |",
            f"| pg_restore exit code | {self.restore_exit_code} |",
            f"| size restored / at backup | {restored} / {self.source_size / 1e6:.1f} MB |",
            f"| schemas restored / expected | {self.schema_count} / {self.expected_schema_count} |",
            f"| tables restored / expected | {self.table_count} / {self.expected_table_count} |",
            "",
            "| stage | at (UTC) |",
            "|---|---|",
            *[f"| {t.stage} | {t.at:%Y-%m-%d %H:%M:%S.%f} |" for t in self.timeline],
        ]
        if self.problems:
            lines += ["", "## Problems", *[f"- {p}" for p in self.problems[:50]]]
        return "\n".join(lines)


class Timeline:
    """Records when each stage was reached."""

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self._clock = clock or (lambda: datetime.now(UTC))
        self.entries: list[TimelineEntry] = []

    def mark(self, stage: str) -> None:
        """Note that ``stage`` was reached now."""
        self.entries.append(TimelineEntry(stage=stage, at=self._clock()))


def check_free_disk(
    manifest: LogicalManifest, where: Path, budget_bytes: int | None = None
) -> None:
    """Refuse to start without 2x the backup's stored size plus 1 GB free (and budgeted)."""
    require_free_disk(
        f"verifying backup {manifest.backup_id}", 2 * manifest.stored_size + HEADROOM_BYTES,
        where, budget_bytes,
        advice="2x the backup plus 1 GB; free space or give the agent a bigger disk budget",
    )


def spool_dump(
    storage: Storage,
    manifest: LogicalManifest,
    keyring: Keyring,
    path: Path,
    stop: threading.Event | None = None,
) -> int:
    """Decrypt the backup's dump into ``path`` (pg_restore -j needs a seekable file).

    Args:
        stop: Set by the caller to abandon the spool (cancellation, failed sandbox).
    """
    size = 0
    with path.open("wb") as out:
        for chunk in decrypted_chunks(storage, manifest.dump, keyring):
            if stop is not None and stop.is_set():
                raise VerificationFailedError("spooling the dump was stopped")
            out.write(chunk)
            size += len(chunk)
    path.chmod(0o644)  # the sandbox's postgres user reads it
    return size


def table_checks(expected: dict[str, int], restored: dict[str, int]) -> list[TableCheck]:
    """One row per table in either map, sorted by name."""
    return [
        TableCheck(table=name, expected=expected.get(name), restored=restored.get(name))
        for name in sorted(expected.keys() | restored.keys())
    ]


def verify_backup(
    storage: Storage,
    manifest: LogicalManifest,
    keyring: Keyring,
    sandbox: Sandbox,
    *,
    timeline: Timeline | None = None,
    run_stage: StageRunner = run_directly,
) -> VerificationReport:
    """Restore ``manifest``'s backup into ``sandbox`` and compare every table: a logical
    restore (the restore flow's globals replay, pg_restore feed and row count) into a
    throwaway server.

    The sandbox is destroyed before this returns or raises. Integrity, restore and
    count failures come back as a Failed report; cancellation (KeyboardInterrupt, a
    cancelled flow) destroys the sandbox and propagates.

    Args:
        run_stage: Runs each stage (start-sandbox, replay-globals, pg-restore, count-rows);
            the flow passes one that makes each a task run of that name.
    """
    timeline = timeline or Timeline()
    if not timeline.entries:
        timeline.mark("picked backup")
    report = VerificationReport(
        status="Running", backup_id=manifest.backup_id, db_id=manifest.database.db_id,
        database=manifest.database.name, source_server_version=manifest.server_version,
        sandbox=f"{sandbox.kind} PostgreSQL {sandbox.major}", timeline=timeline.entries,
        source_size=manifest.database_size, expected_schema_count=manifest.schema_count,
        expected_table_count=manifest.table_count,
    )
    stop_spool = threading.Event()
    try:
        check_free_disk(manifest, sandbox.work_dir, disk_budget_from_environment())
        # Decrypting the dump and starting the server are independent: do them at once.
        with ThreadPoolExecutor(1, thread_name_prefix="pgbackflow-spool") as pool:
            spooled = pool.submit(spool_dump, storage, manifest, keyring,
                                  sandbox.dump_dir / DUMP_FILE, stop_spool)
            try:
                run_stage("start-sandbox", sandbox.start)
                report.sandbox = sandbox.description
                timeline.mark("sandbox up")
                _restore_and_count(storage, manifest, keyring, sandbox, report, timeline,
                                   spooled, run_stage)
            finally:
                # Whatever happened, the spool stops before the sandbox's directory goes.
                stop_spool.set()
                sandbox.destroy()
    except PgBackflowError as exc:
        report.status = "Failed"
        report.failure = report.failure or str(exc)
    finally:
        timeline.mark("sandbox destroyed")
        report.timeline = list(timeline.entries)
    if report.status == "Running":
        report.status = "Successful"
    return report


def prepare_sandbox_database(admin: ConnectionSettings, name: str) -> None:
    """Make the database ``name`` to restore into, in a fresh sandbox.

    A name the sandbox already has (``postgres``, ``template1``: made by initdb, empty)
    is restored into as it is, as a restore into such a server would; it must be empty.

    Raises:
        VerificationFailedError: It exists but takes no connections, or is not empty.
    """
    with connect(admin) as conn:
        row = conn.execute(
            "SELECT datallowconn FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if row is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            return
    if not row[0]:
        raise VerificationFailedError(
            f"the sandbox's database '{name}' takes no connections, so the backup of '{name}' "
            "cannot be restored into it: restore it by hand under another name"
        )
    with connect(admin.with_dbname(name)) as conn:
        count = conn.execute(USER_RELATIONS_SQL).fetchone()
    if count and count[0]:
        raise VerificationFailedError(
            f"the sandbox's database '{name}' already holds {count[0]} relations: the sandbox "
            "image is not a stock one; use an image whose initdb databases are empty"
        )


def _restore_and_count(
    storage: Storage,
    manifest: LogicalManifest,
    keyring: Keyring,
    sandbox: Sandbox,
    report: VerificationReport,
    timeline: Timeline,
    spooled: Future[int],
    run_stage: StageRunner,
) -> None:
    admin = sandbox.settings
    name = manifest.database.name

    def replay() -> tuple[str, ...]:
        # Owners and grants are part of what gets proven: recreate the roles first.
        _, _, warnings = replay_globals(storage, manifest, keyring, admin)
        prepare_sandbox_database(admin, name)
        return warnings

    def restore() -> ToolResult:
        dump_file = sandbox.dump_dir / DUMP_FILE
        spooled.result()  # raises the archive's integrity error, if any
        jobs = sandbox.resources.restore_jobs
        try:
            return run_pg_restore(storage, manifest, keyring, sandbox, name,
                                  [*RESTORE_ARGS, f"--jobs={jobs}"], jobs=jobs,
                                  spooled=dump_file)
        finally:
            dump_file.unlink(missing_ok=True)

    report.problems.extend(run_stage("replay-globals", replay))
    result = run_stage("pg-restore", restore)
    report.restore_exit_code = result.returncode
    report.pg_restore_errors = list(result.stderr_errors[:50])
    timeline.mark("restore done")
    if result.returncode != 0:
        first = next((e for e in result.stderr_errors if "error" in e.lower()),
                     result.stderr_tail.strip().splitlines()[-1] if result.stderr_tail else "")
        report.status = "Failed"
        report.failure = f"pg_restore failed with exit code {result.returncode}: {first}"

    inventory, counted, extra = run_stage("count-rows", lambda: count_restored(
        admin.with_dbname(name), manifest, sandbox.resources.restore_jobs))
    timeline.mark("counted")
    report.restored_size = inventory.database_size
    report.schema_count = inventory.schema_count
    report.table_count = inventory.table_count
    report.tables = table_checks(manifest.rows_by_table(), inventory.rows_by_table())
    # A fresh sandbox holds only what the backup restored: a table it lacks is a finding.
    differences = [*counted, *(f"table {table} is unexpected" for table in extra)]
    report.problems.extend(differences)
    if differences and report.status != "Failed":
        report.status = "Failed"
        shown = "; ".join(differences[:5]) + (" …" if len(differences) > 5 else "")
        report.failure = f"restored data differs from the backup: {shown}"
