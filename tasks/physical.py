"""Physical backups: pg_basebackup full and (PG 17+) incremental, as chains in a storage.

Everything runs remotely over the replication protocol. pg_basebackup writes one tar to
stdout (``-D - -Ft -X fetch``), so each backup is self-contained (it carries the WAL needed
to reach consistency); the uncompressed stream is compressed with multi-threaded zstd
(level 3, two threads) and encrypted in our own pipeline. The tar's ``backup_manifest`` is
picked out on the fly and stored as a second object: the next incremental's input. A cluster
with extra tablespaces gets one tar per tablespace, which pg_basebackup writes only into a
folder: those are spooled to a private temp folder and stored from there.

Layout in a storage::

    physical/<db_id>/base/<backup_id>/base.tar.pgbf         data directory tar, encrypted
    physical/<db_id>/base/<backup_id>/backup_manifest.pgbf  pg_basebackup's manifest, encrypted
    physical/<db_id>/base/<backup_id>/tablespace-<oid>.tar.pgbf  an extra tablespace, encrypted
    physical/<db_id>/base/<backup_id>/manifest.json         our chain metadata, written last
    physical/<db_id>/wal/...                                WAL segments (see tasks.wal)

Manifests carry a MAC that binds them to their place (see tasks.manifest); restores,
verifications and incremental planning use only manifests that verify with the keyring.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, Literal

import psycopg
from pydantic import BaseModel, ConfigDict, Field

from pgbackflow import __version__
from pgbackflow.tasks.database import (
    ConnectionSettings,
    connect,
    libpq_conninfo,
    libpq_password_env,
    lost_session_error,
)
from pgbackflow.tasks.errors import (
    ConfigError,
    DatabaseError,
    ObjectNotFoundError,
    PgBackflowError,
    TransientDatabaseError,
)
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.manifest import (
    Catalog,
    ManifestAuthenticationError,
    ManifestBinding,
    ManifestError,
    ManifestModel,
    SafeId,
    StoredObjectInfo,
    check_id,
    read_manifest_record,
    seal,
    signing_key,
)
from pgbackflow.tasks.pipeline import (
    ObjectWrite,
    decrypted_chunks,
    store_bytes,
    store_file,
    stream_tool_into_storages,
)
from pgbackflow.tasks.process import Tool, ToolFailedError
from pgbackflow.tasks.storage import Storage
from pgbackflow.tasks.storage.base import PHYSICAL_ROOT as PHYSICAL_ROOT
from pgbackflow.tasks.tarstream import TarMemberCapture
from pgbackflow.tasks.toolsets import Toolset
from pgbackflow.tasks.transfer import ProgressCallback

BASE_NAME = "base.tar.pgbf"
BACKUP_MANIFEST_NAME = "backup_manifest.pgbf"
MANIFEST_NAME = "manifest.json"
INCREMENTAL_MIN_MAJOR = 17
PHYSICAL_MIN_MAJOR = 14
# pg_basebackup's stream is uncompressed; two zstd workers keep up with it on two cores.
ZSTD_THREADS = 2
# Level 3 (pgBackRest's default too): a data directory compresses about as well as at 5,
# in half the CPU time; compression is what bounds a full backup's speed.
ZSTD_LEVEL = 3

logger = logging.getLogger("pgbackflow.physical")

Mode = Literal["full", "incremental"]


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` → integer position."""
    high, _, low = text.partition("/")
    try:
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise ConfigError(f"'{text}' is not a WAL position (LSN): expect e.g. 0/2000028") from None


def physical_db_id(system_identifier: str) -> str:
    """The id a cluster's physical backups and WAL are filed under."""
    return f"cluster-{system_identifier}"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TablespaceObject(_Frozen):
    """One extra tablespace of a backup, stored as its own tar."""

    oid: int
    location: str = Field(description="Where it lived on the source server.")
    object: StoredObjectInfo


