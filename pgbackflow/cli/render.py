"""What the CLI prints: every report and result, as text or as one JSON document.

Commands compute; this module says. Imports nothing heavier than rich at load time: the
commands that run no flow must not pay for Prefect (see ``user_errors_without_flows``).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from pgbackflow.demo import DemoResult
    from pgbackflow.deployments.security import Finding
    from pgbackflow.launcher import RunningDaemon
    from pgbackflow.tasks.budget import BudgetPlan
    from pgbackflow.tasks.catalog import Backup, StorageCatalog
    from pgbackflow.tasks.manifest import ManifestRecord
    from pgbackflow.tasks.reports import (
        BackupReport,
        PhysicalBackupReport,
        PitrReport,
        RestoreSummary,
        WalStreamReport,
    )
    from pgbackflow.tasks.retention import RetentionResult
    from pgbackflow.tasks.rotation import RotationReport
    from pgbackflow.tasks.toolsets import Toolset
    from pgbackflow.tasks.verify import VerificationReport
    from pgbackflow.tasks.verify_physical import PhysicalVerificationReport

# Not a terminal (a pipe, a log file, a test): no 80-column limit, so ids are never cut.
out = Console(width=None if sys.stdout.isatty() else 250)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 250)


def attach_consoles() -> None:
    """Decide width and colours again for the current stdout/stderr (the daemon's command
    child takes the launcher's; the consoles were made for the daemon's /dev/null)."""
    out.__init__(width=None if sys.stdout.isatty() else 250)  # type: ignore[misc]
    err.__init__(stderr=True, width=None if sys.stderr.isatty() else 250)  # type: ignore[misc]

#: How ``list`` / ``physical-list`` show a manifest's authentication.
_AUTH_SHOWN = {"verified": "verified", "unverified": "unverified", "no-mac": "no MAC"}
_UNVERIFIED_NOTE = "manifests not verified: pass --key-file to check their MACs"


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def plain_line(line: str) -> None:
    """One line of a command's running account (retention plan, key rotation), as written."""
    out.print(line, highlight=False, markup=False, soft_wrap=True)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[None]:
    """Show a progress bar for byte streams reported by the flows."""
    from pgbackflow.flows.common import progress_listeners

    if not enabled or not err.is_terminal:
        yield
        return
    bar = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeElapsedColumn(), console=err, transient=True,
    )
    tasks: dict[str, Any] = {}

    def listener(label: str, done: int, total: int | None) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=done, total=total)

    progress_listeners.append(listener)
    try:
        with bar:
            yield
    finally:
        progress_listeners.remove(listener)


# --------------------------------------------------------------------------- logical


def backup_report(report: BackupReport, as_json: bool) -> None:
    """``backup``: the backup's report."""
    if as_json:
        print_json(report.model_dump(mode="json"))
        return
    table = Table(title=f"backup {report.backup_id}: {report.status}", show_header=False)
    table.add_row(
        "database", f"{report.database} ({report.db_id}), PostgreSQL {report.server_version}"
    )
    table.add_row("pg_dump", f"{report.pg_dump_version}, {report.compression}")
    table.add_row("size", f"{report.sizes.database / 1e6:.1f} MB database → "
                  f"{report.sizes.stored / 1e6:.1f} MB stored")
    table.add_row("tables", f"{report.table_count} in {report.schema_count} schemas, "
                  f"{sum(report.tables.values())} rows")
    table.add_row("took", f"{report.duration_s:.1f} s")
    for destination in report.destinations:
        table.add_row("stored in", destination.location)
    if report.verification is not None:
        table.add_row("verification", escape(report.verification))
    out.print(table)
    if report.verification is not None and report.verification.startswith("not queued"):
        err.print(f"warning: verification {escape(report.verification)}")


