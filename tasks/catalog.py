"""One catalog of what a storage holds, per database: backups, chains, WAL, orphans.

:func:`read_catalog` lists a storage once (``logical/`` and ``physical/``), reads every
manifest with the existing reader (:func:`pgbackflow.tasks.manifest.read_manifest_record`:
MAC, ids and placement checked) and sorts every other object into the backup it belongs to,
the WAL of its cluster, or the orphans. Nothing here deletes; :mod:`pgbackflow.tasks.retention`
plans and carries out deletions from a catalog.

Manifests are untrusted input. Only a manifest whose MAC verifies with the keyring makes a
backup (its objects are then the ones it names, in its own folder). A folder whose manifest
is refused (wrong key, MAC fails, malformed) is *left alone*: neither a backup to keep nor
objects to sweep, since a refusal may as well mean "written with a key you did not pass".
Objects of a folder without any manifest are orphans (an interrupted or running backup):
they go only once older than the sweep's grace period.

A retention run records which backups it is about to delete in a journal
(``<root>/<db_id>/deleting-<run id>.json``, sealed like a manifest, see
:func:`journal_binding`) before it deletes their manifests; a folder without a manifest
whose backup a verified journal names is an unfinished deletion that the next run completes
at once, whatever the objects' age.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import os
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pgbackflow.tasks.errors import ObjectNotFoundError, PgBackflowError
from pgbackflow.tasks.keys import Keyring, MasterKey, derive_subkey
from pgbackflow.tasks.manifest import (
    LOGICAL_ROOT,
    MANIFEST_NAME,
    Catalog,
    LogicalManifest,
    ManifestBinding,
    ManifestError,
    ManifestModel,
    ManifestRecord,
    ManifestStatus,
    check_id,
    is_valid_id,
    logical_binding,
    open_manifest,
    read_manifest_record,
    seal,
)
from pgbackflow.tasks.physical import (
    PHYSICAL_ROOT,
    PhysicalManifest,
    parse_lsn,
    physical_binding,
)
from pgbackflow.tasks.storage import LocalFolderStorage, ObjectWriter, Storage, StoredObject
from pgbackflow.tasks.storage.base import WriteActivity
from pgbackflow.tasks.wal import (
    DEFAULT_SEGMENT_SIZE,
    OBJECT_SUFFIX,
    PARTIAL,
    WAL_DIR,
    WalInventory,
    history_hole,
    is_wal_file_name,
    parse_segment_name,
    route_gaps,
    segment_name,
    segments_per_id,
    stored_route,
)

JOURNAL_PREFIX = "deleting-"
"""Deletion journals: ``<root>/<db_id>/deleting-<run id>.json``, sealed, written before a
batch of manifests is deleted and removed once the batch is gone."""
MANIFEST_READERS = 8
"""Manifests read at once (S3 round trips dominate a large catalog)."""
READ_BATCH = 256
"""Manifest reads handed to the readers at a time."""
CACHE_ENV = "PGBACKFLOW_CACHE_DIR"
"""Where remote storages' manifests are cached (default: ~/.cache/pgbackflow); "off": never."""
SUMMARY_CACHE_FORMAT = b"pgbackflow-catalog-summaries-v1"
"""First word of a summary cache file (:class:`SummaryCache`); another one is a miss."""
SUMMARY_MAC_INFO = b"pgbackflow catalog summary cache mac v1"
"""HKDF ``info`` of the key that authenticates summary cache files (never a manifest's)."""

Kind = Literal["logical", "physical"]


# ---------------------------------------------------------------------------------------
# Entries


@dataclass(frozen=True, slots=True)
class Backup:
    """One usable backup: what listing, picking, retention and the tables need of its
    verified manifest, and the objects found in its folder.

    The parsed manifest itself is not kept (~5-9 kB of pydantic objects a backup: a catalog
    of 10,000s of backups would grow with them); :func:`load_manifest` reads it again,
    authenticated as the catalog read it, where a caller needs all of it (restore,
    verification, key rotation).

    Attributes:
        kind: "logical" or "physical".
        db_id: Database (logical) or cluster (physical) id.
        backup_id: The backup id.
        mode: "logical", "full" or "incremental".
        finished_at: When the backup finished (the time retention rules look at).
        key_id: Master key id the manifest names (the objects' key).
        status: How its manifest was accepted: "verified", or without a keyring
            "unverified" / "no-mac".
        auth_key_id: Key id its MAC names.
        data_size: Bytes of its objects as its manifest states them.
        server_version: PostgreSQL version backed up.
        objects: Every object in the backup's folder (manifest and marker included).
        missing: Objects the manifest names that are not stored (an incomplete backup).
        database: Database name (logical; "" for physical).
        table_count: Tables dumped (logical; None for physical).
        parent_id: The backup an incremental builds on (None for full and logical backups).
        timeline: Timeline of a physical backup (0 for logical).
        start_lsn: Start LSN of a physical backup ("" for logical).
        end_lsn: End LSN of a physical backup ("" for logical).
        wal_segment_size: WAL segment size of a physical backup (0 for logical).
    """

    kind: Kind
    db_id: str
    backup_id: str
    mode: str
    finished_at: datetime
    key_id: str
    status: ManifestStatus
    auth_key_id: str | None
    data_size: int
    server_version: str
    objects: tuple[StoredObject, ...]
    missing: tuple[str, ...] = ()
    database: str = ""
    table_count: int | None = None
    parent_id: str | None = None
    timeline: int = 0
    start_lsn: str = ""
    end_lsn: str = ""
    wal_segment_size: int = 0

    @property
    def manifest_key(self) -> str:
        """Storage key of the manifest."""
        return _backup_prefix(self.kind, self.db_id, self.backup_id) + MANIFEST_NAME

    @property
    def stored_size(self) -> int:
        """Bytes of every object in the folder."""
        return sum(o.size for o in self.objects)

    def order(self) -> tuple[datetime, str]:
        """Oldest first: by finish time, then id (as the manifests order)."""
        return self.finished_at, self.backup_id


_shared: dict[str, str] = {}


def _share(text: str) -> str:
    """One string object for values many backups repeat (key ids, versions, names)."""
    return _shared.setdefault(text, text) if len(_shared) < 4096 else text


def _summary(kind: Kind, db_id: str, record: ManifestRecord[Any], objects: Sequence[StoredObject],
             missing: Sequence[str]) -> Backup:
    """The catalog's record of a backup whose manifest was accepted (``record.manifest``)."""
    return Backup(objects=tuple(objects), missing=tuple(missing),
                  **_summary_fields(kind, db_id, record))


def _summary_fields(kind: Kind, db_id: str, record: ManifestRecord[Any]) -> dict[str, Any]:
    """The fields of :func:`_summary` but the objects."""
    manifest = record.manifest
    assert manifest is not None
    common: dict[str, Any] = {
        "kind": kind, "db_id": db_id, "backup_id": manifest.backup_id,
        "finished_at": manifest.finished_at, "key_id": _share(manifest.key_id),
        "status": record.status,
        "auth_key_id": None if record.auth_key_id is None else _share(record.auth_key_id),
        "data_size": manifest.stored_size, "server_version": _share(manifest.server_version),
    }
    if isinstance(manifest, PhysicalManifest):
        return {"mode": manifest.mode, "parent_id": manifest.parent_id,
                "timeline": manifest.timeline, "start_lsn": manifest.start_lsn,
                "end_lsn": manifest.end_lsn, "wal_segment_size": manifest.wal_segment_size,
                **common}
    assert isinstance(manifest, LogicalManifest)
    return {"mode": "logical", "database": _share(manifest.database.name),
            "table_count": manifest.table_count, **common}