class PhysicalManifest(ManifestModel):
    """One link of a chain: a full backup or an incremental on top of its parent."""

    KIND: ClassVar[str] = "physical"

    manifest_version: Literal[1] = 1
    kind: Literal["physical"] = "physical"
    backup_id: SafeId
    db_id: SafeId
    mode: Mode
    parent_id: SafeId | None = Field(description="The backup this incremental builds on.")
    full_id: SafeId = Field(description="The full backup that starts this chain.")
    full_reason: str | None = Field(
        default=None, description="Why a full was taken when an incremental was asked for."
    )
    system_identifier: str
    timeline: int
    start_lsn: str
    end_lsn: str
    wal_segment_size: int
    source: str = Field(description="user@host:port of the server, for people.")
    server_version: str
    server_version_num: int
    pg_basebackup_version: str
    started_at: datetime
    finished_at: datetime = Field(description="Earliest moment a restore can target.")
    base: StoredObjectInfo
    backup_manifest: StoredObjectInfo
    tablespaces: tuple[TablespaceObject, ...] = ()
    key_id: str
    cluster_size: int
    tool_version: str

    @property
    def server_major(self) -> int:
        """Major version of the source server."""
        return self.server_version_num // 10000

    @property
    def stored_size(self) -> int:
        """Bytes this backup occupies in one storage."""
        extra = sum(t.object.stored_size for t in self.tablespaces)
        return self.base.stored_size + self.backup_manifest.stored_size + extra

    @property
    def raw_size(self) -> int:
        """Bytes of tar (data directory and tablespaces) before compression."""
        return self.base.raw_size + sum(t.object.raw_size for t in self.tablespaces)

    def location_ids(self) -> tuple[str, str]:
        """``(db_id, backup_id)``."""
        return self.db_id, self.backup_id

    def object_keys(self) -> list[str]:
        """The data directory tar, pg_basebackup's manifest and the tablespace tars."""
        return [self.base.key, self.backup_manifest.key, *(t.object.key for t in self.tablespaces)]

    def order(self) -> tuple[datetime, str]:
        """Oldest first: by finish time, then id."""
        return self.finished_at, self.backup_id

    def to_json(self) -> bytes:
        """Serialised manifest without a MAC (what :func:`write_manifest` authenticates)."""
        return self.model_dump_json(indent=2).encode() + b"\n"


def backup_prefix(db_id: str, backup_id: str) -> str:
    """Storage key prefix of one physical backup (ids checked: they become key segments)."""
    check_id(db_id, "cluster id")
    check_id(backup_id, "backup id")
    return f"{PHYSICAL_ROOT}/{db_id}/base/{backup_id}/"


def manifest_key(manifest: PhysicalManifest) -> str:
    """Storage key of a physical backup's manifest."""
    return backup_prefix(manifest.db_id, manifest.backup_id) + MANIFEST_NAME


def physical_binding(db_id: str, backup_id: str) -> ManifestBinding:
    """What a physical manifest's MAC binds it to."""
    return ManifestBinding(
        PhysicalManifest.KIND, db_id, backup_id, backup_prefix(db_id, backup_id) + MANIFEST_NAME
    )


def write_manifest(storage: Storage, manifest: PhysicalManifest, master_key: MasterKey) -> None:
    """Publish the manifest, sealed with a MAC: the backup exists from this moment on.

    Args:
        storage: Where the backup's objects are.
        manifest: The manifest.
        master_key: Seals it: the key the backup was encrypted with (``manifest.key_id``).
    """
    binding = physical_binding(manifest.db_id, manifest.backup_id)
    key = signing_key(manifest.key_id, master_key, f"manifest {binding.storage_key}")
    data = seal(manifest.model_dump(mode="json"), binding, key)
    with storage.open_write(binding.storage_key, size_hint=len(data)) as writer:
        writer.write(data)