def backup_listing(backups: list[Backup], refused: list[ManifestRecord[Any]], location: str,
                   *, verified: bool, as_json: bool) -> None:
    """``list``: the usable logical backups, then the refused manifests."""
    rows: list[dict[str, Any]] = [{
        "backup_id": b.backup_id, "db_id": b.db_id, "database": b.database,
        "finished_at": b.finished_at.isoformat(), "server_version": b.server_version,
        "stored_size": b.data_size, "table_count": b.table_count, "key_id": b.key_id,
        "auth": b.status, "auth_key_id": b.auth_key_id, "problem": None, "key": b.manifest_key,
    } for b in backups]
    rows += [{
        "backup_id": r.backup_id, "db_id": r.db_id, "database": None, "finished_at": None,
        "server_version": None, "stored_size": None, "table_count": None, "key_id": None,
        "auth": r.status, "auth_key_id": r.auth_key_id, "problem": r.problem, "key": r.key,
    } for r in refused]
    if as_json:
        print_json(rows)
        return
    shown = {**_AUTH_SHOWN, "failed": "REFUSED"}
    usable = sum(1 for r in rows if r["problem"] is None)
    table = Table("backup id", "database", "db id", "finished (UTC)", "PostgreSQL", "stored",
                  "tables", "manifest", title=f"{usable} backups in {location}")
    for r in rows:
        table.add_row(r["backup_id"] or "?", r["database"] or "", r["db_id"] or "?",
                      (r["finished_at"] or "")[:19].replace("T", " "), r["server_version"] or "",
                      f"{r['stored_size'] / 1e6:.1f} MB" if r["stored_size"] is not None else "",
                      str(r["table_count"] if r["table_count"] is not None else ""),
                      shown[r["auth"]] if r["problem"] is None else "REFUSED")
    out.print(table)
    for r in rows:
        if r["problem"] is not None:
            out.print(f"refused: {r['problem']}", highlight=False, markup=False)
    if not verified and rows:
        out.print(_UNVERIFIED_NOTE, highlight=False)


def restore_summary(summary: RestoreSummary, as_json: bool) -> None:
    """``restore``: what was restored where, and the roles the target lacks."""
    if as_json:
        print_json(summary.model_dump(mode="json"))
        return
    out.print(
        f"restored backup {summary.backup_id} into {summary.database} on {summary.target} in "
        f"{summary.duration_s:.1f} s: {len(summary.tables)} tables, row counts match the backup"
    )
    if summary.missing_roles:
        err.print("owners/grants skipped, roles missing on the target: "
                  + ", ".join(summary.missing_roles) + " (use --with-globals)")


def verification_report(report: VerificationReport, as_json: bool) -> None:
    """``verify``: every table's rows, expected and restored; the stages on stderr."""
    if as_json:
        print_json(report.model_dump(mode="json"))
        return
    table = Table("table", "expected", "restored", "", title=f"verification: {report.status}")
    for check in report.tables:
        table.add_row(check.table, str(check.expected), str(check.restored),
                      "✓" if check.ok else "✗")
    out.print(table)
    for entry in report.timeline:
        err.print(f"{entry.at:%H:%M:%S.%f}  {entry.stage}", highlight=False)


# --------------------------------------------------------------------------- physical


def physical_backup_report(report: PhysicalBackupReport, *, incremental: bool,
                           as_json: bool) -> None:
    """``physical-backup``: the backup's report (why it is a full, when asked for an
    incremental)."""
    if as_json:
        print_json(report.model_dump(mode="json"))
        return
    table = Table(title=f"{report.mode} backup {report.backup_id}: {report.status}",
                  show_header=False)
    table.add_row("cluster", f"{report.db_id}, PostgreSQL {report.server_version}, "
                  f"timeline {report.timeline}")
    if report.parent_id:
        table.add_row("parent", report.parent_id)
    if report.full_reason and incremental:
        table.add_row("full because", report.full_reason)
    table.add_row("WAL range", f"{report.start_lsn} to {report.end_lsn}")
    table.add_row("size", f"{report.raw_size / 1e6:.1f} MB read → "
                  f"{report.stored_size / 1e6:.1f} MB stored")
    table.add_row("took", f"{report.duration_s:.1f} s")
    for destination in report.destinations:
        table.add_row("stored in", destination.location)
    out.print(table)


def wal_stream_report(report: WalStreamReport, as_json: bool) -> None:
    """``wal-stream``: what was shipped, and the gaps on stderr."""
    if as_json:
        print_json(report.model_dump(mode="json"))
        return
    out.print(
        f"WAL of {report.db_id}: {report.segments_shipped} segments and "
        f"{report.partials_shipped} partial uploads shipped (last {report.last_segment}), "
        f"{report.bytes_shipped / 1e6:.1f} MB stored"
    )
    if report.gaps:
        err.print(f"[bold red]WAL gaps:[/] {', '.join(report.gaps[:10])}")