def load_manifest(storage: Storage, keyring: Keyring | None,
                  backup: Backup) -> LogicalManifest | PhysicalManifest:
    """The full manifest of a catalogued backup, for callers that need all of it.

    Read again and checked as :func:`read_catalog` checks it (MAC with ``keyring``, model,
    ids, placement: the storage is untrusted, so what was verified at listing time is not
    taken on trust now), and it must still be the manifest the catalog listed.

    Raises:
        ObjectNotFoundError: the manifest is gone since the listing.
        ManifestError: it is refused now, or it changed since the listing.
    """
    record = read_manifest_record(storage, backup.manifest_key, _model_of(backup.kind),
                                  _binding_of(backup.kind), (backup.db_id, backup.backup_id),
                                  keyring)
    label = f"{storage.location}/{backup.manifest_key}"
    if record is None:
        raise ObjectNotFoundError(f"manifest {label} is gone since the storage was listed "
                                  "(deleted by a retention run?): list the storage again")
    if record.manifest is None or not record.accepted(keyring is not None):
        raise record.error()
    manifest = record.manifest
    assert isinstance(manifest, LogicalManifest | PhysicalManifest)
    if _summary(backup.kind, backup.db_id, record, backup.objects, backup.missing) != backup:
        raise ManifestError(f"manifest {label} changed since the storage was listed: list "
                            "the storage again")
    return manifest


@dataclass(frozen=True)
class RefusedFolder:
    """A backup folder whose manifest is refused: left alone by retention and sweeps.

    Attributes:
        key: The manifest's key.
        backup_id: The id in the key (None when not a valid id).
        problem: Why the manifest is refused (one line).
        objects: Every object of the folder.
    """

    key: str
    backup_id: str | None
    problem: str
    objects: tuple[StoredObject, ...]


@dataclass(frozen=True, slots=True)
class WalFile:
    """One WAL object of a cluster.

    Attributes:
        key: Storage key.
        name: WAL file name (``<segment>``, ``<segment>.partial`` or ``<tl>.history``).
        kind: "segment", "partial" or "history".
        timeline: Its timeline.
        number: Segment number (None for history files).
        size: Stored bytes.
        modified: Upload time.
    """

    key: str
    name: str
    kind: Literal["segment", "partial", "history"]
    timeline: int
    number: int | None
    size: int
    modified: datetime


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(moment: datetime) -> int:
    """Exact microseconds since the epoch (what :class:`WalRun` keeps per segment)."""
    return (moment - _EPOCH) // _MICROSECOND