def scan_physical_backups(
    storage: Storage, db_id: str | None = None, keyring: Keyring | None = None
) -> Catalog[PhysicalManifest]:
    """Every physical manifest (optionally of one cluster), checked with ``keyring``: the
    physical view of the storage's catalog (:func:`pgbackflow.tasks.catalog.read_catalog`).

    Args:
        storage: Where to look.
        db_id: Only this cluster.
        keyring: Verify MACs with these keys; None: list without verifying.
    """
    from pgbackflow.tasks.catalog import read_catalog

    if db_id is not None:
        check_id(db_id, "cluster id")
    return read_catalog(storage, keyring, db_id=db_id, kinds=("physical",),
                        wal=False, keep_manifests=True).manifests("physical")


def list_physical_backups(
    storage: Storage, db_id: str | None = None, keyring: Keyring | None = None
) -> list[PhysicalManifest]:
    """The usable physical backups (optionally of one cluster), oldest first.

    With ``keyring`` only manifests whose MAC verifies; without, every readable one.
    Refused manifests are logged (one line each).
    """
    return scan_physical_backups(storage, db_id, keyring).listed()


def usable_backups(
    storage: Storage, db_id: str, keyring: Keyring | None, *, newest: bool
) -> tuple[list[PhysicalManifest], dict[str, str]]:
    """A cluster's usable backups (oldest first) and ``{backup_id: problem}`` of refused ones.

    Args:
        storage: Where to look.
        db_id: The cluster.
        keyring: Only manifests that verify with it are usable (None: every readable one).
        newest: The caller restores the newest state: refuse while a manifest that may be
            newer than the newest usable backup is refused (never fall back silently).

    Raises:
        ManifestError: ``newest`` and the newest manifest is refused, or no manifest is
            usable and some are refused (the message names the object and the fault).
    """
    catalog = scan_physical_backups(storage, db_id, keyring)
    if newest or not catalog.accepted:
        catalog.check_newest(f"picking the newest backup of {db_id}")
    else:
        for record in catalog.refused:
            logger.warning("%s (skipped)", record.problem)
    return catalog.accepted, catalog.refused_by_id()


def authenticate_backup(storage: Storage, manifest: PhysicalManifest, keyring: Keyring) -> None:
    """Re-read ``manifest`` from ``storage`` and check its MAC before its data is used.

    Restores call this for every backup they unpack, however the backup was picked.

    Raises:
        ManifestError: the stored manifest does not verify, or differs from ``manifest``.
    """
    key = manifest_key(manifest)
    record = read_manifest_record(
        storage, key, PhysicalManifest, physical_binding, (manifest.db_id, manifest.backup_id),
        keyring,
    )
    label = f"{storage.location}/{key}"
    if record is None:
        raise ManifestError(
            f"manifest {label} disappeared while restoring backup {manifest.backup_id}: "
            "someone is changing the storage; retry when it is quiet"
        )
    if record.status != "verified":
        raise record.error()
    if record.manifest != manifest:
        raise ManifestAuthenticationError(
            f"manifest {label} changed since the restore was planned: someone is changing "
            "the storage; retry when it is quiet"
        )


def stored_cluster_ids(storage: Storage) -> list[str]:
    """Ids of the clusters with physical backups in ``storage`` (usable or not)."""
    return scan_physical_backups(storage).db_ids()


def resolve_db_id(storage: Storage, db_id: str | None) -> str:
    """The given cluster id, or the only one stored; a clear error otherwise."""
    if db_id:
        return check_id(db_id, "cluster id")
    ids = stored_cluster_ids(storage)
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise ObjectNotFoundError(
            f"no physical backups in {storage.location}: run pgbackflow physical-backup first"
        )
    raise ConfigError(
        f"{storage.location} holds physical backups of several clusters ({', '.join(ids)}): "
        "name one with --db-id"
    )


