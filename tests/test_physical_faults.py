"""Physical backups under hostile storage and hard faults (issue 16), on real servers:
WAL gaps (a middle segment, a timeline switch; PITR and verification), a swapped segment,
the sweep at the start of a WAL stream, lost sessions during pg_basebackup and streaming,
an interrupted PITR.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr

from pgbackflow.blocks import BackupEncryptionKey, LocalStorage, S3Storage
from pgbackflow.flows.physical_backup import full_backup
from pgbackflow.flows.pitr_restore import pitr_restore
from pgbackflow.flows.wal_stream import wal_gaps, wal_stream
from pgbackflow.tasks.cluster import EphemeralCluster, free_port, resolve_os_user
from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.keys import Keyring, write_key_file
from pgbackflow.tasks.physical import physical_db_id
from pgbackflow.tasks.pitr import INCOMPLETE_MARKER, sweep_interrupted_restores
from pgbackflow.tasks.process import Tool
from pgbackflow.tasks.storage import INCOMPLETE_DIR, SWEEP_GRACE_ENV
from pgbackflow.tasks.toolsets import find_toolset
from pgbackflow.tasks.verify_physical import verify_physical_backup
from pgbackflow.tasks.wal import (
    SegmentPages,
    WalIntegrityError,
    WalShipper,
    WalStreamer,
    segment_name,
    wal_object_key,
    wal_prefix,
)
from tests.fixtures.postgres import BigDatabase
from tests.fixtures.prefect_server import PGBACKFLOW, as_users_run_it
from tests.fixtures.s3 import S3Bucket
from tests.test_physical import (
    db_block,
    mark,
    prepare_marks,
    restored_rows,
    server_sysid,
    stop_restored,
    streaming_wal,
    wait_shipped,
)

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.pg, pytest.mark.timeout(600)]

#: Through a warm daemon where the command just runs (``Streamed.cli``); in a process of its
#: own where a test kills it (PGBACKFLOW_DAEMON=off, conftest: the kill is the command's).
CLI = [str(PGBACKFLOW)]
MAJOR = 17


@dataclass
class Streamed:
    """A storage holding a full backup and streamed WAL of a (stopped) PostgreSQL 17."""

    root: Path
    store: Path
    key: BackupEncryptionKey
    key_file: Path
    db_id: str
    middle: str
    """A complete segment between the backup's end and the newest WAL."""
    swapped: str
    """A complete segment whose earlier .partial upload was kept in ``old_partial``."""
    old_partial: bytes
    superuser: str
    password: str
    server: EphemeralCluster

    def copy(self, name: str) -> Path:
        target = self.root / name
        shutil.copytree(self.store, target)
        return target

    def segment_path(self, store: Path, name: str) -> Path:
        return store / wal_object_key(self.db_id, name)

    def cli(self, *args: str, prefect_api: str) -> subprocess.CompletedProcess[str]:
        env = as_users_run_it({**os.environ, "PREFECT_API_URL": prefect_api})
        return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                              timeout=300, check=False)


