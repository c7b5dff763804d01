"""Results of backups and restores, as returned by flows, printed by the CLI and shown in the UI."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pgbackflow.tasks.manifest import LogicalManifest


class DestinationStatus(BaseModel):
    """Whether the backup is complete in one storage."""

    model_config = ConfigDict(frozen=True)

    location: str
    status: Literal["complete", "failed"]
    error: str | None = None


class BackupSizes(BaseModel):
    """Sizes of one backup, in bytes."""

    model_config = ConfigDict(frozen=True)

    database: int
    dump_raw: int
    dump_stored: int
    globals_stored: int

    @property
    def stored(self) -> int:
        """Bytes stored per storage."""
        return self.dump_stored + self.globals_stored


class BackupReport(BaseModel):
    """The outcome of one logical backup."""

    model_config = ConfigDict(frozen=True)

    backup_id: str
    status: Literal["complete", "partial"]
    db_id: str
    database: str
    server_version: str
    pg_dump_version: str
    compression: str
    key_id: str
    started_at: datetime
    finished_at: datetime
    sizes: BackupSizes
    schema_count: int
    table_count: int
    tables: dict[str, int]
    destinations: list[DestinationStatus]
    #: What became of ``--verify-after``'s request ("queued (flow run …)", "not queued: …");
    #: None when none was asked for.
    verification: str | None = None

    @property
    def duration_s(self) -> float:
        """Wall time of the backup."""
        return (self.finished_at - self.started_at).total_seconds()

    @classmethod
    def from_manifest(
        cls, manifest: LogicalManifest, destinations: list[DestinationStatus]
    ) -> BackupReport:
        """Build the report of a backup whose manifest was written."""
        complete = all(d.status == "complete" for d in destinations)
        return cls(
            backup_id=manifest.backup_id,
            status="complete" if complete else "partial",
            db_id=manifest.database.db_id,
            database=manifest.database.name,
            server_version=manifest.server_version,
            pg_dump_version=manifest.pg_dump_version,
            compression=manifest.compression,
            key_id=manifest.key_id,
            started_at=manifest.started_at,
            finished_at=manifest.finished_at,
            sizes=BackupSizes(
                database=manifest.database_size,
                dump_raw=manifest.dump.raw_size,
                dump_stored=manifest.dump.stored_size,
                globals_stored=manifest.globals.stored_size,
            ),
            schema_count=manifest.schema_count,
            table_count=manifest.table_count,
            tables=manifest.rows_by_table(),
            destinations=destinations,
        )

    def markdown(self) -> str:
        """Summary for the Prefect UI."""
        lines = [
            f"# Backup {self.backup_id}: {self.status}",
            "",
            "| | |",
            "|---|---|",
            f"| database | `{self.database}` ({self.db_id}), PostgreSQL {self.server_version} |",
            f"| pg_dump | {self.pg_dump_version}, {self.compression} |",
            f"| duration | {self.duration_s:.1f} s |",
            f"| database size | {self.sizes.database / 1e6:.1f} MB |",
            f"| dump (raw → stored) | {self.sizes.dump_raw / 1e6:.1f} MB → "
            f"{self.sizes.dump_stored / 1e6:.1f} MB |",
            f"| schemas / tables / rows | {self.schema_count} / {self.table_count} / "
            f"{sum(self.tables.values())} |",
            f"| encryption key id | `{self.key_id}` |",
            "",
            "| storage | status | error |",
            "|---|---|---|",
        ]
        lines += [
            f"| {d.location} | {d.status} | {d.error or ''} |" for d in self.destinations
        ]
        return "\n".join(lines)


class RestoreSummary(BaseModel):
    """The outcome of one logical restore."""

    model_config = ConfigDict(frozen=True)

    backup_id: str
    target: str
    database: str
    status: Literal["restored", "restored-with-differences"]
    pg_restore_exit_code: int
    duration_s: float
    tables: dict[str, int]
    expected_tables: dict[str, int]
    count_differences: list[str]
    missing_roles: list[str]
    roles_created: list[str]
    roles_kept: list[str]
    warnings: list[str]

    def markdown(self) -> str:
        """Summary for the Prefect UI."""
        lines = [
            f"# Restore of {self.backup_id}: {self.status}",
            "",
            f"Into `{self.database}` on {self.target} in {self.duration_s:.1f} s, pg_restore exit "
            f"code {self.pg_restore_exit_code}.",
        ]
        if self.count_differences:
            lines += ["", "## Row count differences", *[f"- {d}" for d in self.count_differences]]
        if self.missing_roles:
            lines += ["", "Owners/grants skipped, roles missing on the target: "
                      + ", ".join(self.missing_roles) + " (restore with --with-globals)."]
        return "\n".join(lines)


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


class ChainLink(BaseModel):
    """One backup of a chain, for overviews."""

    model_config = ConfigDict(frozen=True)

    backup_id: str
    mode: Literal["full", "incremental"]
    parent_id: str | None
    finished_at: datetime
    start_lsn: str
    end_lsn: str
    timeline: int
    stored_size: int


class PhysicalBackupReport(BaseModel):
    """The outcome of one physical (full or incremental) backup."""

    model_config = ConfigDict(frozen=True)

    backup_id: str
    status: Literal["complete", "partial"]
    mode: Literal["full", "incremental"]
    requested: Literal["full", "incremental"]
    full_reason: str | None
    db_id: str
    parent_id: str | None
    server_version: str
    timeline: int
    start_lsn: str
    end_lsn: str
    started_at: datetime
    finished_at: datetime
    raw_size: int
    stored_size: int
    cluster_size: int
    destinations: list[DestinationStatus]
    chain: list[ChainLink]

    @property
    def duration_s(self) -> float:
        """Wall time of the backup."""
        return (self.finished_at - self.started_at).total_seconds()

    def markdown(self) -> str:
        """Summary for the Prefect UI."""
        lines = [
            f"# Physical {self.mode} backup {self.backup_id}: {self.status}",
            "",
            f"- cluster: `{self.db_id}`, PostgreSQL {self.server_version}, "
            f"timeline {self.timeline}",
            f"- WAL range: {self.start_lsn} to {self.end_lsn}",
            f"- size: {_mb(self.raw_size)} read, {_mb(self.stored_size)} stored "
            f"(cluster {_mb(self.cluster_size)}), {self.duration_s:.1f} s",
        ]
        if self.full_reason and self.requested == "incremental":
            lines.append(f"- full instead of incremental: {self.full_reason}")
        for destination in self.destinations:
            error = f" — {destination.error}" if destination.error else ""
            lines.append(f"- {destination.location}: {destination.status}{error}")
        return "\n".join(lines) + "\n\n" + chain_markdown(self.chain)


def chain_markdown(chain: list[ChainLink], wal_window: str | None = None) -> str:
    """The chain overview table (full first)."""
    lines = [
        "| backup | mode | finished | timeline | start LSN | end LSN | stored |",
        "|---|---|---|---|---|---|---|",
    ]
    for link in chain:
        lines.append(
            f"| {link.backup_id} | {link.mode} | {link.finished_at:%Y-%m-%d %H:%M:%S} | "
            f"{link.timeline} | {link.start_lsn} | {link.end_lsn} | {_mb(link.stored_size)} |"
        )
    if wal_window:
        lines += ["", f"WAL coverage: {wal_window}"]
    return "\n".join(lines)


class WalStreamReport(BaseModel):
    """What one run of the WAL streamer shipped."""

    model_config = ConfigDict(frozen=True)

    db_id: str
    slot: str
    segments_shipped: int
    partials_shipped: int
    last_segment: str | None
    bytes_shipped: int
    gaps: list[str]


class PitrReport(BaseModel):
    """The outcome of a point-in-time restore."""

    model_config = ConfigDict(frozen=True)

    db_id: str
    target: str
    chain: list[str]
    wal_segments: int
    data_dir: str
    script: str
    window: str
    started: bool
    port: int | None = None
    last_transaction: str | None = None
    reached_target: bool | None = None
    container: str | None = None
    #: The OS user a directory not started here was handed to (root restored it), who
    #: starts it.
    os_user: str | None = None
    duration_s: float

    def markdown(self) -> str:
        """Summary for the Prefect UI."""
        lines = [
            f"# Point-in-time restore of {self.db_id} to {self.target}",
            "",
            f"- chain: {' → '.join(self.chain)}",
            f"- WAL segments replayed from storage: {self.wal_segments}",
            f"- data directory: `{self.data_dir}`; redo by hand: `{self.script} NEW_DIR`",
            f"- recoverable window: {self.window}",
            f"- took {self.duration_s:.1f} s",
        ]
        if self.started:
            lines.append(
                f"- server running on 127.0.0.1:{self.port}, last transaction "
                f"{self.last_transaction or 'unknown'}"
            )
        return "\n".join(lines)