def chain_of(
    backup: PhysicalManifest,
    backups: Sequence[PhysicalManifest],
    refused: Mapping[str, str] | None = None,
) -> list[PhysicalManifest]:
    """The full backup and incrementals that ``backup`` needs, full first.

    Args:
        backup: The chain's last link.
        backups: The usable backups.
        refused: ``{backup_id: problem}`` of backups whose manifests are refused.

    Raises:
        ObjectNotFoundError: a parent is missing from the storage.
        ManifestAuthenticationError: a parent's manifest is refused, or the chain loops.
    """
    by_id = {b.backup_id: b for b in backups}
    chain = [backup]
    while chain[-1].parent_id is not None:
        parent_id = chain[-1].parent_id
        if refused and parent_id in refused:
            raise ManifestAuthenticationError(
                f"backup {chain[-1].backup_id} needs its parent {parent_id}, whose manifest "
                f"is refused: {refused[parent_id]}"
            )
        parent = by_id.get(parent_id)
        if parent is not None and parent in chain:
            raise ManifestAuthenticationError(
                f"backup {parent.backup_id} is its own ancestor (parent ids form a loop): the "
                "manifests were tampered with; restore from another copy of the storage"
            )
        if parent is None:
            raise ObjectNotFoundError(
                f"backup {chain[-1].backup_id} needs its parent {chain[-1].parent_id}, which is "
                "not in the storage (deleted?): restore from an older chain or take a new full"
            )
        chain.append(parent)
    chain.reverse()
    return chain


# ---------------------------------------------------------------------------------------
# The source cluster


@dataclass(frozen=True)
class ClusterFacts:
    """What a physical backup needs to know about the server before it starts.

    Attributes:
        system_identifier: pg_control's system identifier (same for a primary and its copies).
        timeline: The timeline the server writes WAL on.
        version_num: ``server_version_num``.
        version: Human version, e.g. "17.6".
        wal_segment_size: Bytes per WAL segment.
        summarize_wal: The setting (None before PostgreSQL 17).
        extra_tablespaces: Tablespaces besides pg_default and pg_global.
        cluster_size: Sum of every database's size, bytes.
        can_replicate: The role has REPLICATION (or is a superuser).
        role: The role logged in.
    """

    system_identifier: str
    timeline: int
    version_num: int
    version: str
    wal_segment_size: int
    summarize_wal: bool | None
    extra_tablespaces: tuple[str, ...]
    cluster_size: int
    can_replicate: bool
    role: str

    @property
    def major(self) -> int:
        """Major version."""
        return self.version_num // 10000

    @property
    def db_id(self) -> str:
        """Where this cluster's backups are filed."""
        return physical_db_id(self.system_identifier)


_FACTS_SQL = """
SELECT (SELECT system_identifier::text FROM pg_control_system()),
       ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int,
       current_setting('server_version_num')::int,
       current_setting('server_version'),
       (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),
       current_setting('summarize_wal', true),
       ARRAY(SELECT spcname::text FROM pg_tablespace
             WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1),
       (SELECT coalesce(sum(pg_database_size(oid)), 0)::bigint FROM pg_database
        WHERE datallowconn),
       (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user),
       current_user
"""


def read_cluster_facts(settings: ConnectionSettings) -> ClusterFacts:
    """Connect and read what a physical backup needs to check first."""
    with connect(settings) as conn:
        try:
            row = conn.execute(_FACTS_SQL).fetchone()
        except psycopg.errors.ObjectNotInPrerequisiteState:
            raise ConfigError(
                f"database {settings.display} is a standby (in recovery): back up the primary"
            ) from None
        except psycopg.Error as exc:
            raise DatabaseError(
                f"database {settings.display}: reading the cluster's identity failed "
                f"({str(exc).strip().splitlines()[0]}): connect as a superuser or a role with "
                "REPLICATION and pg_monitor"
            ) from None
    assert row is not None
    summarize = None if row[5] in (None, "") else row[5] == "on"
    return ClusterFacts(
        system_identifier=row[0], timeline=int(row[1]), version_num=int(row[2]),
        version=str(row[3]).split()[0], wal_segment_size=int(row[4]), summarize_wal=summarize,
        extra_tablespaces=tuple(row[6]), cluster_size=int(row[7]), can_replicate=bool(row[8]),
        role=str(row[9]),
    )


