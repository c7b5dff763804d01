"""Results of backups and restores, as returned by flows, printed by the CLI and shown in the UI."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tasks.manifest import LogicalManifest


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
