"""Key rotation on real storages (local folder, moto S3): logical and physical backups and WAL,
real archives and sealed manifests; an interrupted rotation resumed."""

from __future__ import annotations

import os
import secrets
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pgbackflow.tasks.archive import ArchiveReader
from pgbackflow.tasks.catalog import load_manifest, read_catalog
from pgbackflow.tasks.keys import Keyring, MasterKey, write_key_file
from pgbackflow.tasks.manifest import (
    DatabaseInfo,
    LogicalManifest,
    TableRows,
    backup_prefix,
    write_manifest,
)
from pgbackflow.tasks.physical import PhysicalManifest
from pgbackflow.tasks.physical import write_manifest as write_physical_manifest
from pgbackflow.tasks.pipeline import decrypted_chunks, store_bytes
from pgbackflow.tasks.rotation import rotate_storage
from pgbackflow.tasks.storage import LocalFolderStorage, Storage
from pgbackflow.tasks.wal import segment_name, wal_object_key
from tests.test_retention import CLI

OLD = MasterKey.generate()
NEW = MasterKey.generate()
CLUSTER = "cluster-7312"


@pytest.fixture
def storage(either_storage: Storage) -> Storage:
    return either_storage


def logical_backup(storage: Storage, serial: int, payload: dict[str, bytes]) -> str:
    """A logical backup of real archives under OLD (dump and globals hold ``payload``)."""
    moment = datetime.now(UTC) - timedelta(hours=serial + 1)
    backup_id = f"{moment:%Y%m%dT%H%M%SZ}-{serial:06x}"
    prefix = backup_prefix("shop", backup_id)
    dump, globals_ = (secrets.token_bytes(3000), secrets.token_bytes(500))
    payload[prefix + "dump.pgbf"], payload[prefix + "globals.pgbf"] = dump, globals_
    manifest = LogicalManifest(
        backup_id=backup_id,
        database=DatabaseInfo(db_id="shop", name="shop", host="db1", port=5432,
                              system_identifier="7312", database_oid=16384),
        server_version="17.6", server_version_num=170006, pg_dump_version="17.6",
        compression="pg_dump zstd:5", started_at=moment, finished_at=moment,
        dump=store_bytes(dump, [storage], prefix + "dump.pgbf", OLD).info,
        globals=store_bytes(globals_, [storage], prefix + "globals.pgbf", OLD).info,
        key_id=OLD.key_id_hex, snapshot="1",
        tables=(TableRows(schema_name="public", table="t", key="public.t", rows=1),),
        schema_count=1, table_count=1, database_size=8192, tool_version="pgbackflow test",
    )
    write_manifest(storage, manifest, OLD)
    return backup_id


def physical_backup(storage: Storage, backup_id: str, parent: str | None,
                    payload: dict[str, bytes]) -> None:
    prefix = f"physical/{CLUSTER}/base/{backup_id}/"
    base, manifest_bytes = secrets.token_bytes(4000), b'{"WAL-Ranges": []}'
    payload[prefix + "base.tar.pgbf"] = base
    payload[prefix + "backup_manifest.pgbf"] = manifest_bytes
    now = datetime.now(UTC) - timedelta(hours=2 if parent is None else 1)
    write_physical_manifest(storage, PhysicalManifest(
        backup_id=backup_id, db_id=CLUSTER, mode="incremental" if parent else "full",
        parent_id=parent, full_id=parent or backup_id, system_identifier="7312", timeline=1,
        start_lsn="0/2000028", end_lsn="0/2000100", wal_segment_size=16 * 1024 * 1024,
        source="u@h:5432", server_version="17.6", server_version_num=170006,
        pg_basebackup_version="17.6", started_at=now, finished_at=now,
        base=store_bytes(base, [storage], prefix + "base.tar.pgbf", OLD).info,
        backup_manifest=store_bytes(manifest_bytes, [storage], prefix + "backup_manifest.pgbf",
                                    OLD).info,
        key_id=OLD.key_id_hex, cluster_size=1, tool_version="pgbackflow test",
    ), OLD)


def everything_decrypts(storage: Storage, keyring: Keyring, payload: dict[str, bytes],
                        wal: dict[str, bytes]) -> int:
    """Every listed backup's objects decrypt with ``keyring`` to their payload (SHA-256 of
    the stored bytes checked against the manifest), and so does every WAL object."""
    catalog = read_catalog(storage, keyring)
    count = 0
    for entry in catalog.databases:
        for backup in entry.backups:
            manifest = load_manifest(storage, keyring, backup)
            infos = ([manifest.dump, manifest.globals] if isinstance(manifest, LogicalManifest)
                     else [manifest.base, manifest.backup_manifest])
            for info in infos:
                original = info.key.split(".k")[0].removesuffix(".pgbf") + ".pgbf"
                assert b"".join(decrypted_chunks(storage, info, keyring)) == payload[original]
            count += 1
    for key, data in wal.items():
        with storage.open_read(key) as raw:
            assert b"".join(ArchiveReader(raw, keyring)) == data
    return count


