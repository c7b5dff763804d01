"""The fast restore path: every object of a chain and the WAL fetched and unpacked at once.

A real PostgreSQL 17 cluster gives a full backup, an incremental and WAL shipped after it
(pgbackflow's own backup and WAL writers, no Prefect). The tests check that the links and
the WAL are read concurrently and the result replays, that one failing job stops the others
and leaves nothing behind with a one-line error, that WAL fetched meanwhile is still checked,
and the stream unpacker's own refusals (it parses tar headers itself).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

import psycopg
import pytest

from pgbackflow.tasks.archive import ArchiveError
from pgbackflow.tasks.cluster import EphemeralCluster, resolve_os_user
from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.errors import PgBackflowError, ToolsetError
from pgbackflow.tasks.keys import Keyring, MasterKey, write_key_file
from pgbackflow.tasks.manifest import new_backup_id
from pgbackflow.tasks.physical import (
    BackupPlan,
    PhysicalManifest,
    backup_prefix,
    build_manifest,
    parent_manifest_file,
    read_cluster_facts,
    take_base_backup,
    write_manifest,
)
from pgbackflow.tasks.pitr import (
    PROMOTE_TIMEOUT_S,
    RESTORE_DIR,
    WAL_CACHE,
    DirectoryDestination,
    PitrPlan,
    _read_ahead,
    build_data_dir,
    free_port,
    plan_pitr,
)
from pgbackflow.tasks.process import Tool
from pgbackflow.tasks.storage import LocalFolderStorage
from pgbackflow.tasks.tarstream import UnsafeArchiveError, unpack_tar_stream
from pgbackflow.tasks.toolsets import find_toolset
from pgbackflow.tasks.wal import WalIntegrityError, WalShipper, wal_object_key
from tests.fixtures.prefect_server import PGBACKFLOW, as_users_run_it

pytestmark = [pytest.mark.pg]

CLI = [str(PGBACKFLOW)]
MAJOR = 17
ROWS = 200_000
LATE_ROWS = 3


@dataclass(frozen=True)
class Chain:
    """A stored full + incremental of a stopped cluster, and WAL after the incremental."""

    root: Path
    store: Path
    key: MasterKey
    key_file: Path
    db_id: str
    wal: tuple[str, ...]
    superuser: str
    password: str

    def copy(self, name: str) -> Path:
        target = self.root / name
        shutil.copytree(self.store, target)
        return target

    def plan(self, store: Path) -> PitrPlan:
        return plan_pitr(LocalFolderStorage(store), self.db_id, None)


def settings_of(server: EphemeralCluster) -> ConnectionSettings:
    return ConnectionSettings(host=server.host, port=server.port, dbname="postgres",
                              user=server.superuser, password=server.password,
                              sslmode="disable")


def backup(server: EphemeralCluster, storage: LocalFolderStorage, key: MasterKey,
           parent: PhysicalManifest | None = None) -> PhysicalManifest:
    """A full (or incremental on ``parent``) backup, as the flows store it."""
    settings = settings_of(server)
    facts = read_cluster_facts(settings)
    backup_id = new_backup_id()
    began = datetime.now(UTC)
    prefix = backup_prefix(facts.db_id, backup_id)
    if parent is None:
        result = take_base_backup(settings, server.toolset, [storage], key, prefix)
    else:
        with parent_manifest_file(storage, parent, Keyring([key])) as parent_file:
            result = take_base_backup(settings, server.toolset, [storage], key, prefix,
                                      incremental_from=parent_file)
    plan = BackupPlan("full") if parent is None else BackupPlan("incremental", parent)
    manifest = build_manifest(backup_id, facts, settings, server.toolset, key, plan, result,
                              began)
    write_manifest(storage, manifest, key)
    return manifest


def ship_wal_after(server: EphemeralCluster, storage: LocalFolderStorage, key: MasterKey,
                   db_id: str, spool: Path, first: str) -> list[str]:
    """Ship the complete segments of pg_wal from ``first`` on with pgbackflow's shipper
    (what wal-stream uploads), the segment in progress excluded."""
    with server.connect() as conn:
        row = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
    assert row is not None
    current = str(row[0])
    spool.mkdir()
    names = sorted(
        p.name for p in (server.data_dir / "pg_wal").iterdir()
        if len(p.name) == 24 and first <= p.name < current
    )
    for name in names:
        shutil.copyfile(server.data_dir / "pg_wal" / name, spool / name)
    shipped = WalShipper(spool, [storage], key, db_id).ship(final=True)
    assert set(names) <= set(shipped), (names, shipped)
    return names


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    try:
        toolset = find_toolset(MAJOR)
    except ToolsetError as exc:
        pytest.fail(f"PostgreSQL {MAJOR} is unavailable: {exc}", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="pgbackflow-test-pitr-speed-", dir="/var/tmp"))
    root.chmod(0o755)  # the restored servers' OS user walks down to their data directories
    key = MasterKey.generate()
    key_file = root / "key"
    write_key_file(key_file, key)
    storage = LocalFolderStorage(root / "store")
    server = EphemeralCluster(toolset, settings={"fsync": "off", "summarize_wal": "on"}).start()
    try:
        with server.connect() as conn:
            conn.autocommit = True
            conn.execute("CREATE TABLE bulk (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO bulk SELECT g, md5(g::text) "
                         f"FROM generate_series(1, {ROWS}) g")
            conn.execute("CREATE TABLE late (id int)")
            conn.execute("CHECKPOINT")
        full = backup(server, storage, key)
        with server.connect() as conn:
            conn.autocommit = True
            conn.execute("UPDATE bulk SET v = 'changed' WHERE id <= 1000")
            conn.execute("CHECKPOINT")
            time.sleep(1)  # the WAL summarizer catches up with the checkpoint
        incremental = backup(server, storage, key, parent=full)
        last = f"{incremental.timeline:08X}" + _segment_of(incremental.end_lsn,
                                                           incremental.wal_segment_size)
        with server.connect() as conn:
            conn.autocommit = True
            for value in range(LATE_ROWS):
                conn.execute("INSERT INTO late VALUES (%s)", (value,))
                conn.execute("SELECT pg_switch_wal()")
        wal = ship_wal_after(server, storage, key, full.db_id, root / "spool", first=last)
        assert len(wal) >= LATE_ROWS, wal
        yield Chain(root, root / "store", key, key_file, full.db_id, tuple(wal),
                    server.superuser, server.password)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _segment_of(lsn: str, segment_size: int) -> str:
    high, low = (int(part, 16) for part in lsn.split("/"))
    number = ((high << 32) | low) // segment_size
    per_id = 0x1_0000_0000 // segment_size
    return f"{number // per_id:08X}{number % per_id:08X}"


class _Tracked(io.RawIOBase):
    """A stored object being read; tells its storage when it is closed."""

    def __init__(self, inner: BinaryIO, on_close: Callable[[], None]) -> None:
        super().__init__()
        self._inner = inner
        self._on_close = on_close

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
            self._on_close()
        super().close()


class RecordingStorage(LocalFolderStorage):
    """A local storage that records which objects are being read at the same time."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.lock = threading.Lock()
        self.open_now: set[str] = set()
        self.overlaps: list[frozenset[str]] = []

    def open_read(self, key: str) -> BinaryIO:
        inner = super().open_read(key)
        with self.lock:
            self.open_now.add(key)
            self.overlaps.append(frozenset(self.open_now))

        def closed() -> None:
            with self.lock:
                self.open_now.discard(key)

        return cast(BinaryIO, io.BufferedReader(_Tracked(inner, closed), 1 << 20))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


