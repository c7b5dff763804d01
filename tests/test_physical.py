"""Physical backups, WAL streaming and point-in-time restore against real servers.

Every test gets its own throwaway cluster (physical backups take the whole cluster), real
pg_basebackup / pg_receivewal / pg_combinebackup, a real storage and the real Prefect API.
"""

from __future__ import annotations

import contextvars
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prefect.client.schemas.objects import StateType
from pydantic import SecretStr

from pgbackflow.blocks import BackupEncryptionKey, LocalStorage, PostgresDatabase
from pgbackflow.flows.physical_backup import (
    ConcurrentBackupError,
    backup_lock_name,
    full_backup,
    incremental_backup,
)
from pgbackflow.flows.physical_verification import physical_verification
from pgbackflow.flows.pitr_restore import pitr_restore
from pgbackflow.flows.wal_stream import wal_gaps
from pgbackflow.tasks.archive import ArchiveError
from pgbackflow.tasks.cluster import EphemeralCluster, free_port, resolve_os_user
from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.errors import ConfigError, ObjectNotFoundError, ToolsetError
from pgbackflow.tasks.keys import write_key_file
from pgbackflow.tasks.physical import list_physical_backups, physical_db_id
from pgbackflow.tasks.process import Tool
from pgbackflow.tasks.storage import LocalFolderStorage
from pgbackflow.tasks.toolsets import find_toolset
from pgbackflow.tasks.wal import WalIntegrityError, WalShipper, WalStreamer, wal_object_key
from tests.fixtures.prefect import settled_task_runs
from tests.fixtures.prefect_server import PGBACKFLOW, as_users_run_it

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.pg]

CLI = [str(PGBACKFLOW)]


def cluster_or_skip(major: int, pg_majors: tuple[int, ...], **settings: str) -> EphemeralCluster:
    if major not in pg_majors:
        pytest.skip(f"PostgreSQL {major} not selected (--pg-majors)")
    try:
        toolset = find_toolset(major)
    except ToolsetError as exc:
        # A selected major must be testable (fail, not skip): CI installs every toolset.
        pytest.fail(f"selected PostgreSQL {major} is unavailable: {exc}", pytrace=False)
    return EphemeralCluster(toolset, settings={"fsync": "off", **settings})


@pytest.fixture(scope="module")
def encryption_key() -> BackupEncryptionKey:
    return BackupEncryptionKey.generate()


def db_block(server: EphemeralCluster, user: str | None = None, password: str | None = None,
             ) -> PostgresDatabase:
    return PostgresDatabase(
        host=server.host, port=server.port, database="postgres", user=user or server.superuser,
        password=SecretStr(password or server.password), sslmode="disable",
    )


def settings_of(server: EphemeralCluster) -> ConnectionSettings:
    return ConnectionSettings(host=server.host, port=server.port, user=server.superuser,
                              password=server.password, sslmode="disable")


