"""The catalog's summary cache of a remote storage (issue 12, "plan 100,000 objects in under
10 s"): a warm catalog reads no manifest, yet trusts nothing it did not verify.

Moto S3 over HTTP and real local folders, manifests sealed as a backup seals them
(tests/test_retention.py's writers); manifest reads are counted at the catalog's reader.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pgbackflow.tasks import catalog as catalog_module
from pgbackflow.tasks.catalog import (
    SUMMARY_CACHE_FORMAT,
    StorageCatalog,
    catalog_json,
    load_manifest,
    read_catalog,
)
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.manifest import MAC_SCHEME, logical_binding, manifest_mac
from pgbackflow.tasks.storage import LocalFolderStorage, S3ObjectStorage, Storage
from tests.fixtures.s3 import S3Bucket
from tests.test_retention import (
    CLUSTER,
    DB,
    KEY,
    RING,
    Writer,
    write_logical,
    write_physical,
)

NOW = datetime.now(UTC).replace(microsecond=0)
OLD = MasterKey.generate()


@pytest.fixture
def s3(s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3ObjectStorage:
    monkeypatch.setenv("PGBACKFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return S3ObjectStorage(s3_bucket.bucket, "pg", endpoint_url=s3_bucket.endpoint_url,
                           region=s3_bucket.region)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Keys of the manifests the catalog reads (from the storage or the raw cache)."""
    keys: list[str] = []
    original = catalog_module.read_manifest_record

    def counting(storage: Storage, key: str, *args: Any, **kwargs: Any) -> Any:
        keys.append(key)
        return original(storage, key, *args, **kwargs)

    monkeypatch.setattr(catalog_module, "read_manifest_record", counting)
    yield keys


def cache_file(tmp_path: Path) -> Path:
    files = list((tmp_path / "cache" / "catalogs").glob("*"))
    assert len(files) == 1, files
    return files[0]


def fill(storage: Storage) -> dict[str, str]:
    """Three logical backups (one missing its dump, one with an object its manifest does
    not name) and a full + incremental chain; returns the interesting ids."""
    writer = Writer(storage)
    ids = {f"logical{h}": write_logical(writer, NOW - timedelta(hours=h), h) for h in (1, 2, 3)}
    storage.delete(f"logical/{DB}/{ids['logical2']}/dump.pgbf")
    writer.put(f"logical/{DB}/{ids['logical3']}/stray.bin", b"x", NOW)
    ids["full"] = write_physical(writer, NOW - timedelta(days=2), 10, 1, None, None)
    ids["incremental"] = write_physical(writer, NOW - timedelta(days=1), 11, 5, ids["full"],
                                        ids["full"])
    return ids


def reseal(storage: Storage, key: str, master: MasterKey,
           change: Callable[[dict[str, Any]], None] = lambda body: None) -> None:
    """Rewrite manifest ``key`` (a logical one) changed by ``change`` and sealed with
    ``master``: a valid manifest, as a backup written with that key would be."""
    document = json.loads(storage.read_bytes(key))
    del document["auth"]
    change(document)
    _, db_id, backup_id, _ = key.split("/")
    binding = logical_binding(db_id, backup_id)
    document["auth"] = {"scheme": MAC_SCHEME, "key_id": master.key_id_hex,
                        "mac": manifest_mac(master, binding, document)}
    storage.write_bytes(key, json.dumps(document).encode())


def same(first: StorageCatalog, second: StorageCatalog) -> None:
    assert first.databases == second.databases
    assert catalog_json(first) == catalog_json(second)