def test_rotation_rewraps_backups_and_wal_and_the_old_key_is_no_longer_needed(
    storage: Storage,
) -> None:
    payload: dict[str, bytes] = {}
    ids = [logical_backup(storage, i, payload) for i in range(2)]
    physical_backup(storage, "20261101T000000Z-aaaaaa", None, payload)
    physical_backup(storage, "20261102T000000Z-bbbbbb", "20261101T000000Z-aaaaaa", payload)
    wal = {wal_object_key(CLUSTER, segment_name(1, n, 16 * 1024 * 1024)): secrets.token_bytes(99)
           for n in (2, 3)}
    for key, data in wal.items():
        store_bytes(data, [storage], key, OLD)

    lines: list[str] = []
    report = rotate_storage(storage, Keyring([OLD]), NEW, lines.append)
    assert (report.rotated, report.skipped, report.backups, report.left) == (10, 0, 4, [])
    assert sum(1 for x in lines if x.startswith("rotated ")) == 10

    new_only = Keyring([NEW])
    assert everything_decrypts(storage, new_only, payload, wal) == 4
    catalog = read_catalog(storage, new_only)
    assert not any(e.refused or e.orphans for e in catalog.databases)
    logical = catalog.database("shop")
    assert logical is not None and sorted(b.backup_id for b in logical.backups) == sorted(ids)
    assert all(b.key_id == NEW.key_id_hex for e in catalog.databases
               for b in e.backups)
    # The old key opens nothing any more (so it can be retired).
    assert not read_catalog(storage, Keyring([OLD])).databases[0].backups
    # A second run finds nothing to do.
    again = rotate_storage(storage, Keyring([OLD]), NEW)
    assert (again.rotated, again.skipped, again.backups) == (0, 10, 0)


def test_rotation_and_retention_never_run_at_once(tmp_path: Path) -> None:
    """A backup rotated between a retention run's listing and its manifest read looked
    incomplete (new objects it had not listed) and went: rotation takes retention's lock."""
    from pgbackflow.tasks.retention import LOCK_KEY, RetentionBusyError, RetentionLock

    storage = LocalFolderStorage(tmp_path / "store")
    payload: dict[str, bytes] = {}
    logical_backup(storage, 0, payload)
    with RetentionLock(storage, "a retention run"):
        with pytest.raises(RetentionBusyError, match="another retention run holds its lock"):
            rotate_storage(storage, Keyring([OLD]), NEW)
        assert everything_decrypts(storage, Keyring([OLD]), payload, {}) == 1
    report = rotate_storage(storage, Keyring([OLD]), NEW)
    assert report.backups == 1 and not storage.exists(LOCK_KEY)
    assert everything_decrypts(storage, Keyring([NEW]), payload, {}) == 1


def test_interrupted_rotation_resumes(tmp_path: Path) -> None:
    storage = LocalFolderStorage(tmp_path / "store")
    payload: dict[str, bytes] = {}
    for i in range(60):
        logical_backup(storage, i, payload)
    old_file, new_file = tmp_path / "old.key", tmp_path / "new.key"
    write_key_file(old_file, OLD)
    write_key_file(new_file, NEW)
    command = [*CLI, "key", "rotate", "--from", str(storage.folder), "--old-key-file",
               str(old_file), "--new-key-file", str(new_file)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("manifest "):  # one backup switched to the new key
            child.kill()
            break
    child.wait(30)
    assert child.returncode == -9, "the rotation finished before it could be killed"
    both = Keyring([OLD, NEW])
    assert everything_decrypts(storage, both, payload, {}) == 60
    entry = read_catalog(storage, both).databases[0]
    assert {b.key_id for b in entry.backups} == {OLD.key_id_hex, NEW.key_id_hex}

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                           env=dict(os.environ))
    assert rerun.returncode == 0, rerun.stderr
    assert everything_decrypts(storage, Keyring([NEW]), payload, {}) == 60
    entry = read_catalog(storage, Keyring([NEW])).databases[0]
    assert not entry.orphans, "objects of the interrupted run were left behind"
    assert rerun.stdout.splitlines()[-1].endswith(", 0 left")


def test_rotation_errors_are_one_line(tmp_path: Path) -> None:
    new_file = tmp_path / "new.key"
    write_key_file(new_file, NEW)
    result = subprocess.run(
        [*CLI, "key", "rotate", "--from", str(tmp_path / "nowhere"), "--old-key-file",
         str(tmp_path / "missing.key"), "--new-key-file", str(new_file)],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "missing.key' does not exist" in result.stderr