@contextmanager
def streaming_wal(server: EphemeralCluster, storage: LocalStorage, key: BackupEncryptionKey,
                  spool: Path) -> Iterator[WalShipper]:
    """pg_receivewal on a slot in a thread, partial segments shipped every second."""
    facts_db_id = physical_db_id(server_sysid(server))
    shipper = WalShipper(spool, [storage.open()], key.master_key(), facts_db_id,
                         partial_interval=0.5)
    streamer = WalStreamer(settings_of(server), server.toolset, shipper, slot="pgbackflow_test",
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
        yield shipper
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors


def server_sysid(server: EphemeralCluster) -> str:
    with server.connect() as conn:
        row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
    assert row is not None
    return str(row[0])


def wait_shipped(server: EphemeralCluster, storage: LocalStorage, timeout: float = 20) -> None:
    """Wait until the WAL up to the server's current position is in the storage."""
    start = time.time()
    with server.connect() as conn:
        # A WAL record written after `start`: the object holding it is shipped after
        # `start` even when the segment in progress was shipped a moment before (its last
        # change, then nothing: an mtime check alone waited in vain at CI load).
        conn.execute("SELECT pg_logical_emit_message(false, 'pgbackflow-test', 'shipped?')")
        row = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
    assert row is not None
    segment = str(row[0])
    db_id = physical_db_id(server_sysid(server))
    folder = Path(storage.folder)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in (segment, segment + ".partial"):
            path = folder / wal_object_key(db_id, name)
            if path.exists() and path.stat().st_mtime > start:
                return
        time.sleep(0.2)
    raise AssertionError(f"WAL segment {segment} was not shipped within {timeout} s")


def committed_at(server: EphemeralCluster, sql: str) -> datetime:
    with server.connect() as conn:
        conn.execute(sql)
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def restored_rows(port: int, server: EphemeralCluster) -> list[str]:
    with psycopg.connect(host="127.0.0.1", port=port, user=server.superuser,
                         password=server.password, dbname="postgres") as conn:
        return [r[0] for r in conn.execute("SELECT v FROM marks ORDER BY id").fetchall()]


def stop_restored(directory: Path, server: EphemeralCluster) -> None:
    Tool(server.toolset.binary("pg_ctl")).run(
        ["-D", directory, "-m", "immediate", "stop"], user=resolve_os_user(), check=False,
    )


def mark(server: EphemeralCluster, value: str) -> datetime:
    """Insert one committed row; returns the server time right after the commit."""
    return committed_at(server, f"INSERT INTO marks (v) VALUES ('{value}')")


def prepare_marks(server: EphemeralCluster) -> None:
    with server.connect() as conn:
        conn.execute("CREATE TABLE marks (id serial PRIMARY KEY, v text NOT NULL)")
        conn.execute("CREATE TABLE bulk AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS"
                     " payload FROM generate_series(1, 100000) g")


@pytest.mark.parametrize("major", [17, 18])
def test_chain_and_point_in_time_restore(
    major: int, pg_majors: tuple[int, ...], work_dir: Path,
    encryption_key: BackupEncryptionKey,
) -> None:
    """full → (a) → incremental → (b) → incremental → (c); PITR inside (b) and to the end."""
    storage = LocalStorage(folder=str(work_dir / "store"))
    with cluster_or_skip(major, pg_majors) as server:
        prepare_marks(server)
        with streaming_wal(server, storage, encryption_key, work_dir / "spool"):
            full = full_backup(db_block(server), [storage], encryption_key=encryption_key)
            mark(server, "a1")
            first = incremental_backup(db_block(server), [storage], encryption_key=encryption_key)
            mark(server, "b1")
            time.sleep(1.0)
            with server.connect() as conn:
                row = conn.execute("SELECT clock_timestamp()").fetchone()
                assert row is not None
                between: datetime = row[0]
            time.sleep(1.0)
            mark(server, "b2")
            second = incremental_backup(db_block(server), [storage], encryption_key=encryption_key)
            mark(server, "c1")
            time.sleep(0.5)
            with server.connect() as conn:
                row = conn.execute("SELECT clock_timestamp()").fetchone()
                assert row is not None
                after_last: datetime = row[0]
                # WAL without a commit, shipped after after_last: the window reaches past it.
                conn.execute("SELECT pg_logical_emit_message(false, 'pgbackflow-test', 'x')")
            wait_shipped(server, storage)
        assert (full.mode, first.mode, second.mode) == ("full", "incremental", "incremental")
        assert first.parent_id == full.backup_id and second.parent_id == first.backup_id
        assert [link.backup_id for link in second.chain] == [
            full.backup_id, first.backup_id, second.backup_id
        ]

        inside = work_dir / "inside"
        report = pitr_restore(storage, str(inside), target_time=between.isoformat(), start=True,
                              encryption_key=encryption_key)
        try:
            assert report.chain == [f"full {full.backup_id}", f"incremental {first.backup_id}"]
            assert restored_rows(report.port or 0, server) == ["a1", "b1"]
        finally:
            stop_restored(inside, server)

        # No commit follows the target: PostgreSQL stops at the end of the WAL; the restore
        # starts it again without the target (the same data) and says so.
        past = work_dir / "past"
        report = pitr_restore(storage, str(past), target_time=after_last.isoformat(),
                              start=True, encryption_key=encryption_key)
        try:
            assert report.reached_target is False
            assert restored_rows(report.port or 0, server) == ["a1", "b1", "b2", "c1"]
        finally:
            stop_restored(past, server)

        end = work_dir / "end"
        report = pitr_restore(storage, str(end), target_time="latest", start=True,
                              encryption_key=encryption_key)
        try:
            assert len(report.chain) == 3
            assert restored_rows(report.port or 0, server) == ["a1", "b1", "b2", "c1"]
            script = Path(report.script)
            assert script.exists() and os.access(script, os.X_OK)
            assert "pitr" in script.read_text() and str(storage.folder) in script.read_text()
            # The restored cluster was promoted onto a new timeline: same system identifier,
            # but an incremental on the old chain is impossible, so a full is taken.
            restored = PostgresDatabase(
                host="127.0.0.1", port=report.port or 0, database="postgres",
                user=server.superuser, password=SecretStr(server.password), sslmode="disable",
            )
            after = incremental_backup(restored, [storage], encryption_key=encryption_key)
            assert after.mode == "full" and after.timeline == 2
            assert "switched from timeline 1" in (after.full_reason or "")
        finally:
            stop_restored(end, server)


def test_incremental_is_a_small_fraction_of_the_full(
    pg_majors: tuple[int, ...], work_dir: Path, encryption_key: BackupEncryptionKey
) -> None:
    """After changing ~5% of a table's blocks, the incremental is far smaller than the full."""
    storage = LocalStorage(folder=str(work_dir / "store"))
    with cluster_or_skip(17, pg_majors) as server:
        with server.connect() as conn:
            conn.execute(
                "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 3)::text) || "
                "md5((g * 5)::text) AS payload FROM generate_series(1, 400000) g"
            )
            # Autovacuum of the fresh table sets every page's all-visible flag, a WAL-logged
            # change of every block: had it run between the two backups, the incremental
            # would rightly be as large as the full (seen in CI). Vacuum now, then never.
            conn.execute("ALTER TABLE big SET (autovacuum_enabled = off)")
            conn.execute("VACUUM (FREEZE) big")
        full = full_backup(db_block(server), [storage], encryption_key=encryption_key)
        with server.connect() as conn:
            conn.execute("UPDATE big SET payload = upper(payload) WHERE id <= 20000")
        inc = incremental_backup(db_block(server), [storage], encryption_key=encryption_key)
    assert inc.mode == "incremental"
    assert full.stored_size > 20_000_000
    assert inc.stored_size < 0.2 * full.stored_size, (inc.stored_size, full.stored_size)


def test_wal_streamer_killed_and_restarted_loses_nothing(
    pg_majors: tuple[int, ...], work_dir: Path, encryption_key: BackupEncryptionKey,
    prefect_api: str,
) -> None:
    """kill -9 of `pgbackflow wal-stream`, writes meanwhile, restart: no gap, PITR across it."""
    storage = LocalStorage(folder=str(work_dir / "store"))
    key_file = work_dir / "key"
    write_key_file(key_file, encryption_key.master_key())
    with cluster_or_skip(17, pg_majors) as server:
        prepare_marks(server)
        dsn = (f"host={server.host} port={server.port} user={server.superuser} "
               "dbname=postgres sslmode=disable")
        env = {**os.environ, "PGPASSWORD": server.password, "PREFECT_API_URL": prefect_api}
        command = [*CLI, "wal-stream", "--db", dsn, "--to", str(storage.folder), "--key-file",
                   str(key_file), "--spool-dir", str(work_dir / "spool"),
                   "--partial-interval", "0.5"]
        streamer = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        try:
            full_backup(db_block(server), [storage], encryption_key=encryption_key)
            mark(server, "before")
            wait_shipped(server, storage, timeout=60)
            os.killpg(streamer.pid, signal.SIGKILL)
            streamer.wait()
            # Written while no streamer runs: the slot keeps it on the server.
            with server.connect() as conn:
                conn.execute("INSERT INTO bulk SELECT g, md5(g::text) FROM "
                             "generate_series(200001, 260000) g")
                conn.execute("SELECT pg_switch_wal()")
            while_dead = mark(server, "while-dead")
            time.sleep(1.0)
            streamer = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
            time.sleep(1.0)
            mark(server, "after")
            try:
                wait_shipped(server, storage, timeout=90)
            except AssertionError as exc:
                ended = streamer.poll()
                output = streamer.communicate(timeout=5)[1].decode() if ended is not None else ""
                raise AssertionError(f"{exc}; restarted streamer exit {ended}: {output[-2000:]}"
                                     ) from None
        finally:
            # What Ctrl-C or a supervisor does: the streamer ships what it has, then exits.
            streamer.send_signal(signal.SIGTERM)
            _, stderr = streamer.communicate(timeout=60)
        assert streamer.returncode == 0, stderr.decode()
        db_id = physical_db_id(server_sysid(server))
        assert wal_gaps(storage.open(), db_id) == []

        target = work_dir / "restored"
        report = pitr_restore(storage, str(target), target_time=while_dead.isoformat(),
                              start=True, encryption_key=encryption_key)
        try:
            assert restored_rows(report.port or 0, server) == ["before", "while-dead"]
        finally:
            stop_restored(target, server)


def test_full_wal_and_pitr_on_15(
    pg_majors: tuple[int, ...], work_dir: Path, encryption_key: BackupEncryptionKey
) -> None:
    """No incrementals before 17, but full + WAL + PITR work; an incremental asks for a full."""
    storage = LocalStorage(folder=str(work_dir / "store"))
    with cluster_or_skip(15, pg_majors) as server:
        prepare_marks(server)
        with streaming_wal(server, storage, encryption_key, work_dir / "spool"):
            full_backup(db_block(server), [storage], encryption_key=encryption_key)
            mark(server, "one")
            time.sleep(1.0)
            between = mark(server, "two")
            time.sleep(1.0)
            mark(server, "three")
            wait_shipped(server, storage)
        with pytest.raises(ConfigError, match=r"PostgreSQL 15\.\d+ cannot take incremental.*"
                                              r"a full backup is what this version can do"):
            incremental_backup(db_block(server), [storage], encryption_key=encryption_key)
        target = work_dir / "restored"
        report = pitr_restore(storage, str(target), target_time=between.isoformat(), start=True,
                              encryption_key=encryption_key)
        try:
            assert restored_rows(report.port or 0, server) == ["one", "two"]
        finally:
            stop_restored(target, server)


def test_incremental_on_16_is_refused_clearly(
    pg_majors: tuple[int, ...], work_dir: Path, encryption_key: BackupEncryptionKey
) -> None:
    storage = LocalStorage(folder=str(work_dir / "store"))
    with (
        cluster_or_skip(16, pg_majors) as server,
        pytest.raises(ConfigError, match=r"PostgreSQL 16\.\d+ cannot take incremental"),
    ):
        incremental_backup(db_block(server), [storage], encryption_key=encryption_key)
    assert not Path(storage.folder).exists() or not any(Path(storage.folder).rglob("*.json"))


def test_summarize_wal_off_says_how_to_fix(
    pg_majors: tuple[int, ...], work_dir: Path, encryption_key: BackupEncryptionKey
) -> None:
    storage = LocalStorage(folder=str(work_dir / "store"))
    with cluster_or_skip(17, pg_majors, summarize_wal="off") as server:
        full_backup(db_block(server), [storage], encryption_key=encryption_key)
        with pytest.raises(ConfigError, match=r"summarize_wal is off.*ALTER SYSTEM SET "
                                              r"summarize_wal = on"):
            incremental_backup(db_block(server), [storage], encryption_key=encryption_key)


def test_role_without_replication_is_refused_clearly(
    pg_majors: tuple[int, ...], work_dir: Path, encryption_key: BackupEncryptionKey
) -> None:
    storage = LocalStorage(folder=str(work_dir / "store"))
    with cluster_or_skip(17, pg_majors) as server:
        with server.connect() as conn:
            conn.execute("CREATE ROLE plain LOGIN PASSWORD 'plain-pw' IN ROLE pg_monitor")
        with pytest.raises(ConfigError, match=r"role 'plain' .* lacks the REPLICATION attribute"
                                              r".*ALTER ROLE \"plain\" REPLICATION"):
            full_backup(db_block(server, "plain", "plain-pw"), [storage],
                        encryption_key=encryption_key)


def test_target_outside_window_names_the_window(
    pg_majors: tuple[int, ...], work_dir: Path, encryption_key: BackupEncryptionKey
) -> None:
    storage = LocalStorage(folder=str(work_dir / "store"))
    with cluster_or_skip(17, pg_majors) as server:
        full = full_backup(db_block(server), [storage], encryption_key=encryption_key)
    too_early = full.started_at - timedelta(hours=1)
    too_late = datetime.now(UTC) + timedelta(days=1)
    for moment in (too_early, too_late):
        with pytest.raises(ConfigError, match=r"outside the recoverable window of cluster-\d+: "
                                              r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+00 to "):
            pitr_restore(storage, str(work_dir / "never"), target_time=moment.isoformat(),
                         encryption_key=encryption_key)
    assert not (work_dir / "never").exists()


def test_tampered_wal_and_incremental_stop_the_restore(
    pg_majors: tuple[int, ...], work_dir: Path, encryption_key: BackupEncryptionKey
) -> None:
    """A flipped byte, or a valid segment under another name: the error names the object."""
    storage = LocalStorage(folder=str(work_dir / "store"))
    with cluster_or_skip(17, pg_majors) as server:
        prepare_marks(server)
        with streaming_wal(server, storage, encryption_key, work_dir / "spool"):
            full_backup(db_block(server), [storage], encryption_key=encryption_key)
            mark(server, "x")
            with server.connect() as conn:
                conn.execute("SELECT pg_switch_wal()")
            mark(server, "y")
            inc = incremental_backup(db_block(server), [storage], encryption_key=encryption_key)
            with server.connect() as conn:
                conn.execute("SELECT pg_switch_wal()")
            mark(server, "z")
            wait_shipped(server, storage)
    folder = Path(storage.folder)
    db_id = inc.db_id
    segments = sorted(p for p in (folder / f"physical/{db_id}/wal").glob("*.pgbf")
                      if len(p.name) == 24 + 5)
    assert len(segments) >= 2
    victim = segments[-1]
    original = victim.read_bytes()

    # 1. a flipped byte inside a WAL object
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    victim.write_bytes(bytes(damaged))
    with pytest.raises(ArchiveError, match=victim.name):
        pitr_restore(storage, str(work_dir / "r1"), target_time="latest",
                     encryption_key=encryption_key)

    # 2. a valid segment of this cluster stored under another segment's name
    shutil.copyfile(segments[-2], victim)
    with pytest.raises(WalIntegrityError, match=rf"{victim.name}: holds WAL of another position"):
        pitr_restore(storage, str(work_dir / "r2"), target_time="latest",
                     encryption_key=encryption_key)
    victim.write_bytes(original)

    # 3. a flipped byte in the incremental backup
    base = next(folder.glob(f"physical/{db_id}/base/{inc.backup_id}/base.tar.pgbf"))
    data = bytearray(base.read_bytes())
    data[len(data) // 3] ^= 0x80
    base.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match=rf"base/{inc.backup_id}/base\.tar\.pgbf"):
        pitr_restore(storage, str(work_dir / "r3"), target_time="latest",
                     encryption_key=encryption_key)


def test_broken_chain_forces_a_full_and_says_why(
    pg_majors: tuple[int, ...], work_dir: Path, encryption_key: BackupEncryptionKey
) -> None:
    storage = LocalStorage(folder=str(work_dir / "store"))
    with cluster_or_skip(17, pg_majors) as server:
        first = incremental_backup(db_block(server), [storage], encryption_key=encryption_key)
        assert first.mode == "full" and "no earlier backup" in (first.full_reason or "")
        second = incremental_backup(db_block(server), [storage], encryption_key=encryption_key)
        assert second.mode == "incremental"
        # The chain's full disappears: the next incremental cannot build on it.
        (Path(storage.folder) / f"physical/{first.db_id}/base/{first.backup_id}/manifest.json"
         ).unlink()
        third = incremental_backup(db_block(server), [storage], encryption_key=encryption_key)
        assert third.mode == "full"
        assert f"needs its parent {first.backup_id}" in (third.full_reason or "")
        backups = list_physical_backups(storage.open(), first.db_id)
        assert [b.backup_id for b in backups] == [second.backup_id, third.backup_id]


def test_backups_of_one_cluster_never_overlap(
    pg_majors: tuple[int, ...], work_dir: Path, encryption_key: BackupEncryptionKey
) -> None:
    """While another backup holds the cluster's slot, a second one waits, then gives up."""
    from prefect import flow
    from prefect.concurrency.sync import concurrency

    storage = LocalStorage(folder=str(work_dir / "store"))
    with cluster_or_skip(17, pg_majors) as server:
        db_id = physical_db_id(server_sysid(server))
        # The first backup creates the limit; then a holder occupies the single slot.
        full_backup(db_block(server), [storage], encryption_key=encryption_key)
        held = threading.Event()
        release = threading.Event()

        @flow
        def holder() -> None:
            with concurrency(backup_lock_name(db_id), occupy=1, strict=True):
                held.set()
                release.wait(60)

        # In this test's context (its Prefect API): a bare thread starts with an empty one,
        # and its flow went to a temporary server of its own (40 s to start under load).
        thread = threading.Thread(target=contextvars.copy_context().run, args=(holder,),
                                  daemon=True)
        thread.start()
        assert held.wait(60)
        try:
            with pytest.raises(ConcurrentBackupError, match=f"another backup of cluster {db_id}"):
                full_backup(db_block(server), [storage], encryption_key=encryption_key,
                            lock_timeout_s=2)
        finally:
            release.set()
            thread.join(60)
        assert len(list_physical_backups(storage.open(), db_id)) == 1


def test_cli_physical_backup_list_and_pitr(
    pg_majors: tuple[int, ...], work_dir: Path, encryption_key: BackupEncryptionKey,
    prefect_api: str,
) -> None:
    """The CLI end to end: backup --json, physical-list, pitr errors as one line."""
    import json

    key_file = work_dir / "key"
    write_key_file(key_file, encryption_key.master_key())
    store = work_dir / "store"
    with cluster_or_skip(17, pg_majors) as server:
        dsn = (f"host={server.host} port={server.port} user={server.superuser} "
               "dbname=postgres sslmode=disable")
        env = as_users_run_it({**os.environ, "PGPASSWORD": server.password,
                               "PREFECT_API_URL": prefect_api})

        def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                                  timeout=300, check=False, cwd=cwd)

        done = cli("physical-backup", "--db", dsn, "--to", str(store), "--key-file",
                   str(key_file), "--json")
        assert done.returncode == 0, done.stderr
        document: dict[str, Any] = json.loads(done.stdout)
        assert document["mode"] == "full" and document["status"] == "complete"
        listed = cli("physical-list", "--from", str(store), "--json")
        assert json.loads(listed.stdout)[0]["backups"][0]["backup_id"] == document["backup_id"]
        occupied = work_dir / "occupied"
        occupied.mkdir()
        (occupied / "keep.txt").write_text("mine")
        refused = cli("pitr", "--from", str(store), "--target", "latest", "--to-dir",
                      str(occupied), "--key-file", str(key_file))
        assert refused.returncode == 1
        assert "is not empty" in refused.stderr and "Traceback" not in refused.stderr
        assert (occupied / "keep.txt").read_text() == "mine"
        # Relative paths, as typed in a shell in work_dir.
        restored = cli("pitr", "--from", store.name, "--target", "latest", "--to-dir",
                       "fresh", "--key-file", key_file.name, "--json", cwd=work_dir)
        assert restored.returncode == 0, restored.stderr
        assert (work_dir / "fresh" / "PG_VERSION").read_text().strip() == "17"
        if os.geteuid() == 0:
            _starts_as_printed_by_its_user(work_dir / "fresh", json.loads(restored.stdout))
            human = cli("pitr", "--from", store.name, "--target", "latest", "--to-dir",
                        "fresh-human", "--key-file", key_file.name, cwd=work_dir)
            assert human.returncode == 0, human.stderr
            hint = f"su postgres -c 'pg_ctl -D {work_dir / 'fresh-human'} start'"
            assert f"start it with: {hint}" in " ".join(human.stdout.split()), human.stdout
        # The written restore.sh redoes the same restore, by hand, into another directory,
        # from any working directory.
        script = Path(json.loads(restored.stdout)["script"])
        again = subprocess.run([str(script), str(work_dir / "again")], env=env, cwd="/",
                               capture_output=True, text=True, timeout=300, check=False)
        assert again.returncode == 0, again.stderr
        assert (work_dir / "again" / "PG_VERSION").read_text().strip() == "17"
        assert (work_dir / "again" / "recovery.signal").exists()
        refused_again = subprocess.run([str(script), str(occupied)], env=env,
                                       capture_output=True, text=True, timeout=60, check=False)
        assert refused_again.returncode != 0 and "not empty" in refused_again.stderr


def _starts_as_printed_by_its_user(data_dir: Path, report: dict[str, Any]) -> None:
    """Root restored ``data_dir`` without starting it: it belongs to the server's user
    (every file, the WAL the restore command copies included), and that user's pg_ctl
    starts it with nothing changed by hand (root's directory: "could not open PID file")."""
    from pgbackflow.tasks.runtime import stop_local_server

    user = resolve_os_user()
    assert report["os_user"] == user.name
    foreign = [path for path in [data_dir, *data_dir.rglob("*")]
               if path.lstat().st_uid != user.uid]
    assert not foreign, f"not handed to {user.name}: {foreign[:5]}"
    pg_ctl = Tool(find_toolset(17).binary("pg_ctl"))
    started = pg_ctl.run(
        ["-D", str(data_dir), "-w", "-t", "120", "-l", str(data_dir / "start.log"),
         "-o", f"-p {free_port()} -c listen_addresses=127.0.0.1 -k {data_dir}", "start"],
        user=user, cwd=data_dir, timeout=180, check=False)
    try:
        assert started.returncode == 0, started.stderr_tail + (
            (data_dir / "start.log").read_text() if (data_dir / "start.log").exists() else "")
    finally:
        stop_local_server(pg_ctl, data_dir, user)


def test_missing_backups_is_a_clear_error(work_dir: Path,
                                          encryption_key: BackupEncryptionKey) -> None:
    with pytest.raises(ObjectNotFoundError, match="no physical backups in"):
        pitr_restore(LocalStorage(folder=str(work_dir)), str(work_dir / "x"),
                     encryption_key=encryption_key)
    assert LocalFolderStorage(work_dir).list() == []


def test_cli_pitr_into_docker_volume_and_verify_physical(
    pg_majors: tuple[int, ...], work_dir: Path, encryption_key: BackupEncryptionKey,
    prefect_api: str, docker_engine: Any,
) -> None:
    """`pitr --docker VOLUME --start` and `verify-physical` through the CLI and the flows."""
    import json
    import secrets

    key_file = work_dir / "key"
    write_key_file(key_file, encryption_key.master_key())
    store = work_dir / "store"
    volume = f"pgbackflow-test-{secrets.token_hex(4)}"
    storage = LocalStorage(folder=str(store))
    with cluster_or_skip(17, pg_majors) as server:
        prepare_marks(server)
        with streaming_wal(server, storage, encryption_key, work_dir / "spool"):
            full_backup(db_block(server), [storage], encryption_key=encryption_key)
            mark(server, "in-volume")
            wait_shipped(server, storage)
        # The run's logs on stderr: this test once saw exit 0 with nothing on stdout, and
        # they say how far the run got.
        env = as_users_run_it({
            **os.environ, "PREFECT_API_URL": prefect_api, "PYTHONFAULTHANDLER": "1",
            **{f"PREFECT_LOGGING_HANDLERS_CONSOLE{part}_LEVEL": "INFO"
               for part in ("", "_FLOW_RUNS", "_TASK_RUNS")}})

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                                  timeout=600, check=False)

        try:
            done = cli("pitr", "--from", str(store), "--target", "latest", "--docker", volume,
                       "--start", "--key-file", str(key_file), "--json")
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip(), f"no JSON on stdout; stderr: {done.stderr[-3000:]}"
            report = json.loads(done.stdout)
            assert report["started"] and report["container"]
            assert restored_rows(report["port"], server) == ["in-volume"]
            assert _stage_task_runs("pitr-restore", report["db_id"]) == {
                "plan-restore", "build-data-dir", "copy-into-volume", "start-restored-server"}
        finally:
            for container in docker_engine.containers.list(all=True, filters={"volume": volume}):
                container.remove(force=True, v=True)
            for leftover in docker_engine.volumes.list(filters={"name": volume}):
                leftover.remove(force=True)

        verified = cli("verify-physical", "--from", str(store), "--key-file", str(key_file),
                       "--json")
        assert verified.returncode == 0, verified.stderr
        document = json.loads(verified.stdout)
        assert document["status"] == "passed"
        # Each stage of the verification is a task run of its own in the UI.
        assert _stage_task_runs("physical-verification", document["db_id"]) == {
            "plan-chain", "build-data-dir", "start-restored-server", "amcheck", "count-rows"}
        rows = {d["name"]: d["rows"] for d in document["databases"]}
        assert rows["postgres"]["public.marks"] == 1