def pitr_report(report: PitrReport, *, docker: bool, as_json: bool) -> None:
    """``pitr``: what was restored, and how to start it or redo it by hand."""
    if as_json:
        print_json(report.model_dump(mode="json"))
        return
    out.print(f"restored {report.db_id} to {report.target} into {report.data_dir} "
              f"({' → '.join(report.chain)}, {report.wal_segments} WAL files) "
              f"in {report.duration_s:.1f} s")
    if report.started:
        where = f"container {report.container}, " if report.container else ""
        out.print(f"server running ({where}127.0.0.1:{report.port}); last transaction "
                  f"{report.last_transaction or 'unknown'}")
    elif docker:
        out.print(f"start it with: {report.script}")
    else:
        command = f"pg_ctl -D {shlex.quote(report.data_dir)} start"
        if report.os_user:  # root restored it for this user, who owns it now
            command = f"su {report.os_user} -c {shlex.quote(command)}"
        out.print(f"start it with: {escape(command)} (recovery runs first)")
    if not docker:
        out.print(f"redo by hand: {report.script} NEW_EMPTY_DIR")


def physical_verification_report(report: PhysicalVerificationReport, as_json: bool) -> None:
    """``verify-physical``: the report (a dataclass) as JSON or its markdown."""
    if as_json:
        import dataclasses

        print_json(dataclasses.asdict(report))
        return
    out.print(report.markdown())


def physical_listing(stored: StorageCatalog, location: str, *, verified: bool,
                     as_json: bool) -> None:
    """``physical-list``: per cluster its chains, refused manifests and WAL coverage."""
    usable, records = stored.listing("physical")
    documents: list[dict[str, Any]] = []
    for cluster in sorted({b.db_id for b in usable} | {r.db_id for r in records if r.db_id}):
        mine = [b for b in usable if b.db_id == cluster]
        entry = stored.database(cluster, "physical")
        newest_wal = entry.wal_newest if entry else None
        documents.append({
            "db_id": cluster,
            "backups": [
                {"backup_id": b.backup_id, "mode": b.mode, "parent_id": b.parent_id,
                 "finished_at": b.finished_at.isoformat(), "timeline": b.timeline,
                 "start_lsn": b.start_lsn, "end_lsn": b.end_lsn, "stored_size": b.data_size,
                 "auth": b.status, "auth_key_id": b.auth_key_id}
                for b in mine
            ],
            "refused": [
                {"backup_id": r.backup_id, "key": r.key, "auth": r.status, "problem": r.problem}
                for r in records if r.db_id == cluster
            ],
            "wal_newest_upload": newest_wal.isoformat() if mine and newest_wal else None,
            "wal_gaps": list(entry.wal_gaps) if entry else [],
        })
    invalid = [r.problem for r in records if r.db_id is None]
    if as_json:
        print_json(documents + ([{"db_id": None, "refused": invalid}] if invalid else []))
        return
    for document in documents:
        table = Table("backup id", "mode", "parent", "finished (UTC)", "TL", "start LSN",
                      "end LSN", "stored", "manifest", title=f"cluster {document['db_id']}")
        for b in document["backups"]:
            table.add_row(b["backup_id"], b["mode"], b["parent_id"] or "", b["finished_at"][:19],
                          str(b["timeline"]), b["start_lsn"], b["end_lsn"],
                          f"{b['stored_size'] / 1e6:.1f} MB", _AUTH_SHOWN[b["auth"]])
        for r in document["refused"]:
            table.add_row(r["backup_id"], "", "", "", "", "", "", "", "REFUSED")
        out.print(table)
        for r in document["refused"]:
            out.print(f"refused: {r['problem']}", highlight=False, markup=False)
        gaps = document["wal_gaps"]
        out.print(f"WAL uploaded until {document['wal_newest_upload'] or 'never'}; "
                  + (f"gaps: {', '.join(gaps[:10])}" if gaps else "no gaps"))
    for problem in invalid:
        out.print(f"refused: {problem}", highlight=False, markup=False)
    if not verified and documents:
        out.print(_UNVERIFIED_NOTE, highlight=False)
    if not documents:
        out.print(f"no physical backups in {location}")


# --------------------------------------------------------------------------- operate


def security_warnings(findings: list[Finding]) -> None:
    """The doctor's warnings, one line each on stderr (after ``deploy``)."""
    for finding in findings:
        if finding.level == "warning":
            err.print(escape(finding.line()), style="yellow", highlight=False, soft_wrap=True)