def _moment(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


@dataclass(frozen=True, slots=True)
class WalRun:
    """Complete segments ``first`` .. ``last`` of one timeline, stored without a hole.

    The catalog keeps a cluster's complete segments as runs, not as one object each: per
    segment only its size and upload time (16 bytes in two arrays: what retention's byte
    count and its one-hour rule need) instead of a listed object (~1.5 kB), so a catalog's
    memory grows with its backups and WAL gaps, not with its WAL. A segment's key is a
    function of its name, so keys are computed, not kept.

    Attributes:
        db_id: The cluster.
        timeline: The timeline.
        first: Number of the first segment.
        segment_size: Bytes per segment (numbers and names depend on it).
        sizes: Stored bytes of each segment, from ``first`` on.
        modified_us: Upload time of each segment, microseconds since the epoch (UTC).
    """

    db_id: str
    timeline: int
    first: int
    segment_size: int
    sizes: array[int]
    modified_us: array[int]

    @property
    def last(self) -> int:
        """Number of the last segment."""
        return self.first + len(self.sizes) - 1

    @property
    def count(self) -> int:
        """Segments in the run."""
        return len(self.sizes)

    @property
    def size(self) -> int:
        """Stored bytes of the run."""
        return sum(self.sizes)

    @property
    def newest(self) -> datetime:
        """Upload time of the run's newest segment."""
        return _moment(max(self.modified_us))

    def key(self, number: int) -> str:
        """Storage key of segment ``number``."""
        return (f"{PHYSICAL_ROOT}/{self.db_id}/{WAL_DIR}/"
                f"{segment_name(self.timeline, number, self.segment_size)}{OBJECT_SUFFIX}")

    def keys(self) -> Iterator[str]:
        """The run's keys, in order."""
        return (self.key(number) for number in range(self.first, self.last + 1))

    def files(self) -> Iterator[WalFile]:
        """The run's segments as :class:`WalFile` (one object each: for small runs or
        callers that need them one by one)."""
        for index, size in enumerate(self.sizes):
            number = self.first + index
            yield WalFile(self.key(number), segment_name(self.timeline, number,
                                                         self.segment_size),
                          "segment", self.timeline, number, size,
                          _moment(self.modified_us[index]))

    def select(self, below: int, uploaded_by: datetime) -> list[WalRun]:
        """The parts of the run numbered below ``below`` and uploaded at or before
        ``uploaded_by`` (what retention may delete), as runs."""
        limit = _micros(uploaded_by)
        parts: list[WalRun] = []
        start: int | None = None
        stop = min(self.count, max(0, below - self.first))
        for index in range(stop + 1):
            fits = index < stop and self.modified_us[index] <= limit
            if fits and start is None:
                start = index
            elif not fits and start is not None:
                parts.append(WalRun(self.db_id, self.timeline, self.first + start,
                                    self.segment_size, self.sizes[start:index],
                                    self.modified_us[start:index]))
                start = None
        return parts


@dataclass(frozen=True, slots=True)
class Orphan:
    """An object no usable backup or WAL needs.

    Attributes:
        key: Storage key.
        size: Bytes.
        modified: Last write.
        reason: Why it is an orphan.
        unfinished_deletion: Part of a backup a retention run was deleting (verified
            marker, manifest gone): removed at once, whatever its age.
        folder_activity: In a backup folder without a manifest, the last write into that
            folder (any of its objects, this one included, or a write still in progress):
            a backup still running keeps all of its objects while it makes progress.
    """

    key: str
    size: int
    modified: datetime
    reason: str
    unfinished_deletion: bool = False
    folder_activity: datetime | None = None

    @property
    def last_activity(self) -> datetime:
        """What the grace period is measured from."""
        return self.folder_activity or self.modified


@dataclass(frozen=True)
class Journal:
    """A verified deletion journal: backups a retention run set out to delete.

    Attributes:
        key: Its storage key.
        run_id: The run's id (in the key).
        backup_ids: The backups it names.
    """

    key: str
    run_id: str
    backup_ids: frozenset[str]


@dataclass(frozen=True)
class DatabaseCatalog:
    """What a storage holds for one database (logical) or cluster (physical).

    Attributes:
        kind: "logical" or "physical".
        db_id: The id.
        backups: Usable backups, oldest first.
        refused: Folders whose manifest is refused (left alone).
        wal_runs: Complete WAL segments (physical only) as runs without holes, by
            timeline and number (:class:`WalRun`; :attr:`wal` gives them one by one).
        wal_files: The other WAL objects: history files and partial segments, by key.
        wal_gaps: Holes in the WAL a restore replays (``<segment(s)> (LSN a to b)``): from
            the end of the oldest full backup the stored WAL reaches back to (else the newest
            full) to the newest WAL, across timeline switches as replay follows them
            (:func:`pgbackflow.tasks.wal.stored_route`, the route PITR takes).
        segment_size: WAL segment size (from the backups; the default without).
        orphans: Objects nothing needs.
        journals: Verified deletion journals (unverified ones are orphans).
        records: The manifests of this database that are not usable (what ``list`` shows
            as refused; without their parsed manifest); read with ``keep_manifests=True``,
            every manifest, parsed (what :meth:`StorageCatalog.manifests` picks from).
        authenticated: Manifests were checked with a keyring (else: listed unverified, and
            no retention may be planned from it).
    """

    kind: Kind
    db_id: str
    backups: tuple[Backup, ...] = ()
    refused: tuple[RefusedFolder, ...] = ()
    wal_runs: tuple[WalRun, ...] = ()
    wal_files: tuple[WalFile, ...] = ()
    wal_gaps: tuple[str, ...] = ()
    segment_size: int = DEFAULT_SEGMENT_SIZE
    orphans: tuple[Orphan, ...] = ()
    journals: tuple[Journal, ...] = ()
    records: tuple[ManifestRecord[Any], ...] = ()
    authenticated: bool = True

    @property
    def newest(self) -> Backup | None:
        """The newest usable backup."""
        return self.backups[-1] if self.backups else None

    def by_id(self) -> dict[str, Backup]:
        """Usable backups by id (a copy of the cached map)."""
        return dict(self._by_id)

    @functools.cached_property
    def _by_id(self) -> dict[str, Backup]:
        # Built once: retention walks the ancestors of every kept backup (quadratic when
        # each walk rebuilt it: 3.8 s of a 50,000-object plan).
        return {b.backup_id: b for b in self.backups}

    def ancestors(self, backup: Backup) -> list[Backup]:
        """The usable backups ``backup`` builds on, nearest first (stops at a missing,
        refused or looping parent: such a chain is reported by :meth:`broken_chains`)."""
        by_id = self._by_id
        found: list[Backup] = []
        current = backup
        while current.parent_id is not None:
            parent = by_id.get(current.parent_id)
            if parent is None or parent is backup or parent in found:
                break
            found.append(parent)
            current = parent
        return found

    def broken_chains(self) -> dict[str, str]:
        """``{backup_id: problem}`` of incrementals whose chain is not complete."""
        by_id = self.by_id()
        refused = {r.backup_id for r in self.refused if r.backup_id}
        problems: dict[str, str] = {}
        for backup in self.backups:
            seen = {backup.backup_id}
            current = backup
            while current.parent_id is not None:
                parent_id = current.parent_id
                if parent_id in refused:
                    problems[backup.backup_id] = f"parent {parent_id}'s manifest is refused"
                    break
                if parent_id in seen:
                    problems[backup.backup_id] = "parent ids form a loop"
                    break
                parent = by_id.get(parent_id)
                if parent is None:
                    problems[backup.backup_id] = f"parent {parent_id} is not in the storage"
                    break
                seen.add(parent_id)
                current = parent
        return problems

    def wal_inventory(self) -> WalInventory:
        """The WAL as :class:`pgbackflow.tasks.wal.WalInventory` (gaps, newest segment)."""
        return _inventory(self.wal_runs, self.wal_files, self.segment_size)

    @property
    def wal(self) -> tuple[WalFile, ...]:
        """Every WAL object, one :class:`WalFile` each, by key (built on each call: a
        cluster's WAL can be large; prefer :attr:`wal_runs`, :attr:`wal_count`,
        :attr:`wal_newest`)."""
        files = [f for run in self.wal_runs for f in run.files()] + list(self.wal_files)
        return tuple(sorted(files, key=lambda f: f.key))

    @property
    def wal_count(self) -> int:
        """WAL objects stored (segments, partials, history files)."""
        return sum(run.count for run in self.wal_runs) + len(self.wal_files)

    @property
    def wal_size(self) -> int:
        """Stored bytes of the WAL."""
        return sum(run.size for run in self.wal_runs) + sum(f.size for f in self.wal_files)

    @property
    def wal_newest(self) -> datetime | None:
        """Upload time of the newest WAL object."""
        return max([run.newest for run in self.wal_runs]
                   + [f.modified for f in self.wal_files], default=None)

    @property
    def stored_size(self) -> int:
        """Bytes of every object of this database in the storage."""
        return (sum(b.stored_size for b in self.backups) + self.wal_size
                + sum(o.size for o in self.orphans)
                + sum(sum(x.size for x in r.objects) for r in self.refused))


@dataclass(frozen=True)
class StorageCatalog:
    """Everything a storage holds, per database.

    Attributes:
        location: The storage's location.
        databases: One entry per (kind, id), logical first, by id.
        orphans: Objects under ``logical/`` or ``physical/`` outside any database folder.
        temporaries: Leftovers of killed writers older than the grace period (one line each).
        read_at: When the listing was taken.
        invalid: ``(kind, record)`` of objects named like a manifest whose key holds an
            invalid id (refused unread; their objects are among ``orphans``).
        authenticated: Manifests were checked with a keyring.
        keeps_manifests: Read with ``keep_manifests=True`` (see :meth:`manifests`).
    """

    location: str
    databases: tuple[DatabaseCatalog, ...]
    orphans: tuple[Orphan, ...] = ()
    temporaries: tuple[str, ...] = ()
    read_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    invalid: tuple[tuple[Kind, ManifestRecord[Any]], ...] = ()
    authenticated: bool = True

    keeps_manifests: bool = False

    def manifests(self, kind: Kind) -> Catalog[Any]:
        """The manifests of ``kind`` as a :class:`pgbackflow.tasks.manifest.Catalog`: what
        the pickers (``latest``, a backup id, a cluster's chain) work on. Only of a catalog
        read with ``keep_manifests=True``."""
        if not self.keeps_manifests:
            raise RuntimeError("read_catalog(..., keep_manifests=True) keeps the manifests")
        records = [r for e in self.databases if e.kind == kind for r in e.records]
        records += [r for k, r in self.invalid if k == kind]
        return Catalog(tuple(records), self.authenticated)

    def listing(self, kind: Kind) -> tuple[list[Backup], list[ManifestRecord[Any]]]:
        """What ``list`` / ``physical-list`` show: the usable backups of ``kind``, oldest
        first, and the refused manifests (invalid ids included), by key."""
        usable = sorted((b for e in self.databases if e.kind == kind for b in e.backups),
                        key=Backup.order)
        refused = [r for e in self.databases if e.kind == kind for r in e.records
                   if not r.accepted(self.authenticated)]
        refused += [r for k, r in self.invalid if k == kind]
        return usable, sorted(refused, key=lambda r: r.key)

    def database(self, db_id: str, kind: Kind | None = None) -> DatabaseCatalog | None:
        """The entry of ``db_id`` (of ``kind`` when given)."""
        for entry in self.databases:
            if entry.db_id == db_id and (kind is None or entry.kind == kind):
                return entry
        return None


# ---------------------------------------------------------------------------------------
# Deletion journals


def journal_binding(kind: Kind, db_id: str, run_id: str) -> ManifestBinding:
    """What a deletion journal's MAC binds it to (its own kind: never a manifest)."""
    check_id(db_id, "database id")
    check_id(run_id, "run id")
    root = LOGICAL_ROOT if kind == "logical" else PHYSICAL_ROOT
    return ManifestBinding(f"{kind}-deletion", db_id, run_id,
                           f"{root}/{db_id}/{JOURNAL_PREFIX}{run_id}.json")


def seal_journal(kind: Kind, db_id: str, run_id: str, backup_ids: Sequence[str],
                 master_key: MasterKey) -> tuple[str, bytes]:
    """``(key, bytes)`` of a deletion journal naming ``backup_ids``."""
    binding = journal_binding(kind, db_id, run_id)
    body = {"kind": kind, "db_id": db_id, "run_id": run_id, "backup_ids": list(backup_ids),
            "written_at": datetime.now(UTC).isoformat()}
    return binding.storage_key, seal(body, binding, master_key)


def _read_journal(storage: Storage, item: StoredObject, kind: Kind, db_id: str,
                  keyring: Keyring) -> Journal | None:
    """The journal at ``item`` if its name is a journal's and its MAC verifies."""
    name = item.key.rsplit("/", 1)[1]
    run_id = name.removeprefix(JOURNAL_PREFIX).removesuffix(".json")
    if not (name.startswith(JOURNAL_PREFIX) and name.endswith(".json")
            and is_valid_id(run_id)) or item.size > 16 * 1024 * 1024:
        return None
    try:
        raw = storage.read_bytes(item.key)
    except ObjectNotFoundError:
        return None
    opened = open_manifest(raw, journal_binding(kind, db_id, run_id), keyring,
                           f"{storage.location}/{item.key}")
    ids = opened.body.get("backup_ids") if opened.body else None
    if opened.status != "verified" or not isinstance(ids, list):
        return None
    return Journal(item.key, run_id, frozenset(i for i in ids if is_valid_id(i)))


# ---------------------------------------------------------------------------------------
# Reading


def _cache_folder(storage: Storage, kind: str) -> Path | None:
    """``<cache root>/<kind>/<storage digest>``; None for local folders or when off."""
    setting = os.environ.get(CACHE_ENV, "")
    if isinstance(storage, LocalFolderStorage) or setting == "off":
        return None
    root = Path(setting) if setting else Path.home() / ".cache" / "pgbackflow"
    return root / kind / hashlib.sha256(storage.location.encode()).hexdigest()[:24]


class ManifestCache:
    """Raw manifest bytes of a remote storage, kept locally by key, ETag, size and upload time.

    A manifest is written once; one whose ETag, size or upload time changed is fetched again.
    Cached bytes are authenticated on every read like fetched ones (the MAC is checked
    after the cache), so the cache saves round trips and trusts nothing. Entries of
    manifests no longer listed are removed by :meth:`prune`.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def for_storage(cls, storage: Storage) -> ManifestCache | None:
        """The cache of ``storage``; None for local folders or when switched off."""
        folder = _cache_folder(storage, "manifests")
        return None if folder is None else cls(folder)

    @staticmethod
    def _name(item: StoredObject) -> str:
        # The ETag too: S3 upload times have one-second steps, so a manifest rewritten with
        # the same size within a second is told apart only by its content's fingerprint.
        name = hashlib.sha256(f"{item.key}\0{item.etag or ''}".encode()).hexdigest()
        return f"{name}-{item.size}-{int(item.modified.timestamp() * 1e6)}"

    def _path(self, item: StoredObject) -> Path:
        return self.folder / self._name(item)

    def get(self, item: StoredObject) -> bytes | None:
        """The cached bytes of ``item`` (same key, size and upload time), or None."""
        try:
            data = self._path(item).read_bytes()
        except OSError:
            return None
        return data if len(data) == item.size else None

    def put(self, item: StoredObject, data: bytes) -> None:
        """Keep ``data``; a cache that cannot be written is no error."""
        path = self._path(item)
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
            temporary.write_bytes(data)
            temporary.replace(path)
        except OSError:
            pass

    def prune(self, listed: Iterable[StoredObject]) -> None:
        """Remove the entries of manifests that are gone or changed."""
        wanted = {self._name(item) for item in listed}  # no Path per manifest: 14,000 of them
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return
        for entry in entries:
            if entry.name not in wanted:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


class _CachedReads(Storage):
    """``storage`` whose ``read_bytes`` of listed manifests goes through the cache."""

    def __init__(self, storage: Storage, cache: ManifestCache,
                 listed: dict[str, StoredObject]) -> None:
        self._storage = storage
        self._cache = cache
        self._listed = listed

    @property
    def location(self) -> str:
        return self._storage.location

    def read_bytes(self, key: str) -> bytes:
        item = self._listed.get(key)
        if item is not None and (data := self._cache.get(item)) is not None:
            return data
        data = self._storage.read_bytes(key)
        if item is not None and len(data) == item.size:
            self._cache.put(item, data)
        return data

    def open_write(self, key: str, *, size_hint: int | None = None) -> ObjectWriter:
        return self._storage.open_write(key, size_hint=size_hint)

    def open_read(self, key: str) -> BinaryIO:
        return self._storage.open_read(key)

    def create_new(self, key: str, data: bytes) -> bool:
        return self._storage.create_new(key, data)

    def list(self, prefix: str = "") -> list[StoredObject]:
        return self._storage.list(prefix)

    def stat(self, key: str) -> StoredObject:
        return self._storage.stat(key)

    def delete(self, key: str) -> None:
        self._storage.delete(key)


_SUMMARY_FIELDS = ("kind", "db_id", "backup_id", "mode", "finished_at", "key_id", "status",
                   "auth_key_id", "data_size", "server_version", "database", "table_count",
                   "parent_id", "timeline", "start_lsn", "end_lsn", "wal_segment_size")
"""What a summary cache entry keeps of a :class:`Backup` (then the names its manifest
gives its objects; the objects themselves come from the listing)."""


class SummaryCache:
    """What the catalog kept of each verified manifest of a remote storage, in one local file.

    A warm ``retention --dry-run`` of 100,000 objects spent most of its time authenticating
    and parsing 14,000 cached manifests again; this keeps the result instead (the slim
    :class:`Backup` fields and the names of the objects its manifest lists), so a manifest
    unchanged since it was verified is neither read nor parsed again. An entry is found by the
    manifest's key, size, upload time and ETag as listed: a manifest replaced or rewritten
    misses and is read from the storage and verified. Only manifests verified with a key
    of the keyring in use are kept, and an entry counts only while its key is still in the
    keyring.

    The file is the user's own, yet it must not make a backup of what no key sealed: it is
    authenticated with an HMAC under a key derived from the current master key (HKDF,
    ``SUMMARY_MAC_INFO``) over the storage's location and every entry. A file that fails
    it, cannot be read, is of another format or was written with another current key is
    ignored whole (every manifest read again) and rewritten.

    File: ``<format> <key id> <hmac hex>\n`` then one line per manifest:
    ``<key>\t<size>\t<upload µs>\t<etag>\t<JSON list>``.
    """

    def __init__(self, path: Path, location: str, master_key: MasterKey,
                 keyring: Keyring) -> None:
        self.path = path
        self._location = location.encode()
        self._key_id = master_key.key_id_hex
        self._mac_key = derive_subkey(master_key.material, SUMMARY_MAC_INFO)
        self._keyring = keyring
        self._lines: dict[str, bytes] = {}
        self._used: set[str] = set()
        self._added: list[tuple[str, bytes]] = []
        self._dirty = False

    @classmethod
    def for_storage(cls, storage: Storage, keyring: Keyring | None) -> SummaryCache | None:
        """The summary cache of ``storage``, loaded; None for local folders, without a
        keyring (nothing verified to keep) or when caching is off."""
        path = _cache_folder(storage, "catalogs")
        if path is None or keyring is None:
            return None
        cache = cls(path, storage.location, keyring.current, keyring)
        cache._load()
        return cache

    def _mac(self, body: bytes) -> str:
        return hmac.new(self._mac_key, self._location + b"\0" + body, hashlib.sha256).hexdigest()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError:
            return
        header, _, body = data.partition(b"\n")
        words = header.split(b" ")
        if (len(words) != 3 or words[0] != SUMMARY_CACHE_FORMAT
                or words[1] != self._key_id.encode()
                or not hmac.compare_digest(words[2], self._mac(body).encode())):
            self._dirty = True  # rewritten with what this run verifies
            return
        for line in body.splitlines():
            head, _, _ = line.rpartition(b"\t")
            self._lines[head.decode()] = line

    @staticmethod
    def _lookup(item: StoredObject) -> str:
        return f"{item.key}\t{item.size}\t{_micros(item.modified)}\t{item.etag or ''}"

    def found(self, kind: Kind, db_id: str, backup_id: str, item: StoredObject,
              items: Sequence[StoredObject]) -> _Found | None:
        """The catalog's record of manifest ``item`` from the cache, or None (a miss)."""
        lookup = self._lookup(item)
        line = self._lines.get(lookup)
        if line is None:
            return None
        try:
            values = json.loads(line[len(lookup.encode()) + 1:])
            fields = dict(zip(_SUMMARY_FIELDS, values[:-1], strict=True))
            names = values[-1]
            fields["finished_at"] = datetime.fromisoformat(fields["finished_at"])
        except (ValueError, TypeError, KeyError):
            return None
        if ((fields["kind"], fields["db_id"], fields["backup_id"]) != (kind, db_id, backup_id)
                or fields["status"] != "verified" or not isinstance(names, list)
                or self._keyring.find_hex(str(fields["auth_key_id"])) is None):
            return None
        for name in ("key_id", "auth_key_id", "server_version", "database"):
            fields[name] = _share(fields[name])
        self._used.add(lookup)
        folder = item.key[: -len(MANIFEST_NAME)]
        return _placed(fields, [folder + n for n in names], item.key, items)

    def remember(self, item: StoredObject, backup: Backup, object_keys: Sequence[str]) -> None:
        """Keep ``backup`` (verified from manifest ``item``) for the next run."""
        folder = item.key[: -len(MANIFEST_NAME)]
        lookup = self._lookup(item)
        if (backup.status != "verified" or "\n" in lookup or lookup.count("\t") != 3
                or not all(k.startswith(folder) for k in object_keys)):
            return  # kept as the catalog would not read it back: not kept
        values: list[Any] = [getattr(backup, name) for name in _SUMMARY_FIELDS]
        values[_SUMMARY_FIELDS.index("finished_at")] = backup.finished_at.isoformat()
        values.append([k[len(folder):] for k in object_keys])
        self._added.append((lookup, f"{lookup}\t{json.dumps(values)}".encode()))

    def save(self, scope: Sequence[str]) -> None:
        """Write the entries found and added by this run; entries under ``scope`` (the
        prefixes listed) that were not found are dropped (gone or changed), the others
        kept. Nothing written when nothing changed; a cache that cannot be written is no
        error."""
        kept = {lookup: line for lookup, line in self._lines.items()
                if lookup in self._used or not lookup.startswith(tuple(scope))}
        if not self._dirty and not self._added and len(kept) == len(self._lines):
            return
        kept.update(self._added)
        body = b"\n".join(kept.values())
        header = b" ".join((SUMMARY_CACHE_FORMAT, self._key_id.encode(),
                            self._mac(body).encode()))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
            with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                      "wb") as out:
                out.write(header + b"\n" + body)
            temporary.replace(self.path)
        except OSError:
            pass


