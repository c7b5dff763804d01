"""Master key rotation of a whole storage: every archive re-wrapped, no data re-encrypted.

An archive's data key is wrapped by the master key in the archive's header (bytes 34-101,
docs/FORMAT.md); :func:`pgbackflow.tasks.archive.rewrap_header` re-wraps it under a new master
key and the frames stay byte-identical. A storage cannot patch 68 bytes in place, so each
object is copied (streamed) with its new header.

Backups: a manifest pins the SHA-256 of every object, so a backup is rotated by writing its
objects re-wrapped under new names (``dump.pgbf`` → ``dump.k<new key id>.pgbf``), then its
manifest naming them (sealed with the new key), then deleting the old objects. Killed at any
moment, every listed backup is complete: the manifest names either all old or all new
objects; what a killed run wrote and did not publish is rewritten by the next run (or swept
as an orphan). WAL objects have no manifest: each is replaced in place, atomically.

Manifests that are refused with the keys given, and orphans, are left as they are.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from pgbackflow.tasks.archive import HEADER_BYTES, ArchiveError, ArchiveHeader, rewrap_header
from pgbackflow.tasks.catalog import Backup, load_manifest, read_catalog
from pgbackflow.tasks.errors import PgBackflowError
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.manifest import LogicalManifest, StoredObjectInfo
from pgbackflow.tasks.manifest import write_manifest as write_logical_manifest
from pgbackflow.tasks.physical import PhysicalManifest
from pgbackflow.tasks.physical import write_manifest as write_physical_manifest
from pgbackflow.tasks.retention import RetentionLock
from pgbackflow.tasks.storage import Storage

COPY_CHUNK = 1024 * 1024
_KEY_TAG = re.compile(r"\.k[0-9a-f]{16}(?=\.pgbf$)")

logger = logging.getLogger("pgbackflow.rotation")


class RotationError(PgBackflowError):
    """An object cannot be re-wrapped (damaged, or under a key that was not given)."""


@dataclass
class RotationReport:
    """What a rotation did.

    Attributes:
        rotated: Objects re-wrapped under the new key.
        skipped: Objects already under the new key.
        backups: Backups whose manifest now names the new key.
        left: One line per manifest or object left alone, and why.
    """

    rotated: int = 0
    skipped: int = 0
    backups: int = 0
    left: list[str] = field(default_factory=list)


def rotated_key(key: str, new_key: MasterKey) -> str:
    """``…/dump.pgbf`` → ``…/dump.k<new key id>.pgbf`` (an older tag is replaced)."""
    stem = _KEY_TAG.sub("", key).removesuffix(".pgbf")
    return f"{stem}.k{new_key.key_id_hex}.pgbf"


def _header_key_id(storage: Storage, key: str) -> str:
    with storage.open_read(key) as reader:
        raw = reader.read(HEADER_BYTES)
    return ArchiveHeader.parse(raw).key_id.hex()


def copy_rewrapped(storage: Storage, source: str, target: str, keyring: Keyring,
                   new_key: MasterKey, expected_sha256: str | None = None) -> tuple[str, int]:
    """Stream ``source`` into ``target`` with its header re-wrapped under ``new_key``.

    Returns:
        ``(sha256, size)`` of the new object.

    Raises:
        RotationError: the source's SHA-256 is not ``expected_sha256`` (nothing published),
            or its header does not open with ``keyring``.
    """
    label = f"{storage.location}/{source}"
    old_hash, new_hash, size = hashlib.sha256(), hashlib.sha256(), 0
    with storage.open_read(source) as reader:
        header = reader.read(HEADER_BYTES)
        try:
            fresh = rewrap_header(header, keyring, new_key)
        except PgBackflowError as exc:
            raise RotationError(f"{label}: {exc}") from None
        with storage.open_write(target, size_hint=None) as writer:
            old_hash.update(header)
            new_hash.update(fresh)
            writer.write(fresh)
            size += len(fresh)
            while chunk := reader.read(COPY_CHUNK):
                old_hash.update(chunk)
                new_hash.update(chunk)
                writer.write(chunk)
                size += len(chunk)
            if expected_sha256 is not None and old_hash.hexdigest() != expected_sha256:
                writer.abort()
                raise RotationError(
                    f"{label}: its SHA-256 differs from its manifest's: the object was replaced "
                    "or damaged; it is left under the old key"
                )
    return new_hash.hexdigest(), size


def _rotate_backup(storage: Storage, backup: Backup, keyring: Keyring, new_key: MasterKey,
                   report: RotationReport, log: Callable[[str], None]) -> None:
    manifest = load_manifest(storage, keyring, backup)
    if manifest.key_id == new_key.key_id_hex:
        report.skipped += len(manifest.object_keys())
        _drop_superseded(storage, backup, manifest, log)
        return
    replaced: dict[str, StoredObjectInfo] = {}
    for info in _objects(manifest):
        target = rotated_key(info.key, new_key)
        digest, size = copy_rewrapped(storage, info.key, target, keyring, new_key, info.sha256)
        replaced[info.key] = info.model_copy(update={"key": target, "sha256": digest,
                                                     "stored_size": size})
        report.rotated += 1
        log(f"rotated {storage.location}/{info.key} -> {target}")
    if isinstance(manifest, LogicalManifest):
        write_logical_manifest(storage, manifest.model_copy(update={
            "key_id": new_key.key_id_hex, "dump": replaced[manifest.dump.key],
            "globals": replaced[manifest.globals.key],
        }), new_key)
    else:
        write_physical_manifest(storage, manifest.model_copy(update={
            "key_id": new_key.key_id_hex, "base": replaced[manifest.base.key],
            "backup_manifest": replaced[manifest.backup_manifest.key],
            "tablespaces": tuple(t.model_copy(update={"object": replaced[t.object.key]})
                                 for t in manifest.tablespaces),
        }), new_key)
    report.backups += 1
    log(f"manifest {backup.manifest_key} now names key {new_key.key_id_hex}")
    old = list(replaced)
    storage.delete_many(old)
    for key in old:
        log(f"deleted {storage.location}/{key} (replaced by its re-wrapped copy)")


def _drop_superseded(storage: Storage, backup: Backup,
                     manifest: LogicalManifest | PhysicalManifest,
                     log: Callable[[str], None]) -> None:
    """Delete the old copies a killed rotation left next to the objects now named."""
    named = set(manifest.object_keys())
    originals = {_KEY_TAG.sub("", key) for key in named}
    stale = [o.key for o in backup.objects
             if o.key not in named and _KEY_TAG.sub("", o.key) in originals]
    storage.delete_many(stale)
    for key in stale:
        log(f"deleted {storage.location}/{key} (replaced by its re-wrapped copy)")


def _objects(manifest: LogicalManifest | PhysicalManifest) -> list[StoredObjectInfo]:
    if isinstance(manifest, LogicalManifest):
        return [manifest.dump, manifest.globals]
    return [manifest.base, manifest.backup_manifest, *(t.object for t in manifest.tablespaces)]


def rotate_storage(storage: Storage, old_keys: Keyring, new_key: MasterKey,
                   log: Callable[[str], None] = logger.info) -> RotationReport:
    """Re-wrap every backup and WAL object of ``storage`` under ``new_key``; resumable.

    Args:
        storage: The storage.
        old_keys: The keys the objects are wrapped with now (the new key may be among them).
        new_key: The key to wrap with.
        log: One line per object rotated or deleted.
    """
    storage.check_exists()
    # Retention's lock: between a retention run's listing and its reading of a manifest, a
    # backup rotated meanwhile (new objects, new manifest) looked incomplete, and went.
    with RetentionLock(storage, "pgbackflow key rotate"):
        return _rotate_all(storage, Keyring([*old_keys, new_key]), new_key, log)


def _rotate_all(storage: Storage, keyring: Keyring, new_key: MasterKey,
                log: Callable[[str], None]) -> RotationReport:
    catalog = read_catalog(storage, keyring)
    report = RotationReport()
    for entry in catalog.databases:
        for folder in entry.refused:
            report.left.append(f"left {folder.key}: {folder.problem}")
        for backup in entry.backups:
            try:
                _rotate_backup(storage, backup, keyring, new_key, report, log)
            except RotationError as exc:
                report.left.append(f"left backup {backup.backup_id}: {exc}")
        for wal in entry.wal:
            try:
                if _header_key_id(storage, wal.key) == new_key.key_id_hex:
                    report.skipped += 1
                    continue
                copy_rewrapped(storage, wal.key, wal.key, keyring, new_key)
            except (RotationError, ArchiveError) as exc:
                report.left.append(f"left {wal.key}: {exc}")
                continue
            report.rotated += 1
            log(f"rotated {storage.location}/{wal.key} (in place)")
    return report


__all__ = ["RotationError", "RotationReport", "copy_rewrapped", "rotate_storage", "rotated_key"]