def doctor_findings(findings: list[Finding], as_json: bool) -> None:
    """``doctor``: one line per check."""
    if as_json:
        print_json([{"check": f.check, "level": f.level, "message": f.message}
                    for f in findings])
        return
    for finding in findings:
        out.print(escape(finding.line()), highlight=False, soft_wrap=True)


def fleet_status(rows: list[dict[str, Any]], as_json: bool) -> None:
    """``status``: one row per database, as its last health check saw it."""
    if as_json:
        print_json(rows)
        return
    if not rows:
        out.print("no health checks have run yet (pgbackflow deploy makes them)")
        return
    table = Table(*rows[0], title=f"fleet status: {len(rows)} databases")
    for row in rows:
        table.add_row(*(str(value) for value in row.values()))
    out.print(table)


def agent_plan(pool: str, plan: BudgetPlan, command: list[str], max_disk_gb: float,
               as_json: bool) -> None:
    """``agent``: how the budget is shared and the worker it starts (JSON on stdout, else
    one line on stderr)."""
    if as_json:
        print_json({
            "pool": pool, "concurrent_jobs": plan.concurrent_jobs,
            "per_job": {"cpus": plan.per_job.cpus, "memory_mb": plan.per_job.memory_mb},
            "disk_bytes": plan.disk_bytes, "note": plan.note, "command": command,
        })
        return
    err.print(f"agent for pool {pool}: {plan.concurrent_jobs} concurrent job(s), each "
              f"{plan.per_job.cpus:g} CPU / {plan.per_job.memory_mb} MB; disk budget "
              f"{max_disk_gb:g} GB", highlight=False)


def demo_result(result: DemoResult, keep: Path | None, as_json: bool) -> None:
    """``demo``: every table's rows in the backup and restored, sizes and step timings."""
    if as_json:
        print_json({
            "matches": result.matches,
            "backup": result.backup.model_dump(mode="json"),
            "restore": result.restore.model_dump(mode="json"),
            "timings": result.timings,
        })
        return
    table = Table("table", "rows in backup", "rows restored", "",
                  title=f"backup {result.backup.backup_id} → restore")
    for name, rows in result.backup.tables.items():
        restored = result.restore.tables.get(name)
        table.add_row(name, str(rows), str(restored), "✓" if restored == rows else "✗")
    out.print(table)
    sizes = result.backup.sizes
    out.print(
        f"database {sizes.database / 1e6:.1f} MB → encrypted backup "
        f"{sizes.stored / 1e6:.1f} MB; steps (s): "
        + ", ".join(f"{k} {v}" for k, v in result.timings.items())
    )
    if keep:
        out.print(f"backup and key kept in {keep}")


def toolsets_table(toolsets: list[Toolset]) -> None:
    """``toolsets list``."""
    table = Table("major", "version", "binaries", "zstd")
    for toolset in toolsets:
        table.add_row(
            str(toolset.major), toolset.version, str(toolset.bin_dir),
            "yes" if toolset.supports_zstd else "no",
        )
    out.print(table)


# --------------------------------------------------------------------------- storage upkeep


def retention_outcome(result: RetentionResult | None) -> None:
    """``retention``'s last line (its plan was shown line by line): what was deleted, or
    that a dry run deleted nothing."""
    if result is None:
        err.print("dry run: nothing was deleted")
        return
    plain_line(f"deleted {len(result.deleted_backups)} backups, {len(result.deleted_objects)} "
               f"objects, {result.bytes_freed} bytes; {len(result.temporaries)} temporaries "
               "swept")


def rotation_report(report: RotationReport, new_key_id: str) -> None:
    """``key rotate``: what is left to do, then the counts."""
    for line in report.left:
        plain_line(line)
    plain_line(f"{report.rotated} objects re-wrapped, {report.skipped} already under key "
               f"{new_key_id}, {report.backups} manifests rewritten, {len(report.left)} left")


def daemons(action: str, found: list[RunningDaemon], as_json: bool) -> None:
    """``pgbackflow daemon status|stop``."""
    if as_json:
        print_json([{"pid": d.pid, "key": d.key, "socket": str(d.socket)} for d in found])
        return
    verb = "running" if action == "status" else "stopped (their running commands go on)"
    out.print(f"{len(found)} daemon(s) {verb}", highlight=False)
    for daemon in found:
        out.print(f"  pid {daemon.pid}  {escape(str(daemon.socket))}", highlight=False)