def _backup_prefix(kind: Kind, db_id: str, backup_id: str) -> str:
    check_id(db_id, "database id")
    check_id(backup_id, "backup id")
    if kind == "logical":
        return f"{LOGICAL_ROOT}/{db_id}/{backup_id}/"
    return f"{PHYSICAL_ROOT}/{db_id}/base/{backup_id}/"


def _binding_of(kind: Kind) -> Callable[[str, str], ManifestBinding]:
    return logical_binding if kind == "logical" else physical_binding


def _model_of(kind: Kind) -> type[ManifestModel]:
    return LogicalManifest if kind == "logical" else PhysicalManifest


class _WalPacker:
    """A cluster's WAL folder while it is listed: complete segments packed per timeline as
    they come (name as one 64-bit number, size, upload time: 24 bytes a segment), the rest
    (history files, partial segments, foreign names) kept as listed. Runs are cut once the
    segment size is known (:func:`_wal_runs`): it is in the manifests, read after the
    listing."""

    __slots__ = ("db_id", "other", "prefix", "segments")

    def __init__(self, db_id: str) -> None:
        self.db_id = db_id
        self.prefix = f"{PHYSICAL_ROOT}/{db_id}/{WAL_DIR}/"
        self.segments: dict[int, tuple[array[int], array[int], array[int]]] = {}
        self.other: list[StoredObject] = []

    def add(self, item: StoredObject) -> None:
        stem = item.key[len(self.prefix):].removesuffix(OBJECT_SUFFIX)
        if len(stem) != 24 or not item.key.endswith(OBJECT_SUFFIX) or not is_wal_file_name(
                stem):
            self.other.append(item)
            return
        packed = self.segments.get(int(stem[:8], 16))
        if packed is None:
            packed = self.segments[int(stem[:8], 16)] = (array("Q"), array("q"), array("q"))
        packed[0].append(int(stem[8:], 16))
        packed[1].append(item.size)
        packed[2].append(_micros(item.modified))

    def clear(self) -> None:
        self.segments.clear()
        self.other.clear()