def check_physical_source(facts: ClusterFacts, settings: ConnectionSettings) -> None:
    """Refuse, with the fix, a server or role a physical backup cannot work with."""
    if facts.major < PHYSICAL_MIN_MAJOR:
        raise ConfigError(
            f"database {settings.display} runs PostgreSQL {facts.version}: physical backups "
            f"need {PHYSICAL_MIN_MAJOR} or newer; use a logical backup (pgbackflow backup)"
        )
    if not facts.can_replicate:
        raise ConfigError(
            f"role {facts.role!r} on {settings.host}:{settings.port} lacks the REPLICATION "
            f"attribute physical backups need: run ALTER ROLE {_ident(facts.role)} REPLICATION; "
            "and allow it in pg_hba.conf (a 'replication' line)"
        )


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def incremental_refusal(facts: ClusterFacts) -> str | None:
    """Why this server cannot take an incremental backup, or None when it can."""
    if facts.major < INCREMENTAL_MIN_MAJOR:
        return (
            f"PostgreSQL {facts.version} cannot take incremental backups (they need "
            f"{INCREMENTAL_MIN_MAJOR} or newer): a full backup is what this version can do "
            "(pgbackflow physical-backup without --incremental)"
        )
    if not facts.summarize_wal:
        return (
            "summarize_wal is off, and incremental backups need it: run ALTER SYSTEM SET "
            "summarize_wal = on; SELECT pg_reload_conf(); (no restart needed), then take a "
            "full backup to start the chain"
        )
    return None


@dataclass(frozen=True)
class BackupPlan:
    """What the next backup of a cluster will be.

    Attributes:
        mode: "full" or "incremental".
        parent: The backup an incremental builds on.
        full_reason: Why a full is taken although an incremental was asked for.
    """

    mode: Mode
    parent: PhysicalManifest | None = None
    full_reason: str | None = None


def plan_backup(
    facts: ClusterFacts,
    backups: Sequence[PhysicalManifest],
    *,
    incremental: bool,
    newer_refused: str | None = None,
) -> BackupPlan:
    """Full, or incremental on the newest backup; a broken chain forces a full and says why.

    Args:
        facts: The server.
        backups: The cluster's usable backups, oldest first.
        incremental: An incremental was asked for.
        newer_refused: Why a manifest that may be newer than ``backups[-1]`` is refused:
            building on an older parent than the newest is not done, a full is taken.

    Raises:
        ConfigError: an incremental was asked of a server that can never take one.
    """
    if not incremental:
        return BackupPlan("full")
    refusal = incremental_refusal(facts)
    if refusal is not None:
        raise ConfigError(refusal)
    if newer_refused is not None:
        return BackupPlan("full", full_reason=f"the newest manifest is refused: {newer_refused}")
    if not backups:
        return BackupPlan("full", full_reason="no earlier backup of this cluster to build on")
    parent = backups[-1]
    if parent.system_identifier != facts.system_identifier:
        return BackupPlan(
            "full",
            full_reason=f"the newest backup {parent.backup_id} is of another cluster (system "
            f"identifier {parent.system_identifier}, server has {facts.system_identifier})",
        )
    if parent.timeline != facts.timeline:
        return BackupPlan(
            "full",
            full_reason=f"the server switched from timeline {parent.timeline} (backup "
            f"{parent.backup_id}) to {facts.timeline}",
        )
    try:
        chain_of(parent, backups)
    except ObjectNotFoundError as exc:
        return BackupPlan("full", full_reason=f"the chain is broken: {exc}")
    return BackupPlan("incremental", parent=parent)


def plan_backup_in(
    storage: Storage, facts: ClusterFacts, keyring: Keyring, *, incremental: bool
) -> BackupPlan:
    """:func:`plan_backup` on the backups in ``storage`` whose manifests verify."""
    catalog = scan_physical_backups(storage, facts.db_id, keyring)
    newer = catalog.newer_refused()
    return plan_backup(
        facts, catalog.accepted, incremental=incremental,
        newer_refused=newer[-1].problem if newer else None,
    )