# --------------------------------------------------------------------------- the fast path


def test_links_and_wal_are_read_at_once_and_the_result_replays(chain: Chain) -> None:
    storage = RecordingStorage(chain.store)
    plan = plan_pitr(storage, chain.db_id, None)
    assert [b.mode for b in plan.chain] == ["full", "incremental"]
    assert set(chain.wal) <= set(plan.wal_segments)
    parent = chain.root / "fast"
    target = parent / "data"
    fetched = build_data_dir(storage, plan, Keyring([chain.key]), target,
                             find_toolset(MAJOR), mark_incomplete=True)
    assert fetched == list(plan.wal_segments)
    # Both links' tars were open together, and WAL was fetched while a tar was open.
    tars = {b.base.key for b in plan.chain}
    assert any(len(tars & seen) == 2 for seen in storage.overlaps), storage.overlaps
    wal_keys = {wal_object_key(chain.db_id, name) for name in chain.wal}
    assert any(tars & seen and wal_keys & seen for seen in storage.overlaps)
    wal_dir = target / RESTORE_DIR / WAL_CACHE
    assert sorted(p.name for p in wal_dir.iterdir()) == sorted(fetched)
    assert leftovers(parent) == ["data"]  # no work folder, the WAL moved in

    user = resolve_os_user()
    port = free_port()
    # The rest of the one point-in-time restore (tasks/pitr.py restore_to), step by step.
    toolset = find_toolset(MAJOR)
    destination = DirectoryDestination(target, port=port, user=user, toolset=toolset)
    destination.configure(plan)
    destination.start(PROMOTE_TIMEOUT_S, plan)
    destination.finish()
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user=chain.superuser,
                             password=chain.password, dbname="postgres") as conn:
            late = conn.execute("SELECT count(*) FROM late").fetchone()
            changed = conn.execute("SELECT count(*) FROM bulk WHERE v = 'changed'").fetchone()
        # The rows after the incremental came only from the WAL fetched meanwhile.
        assert late == (LATE_ROWS,)
        assert changed == (1000,)
    finally:
        Tool(toolset.binary("pg_ctl")).run(["-D", target, "-m", "immediate", "stop"],
                                           user=user, check=False)