@dataclass
class _Db:
    kind: Kind
    db_id: str
    folders: dict[str, list[StoredObject]] = field(default_factory=lambda: defaultdict(list))
    wal: _WalPacker | None = None
    stray: list[StoredObject] = field(default_factory=list)


def _group(objects: Iterable[StoredObject]) -> tuple[dict[tuple[Kind, str], _Db],
                                                     list[StoredObject]]:
    """Objects by database and backup folder; what fits nowhere goes to the second list."""
    dbs: dict[tuple[Kind, str], _Db] = {}
    outside: list[StoredObject] = []

    def db(kind: Kind, db_id: str) -> _Db:
        return dbs.setdefault((kind, db_id), _Db(kind, db_id))

    for item in objects:
        parts = item.key.split("/")
        if parts[0] == LOGICAL_ROOT and len(parts) >= 2 and is_valid_id(parts[1]):
            if len(parts) == 4 and is_valid_id(parts[2]):
                db("logical", parts[1]).folders[parts[2]].append(item)
            else:
                db("logical", parts[1]).stray.append(item)
        elif parts[0] == PHYSICAL_ROOT and len(parts) >= 2 and is_valid_id(parts[1]):
            if len(parts) == 5 and parts[2] == "base" and is_valid_id(parts[3]):
                db("physical", parts[1]).folders[parts[3]].append(item)
            elif len(parts) == 4 and parts[2] == WAL_DIR:
                entry = db("physical", parts[1])
                if entry.wal is None:
                    entry.wal = _WalPacker(parts[1])
                entry.wal.add(item)
            else:
                db("physical", parts[1]).stray.append(item)
        else:
            outside.append(item)
    return dbs, outside