# ---------------------------------------------------------------------------------------
# Taking the backup


@dataclass(frozen=True)
class BaseBackupResult:
    """The objects of one pg_basebackup run.

    Attributes:
        base: The data directory tar.
        backup_manifest: pg_basebackup's manifest.
        timeline: From the manifest's WAL range.
        start_lsn: Where replay must start.
        end_lsn: Where the backup becomes consistent.
        system_identifier: From the backup's pg_control.
    """

    base: ObjectWrite
    backup_manifest: ObjectWrite
    timeline: int
    start_lsn: str
    end_lsn: str
    system_identifier: str
    tablespaces: tuple[tuple[int, str, ObjectWrite], ...] = ()

    @property
    def writes(self) -> tuple[ObjectWrite, ...]:
        """Every object of the backup."""
        return (self.base, self.backup_manifest, *(t[2] for t in self.tablespaces))


class IncrementalChainBroken(PgBackflowError):
    """The server cannot build an incremental on the given parent (WAL summaries missing)."""


_SUMMARIES_MISSING = re.compile(r"WAL summar", re.IGNORECASE)


@contextmanager
def parent_manifest_file(
    storage: Storage, parent: PhysicalManifest, keyring: Keyring
) -> Iterator[Path]:
    """The parent's backup_manifest, decrypted (checksum checked) into a private temp file."""
    with tempfile.TemporaryDirectory(prefix="pgbackflow-inc-") as tmp:
        path = Path(tmp) / "parent.backup_manifest"
        with path.open("wb") as out:
            for chunk in decrypted_chunks(storage, parent.backup_manifest, keyring):
                out.write(chunk)
        yield path


def system_identifier_from_control(control: bytes) -> str:
    """pg_control starts with the 64-bit system identifier (host byte order)."""
    if len(control) < 8:
        raise PgBackflowError("the backup's global/pg_control is missing or short")
    return str(int.from_bytes(control[:8], sys.byteorder))


def take_base_backup(
    settings: ConnectionSettings,
    toolset: Toolset,
    storages: Sequence[Storage],
    master_key: MasterKey,
    prefix: str,
    *,
    incremental_from: Path | None = None,
    size_hint: int | None = None,
    progress: ProgressCallback | None = None,
    tablespaces: bool = False,
) -> BaseBackupResult:
    """Run pg_basebackup and stream its tar, encrypted, into ``prefix`` of every storage.

    Args:
        settings: The source server (any database; the replication connection ignores it).
        toolset: Whose pg_basebackup to run (the server's major).
        storages: Destinations.
        master_key: Wraps the objects' data keys.
        prefix: Key prefix of this backup.
        incremental_from: The parent's backup_manifest for an incremental.
        size_hint: Expected uncompressed size, for progress and multipart planning.
        progress: Called with the bytes received so far.
        tablespaces: The cluster has extra tablespaces: pg_basebackup writes one tar per
            tablespace, which it can only do into a folder, so the tars are spooled to a
            private temp folder (``PGBACKFLOW_SPOOL_DIR`` or the system's) and stored from
            there; it needs free space for the uncompressed backup.
    """
    pg_basebackup = Tool(toolset.binary("pg_basebackup"))
    capture = TarMemberCapture(["backup_manifest", "global/pg_control", "tablespace_map"])
    common = [
        "--format=tar",
        "--wal-method=fetch",
        "--checkpoint=fast",
        "--no-password",
        "--manifest-checksums=CRC32C",
        f"--dbname={libpq_conninfo(settings)}",
    ]
    if incremental_from is not None:
        common.append(f"--incremental={incremental_from}")
    with libpq_password_env(settings) as env:
        try:
            if tablespaces:
                return _spooled_base_backup(
                    pg_basebackup, common, env, storages, master_key, prefix, capture, progress,
                    settings,
                )
            base = stream_tool_into_storages(
                pg_basebackup, ["--pgdata=-", *common], env, storages, prefix + BASE_NAME,
                master_key, compress=True, zstd_threads=ZSTD_THREADS, zstd_level=ZSTD_LEVEL,
                size_hint=size_hint, progress=progress, tap=capture,
            )
        except ToolFailedError as exc:
            raise _explain_basebackup_failure(exc, settings) from None
    return _finish_base_backup(
        base, capture.members.get("backup_manifest"), capture, storages, master_key, prefix,
        settings, (),
    )