def test_a_failing_link_stops_the_restore_with_one_line_and_leaves_nothing(
    chain: Chain, prefect_api: str
) -> None:
    """A byte flipped in the middle of the full's tar: the other jobs (the incremental, the
    WAL) stop, the CLI prints one line naming the object, and the parent folder is as
    before: no data directory, no hidden work folder."""
    store = chain.copy("tampered-link")
    full = chain.plan(store).chain[0]
    path = store / full.base.key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    parent = chain.root / "tampered-link-restore"
    parent.mkdir()
    result = subprocess.run(
        [*CLI, "pitr", "--from", str(store), "--target", "latest", "--to-dir",
         str(parent / "data"), "--key-file", str(chain.key_file)],
        env=as_users_run_it({**os.environ, "PREFECT_API_URL": prefect_api}),
        capture_output=True, text=True,
        timeout=300, check=False)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert full.base.key in lines[-1] and "failed authentication" in lines[-1], lines[-1]
    assert leftovers(parent) == []


def test_wal_fetched_meanwhile_is_still_checked(chain: Chain) -> None:
    """A WAL object swapped for another segment's: refused while the base is unpacked,
    named in one line, and nothing is left."""
    store = chain.copy("swapped-wal")
    first, second = chain.wal[0], chain.wal[1]
    shutil.copyfile(store / wal_object_key(chain.db_id, second),
                    store / wal_object_key(chain.db_id, first))
    parent = chain.root / "swapped-wal-restore"
    with pytest.raises(ArchiveError) as error:
        build_data_dir(LocalFolderStorage(store), chain.plan(store), Keyring([chain.key]),
                       parent / "data", find_toolset(MAJOR), mark_incomplete=True)
    assert "\n" not in str(error.value)
    assert first in str(error.value), str(error.value)
    assert isinstance(error.value, WalIntegrityError) or "another" in str(error.value)
    assert leftovers(parent) == []