def _by_key(item: StoredObject) -> str:
    return item.key


def _manifest_ids(parts: Sequence[str]) -> tuple[Kind, str, str] | None:
    """``(kind, db_id, backup_id)`` of a key split at ``/`` that is named like a manifest
    (ids not checked), else None."""
    if len(parts) == 4 and parts[0] == LOGICAL_ROOT and parts[3] == MANIFEST_NAME:
        return "logical", parts[1], parts[2]
    if (len(parts) == 5 and parts[0] == PHYSICAL_ROOT and parts[2] == "base"
            and parts[4] == MANIFEST_NAME):
        return "physical", parts[1], parts[3]
    return None


def read_catalog(
    storage: Storage,
    keyring: Keyring | None,
    *,
    db_id: str | None = None,
    grace: timedelta | None = None,
    kinds: Sequence[Kind] = ("logical", "physical"),
    wal: bool = True,
    keep_manifests: bool = False,
) -> StorageCatalog:
    """Read ``storage`` into a catalog; manifests authenticated with ``keyring``.

    Args:
        storage: Where to look.
        keyring: Only manifests whose MAC verifies with one of these keys make backups;
            None lists every readable manifest unverified (``list`` without a key; no
            retention can be planned from such a catalog).
        db_id: Only this database or cluster.
        grace: A ``timedelta``: also list the killed writers' temporaries older than it.
        kinds: Only these kinds of backup.
        wal: Also list the clusters' WAL (with ``db_id``: False lists only its backups).
        keep_manifests: Also keep every parsed manifest, for
            :meth:`StorageCatalog.manifests` (the pickers of restore, verification and
            PITR, which read one database's backups whole). Without, a backup is kept as
            its slim :class:`Backup` (what listing, retention and the tables need), so
            memory grows by ~1 kB a backup, not by its manifest.
    """
    if db_id is not None:
        check_id(db_id, "database id")
    read_at = datetime.now(UTC)
    prefixes = [
        f"{root}/" + (f"{db_id}/" + ("base/" if kind == "physical" and not wal else "")
                      if db_id else "")
        for root, kind in ((LOGICAL_ROOT, "logical"), (PHYSICAL_ROOT, "physical"))
        if kind in kinds
    ]
    cache = ManifestCache.for_storage(storage)
    # The writes in progress, before the listing: an upload that completes meanwhile is
    # then either still in progress here or listed there. Only retention (``grace``) ages
    # orphans; restore and list need no permission to list uploads.
    writing = storage.write_activity(prefixes) if grace is not None else WriteActivity()

    def group(prefix: str) -> tuple[dict[tuple[Kind, str], _Db], list[StoredObject]]:
        # Page by page: the WAL is packed as it comes, never held as a listing.
        return _group(storage.iter_list(prefix))

    if cache is None or len(prefixes) == 1:
        grouped = [group(prefix) for prefix in prefixes]
    else:  # remote: both listings' round trips at once (their databases are disjoint)
        with ThreadPoolExecutor(len(prefixes), thread_name_prefix="pgbackflow-list") as pool:
            grouped = list(pool.map(group, prefixes))
    dbs = {key: entry for found, _ in grouped for key, entry in found.items()}
    outside = sorted((o for _, stray in grouped for o in stray), key=_by_key)
    del grouped
    for entry in dbs.values():  # a local folder lists in directory order
        entry.stray.sort(key=_by_key)
        for items in entry.folders.values():
            items.sort(key=_by_key)
    if not wal:
        for entry in dbs.values():
            if entry.wal is not None:
                entry.wal.clear()
    invalid: list[tuple[Kind, ManifestRecord[Any]]] = []
    for item in outside + [o for entry in dbs.values() for o in entry.stray]:
        ids = _manifest_ids(item.key.split("/"))
        if ids is not None and not (is_valid_id(ids[1]) and is_valid_id(ids[2])):
            record = read_manifest_record(storage, item.key, _model_of(ids[0]),
                                          _binding_of(ids[0]), (ids[1], ids[2]), keyring)
            assert record is not None  # refused from its key alone: nothing read
            invalid.append((ids[0], record))
    manifests: list[tuple[Kind, str, str, StoredObject]] = []
    for (kind, found_id), entry in dbs.items():
        for backup_id, items in entry.folders.items():
            manifests += [(kind, found_id, backup_id, o) for o in items
                          if o.key.rsplit("/", 1)[1] == MANIFEST_NAME]

    summaries = None if keep_manifests else SummaryCache.for_storage(storage, keyring)

    def read(job: tuple[Kind, str, str, StoredObject], source: Storage = storage) -> _Found | None:
        kind, found_id, backup_id, item = job
        record = read_manifest_record(source, item.key, _model_of(kind), _binding_of(kind),
                                      (found_id, backup_id), keyring, size=item.size)
        # Made slim at once, so the parsed manifests are never all held together.
        found = _found(kind, found_id, record, dbs[(kind, found_id)].folders[backup_id],
                       keyring is not None, keep_manifests)
        if summaries is not None and found is not None and found.backup is not None:
            assert record is not None and record.manifest is not None
            summaries.remember(item, found.backup, record.manifest.object_keys())
        return found

    records: dict[tuple[Kind, str, str], _Found | None] = {}
    if summaries is not None:  # unchanged manifests: what was verified before, unread
        unread: list[tuple[Kind, str, str, StoredObject]] = []
        for job in manifests:
            hit = summaries.found(*job, dbs[(job[0], job[1])].folders[job[2]])
            if hit is None:
                unread.append(job)
            else:
                records[job[:3]] = hit
        manifests_listed, manifests = manifests, unread
    else:
        manifests_listed = manifests
    if cache is None:  # a local folder: no round trips to overlap
        records.update(((m[0], m[1], m[2]), read(m)) for m in manifests)
    else:
        def read_cached(job: tuple[Kind, str, str, StoredObject]) -> _Found | None:
            return read(job, _CachedReads(storage, cache, {job[3].key: job[3]}))

        with ThreadPoolExecutor(MANIFEST_READERS, thread_name_prefix="pgbackflow-catalog") as pool:
            # A bounded batch at a time: Executor.map submits every job at once, and a
            # pending future weighs ~1 kB (as much as the backup's record).
            for start in range(0, len(manifests), READ_BATCH):
                batch = manifests[start : start + READ_BATCH]
                records.update(zip(((m[0], m[1], m[2]) for m in batch),
                                   pool.map(read_cached, batch), strict=True))
        if db_id is None and len(kinds) == 2:
            cache.prune(m[3] for m in manifests_listed)
    if summaries is not None:
        summaries.save(prefixes)
    databases = [
        _database(storage, keyring, entry, records, writing)
        for _, entry in sorted(dbs.items(), key=lambda kv: (kv[0][0] != "logical", kv[0][1]))
    ]
    stray = tuple(Orphan(o.key, o.size, o.modified, "not inside a database folder")
                  for o in outside)
    temporaries = storage.list_stale_writes(grace) if grace is not None else ()
    return StorageCatalog(storage.location, tuple(databases), stray, temporaries, read_at,
                          tuple(invalid), keyring is not None, keep_manifests)