def _spooled_base_backup(
    pg_basebackup: Tool,
    common: list[str],
    env: dict[str, str],
    storages: Sequence[Storage],
    master_key: MasterKey,
    prefix: str,
    capture: TarMemberCapture,
    progress: ProgressCallback | None,
    settings: ConnectionSettings,
) -> BaseBackupResult:
    spool_parent = os.environ.get("PGBACKFLOW_SPOOL_DIR") or None
    with tempfile.TemporaryDirectory(prefix="pgbackflow-basebackup-", dir=spool_parent) as tmp:
        spool = Path(tmp) / "backup"
        pg_basebackup.run(["--pgdata", str(spool), *common], env=env, timeout=None)
        base = store_file(
            spool / "base.tar", storages, prefix + BASE_NAME, master_key,
            zstd_threads=ZSTD_THREADS, zstd_level=ZSTD_LEVEL, progress=progress, tap=capture,
        )
        locations = _tablespace_map(capture.members.get("tablespace_map", b""))
        written = []
        for tar in sorted(spool.glob("*.tar")):
            if tar.name == "base.tar":
                continue
            oid = int(tar.stem)
            write = store_file(
                tar, storages, prefix + tablespace_object_name(oid), master_key,
                zstd_threads=ZSTD_THREADS, zstd_level=ZSTD_LEVEL,
            )
            written.append((oid, locations.get(oid, ""), write))
        manifest = (spool / "backup_manifest").read_bytes()
    return _finish_base_backup(
        base, manifest, capture, storages, master_key, prefix, settings, tuple(written)
    )


def tablespace_object_name(oid: int) -> str:
    """Object name of a tablespace's tar inside a backup's prefix."""
    return f"tablespace-{oid}.tar.pgbf"


def _tablespace_map(text: bytes) -> dict[int, str]:
    """``tablespace_map`` lines are ``<oid> <location>``."""
    found: dict[int, str] = {}
    for line in text.decode("utf-8", "replace").splitlines():
        oid, _, location = line.partition(" ")
        if oid.isdigit():
            found[int(oid)] = location
    return found


def _finish_base_backup(
    base: ObjectWrite,
    manifest_bytes: bytes | None,
    capture: TarMemberCapture,
    storages: Sequence[Storage],
    master_key: MasterKey,
    prefix: str,
    settings: ConnectionSettings,
    tablespaces: tuple[tuple[int, str, ObjectWrite], ...],
) -> BaseBackupResult:
    if manifest_bytes is None:
        raise PgBackflowError(
            f"pg_basebackup of {settings.host}:{settings.port} produced no backup_manifest: "
            "the backup is incomplete"
        )
    wal_range = json.loads(manifest_bytes)["WAL-Ranges"]
    control = capture.members.get("global/pg_control", b"")
    system_identifier = system_identifier_from_control(control)
    manifest_write = store_bytes(
        manifest_bytes, storages, prefix + BACKUP_MANIFEST_NAME, master_key
    )
    return BaseBackupResult(
        base=base,
        backup_manifest=manifest_write,
        timeline=int(wal_range[-1]["Timeline"]),
        start_lsn=str(wal_range[0]["Start-LSN"]),
        end_lsn=str(wal_range[-1]["End-LSN"]),
        system_identifier=system_identifier,
        tablespaces=tablespaces,
    )


