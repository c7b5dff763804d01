"""The catalog's memory: slim records per backup, full manifests loaded one at a time and
authenticated again, and a local folder listed as a stream (issue 12, "memory flat").

Real local folders with manifests sealed as a backup seals them (tests/test_retention.py's
writers); memory is measured with tracemalloc around the real calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pgbackflow.tasks.catalog import load_manifest, read_catalog
from pgbackflow.tasks.errors import ObjectNotFoundError
from pgbackflow.tasks.manifest import (
    LogicalManifest,
    ManifestAuthenticationError,
    ManifestError,
    logical_binding,
)
from pgbackflow.tasks.storage import INCOMPLETE_DIR, LocalFolderStorage, StoredObject
from tests.test_retention import CLUSTER, DB, RING, Writer, sealed, write_logical

NOW = datetime.now(UTC).replace(microsecond=0)


def peak_bytes(work: Callable[[], Any]) -> int:
    """Peak Python memory traced while ``work`` runs (what it returns is dropped inside)."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_local_iter_list_streams_without_reading_a_folder_whole(tmp_path: Path) -> None:
    """A folder of 20,000 files is listed one object at a time: the walk's peak memory is a
    small fraction of what the listing holds, and it lists exactly what ``list`` does."""
    storage = LocalFolderStorage(tmp_path)
    wal = tmp_path / "physical" / CLUSTER / "wal"
    wal.mkdir(parents=True)
    for n in range(20000):
        (wal / f"00000001{n // 256:08X}{n % 256:08X}.pgbf").write_bytes(b"w")
    (tmp_path / "logical" / DB / "b1").mkdir(parents=True)
    (tmp_path / "logical" / DB / "b1" / "manifest.json").write_bytes(b"{}")
    (tmp_path / INCOMPLETE_DIR).mkdir()
    (tmp_path / INCOMPLETE_DIR / "tmp-1").write_bytes(b"x")

    listed = storage.list()
    assert len(listed) == 20001 and [o.key for o in listed] == sorted(o.key for o in listed)
    assert sorted(storage.iter_list(), key=lambda o: o.key) == listed
    assert [o.key for o in storage.list("logical/")] == [f"logical/{DB}/b1/manifest.json"]
    assert len(storage.list(f"physical/{CLUSTER}/wal/0000000100000000")) == 256
    assert storage.list("nowhere/") == []

    def walk() -> int:
        return sum(1 for _ in storage.iter_list())

    def whole() -> list[StoredObject]:
        return storage.list()

    streamed, held = peak_bytes(walk), peak_bytes(whole)
    assert held > 3_000_000, held  # ~200 bytes per listed object
    assert streamed < 300_000, f"the walk held {streamed} bytes (the listing: {held})"

    # A reader that stops early closes the folder it was reading.
    first = storage.iter_list()
    next(first)
    first.close()


_PEAK_OF_READ = """
import sys
from pgbackflow.tasks.catalog import read_catalog
from pgbackflow.tasks.storage import LocalFolderStorage
from tests.test_catalog_memory import peak_bytes
from tests.test_retention import RING
storage = LocalFolderStorage(sys.argv[1])
print(peak_bytes(lambda: read_catalog(storage, RING)))
"""


def test_catalog_keeps_slim_records_not_manifests(tmp_path: Path) -> None:
    """Peak memory of reading a catalog grows by under 2.5 kB per backup (a parsed
    manifest alone is ~5-9 kB), and no parsed manifest is kept."""
    storage = LocalFolderStorage(tmp_path)
    writer = Writer(storage)
    for i in range(1500):
        write_logical(writer, NOW - timedelta(hours=i + 2), i)
    # Measured in a fresh interpreter: process-wide tables that earlier tests grew (the
    # interned-string table pathlib fills, 3.8 MB when it is resized) must not land in it.
    peak = int(subprocess.run(
        [sys.executable, "-c", _PEAK_OF_READ, str(tmp_path)], check=True, capture_output=True,
        text=True, cwd=Path(__file__).parent.parent, timeout=120).stdout)
    assert peak / 1500 < 2500, f"{peak / 1500:.0f} bytes per backup"
    catalog = read_catalog(storage, RING)
    (entry,) = catalog.databases
    assert len(entry.backups) == 1500 and not entry.records
    assert not hasattr(entry.backups[0], "__dict__")  # slots: nothing else hangs off it
    with pytest.raises(RuntimeError):
        catalog.manifests("logical")
    kept = read_catalog(storage, RING, keep_manifests=True).manifests("logical")
    assert len(kept.accepted) == 1500


def _rewrite(storage: LocalFolderStorage, key: str, change: Callable[[dict[str, Any]], None],
             reseal: bool) -> None:
    path = storage.folder / key
    body = json.loads(path.read_bytes())
    auth = body.pop("auth")
    change(body)
    data = (sealed(body, logical_binding(DB, body["backup_id"])) if reseal
            else json.dumps({**body, "auth": auth}).encode())
    path.write_bytes(data)


def test_load_manifest_authenticates_again_and_refuses_a_changed_manifest(
    tmp_path: Path,
) -> None:
    """The full manifest of a catalogued backup is read again through the manifest reader:
    an edit after the listing fails its MAC, a validly sealed but different manifest is
    refused as changed, a deleted one is not found; an untouched one loads whole."""
    storage = LocalFolderStorage(tmp_path)
    writer = Writer(storage)
    ids = [write_logical(writer, NOW - timedelta(hours=h), h) for h in (5, 4, 3, 2)]
    entry = read_catalog(storage, RING).database(DB)
    assert entry is not None
    backups = {b.backup_id: b for b in entry.backups}

    manifest = load_manifest(storage, RING, backups[ids[0]])
    assert isinstance(manifest, LogicalManifest)
    assert (manifest.backup_id, manifest.finished_at) == (ids[0], backups[ids[0]].finished_at)
    assert [manifest.dump.key, manifest.globals.key] == [
        o.key for o in backups[ids[0]].objects if not o.key.endswith("manifest.json")]

    def later(body: dict[str, Any]) -> None:
        body["finished_at"] = (datetime.fromisoformat(body["finished_at"])
                               + timedelta(minutes=1)).isoformat()

    _rewrite(storage, backups[ids[1]].manifest_key, later, reseal=False)
    with pytest.raises(ManifestAuthenticationError, match="failed authentication"):
        load_manifest(storage, RING, backups[ids[1]])
    _rewrite(storage, backups[ids[2]].manifest_key, later, reseal=True)
    with pytest.raises(ManifestError, match="changed since the storage was listed"):
        load_manifest(storage, RING, backups[ids[2]])
    os.unlink(storage.folder / backups[ids[3]].manifest_key)
    with pytest.raises(ObjectNotFoundError, match="gone since the storage was listed"):
        load_manifest(storage, RING, backups[ids[3]])