@dataclass(frozen=True, slots=True)
class _Found:
    """A manifest as :func:`read_catalog` keeps it.

    Attributes:
        record: Its record (parsed manifest dropped unless manifests are kept; None for a
            usable one then: it lives on as ``backup``).
        backup: The backup, when the manifest is usable.
        unnamed: Objects of the backup's folder that its manifest does not name.
    """

    record: ManifestRecord[Any] | None
    backup: Backup | None = None
    unnamed: tuple[StoredObject, ...] = ()


def _found(kind: Kind, db_id: str, record: ManifestRecord[Any] | None,
           items: Sequence[StoredObject], authenticated: bool, keep: bool) -> _Found | None:
    if record is None:  # vanished since the listing
        return None
    manifest = record.manifest
    if manifest is None or not record.accepted(authenticated):
        # Refused: kept for ``list`` (why), without a parsed manifest unless asked.
        return _Found(record if keep or manifest is None
                      else dataclasses.replace(record, manifest=None))
    placed = _placed(_summary_fields(kind, db_id, record), manifest.object_keys(),
                     record.key, items)
    return dataclasses.replace(placed, record=record) if keep else placed


def _placed(fields: dict[str, Any], keys: Sequence[str], manifest_key: str,
            items: Sequence[StoredObject]) -> _Found:
    """The backup of ``fields`` (its manifest's summary) with the listed ``items`` of its
    folder: the ones its manifest names (``keys``) missing from them, those it does not
    name apart."""
    listed = {o.key for o in items}
    named = {*keys, manifest_key}
    return _Found(None, Backup(objects=tuple(items),
                               missing=tuple(k for k in keys if k not in listed), **fields),
                  tuple(o for o in items if o.key not in named))


def _database(
    storage: Storage,
    keyring: Keyring | None,
    entry: _Db,
    records: dict[tuple[Kind, str, str], _Found | None],
    writing: WriteActivity,
) -> DatabaseCatalog:
    kind, db_id = entry.kind, entry.db_id
    backups: list[Backup] = []
    found: list[ManifestRecord[Any]] = []
    refused: list[RefusedFolder] = []
    orphans: list[Orphan] = []
    journals: list[Journal] = []
    authenticated = keyring is not None
    for item in entry.stray:
        journal = _read_journal(storage, item, kind, db_id, keyring) if keyring else None
        if journal is not None:
            journals.append(journal)
        else:
            orphans.append(Orphan(item.key, item.size, item.modified,
                                  "not inside a backup folder"))
    doomed = set().union(*(j.backup_ids for j in journals))
    for backup_id, items in sorted(entry.folders.items()):
        read = records.get((kind, db_id, backup_id))
        record = read.record if read is not None else None
        if record is not None:
            found.append(record)
        if read is not None and read.backup is not None:
            backups.append(read.backup)
            orphans += [Orphan(o.key, o.size, o.modified,
                               f"in backup {backup_id}'s folder but not named by its manifest")
                        for o in read.unnamed]
        elif record is not None:
            refused.append(RefusedFolder(record.key, record.backup_id,
                                         record.problem or "refused", tuple(items)))
        elif backup_id in doomed:
            orphans += [Orphan(o.key, o.size, o.modified,
                               f"left by an unfinished deletion of backup {backup_id}",
                               unfinished_deletion=True) for o in items]
        else:
            folder = items[0].key.rpartition("/")[0]
            last = max([o.modified for o in items] + [writing.last(folder) or _EPOCH])
            orphans += [Orphan(o.key, o.size, o.modified,
                               f"backup folder {backup_id} has no manifest (a backup that "
                               "failed, was killed, or is still running)",
                               folder_activity=last) for o in items]
    backups.sort(key=Backup.order)
    segment_size = DEFAULT_SEGMENT_SIZE
    physical = [b for b in backups if b.kind == "physical"]
    if physical:
        segment_size = physical[-1].wal_segment_size
    runs, wal_files, wal_orphans = _wal_runs(entry.wal or _WalPacker(db_id), segment_size)
    gaps = _gaps(storage, keyring, db_id, physical, _inventory(runs, wal_files, segment_size))
    return DatabaseCatalog(
        kind, db_id, tuple(backups), tuple(refused), tuple(runs), tuple(wal_files),
        tuple(gaps), segment_size, tuple(orphans + wal_orphans), tuple(journals), tuple(found),
        authenticated,
    )


def _wal_runs(packer: _WalPacker,
             segment_size: int) -> tuple[list[WalRun], list[WalFile], list[Orphan]]:
    """A listed WAL folder as runs of complete segments, the other WAL files (history
    files, partial segments not superseded) and the orphans (foreign names, partial
    uploads of a segment stored complete). Empties ``packer``."""
    per_id = segments_per_id(segment_size)
    runs: list[WalRun] = []
    loose: list[StoredObject] = []  # a low half past the segment count: no server names so
    for timeline in sorted(packer.segments):
        names, sizes, times = packer.segments.pop(timeline)
        order: Iterable[int] = range(len(names))
        if any(names[i] >= names[i + 1] for i in range(len(names) - 1)):
            order = sorted(order, key=names.__getitem__)  # listings come sorted; be sure
        run: WalRun | None = None
        for index in order:
            packed = names[index]
            if packed & 0xFFFFFFFF >= per_id:
                loose.append(StoredObject(
                    f"{packer.prefix}{timeline:08X}{packed:016X}{OBJECT_SUFFIX}", sizes[index],
                    _moment(times[index])))
                continue
            number = (packed >> 32) * per_id + (packed & 0xFFFFFFFF)
            if run is None or number != run.last + 1:
                run = WalRun(packer.db_id, timeline, number, segment_size, array("q"),
                             array("q"))
                runs.append(run)
            run.sizes.append(sizes[index])
            run.modified_us.append(times[index])
    files: list[WalFile] = []
    orphans: list[Orphan] = []
    for item in sorted(packer.other + loose, key=lambda o: o.key):
        name = item.key[len(packer.prefix):].removesuffix(OBJECT_SUFFIX)
        if not item.key.endswith(OBJECT_SUFFIX) or not is_wal_file_name(name):
            orphans.append(Orphan(item.key, item.size, item.modified,
                                  "not a WAL file name (foreign object)"))
            continue
        if name.endswith(".history"):
            files.append(WalFile(item.key, name, "history", int(name[:8], 16), None,
                                 item.size, item.modified))
            continue
        partial = name.endswith(PARTIAL)
        timeline, number = parse_segment_name(name.removesuffix(PARTIAL), segment_size)
        files.append(WalFile(item.key, name, "partial" if partial else "segment", timeline,
                             number, item.size, item.modified))
    packer.clear()
    loose_complete = {(f.timeline, f.number) for f in files if f.kind == "segment"}
    kept: list[WalFile] = []
    for wal_file in files:
        if wal_file.kind == "partial" and (
                (wal_file.timeline, wal_file.number) in loose_complete
                or _in_runs(runs, wal_file.timeline, wal_file.number)):
            orphans.append(Orphan(wal_file.key, wal_file.size, wal_file.modified,
                                  "partial upload of a segment stored complete (superseded)"))
        else:
            kept.append(wal_file)
    return runs, kept, orphans