def _explain_basebackup_failure(
    exc: ToolFailedError, settings: ConnectionSettings
) -> PgBackflowError:
    text = "\n".join([exc.result.stderr_tail, *exc.result.stderr_errors])
    where = f"{settings.host}:{settings.port}"
    # A restart, shutdown or network failure mid-copy: transient, the task retries it (the
    # aborted objects were never published).
    lost = lost_session_error(settings, "the base backup", text, reader="pg_basebackup")
    if lost is not None:
        return lost
    if _SUMMARIES_MISSING.search(text):
        first = next((line for line in text.splitlines() if "summar" in line.lower()), text)
        return IncrementalChainBroken(f"pg_basebackup on {where}: {first.strip()}")
    if "no pg_hba.conf entry for replication" in text:
        return ConfigError(
            f"{where} refuses replication connections from this host for role "
            f"{settings.user!r}: add a 'host replication {settings.user} <this host> "
            "scram-sha-256' line to pg_hba.conf and reload"
        )
    if "must be superuser or replication role" in text or "permission denied to start WAL" in text:
        return ConfigError(
            f"role {settings.user!r} on {where} lacks REPLICATION: run ALTER ROLE "
            f"{_ident(settings.user)} REPLICATION;"
        )
    if "could not connect" in text or "Connection refused" in text or "timeout expired" in text:
        line = next((x for x in text.splitlines() if "connect" in x or "timeout" in x), text)
        return TransientDatabaseError(f"pg_basebackup cannot reach {where}: {line.strip()}")
    if "number of requested standby connections exceeds" in text or "max_wal_senders" in text:
        return DatabaseError(
            f"{where} has no free WAL sender: raise max_wal_senders (restart needed) or stop "
            "another replication client"
        )
    return exc


def build_manifest(
    backup_id: str,
    facts: ClusterFacts,
    settings: ConnectionSettings,
    toolset: Toolset,
    master_key: MasterKey,
    plan: BackupPlan,
    result: BaseBackupResult,
    started_at: datetime,
) -> PhysicalManifest:
    """The manifest of a base backup just taken (what the physical flow publishes)."""
    return PhysicalManifest(
        backup_id=backup_id,
        db_id=facts.db_id,
        mode=plan.mode,
        parent_id=plan.parent.backup_id if plan.parent else None,
        full_id=plan.parent.full_id if plan.parent else backup_id,
        full_reason=plan.full_reason,
        system_identifier=result.system_identifier,
        timeline=result.timeline,
        start_lsn=result.start_lsn,
        end_lsn=result.end_lsn,
        wal_segment_size=facts.wal_segment_size,
        source=f"{settings.user}@{settings.host}:{settings.port}",
        server_version=facts.version,
        server_version_num=facts.version_num,
        pg_basebackup_version=toolset.version,
        started_at=started_at,
        finished_at=datetime.now(UTC),
        base=result.base.info,
        backup_manifest=result.backup_manifest.info,
        tablespaces=tuple(
            TablespaceObject(oid=oid, location=location, object=write.info)
            for oid, location, write in result.tablespaces
        ),
        key_id=master_key.key_id_hex,
        cluster_size=facts.cluster_size,
        tool_version=f"pgbackflow {__version__}",
    )


__all__ = [
    "BACKUP_MANIFEST_NAME",
    "BASE_NAME",
    "BackupPlan",
    "BaseBackupResult",
    "ClusterFacts",
    "IncrementalChainBroken",
    "PhysicalManifest",
    "TablespaceObject",
    "authenticate_backup",
    "backup_prefix",
    "build_manifest",
    "chain_of",
    "check_physical_source",
    "incremental_refusal",
    "list_physical_backups",
    "manifest_key",
    "parent_manifest_file",
    "parse_lsn",
    "physical_binding",
    "physical_db_id",
    "plan_backup",
    "plan_backup_in",
    "read_cluster_facts",
    "resolve_db_id",
    "scan_physical_backups",
    "stored_cluster_ids",
    "tablespace_object_name",
    "take_base_backup",
    "usable_backups",
    "write_manifest",
]