def test_a_failure_in_place_removes_what_was_written(chain: Chain) -> None:
    """Without the staging folder (a caller's own work folder, as verification and the Docker
    restore use): an existing empty target is emptied again after a failure."""
    store = chain.copy("tampered-in-place")
    incremental = chain.plan(store).chain[1]
    path = store / incremental.base.key
    path.write_bytes(path.read_bytes()[:-100])
    target = chain.root / "in-place"
    target.mkdir()
    with pytest.raises(PgBackflowError) as error:
        build_data_dir(LocalFolderStorage(store), chain.plan(store), Keyring([chain.key]),
                       target, find_toolset(MAJOR))
    assert incremental.base.key in str(error.value)
    assert "\n" not in str(error.value)
    assert leftovers(target) == []
    assert not any(p.name.startswith(".pgbackflow-chain-") for p in chain.root.iterdir())


# --------------------------------------------------------------------------- the pieces


def _tar(*infos: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for info, data in infos:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize(("name", "fmt", "kind"), [
    ("base/" + "x" * 120, tarfile.GNU_FORMAT, "b'L'"),
    ("base/" + "x" * 120, tarfile.PAX_FORMAT, "b'x'"),
])
def test_extension_headers_are_refused(tmp_path: Path, name: str, fmt: int, kind: str) -> None:
    """pg_basebackup never writes them (it refuses names over 99 bytes): a long name that
    would have to be assembled from an extension header is refused, nothing written."""
    data = _tar((tarfile.TarInfo(name), b"data"), fmt=fmt)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(UnsafeArchiveError) as error:
        unpack_tar_stream([data], target, label="archive")
    assert kind in str(error.value) and "\n" not in str(error.value)
    assert leftovers(target) == []


def test_a_truncated_member_is_a_damaged_archive(tmp_path: Path) -> None:
    data = _tar((tarfile.TarInfo("PG_VERSION"), b"17\n" * 1000))
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(PgBackflowError, match=r"^archive: not a valid tar archive \(unexpected "
                       r"end of data in member 'PG_VERSION'\): the archive is damaged$"):
        unpack_tar_stream([data[:1500]], target, label="archive")


def test_members_split_across_chunks_at_every_offset(tmp_path: Path) -> None:
    """Headers and data split anywhere between chunks are reassembled."""
    payload = os.urandom(3000)
    data = _tar((tarfile.TarInfo("a"), payload), (tarfile.TarInfo("b"), b"bee"))
    for size in (1, 511, 512, 513, 4096):
        target = tmp_path / f"t{size}"
        target.mkdir()
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        assert unpack_tar_stream(chunks, target, label="archive") == 2
        assert (target / "a").read_bytes() == payload
        assert (target / "b").read_bytes() == b"bee"


def test_read_ahead_hands_over_errors_and_stops_its_thread() -> None:
    def failing() -> Iterator[bytes]:
        yield b"one"
        raise ArchiveError("store/x: chunk 1 failed authentication")

    before = threading.active_count()
    with pytest.raises(ArchiveError, match="chunk 1 failed"):
        list(_read_ahead(failing(), threading.Event()))
    endless_closed = threading.Event()

    def endless() -> Iterator[bytes]:
        try:
            while True:
                yield b"x" * 1024
        finally:
            endless_closed.set()

    reader = _read_ahead(endless(), threading.Event())
    assert next(reader) == b"x" * 1024
    reader.close()  # the consumer stops early: the producer stops and closes its source
    assert endless_closed.is_set()
    stop = threading.Event()
    stopped = _read_ahead(endless(), stop)
    next(stopped)
    stop.set()
    with pytest.raises(PgBackflowError):
        for _ in stopped:
            pass
    assert threading.active_count() == before