def _in_runs(runs: Sequence[WalRun], timeline: int, number: int | None) -> bool:
    """Whether segment ``number`` of ``timeline`` is in one of ``runs`` (sorted)."""
    if number is None:
        return False
    index = bisect.bisect_right(runs, (timeline, number), key=lambda r: (r.timeline, r.first))
    return index > 0 and runs[index - 1].timeline == timeline and runs[index - 1].last >= number


def wal_inventory(items: Sequence[StoredObject], db_id: str, segment_size: int) -> WalInventory:
    """The :class:`~pgbackflow.tasks.wal.WalInventory` of a listing of ``db_id``'s WAL folder
    (foreign names and partials of segments stored complete left out)."""
    packer = _WalPacker(db_id)
    for item in items:
        packer.add(item)
    runs, files, _ = _wal_runs(packer, segment_size)
    return _inventory(runs, files, segment_size)


def _inventory(runs: Iterable[WalRun], files: Iterable[WalFile],
               segment_size: int) -> WalInventory:
    inventory = WalInventory(segment_size)
    newest: list[datetime] = []
    for run in runs:
        inventory.complete.setdefault(run.timeline, set()).update(
            range(run.first, run.last + 1))
        newest.append(run.newest)
    for wal_file in files:
        if wal_file.kind == "history":
            inventory.histories.add(wal_file.timeline)
        else:
            assert wal_file.number is not None
            target = inventory.partial if wal_file.kind == "partial" else inventory.complete
            target.setdefault(wal_file.timeline, set()).add(wal_file.number)
        newest.append(wal_file.modified)
    inventory.newest = max(newest, default=None)
    return inventory


def _gaps(storage: Storage, keyring: Keyring | None, db_id: str,
          physical: Sequence[Backup], inventory: WalInventory) -> list[str]:
    """The holes on the route replay takes from the oldest full the WAL reaches back to
    (else the newest full) to the newest WAL, following timeline switches at the points
    the newest timeline's history file names (read and authenticated with ``keyring``;
    without a key, or when it cannot be read, estimated from the stored segments)."""
    fulls = [p for p in physical if p.mode == "full"]
    if not fulls or inventory.newest is None:
        return []
    size = inventory.segment_size
    base = fulls[-1]
    for full in fulls:
        stored = inventory.complete.get(full.timeline, set()) | inventory.partial.get(
            full.timeline, set())
        if stored and min(stored) <= parse_lsn(full.end_lsn) // size:
            base = full
            break
    first = parse_lsn(base.end_lsn) // size
    hole = history_hole(inventory, base.timeline)
    missing_history = [] if hole is None else [
        f"{hole:08X}.history (the history file of timeline {hole}, while WAL of a newer "
        "timeline is stored: replay would stay on the abandoned branch)"]
    try:
        route = stored_route(storage, db_id, inventory, base.timeline, first, keyring)
    except PgBackflowError:  # a damaged history file: PITR says so; here, estimate
        route = stored_route(storage, db_id, inventory, base.timeline, first, None)
    return missing_history + [gap.describe() for gap in route_gaps(inventory, route)]


# ---------------------------------------------------------------------------------------
# Views


def backup_rows(entry: DatabaseCatalog, kept: dict[str, str] | None = None,
                verified: Iterable[str] = (), exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
    """One row per backup (the "backups of <db>" table): id, kind, time, size, verified?,
    kept because ...; refused folders last; backups in ``exclude`` (deleted) left out."""
    verified_ids, gone = set(verified), set(exclude)
    rows: list[dict[str, Any]] = []
    for backup in reversed(entry.backups):
        if backup.backup_id in gone:
            continue
        rows.append({
            "backup_id": backup.backup_id, "kind": backup.mode,
            "finished_at": backup.finished_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "stored_bytes": backup.stored_size,
            "verified": "yes" if backup.backup_id in verified_ids else "",
            "kept_because": (kept or {}).get(backup.backup_id, ""),
        })
    for folder in entry.refused:
        rows.append({"backup_id": folder.backup_id or "?", "kind": "REFUSED",
                     "finished_at": "", "stored_bytes": sum(o.size for o in folder.objects),
                     "verified": "", "kept_because": f"left alone: {folder.problem}"})
    return rows


def describe_wal(entry: DatabaseCatalog) -> str:
    """One line: WAL objects, the newest segment and the gaps."""
    if not entry.wal_count:
        return "no WAL stored"
    segments = [(run.timeline, run.last) for run in entry.wal_runs] + [
        (w.timeline, w.number) for w in entry.wal_files if w.number is not None]
    newest = max(segments) if segments else None
    last = segment_name(newest[0], newest[1], entry.segment_size) if newest else "none"
    gaps = f"gaps: {', '.join(entry.wal_gaps[:5])}" if entry.wal_gaps else "no gaps"
    return f"{entry.wal_count} WAL objects, newest segment {last}; {gaps}"


def catalog_json(catalog: StorageCatalog) -> list[dict[str, Any]]:
    """A JSON-able summary, one document per database."""
    return [
        {"db_id": e.db_id, "kind": e.kind,
         "backups": [{"backup_id": b.backup_id, "mode": b.mode, "parent_id": b.parent_id,
                      "finished_at": b.finished_at.isoformat(), "stored_size": b.stored_size,
                      "missing": list(b.missing)} for b in e.backups],
         "refused": [{"key": r.key, "problem": r.problem} for r in e.refused],
         "wal_objects": e.wal_count, "wal_gaps": list(e.wal_gaps),
         "orphans": [{"key": o.key, "reason": o.reason} for o in e.orphans]}
        for e in catalog.databases
    ]


__all__ = [
    "JOURNAL_PREFIX",
    "Backup",
    "DatabaseCatalog",
    "Journal",
    "Orphan",
    "RefusedFolder",
    "StorageCatalog",
    "WalFile",
    "WalRun",
    "backup_rows",
    "catalog_json",
    "describe_wal",
    "journal_binding",
    "load_manifest",
    "read_catalog",
    "seal_journal",
    "wal_inventory",
]