@pytest.mark.parametrize("major", [15, 17])
def test_cluster_with_a_tablespace(
    major: int, pg_majors: tuple[int, ...], work_dir: Path, encryption_key: BackupEncryptionKey
) -> None:
    """Extra tablespaces: tars spooled per tablespace, restored next to the data directory."""
    storage = LocalStorage(folder=str(work_dir / "store"))
    location = work_dir / "tablespace"
    location.mkdir()
    user = resolve_os_user()
    os.chown(location, user.uid, user.gid)
    with cluster_or_skip(major, pg_majors) as server:
        with server.connect() as conn:
            conn.execute(f"CREATE TABLESPACE extra LOCATION '{location}'")
            conn.execute("CREATE TABLE far (id int, v text) TABLESPACE extra")
            conn.execute("INSERT INTO far SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
        full = full_backup(db_block(server), [storage], encryption_key=encryption_key)
        with server.connect() as conn:
            conn.execute("INSERT INTO far SELECT g, 'later' FROM generate_series(5001, 5100) g")
        second = (incremental_backup if major >= 17 else full_backup)(
            db_block(server), [storage], encryption_key=encryption_key
        )
    assert second.mode == ("incremental" if major >= 17 else "full")
    manifests = list_physical_backups(storage.open(), full.db_id)
    assert all(len(m.tablespaces) == 1 and m.tablespaces[0].location == str(location)
               for m in manifests)
    target = work_dir / "restored"
    report = pitr_restore(storage, str(target), target_time="latest", start=True,
                          encryption_key=encryption_key)
    try:
        link = next((target / "pg_tblspc").iterdir())
        assert link.is_symlink()
        assert link.resolve().parent == (work_dir / "restored.tablespaces").resolve()
        with psycopg.connect(host="127.0.0.1", port=report.port or 0, user=server.superuser,
                             password=server.password, dbname="postgres") as conn:
            row = conn.execute("SELECT count(*), count(*) FILTER (WHERE v = 'later') FROM far"
                               ).fetchone()
            assert row == (5100, 100)
            located = conn.execute("SELECT pg_tablespace_location(oid) FROM pg_tablespace "
                                   "WHERE spcname = 'extra'").fetchone()
            assert located is not None and "restored.tablespaces" in located[0]
    finally:
        stop_restored(target, server)
    with pytest.raises(ConfigError, match=r"extra tablespaces.*restore with --to-dir"):
        pitr_restore(storage, str(work_dir / "unused"), target_time="latest",
                     encryption_key=encryption_key, docker_volume="pgbackflow-never-created")
    verified = physical_verification(storage, encryption_key=encryption_key, amcheck="all")
    assert verified.passed
    rows = {d.name: dict(d.rows) for d in verified.databases}
    assert rows["postgres"]["public.far"] == 5100


def test_another_system_identifier_breaks_the_chain() -> None:
    """Planning is plain data: a newest backup of another cluster can never be a parent."""
    from pgbackflow.tasks.manifest import StoredObjectInfo
    from pgbackflow.tasks.physical import ClusterFacts, PhysicalManifest, plan_backup

    info = StoredObjectInfo(key="k", raw_size=1, stored_size=1, sha256="0" * 64)
    now = datetime.now(UTC)
    parent = PhysicalManifest(
        backup_id="b1", db_id="cluster-1", mode="full", parent_id=None, full_id="b1",
        system_identifier="111", timeline=1, start_lsn="0/2000028", end_lsn="0/2000100",
        wal_segment_size=16 * 1024 * 1024, source="u@h:1", server_version="17.6",
        server_version_num=170006, pg_basebackup_version="17.6", started_at=now,
        finished_at=now, base=info, backup_manifest=info, key_id="00", cluster_size=1,
        tool_version="t",
    )
    facts = ClusterFacts(
        system_identifier="222", timeline=1, version_num=170006, version="17.6",
        wal_segment_size=16 * 1024 * 1024, summarize_wal=True, extra_tablespaces=(),
        cluster_size=1, can_replicate=True, role="u",
    )
    plan = plan_backup(facts, [parent], incremental=True)
    assert plan.mode == "full" and "another cluster (system identifier 111" in (
        plan.full_reason or ""
    )
    same = plan_backup(
        ClusterFacts(**{**facts.__dict__, "system_identifier": "111"}), [parent],
        incremental=True,
    )
    assert same.mode == "incremental" and same.parent == parent


def _stage_task_runs(flow_name: str, db_id: str) -> set[str]:
    """Names of the task runs (without Prefect's "-<n>" suffix) of the newest run of
    ``flow_name`` for ``db_id``, all of them Completed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"db:{db_id}"])),
            sort=FlowRunSort.START_TIME_DESC, limit=1,
        )
    assert runs, f"no {flow_name} run of {db_id} on the API"
    tasks = settled_task_runs(runs[0].id)
    assert all(t.state_type == StateType.COMPLETED for t in tasks), \
        [(t.name, t.state_type) for t in tasks]
    return {t.name.rsplit("-", 1)[0] for t in tasks}