def current_segment(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    row = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
    assert row is not None
    return str(row[0])


def wait_for_file(path: Path, newer_than: float, timeout: float = 30) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if path.stat().st_mtime > newer_than:
                return path.read_bytes()
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{path} did not appear within {timeout} s")


@pytest.fixture(scope="module")
def streamed() -> Iterator[Streamed]:
    root = Path(tempfile.mkdtemp(prefix="pgbackflow-test-physfaults-", dir="/var/tmp"))
    root.chmod(0o755)
    key = BackupEncryptionKey.generate()
    key_file = root / "key"
    write_key_file(key_file, key.master_key())
    storage = LocalStorage(folder=str(root / "store"))
    server = EphemeralCluster(find_toolset(MAJOR), settings={"fsync": "off"}).start()
    try:
        prepare_marks(server)
        db_id = physical_db_id(server_sysid(server))
        segments = []
        with streaming_wal(server, storage, key, root / "spool"):
            full_backup(db_block(server), [storage], encryption_key=key)
            mark(server, "after-full")
            with server.connect() as conn:
                conn.autocommit = True
                for _ in range(3):
                    conn.execute("INSERT INTO bulk SELECT g, md5(g::text) FROM "
                                 "generate_series(1, 20000) g")
                    segments.append(current_segment(conn))
                    conn.execute("SELECT pg_switch_wal()")
                started = time.time()
                conn.execute("INSERT INTO marks (v) VALUES ('in-partial')")
                swapped = current_segment(conn)
                old_partial = wait_for_file(
                    root / "store" / wal_object_key(db_id, swapped + ".partial"), started)
                conn.execute("INSERT INTO bulk SELECT g, md5(g::text) FROM "
                             "generate_series(1, 5000) g")
                conn.execute("SELECT pg_switch_wal()")
            mark(server, "last")
            wait_shipped(server, storage)
            wait_for_file(root / "store" / wal_object_key(db_id, swapped), started)
        yield Streamed(root, root / "store", key, key_file, db_id, segments[1], swapped,
                       old_partial, server.superuser, server.password, server)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, result.stderr
    return lines[-1]


# --------------------------------------------------------------------------- WAL gaps


def test_missing_middle_segment_is_listed_and_stops_pitr(streamed: Streamed,
                                                         prefect_api: str) -> None:
    pristine = streamed.cli("physical-list", "--from", str(streamed.store), "--key-file",
                            str(streamed.key_file), prefect_api=prefect_api)
    assert pristine.returncode == 0, pristine.stderr
    assert "no gaps" in pristine.stdout

    store = streamed.copy("middle-gap")
    streamed.segment_path(store, streamed.middle).unlink()
    number = int(streamed.middle[16:], 16)
    lsn = f"LSN 0/{number * 0x1000000:X} to 0/{(number + 1) * 0x1000000:X}"
    for key_args in (["--key-file", str(streamed.key_file)], []):
        listed = streamed.cli("physical-list", "--from", str(store), *key_args,
                              prefect_api=prefect_api)
        assert listed.returncode == 0, listed.stderr
        assert f"gaps: {streamed.middle} ({lsn})" in listed.stdout, listed.stdout
        assert "no gaps" not in listed.stdout
    as_json = streamed.cli("physical-list", "--from", str(store), "--json",
                           prefect_api=prefect_api)
    assert json.loads(as_json.stdout)[0]["wal_gaps"] == [f"{streamed.middle} ({lsn})"]

    refused = streamed.cli("pitr", "--from", str(store), "--target-time", "latest",
                           "--to-dir", str(streamed.root / "into-gap"), "--key-file",
                           str(streamed.key_file), prefect_api=prefect_api)
    line = one_line_error(refused)
    assert f"has gaps ({streamed.middle} ({lsn}) missing" in line, line
    assert not (streamed.root / "into-gap" / "PG_VERSION").exists()


def test_partial_finished_while_it_is_uploaded_ships_complete_next_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pg_receivewal renames ``<segment>.partial`` to ``<segment>`` when the segment is full;
    a rename between the shipper's look at the spool and its open of the file is no error
    (a restarted streamer died of it in CI): the complete segment ships on the next pass."""
    from pgbackflow.tasks import wal
    from pgbackflow.tasks.keys import MasterKey

    spool, store = tmp_path / "spool", tmp_path / "store"
    spool.mkdir()
    segment = "000000010000000000000004"
    (spool / (segment + ".partial")).write_bytes(b"\x01" * 8192)
    storage = LocalStorage(folder=str(store)).open()
    shipper = WalShipper(spool, [storage], MasterKey.generate(), "c1", partial_interval=0)
    real_store_file = wal.store_file
    renamed: list[str] = []

    def finished_meanwhile(path: Path, *args: object, **kwargs: object) -> object:
        if path.name.endswith(".partial"):
            path.rename(path.with_name(segment))  # what pg_receivewal does at the segment's end
            renamed.append(path.name)
        return real_store_file(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(wal, "store_file", finished_meanwhile)
    assert shipper.ship() == []
    assert renamed == [segment + ".partial"], "the race was not produced"
    assert [o.key for o in storage.list()] == [], "an aborted partial upload was left behind"
    assert shipper.ship() == [segment]
    assert [o.key for o in storage.list()] == [wal_object_key("c1", segment)]


def test_swapped_partial_under_a_complete_name_is_refused(streamed: Streamed,
                                                          prefect_api: str) -> None:
    """An older .partial upload (a valid archive under the key) stored under the complete
    segment's name: its header matches the name, but the segment ends unfinished."""
    store = streamed.copy("swapped")
    streamed.segment_path(store, streamed.swapped).write_bytes(streamed.old_partial)
    refused = streamed.cli("pitr", "--from", str(store), "--target-time", "latest",
                           "--to-dir", str(streamed.root / "swapped-restore"), "--key-file",
                           str(streamed.key_file), prefect_api=prefect_api)
    line = one_line_error(refused)
    key = wal_object_key(streamed.db_id, streamed.swapped)
    assert f"{key}: the segment ends unfinished" in line, line
    assert "older .partial upload" in line


@contextmanager
def streaming_from(settings: ConnectionSettings, storage: LocalStorage,
                   key: BackupEncryptionKey, db_id: str, spool: Path) -> Iterator[None]:
    shipper = WalShipper(spool, [storage.open()], key.master_key(), db_id, partial_interval=0.5)
    streamer = WalStreamer(settings, find_toolset(MAJOR), shipper, slot="pgbackflow_test",
                           poll_interval=0.2)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            streamer.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors


@dataclass
class Switched:
    """A copy of the streamed storage after a timeline switch: a restored, promoted copy
    (timeline 2, same system identifier) streamed its WAL into it."""

    store: Path
    """Keep it as it is: tests that change it work on a copy (:meth:`copy`)."""
    marks: int
    """Rows of ``marks`` at the end of timeline 2 (its last one is in a .partial segment)."""
    bulk: int
    """Rows of ``bulk`` there."""

    def copy(self, streamed: Streamed, name: str) -> Path:
        target = streamed.root / name
        shutil.copytree(self.store, target)
        return target

    def switch_segment(self, streamed: Streamed, store: Path) -> str:
        """The first complete timeline-2 segment (it holds the switch)."""
        tl2 = sorted(p.name for p in (store / wal_prefix(streamed.db_id)).iterdir()
                     if p.name.startswith("00000002") and ".partial" not in p.name
                     and "history" not in p.name)
        return tl2[0].removesuffix(".pgbf")


def build_timeline_switch(streamed: Streamed, store: Path) -> Switched:
    """PITR the newest backup of ``store`` to latest, start it (promoted: timeline 2) and
    stream its WAL into ``store`` while it writes."""
    storage = LocalStorage(folder=str(store))
    first = streamed.root / f"{store.name}-tl2-server"
    report = pitr_restore(storage, str(first), target_time="latest", start=True,
                          encryption_key=streamed.key)
    assert report.port is not None
    try:
        settings = ConnectionSettings(host="127.0.0.1", port=report.port,
                                      user=streamed.superuser, password=streamed.password,
                                      sslmode="disable")
        with streaming_from(settings, storage, streamed.key, streamed.db_id,
                            streamed.root / f"{store.name}-tl2-spool"):
            with psycopg.connect(host="127.0.0.1", port=report.port, user=streamed.superuser,
                                 password=streamed.password, dbname="postgres",
                                 autocommit=True) as conn:
                conn.execute("INSERT INTO marks (v) VALUES ('on-timeline-2')")
                conn.execute("INSERT INTO bulk SELECT g, md5(g::text) FROM "
                             "generate_series(1, 20000) g")
                segment = current_segment(conn)
                started = time.time()
                conn.execute("SELECT pg_switch_wal()")
                conn.execute("INSERT INTO marks (v) VALUES ('tl2-last')")
                after = current_segment(conn)
                counts = conn.execute("SELECT (SELECT count(*) FROM marks), "
                                      "(SELECT count(*) FROM bulk)").fetchone()
            assert counts is not None
            assert segment.startswith("00000002")
            wait_for_file(store / wal_object_key(streamed.db_id, segment), started)
            wait_for_file(store / wal_object_key(streamed.db_id, after + ".partial"), started)
    finally:
        stop_restored(first, streamed.server)
        shutil.rmtree(first, ignore_errors=True)
    return Switched(store, int(counts[0]), int(counts[1]))


@pytest.fixture(scope="module")
def switched(streamed: Streamed, prefect_api: str) -> Switched:
    return build_timeline_switch(streamed, streamed.copy("timelines"))


def test_wal_across_a_timeline_switch(streamed: Streamed, switched: Switched,
                                      prefect_api: str) -> None:
    """A restored, promoted copy (timeline 2, same system identifier) streams into the same
    storage: PITR to latest from the timeline-1 backup follows the switch (it stopped at the
    switch, silently, before), and a missing timeline-2 segment is a gap."""
    storage = LocalStorage(folder=str(switched.store))
    assert wal_gaps(storage.open(), streamed.db_id, storage_keyring(streamed)) == []
    second = streamed.root / "tl2-restore"
    again = pitr_restore(storage, str(second), target_time="latest", start=True,
                         encryption_key=streamed.key)
    try:
        rows = restored_rows(again.port or 0, streamed.server)
        assert rows[-2:] == ["on-timeline-2", "tl2-last"], rows
        # A finished restore is not marked.
        assert not (second / INCOMPLETE_MARKER).exists()
        assert INCOMPLETE_MARKER not in (second / "postgresql.conf").read_text()
    finally:
        stop_restored(second, streamed.server)

    # The first timeline-2 segment (it holds the switch) goes missing.
    store = switched.copy(streamed, "tl2-gap-store")
    switch_segment = switched.switch_segment(streamed, store)
    (store / wal_object_key(streamed.db_id, switch_segment)).unlink()
    for key_args in (["--key-file", str(streamed.key_file)], []):
        listed = streamed.cli("physical-list", "--from", str(store), *key_args,
                              prefect_api=prefect_api)
        assert listed.returncode == 0, listed.stderr
        assert f"gaps: {switch_segment} (LSN " in listed.stdout, listed.stdout
    refused = streamed.cli("pitr", "--from", str(store), "--target-time", "latest",
                           "--to-dir", str(streamed.root / "tl2-gap"), "--key-file",
                           str(streamed.key_file), prefect_api=prefect_api)
    assert f"has gaps ({switch_segment} (LSN " in one_line_error(refused)


def test_verification_replays_across_a_timeline_switch(
    streamed: Streamed, switched: Switched, prefect_api: str
) -> None:
    """verify-physical of the timeline-1 backup replays to the end of timeline 2 (it stopped
    at the end of timeline 1, silently, before) and says so; a missing segment on the route
    fails it in one line naming the segment (it passed before)."""
    work = streamed.root / "verify-work"
    work.mkdir(mode=0o755, exist_ok=True)
    storage = LocalStorage(folder=str(switched.store)).open()
    report = verify_physical_backup(storage, storage_keyring(streamed), db_id=streamed.db_id,
                                    work_dir=work)
    assert report.passed, report.error
    rows = report.rows_by_database()["postgres"]
    assert (rows["public.marks"], rows["public.bulk"]) == (switched.marks, switched.bulk)
    assert report.timeline == 1 and report.wal_timeline == 2
    assert report.wal_end is not None and report.wal_end.startswith("00000002"), report.wal_end
    assert f"{report.wal_end}, timeline 2 (from timeline 1)" in report.markdown()

    store = switched.copy(streamed, "verify-gap-store")
    switch_segment = switched.switch_segment(streamed, store)
    (store / wal_object_key(streamed.db_id, switch_segment)).unlink()
    refused = streamed.cli("verify-physical", "--from", str(store), "--key-file",
                           str(streamed.key_file), prefect_api=prefect_api)
    line = one_line_error(refused)
    assert f"has gaps ({switch_segment} (LSN " in line, line
    assert "cannot be restored to the end of the stored WAL" in line, line
    assert list(work.iterdir()) == []


def test_a_segment_of_the_abandoned_timeline_under_the_new_ones_name_is_refused(
    streamed: Streamed, switched: Switched, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old primary (timeline 1) went on writing after its promoted copy began timeline
    2. Its genuine segment stored under timeline 2's name of the same position passed the
    first-page check (an older timeline is allowed there), PostgreSQL stopped at it ("out-
    of-sequence timeline ID") and promoted, and pitr and verify-physical reported success
    without timeline 2's later transactions. Now the fetch refuses it; and a replay that
    ends before the end of the WAL it was given fails (checked with the page check off).
    A deleted timeline-2 history file is listed, and refused, as a hole."""
    store = switched.copy(streamed, "tl1-went-on")
    storage = LocalStorage(folder=str(store))
    with streaming_wal(streamed.server, storage, streamed.key, streamed.root / "tl1-spool"):
        with streamed.server.connect() as conn:
            conn.autocommit = True
            for _ in range(3):
                conn.execute("INSERT INTO bulk SELECT g, md5(g::text) FROM "
                             "generate_series(1, 5000) g")
                conn.execute("SELECT pg_switch_wal()")
        wait_shipped(streamed.server, storage)
    switch = switched.switch_segment(streamed, store)
    size = 16 * 1024 * 1024
    after, later = (segment_name(2, int(switch[8:], 16) + n, size) for n in (1, 2))
    wal = store / wal_prefix(streamed.db_id)
    genuine = wal / f"{after}.pgbf"  # usually only its .partial is stored
    kept = genuine.read_bytes() if genuine.exists() else None
    shutil.copy(wal / f"00000001{after[8:]}.pgbf", genuine)

    target = streamed.root / "tl1-under-tl2"
    refused = streamed.cli("pitr", "--from", str(store), "--target-time", "latest", "--to-dir",
                           str(target), "--key-file", str(streamed.key_file), "--start",
                           prefect_api=prefect_api)
    line = one_line_error(refused)
    assert f"{after}.pgbf: the page at LSN " in line, line
    assert "holds WAL of timeline 1, not of timeline 2, which began at LSN" in line, line
    assert not target.exists() or not any(target.iterdir())
    refused = streamed.cli("verify-physical", "--from", str(store), "--key-file",
                           str(streamed.key_file), prefect_api=prefect_api)
    assert "holds WAL of timeline 1, not of timeline 2" in one_line_error(refused)

    # Were the page check missing, the replay's early end is caught instead (timeline 1's
    # next segment stored after it: the route goes on past the one replay stops at).
    assert not (wal / f"{later}.pgbf").exists()
    shutil.copy(wal / f"00000001{later[8:]}.pgbf", wal / f"{later}.pgbf")
    monkeypatch.setattr(SegmentPages, "_page", lambda *_args: None)
    with pytest.raises(WalIntegrityError, match=(
            rf"ended at LSN \S+ on timeline 2, before the end of the stored WAL \(segment "
            rf"{after}\)")):
        pitr_restore(storage, str(target), target_time="latest", start=True,
                     encryption_key=streamed.key)
    # Undone as a failed start: its server stopped, the directory blocked, never "good".
    assert not (target / "postmaster.pid").exists()
    assert "Recovery was started by pgbackflow" not in (target / INCOMPLETE_MARKER).read_text()
    monkeypatch.undo()
    shutil.rmtree(target)

    # The timeline-2 history file deleted: replay would restore timeline 1's branch.
    (wal / f"{later}.pgbf").unlink()
    if kept is None:
        genuine.unlink()
    else:
        genuine.write_bytes(kept)
    (wal / "00000002.history.pgbf").unlink()
    listed = streamed.cli("physical-list", "--from", str(store), "--key-file",
                          str(streamed.key_file), prefect_api=prefect_api)
    assert listed.returncode == 0, listed.stderr
    assert "gaps: 00000002.history (the history file of timeline 2" in listed.stdout
    refused = streamed.cli("pitr", "--from", str(store), "--target-time", "latest", "--to-dir",
                           str(target), "--key-file", str(streamed.key_file),
                           prefect_api=prefect_api)
    assert "the history file 00000002.history is missing from" in one_line_error(refused)


def storage_keyring(streamed: Streamed) -> Keyring:
    return Keyring([streamed.key.master_key()])


# --------------------------------------------------------------------------- sweep


@pytest.fixture(scope="module")
def small_server() -> Iterator[EphemeralCluster]:
    server = EphemeralCluster(find_toolset(MAJOR), settings={"fsync": "off"}).start()
    try:
        prepare_marks(server)
        yield server
    finally:
        server.stop()


def test_wal_stream_start_sweeps_stale_temporaries(
    small_server: EphemeralCluster, tmp_path: Path, s3_bucket: S3Bucket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Old leftovers go when a WAL stream starts; young ones and a live writer's stay
    (the grace period protects a running streamer's upload)."""
    key = BackupEncryptionKey.generate()
    folder = tmp_path / "store"
    local = LocalStorage(folder=str(folder))
    live = local.open().open_write("physical/live/wal/000000010000000000000001.pgbf")
    live.write(b"x" * 100)  # this process writes it: its lock is held
    incomplete = folder / INCOMPLETE_DIR
    old, young = f"{'f' * 12}-2-{'c' * 16}", f"{'f' * 12}-1-{'b' * 16}"
    for name in (old, young):
        (incomplete / name).write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86400
    os.utime(incomplete / old, (two_days_ago, two_days_ago))
    live_name = next(p.name for p in incomplete.iterdir() if p.name not in (old, young))
    os.utime(incomplete / live_name, (two_days_ago, two_days_ago))
    s3 = S3Storage(bucket=s3_bucket.bucket, prefix="pg", endpoint_url=s3_bucket.endpoint_url,
                   region=s3_bucket.region, access_key_id=s3_bucket.access_key_id,
                   secret_access_key=SecretStr(s3_bucket.secret_access_key))
    client = s3_bucket.client()
    upload_key = "pg/physical/cluster-1/wal/000000010000000000000001.pgbf"

    def uploads() -> list[str]:
        found = client.list_multipart_uploads(Bucket=s3_bucket.bucket)
        return [u["Key"] for u in found.get("Uploads", [])]

    def stream() -> None:
        wal_stream(db_block(small_server), [local, s3], encryption_key=key,
                   spool_dir=str(tmp_path / "spool"), partial_interval_s=0.5,
                   max_runtime_s=1.0)

    # moto dates every upload 2010: younger than a grace of 1,000,000 hours.
    client.create_multipart_upload(Bucket=s3_bucket.bucket, Key=upload_key)
    monkeypatch.setenv(SWEEP_GRACE_ENV, "1000000")
    stream()
    assert uploads() == [upload_key]
    assert sorted(p.name for p in incomplete.iterdir()) == sorted([old, young, live_name])

    monkeypatch.setenv(SWEEP_GRACE_ENV, "24")
    stream()
    assert uploads() == []
    assert sorted(p.name for p in incomplete.iterdir()) == sorted([young, live_name])
    live.close()  # the live writer publishes as if nothing happened
    assert local.open().read_bytes("physical/live/wal/000000010000000000000001.pgbf") == (
        b"x" * 100)


# --------------------------------------------------------------------------- interrupted PITR


def test_pitr_killed_after_pg_control_leaves_a_marked_unstartable_dir(
    streamed: Streamed, prefect_api: str
) -> None:
    """kill -9 of `pgbackflow pitr --start` once global/pg_control is written: the directory
    is marked, PostgreSQL refuses to start it, and a rerun into it is refused in one line."""
    target = streamed.root / "killed-restore"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.Popen(
        [*CLI, "pitr", "--from", str(streamed.store), "--target-time", "latest", "--to-dir",
         str(target), "--key-file", str(streamed.key_file), "--start"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (target / "global" / "pg_control").exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "pg_control never appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pg_ctl = Tool(find_toolset(MAJOR).binary("pg_ctl"))
    try:
        assert (target / INCOMPLETE_MARKER).exists()
        marker = (target / INCOMPLETE_MARKER).read_text()
        assert "did not finish" in marker
        # Killed in the moment between pgbackflow letting its own start through (the marker
        # relaxed for recovery) and the server's start, PostgreSQL may start it: not this case.
        relaxed = "Recovery was started by pgbackflow" in marker
        if not relaxed and not (target / "postmaster.pid").exists():
            # Someone tries to use it by hand: PostgreSQL refuses.
            user = resolve_os_user()
            for folder, dirs, files in os.walk(target):
                for name in [*dirs, *files, "."]:
                    os.chown(os.path.join(folder, name), user.uid, user.gid,
                             follow_symlinks=False)
            log = target / "killed-start.log"
            started = pg_ctl.run(["-D", target, "-l", log, "-w", "-t", "30", "start",
                                  "-o", f"-p {free_port()} -k /tmp"], user=user, cwd=target,
                                 check=False)
            assert started.returncode != 0
            assert "pgbackflow_restore_incomplete" in log.read_text(), log.read_text()
        rerun = streamed.cli("pitr", "--from", str(streamed.store), "--target-time", "latest",
                             "--to-dir", str(target), "--key-file", str(streamed.key_file),
                             prefect_api=prefect_api)
        line = one_line_error(rerun)
        assert f"--to-dir {target} holds an interrupted restore ({INCOMPLETE_MARKER})" in line
        assert f"rm -rf {target}" in line
    finally:
        pg_ctl.run(["-D", target, "-m", "immediate", "stop"], user=resolve_os_user(),
                   check=False)


def _recovering_startup_process(data_dir: Path) -> int | None:
    """The pid of the startup (recovery) process of the server in ``data_dir``, if any."""
    try:
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError, ValueError, IndexError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == postmaster and b"startup" in (entry / "cmdline").read_bytes():
                return int(entry.name)
    return None


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_pitr_interrupted_while_recovering_stops_its_server_and_blocks_the_dir(
    streamed: Streamed, prefect_api: str
) -> None:
    """Ctrl-C while `pitr --start` waits for the promotion: the server it started stops (it
    went on alone before, and finished recovery with no one watching), the directory is
    blocked again (PostgreSQL refuses it) and a rerun into it is refused in one line. The
    recovery is held with SIGSTOP so that the interruption surely lands during it."""
    target = streamed.root / "interrupted-recovery"
    env = as_users_run_it({**os.environ, "PREFECT_API_URL": prefect_api})
    proc = subprocess.Popen(
        [*CLI, "pitr", "--from", str(streamed.store), "--target-time", "latest", "--to-dir",
         str(target), "--key-file", str(streamed.key_file), "--start", "--port",
         str(free_port())],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=_sigint_as_in_a_terminal,
    )
    pg_ctl = Tool(find_toolset(MAJOR).binary("pg_ctl"))
    startup = None
    try:
        deadline = time.monotonic() + 120
        while (startup := _recovering_startup_process(target)) is None:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the restored server never started recovery"
            time.sleep(0.005)
        os.kill(startup, signal.SIGSTOP)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the command's terminal
        time.sleep(1)
        os.kill(startup, signal.SIGCONT)  # its stop request is then taken at once
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 130, stderr[-2000:]
        assert stderr.strip().splitlines()[-1] == "interrupted", stderr[-2000:]
        assert not (target / "postmaster.pid").exists(), "the restored server still runs"
        assert "pgbackflow_restore_incomplete" in (target / INCOMPLETE_MARKER).read_text()
        rerun = streamed.cli("pitr", "--from", str(streamed.store), "--target-time", "latest",
                             "--to-dir", str(target), "--key-file", str(streamed.key_file),
                             prefect_api=prefect_api)
        assert "holds an interrupted restore" in one_line_error(rerun)
    finally:
        if startup is not None:
            with suppress(ProcessLookupError):
                os.kill(startup, signal.SIGCONT)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pg_ctl.run(["-D", target, "-m", "immediate", "stop"], user=resolve_os_user(),
                   check=False)


def test_pitr_interrupted_just_after_the_promotion_stops_its_server(
    streamed: Streamed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interruption after the restored server was promoted but before the restore
    finished (the start stage's task run closing, the WAL cache going) left that server
    running in a directory still marked unfinished. The interruption is injected where the
    WAL cache goes: the window is milliseconds wide for a real Ctrl-C."""
    import pgbackflow.tasks.pitr as pitr_module

    def interrupted(_data_dir: Path) -> None:
        raise KeyboardInterrupt("signal 2")

    monkeypatch.setattr(pitr_module, "remove_wal_cache", interrupted)
    target = streamed.root / "interrupted-after-promotion"
    try:
        with pytest.raises(KeyboardInterrupt):
            pitr_restore(LocalStorage(folder=str(streamed.store)), str(target),
                         target_time="latest", start=True, encryption_key=streamed.key)
        assert not (target / "postmaster.pid").exists(), "the restored server still runs"
        marker = (target / INCOMPLETE_MARKER).read_text()
        assert "pgbackflow_restore_incomplete" in marker
        assert "Recovery was started by pgbackflow" not in marker
    finally:
        stop_restored(target, streamed.server)
        shutil.rmtree(target, ignore_errors=True)


def boot_tag() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]


def gone_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


HOLD_LOCK = """
import fcntl, os, sys, tempfile, time
path = tempfile.mkdtemp(prefix=sys.argv[1] + str(os.getpid()) + "-", dir=sys.argv[2])
fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print(path, flush=True)
time.sleep(600)
"""


def test_pitr_killed_mid_unpack_leaves_a_folder_the_next_pitr_removes(
    streamed: Streamed, prefect_api: str
) -> None:
    """kill -9 of `pgbackflow pitr` while it unpacks: the target is untouched and the hidden
    work folder stays; the next pitr into the same parent removes it and a killed chain's
    folder (one log line each), but not a live restore's, nor one of another machine, nor
    one whose pid still runs."""
    parent = streamed.root / "unpack-kill"
    parent.mkdir()
    target = parent / "restore"
    args = ["pitr", "--from", str(streamed.store), "--target-time", "latest", "--to-dir",
            str(target), "--key-file", str(streamed.key_file)]
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    staging: list[Path] = []
    while not staging or len(list(staging[0].iterdir())) < 3:
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "the unpack never started"
        staging = [p for p in parent.iterdir() if ".pgbackflow-restoring-" in p.name]
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = staging[0]
    assert killed.name.startswith(f".restore.pgbackflow-restoring-{boot_tag()}-{proc.pid}-")
    assert not target.exists(), "the kill came after the unpack (raise the data size)"
    assert (killed / INCOMPLETE_MARKER).exists()

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, f".other.pgbackflow-restoring-{boot_tag()}-",
         str(parent)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        live = Path(holder.stdout.readline().strip())
        dead_chain = parent / f".pgbackflow-chain-{boot_tag()}-{gone_pid()}-abcd_123"
        elsewhere = parent / f".pgbackflow-chain-{'0' * 12}-{gone_pid()}-abcd_123"
        running = parent / f".pgbackflow-chain-{boot_tag()}-{os.getpid()}-abcd_123"
        for folder in (dead_chain, elsewhere, running):
            (folder / "base").mkdir(parents=True)
        # The run's log lines (in the Prefect UI) on the console too.
        rerun = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300,
                               env={**env, "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL":
                                    "INFO"}, check=False)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        output = rerun.stdout + rerun.stderr
        for folder, pid in ((killed, proc.pid), (dead_chain, int(dead_chain.name.split("-")[3]))):
            line = f"removed {folder}: left by an interrupted restore (pid {pid} on this " \
                   "machine is gone)"
            assert output.count(line) == 1, output[-3000:]
            assert not folder.exists()
        assert sorted(p.name for p in parent.iterdir()) == sorted(
            [live.name, elsewhere.name, running.name, "restore"])
        assert (target / "PG_VERSION").exists() and not (target / INCOMPLETE_MARKER).exists()
    finally:
        holder.kill()
        holder.wait()
    # Once its owner is gone, the live one goes too.
    assert sweep_interrupted_restores(parent) == [
        f"removed {live}: left by an interrupted restore (pid {holder.pid} on this machine is "
        "gone)"]


# --------------------------------------------------------------------------- lost sessions

RETRY_LINE = re.compile(r"^database \S+ (not reachable \(.+\)|connection lost during .+); "
                        r"retry (\d) of (\d) in \S+ s$")


def run_env(prefect_api: str, server: EphemeralCluster) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_api, "PGPASSWORD": server.password,
            "PGBACKFLOW_RETRY_DELAYS": "1,2"}


def dsn_of(server: EphemeralCluster) -> str:
    return (f"host={server.host} port={server.port} user={server.superuser} dbname=postgres "
            "sslmode=disable")


def retry_lines(stderr: str) -> list[re.Match[str]]:
    return [m for line in stderr.splitlines() if (m := RETRY_LINE.match(line.strip()))]


def basebackup_streamed(server: EphemeralCluster) -> int:
    try:
        with server.connect() as conn:
            row = conn.execute("SELECT coalesce(max(backup_streamed), 0) FROM "
                               "pg_stat_progress_basebackup").fetchone()
    except psycopg.OperationalError:
        return 0
    return int(row[0]) if row else 0


def start_cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_mid_copy(server: EphemeralCluster, proc: subprocess.Popen[str],
                  streamed_bytes: int = 30_000_000) -> None:
    deadline = time.monotonic() + 120
    while basebackup_streamed(server) < streamed_bytes:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "pg_basebackup never got going"
        time.sleep(0.05)


def leftovers(folder: Path) -> list[str]:
    incomplete = folder / INCOMPLETE_DIR
    return sorted(p.name for p in incomplete.iterdir()) if incomplete.exists() else []


def manifests(folder: Path) -> list[Path]:
    return sorted(folder.glob("physical/*/base/*/manifest.json"))


@pytest.mark.parametrize("outage", ["restart", "shutdown"])
def test_pg_basebackup_loses_its_session(
    outage: str, big_database: BigDatabase, prefect_api: str, tmp_path: Path
) -> None:
    """The server restarts (or shuts down) while pg_basebackup copies a ~300 MB cluster:
    the retry line, then a complete backup (or a one-line error); never a partial one."""
    server = big_database.server
    key_file = tmp_path / "key"
    write_key_file(key_file, BackupEncryptionKey.generate().master_key())
    folder = tmp_path / "store"
    proc = start_cli(run_env(prefect_api, server), "physical-backup", "--db", dsn_of(server),
                     "--to", str(folder), "--key-file", str(key_file))
    try:
        wait_mid_copy(server, proc)
        server.halt()
        if outage == "restart":
            server.resume()
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if not server.running or outage == "shutdown":
            with suppress(Exception):
                server.resume()
    lines = retry_lines(stderr)
    assert lines, stderr[-3000:]
    assert "connection lost during the base backup (pg_basebackup: " in lines[0].group(0)
    assert leftovers(folder) == []
    if outage == "restart":
        assert proc.returncode == 0, stderr[-3000:]
        assert len(manifests(folder)) == 1
    else:
        assert proc.returncode == 1, stderr[-3000:]
        assert "Traceback" not in stderr
        last = [line for line in stderr.splitlines() if line.strip()][-1]
        assert last.startswith("error: "), last
        assert f"{server.host}:{server.port}" in last and "retry" not in last
        assert manifests(folder) == []
        assert list(folder.glob("physical/*/base/*/*")) == []


def test_incremental_pg_basebackup_loses_its_session(prefect_api: str, tmp_path: Path) -> None:
    """PostgreSQL 17 restarts while `physical-backup --incremental` copies ~150 MB of pages
    written since the full backup: the retry line, then one complete incremental backup on
    the full (nothing partial left)."""
    server = EphemeralCluster(find_toolset(MAJOR), settings={"fsync": "off"}).start()
    try:
        key = BackupEncryptionKey.generate()
        key_file = tmp_path / "key"
        write_key_file(key_file, key.master_key())
        folder = tmp_path / "store"
        full = full_backup(db_block(server), [LocalStorage(folder=str(folder))],
                           encryption_key=key)  # a small cluster: fast
        with server.connect() as conn:  # new pages only the incremental copies
            conn.execute("CREATE TABLE changed AS SELECT g AS id, md5(g::text) AS a, "
                         "md5((g * 7)::text) AS b FROM generate_series(1, 1500000) g")
        proc = start_cli(run_env(prefect_api, server), "physical-backup", "--incremental",
                         "--db", dsn_of(server), "--to", str(folder), "--key-file",
                         str(key_file), "--json")
        try:
            wait_mid_copy(server, proc, streamed_bytes=10_000_000)
            server.halt()
            server.resume()
            stdout, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        lines = retry_lines(stderr)
        assert lines, stderr[-3000:]
        assert "connection lost during the base backup (pg_basebackup: " in lines[0].group(0)
        assert proc.returncode == 0, stderr[-3000:]
        report = json.loads(stdout)
        assert (report["mode"], report["parent_id"]) == ("incremental", full.backup_id), report
        assert report["raw_size"] > 100_000_000, report  # the changed pages, not a full copy
        assert leftovers(folder) == []
        stored = [json.loads(m.read_text()) for m in manifests(folder)]
        assert sorted(m["mode"] for m in stored) == ["full", "incremental"]
    finally:
        server.stop()


@pytest.mark.parametrize("outage", ["restart", "shutdown"])
def test_wal_stream_loses_its_session(
    outage: str, small_server: EphemeralCluster, prefect_api: str, tmp_path: Path
) -> None:
    """The server restarts (or shuts down) under `pgbackflow wal-stream`: the retry line,
    then streaming resumes without a gap (or a one-line error)."""
    server = small_server
    key = BackupEncryptionKey.generate()
    key_file = tmp_path / "key"
    write_key_file(key_file, key.master_key())
    folder = tmp_path / "store"
    storage = LocalStorage(folder=str(folder))
    full_backup(db_block(server), [storage], encryption_key=key)
    proc = start_cli(run_env(prefect_api, server), "wal-stream", "--db", dsn_of(server),
                     "--to", str(folder), "--key-file", str(key_file), "--spool-dir",
                     str(tmp_path / "spool"), "--partial-interval", "0.5",
                     "--slot", f"lost_{outage}")
    try:
        mark(server, f"before-{outage}")
        wait_shipped(server, storage, timeout=90)
        server.halt()
        if outage == "restart":
            server.resume()
            time.sleep(4)  # the retries reconnect
            mark(server, "after-restart")
            wait_shipped(server, storage, timeout=90)
            proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if outage == "shutdown":
            server.resume()
    lines = retry_lines(stderr)
    assert lines, stderr[-3000:]
    assert "Traceback" not in stderr
    if outage == "restart":
        assert proc.returncode == 0, stderr[-3000:]
        db_id = physical_db_id(server_sysid(server))
        assert wal_gaps(storage.open(), db_id, Keyring([key.master_key()])) == []
    else:
        assert proc.returncode == 1, stderr[-3000:]
        last = [line for line in stderr.splitlines() if line.strip()][-1]
        assert last.startswith("error: "), last
        assert f"{server.host}:{server.port}" in last and "retry" not in last
    assert leftovers(folder) == []
