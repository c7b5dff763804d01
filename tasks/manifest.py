"""Backup manifests and the catalog of backups in a storage.

A manifest is written last, after every object of the backup is complete; a backup without
a manifest does not exist for any reader. Manifests are plain JSON (no secrets: sizes,
checksums, table names and counts) so listing needs no key.

Layout in a storage::

    logical/<db_id>/<backup_id>/dump.pgbf      pg_dump custom archive, encrypted
    logical/<db_id>/<backup_id>/globals.pgbf   pg_dumpall --globals-only, encrypted
    logical/<db_id>/<backup_id>/manifest.json  this manifest
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pgbackflow.tasks.errors import ConfigError, ObjectNotFoundError
from pgbackflow.tasks.storage import Storage

MANIFEST_NAME = "manifest.json"
LOGICAL_ROOT = "logical"

logger = logging.getLogger("pgbackflow.manifest")


def new_backup_id(now: datetime | None = None) -> str:
    """A sortable, unique backup id: ``20261121T101530Z-3fa9c2``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StoredObjectInfo(_Frozen):
    """One encrypted object of a backup."""

    key: str = Field(description="Key of the object in the storage.")
    raw_size: int = Field(description="Bytes before pgbackflow's compression and encryption.")
    stored_size: int = Field(description="Bytes stored.")
    sha256: str = Field(description="SHA-256 of the stored bytes, hex.")


class DatabaseInfo(_Frozen):
    """Identity of the backed-up database."""

    db_id: str
    name: str
    host: str
    port: int
    system_identifier: str | None
    database_oid: int


class TableRows(_Frozen):
    """Exact rows of one table in the backup's snapshot."""

    schema_name: str = Field(alias="schema")
    table: str
    key: str
    rows: int

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class LogicalManifest(_Frozen):
    """Everything known about one logical backup."""

    manifest_version: Literal[1] = 1
    kind: Literal["logical"] = "logical"
    backup_id: str
    database: DatabaseInfo
    server_version: str
    server_version_num: int
    pg_dump_version: str
    format: Literal["custom"] = "custom"
    compression: str = Field(description="Who compressed the dump and how, e.g. 'pg_dump zstd:5'.")
    started_at: datetime
    finished_at: datetime
    dump: StoredObjectInfo
    globals: StoredObjectInfo
    key_id: str
    snapshot: str
    tables: tuple[TableRows, ...]
    schema_count: int
    table_count: int
    database_size: int
    tool_version: str

    @property
    def server_major(self) -> int:
        """Major version of the source server."""
        return self.server_version_num // 10000

    @property
    def stored_size(self) -> int:
        """Bytes this backup occupies in one storage."""
        return self.dump.stored_size + self.globals.stored_size

    def rows_by_table(self) -> dict[str, int]:
        """``{schema.table: rows}`` as counted in the snapshot."""
        return {t.key: t.rows for t in self.tables}

    def to_json(self) -> bytes:
        """Serialised manifest."""
        return self.model_dump_json(indent=2, by_alias=True).encode() + b"\n"


def backup_prefix(db_id: str, backup_id: str) -> str:
    """Storage key prefix of one backup."""
    return f"{LOGICAL_ROOT}/{db_id}/{backup_id}/"


def write_manifest(storage: Storage, manifest: LogicalManifest) -> None:
    """Publish the manifest: the backup exists from this moment on."""
    key = backup_prefix(manifest.database.db_id, manifest.backup_id) + MANIFEST_NAME
    with storage.open_write(key) as writer:
        writer.write(manifest.to_json())


def _parse(data: bytes, key: str) -> LogicalManifest | None:
    try:
        return LogicalManifest.model_validate(json.loads(data))
    except (ValueError, ValidationError) as exc:
        logger.warning("ignoring unreadable manifest %s: %s", key, str(exc).splitlines()[0])
        return None


def list_backups(storage: Storage, db_id: str | None = None) -> list[LogicalManifest]:
    """All complete backups in ``storage`` (optionally of one database), oldest first."""
    prefix = f"{LOGICAL_ROOT}/" + (f"{db_id}/" if db_id else "")
    manifests: list[LogicalManifest] = []
    for item in storage.list(prefix):
        if not item.key.endswith("/" + MANIFEST_NAME):
            continue
        manifest = _parse(storage.read_bytes(item.key), item.key)
        if manifest is not None:
            manifests.append(manifest)
    manifests.sort(key=lambda m: (m.finished_at, m.backup_id))
    return manifests


def find_backup(storage: Storage, backup_id: str, db_id: str | None = None) -> LogicalManifest:
    """The backup with ``backup_id``, or the newest one when it is ``latest``.

    Raises:
        ObjectNotFoundError: no such backup (the message lists what exists).
        ConfigError: ``latest`` is ambiguous because several databases are stored.
    """
    backups = list_backups(storage, db_id)
    if backup_id == "latest":
        if not backups:
            scope = f" of database {db_id}" if db_id else ""
            raise ObjectNotFoundError(
                f"no backups{scope} in {storage.location}: run pgbackflow backup first"
            )
        databases = sorted({m.database.db_id for m in backups})
        if len(databases) > 1:
            raise ConfigError(
                f"{storage.location} holds backups of several databases ({', '.join(databases)}):"
                " name one with --db-id"
            )
        return backups[-1]
    for manifest in backups:
        if manifest.backup_id == backup_id:
            return manifest
    newest = ", ".join(m.backup_id for m in backups[-3:]) or "none"
    raise ObjectNotFoundError(
        f"backup '{backup_id}' not found in {storage.location} (newest: {newest}): "
        "run pgbackflow list to see the backups"
    )


def find_manifest_key(manifest: LogicalManifest) -> str:
    """Storage key of a manifest."""
    return backup_prefix(manifest.database.db_id, manifest.backup_id) + MANIFEST_NAME


__all__ = [
    "MANIFEST_NAME",
    "DatabaseInfo",
    "LogicalManifest",
    "ObjectNotFoundError",
    "StoredObjectInfo",
    "TableRows",
    "backup_prefix",
    "find_backup",
    "find_manifest_key",
    "list_backups",
    "new_backup_id",
    "write_manifest",
]