def test_warm_catalog_reads_no_manifest_and_is_the_cold_one(
        s3: S3ObjectStorage, tmp_path: Path, reads: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ids = fill(s3)
    cold = read_catalog(s3, RING)
    assert len(reads) == 5
    logical = cold.database(DB, "logical")
    assert logical is not None and len(logical.backups) == 3
    assert [b.backup_id for b in logical.backups if b.missing] == [ids["logical2"]]
    assert [o.key for o in logical.orphans] == [f"logical/{DB}/{ids['logical3']}/stray.bin"]
    assert cache_file(tmp_path).read_bytes().startswith(SUMMARY_CACHE_FORMAT + b" ")

    reads.clear()
    warm = read_catalog(s3, RING)
    assert reads == []  # every backup from the summaries, no manifest parsed
    same(warm, cold)
    cluster = warm.database(CLUSTER, "physical")
    assert cluster is not None
    incremental = cluster.by_id()[ids["incremental"]]
    assert incremental.parent_id == ids["full"] and incremental.start_lsn
    # What load_manifest checks: the cached summary is exactly what the manifest gives.
    for backup in (*warm.databases[0].backups, *warm.databases[1].backups):
        assert load_manifest(s3, RING, backup).backup_id == backup.backup_id

    monkeypatch.setenv("PGBACKFLOW_CACHE_DIR", "off")
    same(read_catalog(s3, RING), cold)
    # Without a keyring (an unverified listing) nothing of the summaries is used.
    reads.clear()
    unverified = read_catalog(s3, None)
    assert len(reads) == 5 and all(b.status != "verified"
                                   for e in unverified.databases for b in e.backups)


def test_changed_and_deleted_manifests_miss_and_their_entries_go(
        s3: S3ObjectStorage, tmp_path: Path, reads: list[str]) -> None:
    ids = fill(s3)
    read_catalog(s3, RING)
    keys = {name: f"logical/{DB}/{ids[name]}/manifest.json"
            for name in ("logical1", "logical2", "logical3")}
    # A valid manifest replaced by another valid one of the same size (within the same
    # second, maybe: only the ETag tells them apart), one forged, one deleted.
    reseal(s3, keys["logical1"], KEY, lambda body: body.update(tool_version="pgbackflow tesT"))
    forged = json.loads(s3.read_bytes(keys["logical3"]))
    forged["finished_at"] = (NOW + timedelta(days=400)).isoformat()
    s3.write_bytes(keys["logical3"], json.dumps(forged).encode())
    s3.delete(keys["logical2"])
    reads.clear()
    entry = read_catalog(s3, RING).database(DB, "logical")
    assert entry is not None
    assert sorted(reads) == sorted([keys["logical1"], keys["logical3"]])
    assert [b.backup_id for b in entry.backups] == [ids["logical1"]]
    assert [r.backup_id for r in entry.refused] == [ids["logical3"]]
    assert "failed authentication" in entry.refused[0].problem
    lines = cache_file(tmp_path).read_bytes().split(b"\n")[1:]
    # The replaced manifest's entry is the new one; deleted and refused ones are not kept.
    assert sorted(line.split(b"\t")[0].decode() for line in lines) == sorted(
        [keys["logical1"], f"physical/{CLUSTER}/base/{ids['full']}/manifest.json",
         f"physical/{CLUSTER}/base/{ids['incremental']}/manifest.json"])
    reads.clear()
    assert [b.backup_id for b in read_catalog(s3, RING).databases[0].backups] == [
        ids["logical1"]]
    assert reads == [keys["logical3"]]  # only the refused one is read each time


def _flip_year(data: bytes) -> bytes:
    head, _, body = data.partition(b"\n")
    return head + b"\n" + body.replace(str(NOW.year).encode(), str(NOW.year - 1).encode(), 1)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _old_format(data: bytes) -> bytes:
    return data.replace(SUMMARY_CACHE_FORMAT, b"pgbackflow-catalog-summaries-v0", 1)


def _garbage(data: bytes) -> bytes:
    return b"\x00\xff" * 100


def _empty(data: bytes) -> bytes:
    return b""


@pytest.mark.parametrize("damage", [_flip_year, _truncated, _old_format, _garbage, _empty])
def test_a_damaged_cache_file_is_read_again_not_trusted(
        s3: S3ObjectStorage, tmp_path: Path, reads: list[str],
        damage: Callable[[bytes], bytes]) -> None:
    fill(s3)
    cold = read_catalog(s3, RING)
    path = cache_file(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    reads.clear()
    same(read_catalog(s3, RING), cold)
    assert len(reads) == 5  # the whole file ignored: every manifest verified again
    reads.clear()
    same(read_catalog(s3, RING), cold)
    assert reads == []  # and rewritten whole


def test_a_forged_entry_does_not_make_a_refused_manifest_a_backup(
        s3: S3ObjectStorage, tmp_path: Path, reads: list[str]) -> None:
    """A manifest forged in the storage, its cache entry pointed at the forged object's
    size, upload time and ETag (what a hit is found by): the file's MAC fails, so the
    forged manifest is read and refused."""
    ids = fill(s3)
    read_catalog(s3, RING)
    key = f"logical/{DB}/{ids['logical1']}/manifest.json"
    forged = json.loads(s3.read_bytes(key))
    forged["finished_at"] = (NOW + timedelta(days=400)).isoformat()
    s3.write_bytes(key, json.dumps(forged).encode())
    listed = next(o for o in s3.list(f"logical/{DB}/{ids['logical1']}/") if o.key == key)
    path = cache_file(tmp_path)
    lines = path.read_bytes().split(b"\n")
    for index, line in enumerate(lines[1:], 1):
        if line.startswith(key.encode() + b"\t"):
            payload = line.split(b"\t")[4]
            lines[index] = (f"{key}\t{listed.size}\t{catalog_module._micros(listed.modified)}"
                            f"\t{listed.etag or ''}\t").encode() + payload
    path.write_bytes(b"\n".join(lines))
    reads.clear()
    entry = read_catalog(s3, RING).database(DB, "logical")
    assert entry is not None and key in reads
    assert ids["logical1"] not in {b.backup_id for b in entry.backups}
    assert [r.backup_id for r in entry.refused] == [ids["logical1"]]


def test_an_entry_counts_only_while_its_key_is_in_the_keyring(
        s3: S3ObjectStorage, tmp_path: Path, reads: list[str]) -> None:
    ids = fill(s3)
    old_key = f"logical/{DB}/{ids['logical1']}/manifest.json"
    reseal(s3, old_key, OLD)  # written before a key rotation
    both = Keyring([KEY, OLD])
    assert len(read_catalog(s3, both).databases[0].backups) == 3
    reads.clear()
    assert len(read_catalog(s3, both).databases[0].backups) == 3 and reads == []
    # The old key dropped from the keyring: its manifest is read again and refused.
    entry = read_catalog(s3, RING).database(DB, "logical")
    assert entry is not None and reads == [old_key]
    assert ids["logical1"] not in {b.backup_id for b in entry.backups}
    assert [r.backup_id for r in entry.refused] == [ids["logical1"]]
    # Another current key: the file (authenticated under the current key) is not used.
    reads.clear()
    assert len(read_catalog(s3, Keyring([OLD, KEY])).databases[0].backups) == 3
    assert len(reads) == 5


def test_a_partial_read_keeps_the_other_databases_entries(
        s3: S3ObjectStorage, reads: list[str]) -> None:
    fill(s3)
    read_catalog(s3, RING)
    reads.clear()
    assert len(read_catalog(s3, RING, db_id=CLUSTER, kinds=("physical",)).databases) == 1
    assert len(read_catalog(s3, RING, db_id=DB, kinds=("logical",)).databases) == 1
    assert len(read_catalog(s3, RING).databases) == 2
    assert reads == []


def test_a_local_folder_is_read_directly(tmp_path: Path, reads: list[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing to save on a local folder: manifests read each time, no cache written."""
    monkeypatch.setenv("PGBACKFLOW_CACHE_DIR", str(tmp_path / "cache"))
    storage = LocalFolderStorage(tmp_path / "store")
    fill(storage)
    first = read_catalog(storage, RING)
    second = read_catalog(storage, RING)
    same(first, second)
    assert len(reads) == 10 and not (tmp_path / "cache").exists()
