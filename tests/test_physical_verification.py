"""Physical backup verification against real PostgreSQL 17 and 18 clusters.

One source cluster per major (module scope) gets a full backup, writes, an incremental,
more writes and streamed WAL; its bootstrap superuser is "boss" and the backups are taken
by a REPLICATION role that is dropped afterwards, so the verification must find the
superuser without knowing it. Corruption is real: checksums off, bytes flipped in a heap
page of the source's table file, then a full backup of that.
"""

from __future__ import annotations

import os
import secrets
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pgbackflow.tasks import physical as ph
from pgbackflow.tasks.cluster import EphemeralCluster, resolve_os_user
from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.errors import ObjectNotFoundError, ToolsetError
from pgbackflow.tasks.inventory import take_inventory
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.manifest import new_backup_id
from pgbackflow.tasks.process import Tool
from pgbackflow.tasks.storage import LocalFolderStorage
from pgbackflow.tasks.toolsets import Toolset, find_toolset
from pgbackflow.tasks.verify_physical import (
    PhysicalVerificationReport,
    sandbox_settings,
    verify_physical_backup,
)
from pgbackflow.tasks.wal import WalShipper, WalStreamer

pytestmark = [pytest.mark.pg]

MAJORS = (17, 18)
SETTINGS = {"fsync": "off"}
SUPERUSER = "boss"
BACKUP_ROLE = "backup_role"


def _toolset(major: int) -> Toolset:
    try:
        return find_toolset(major)
    except ToolsetError as exc:
        # Fail, not skip: a physical test that did not run must not look like a pass.
        pytest.fail(f"PostgreSQL {major} toolset unavailable: {exc}", pytrace=False)


@pytest.fixture
def work_parent() -> Iterator[Path]:
    """A parent work directory the server's OS user can enter, removed afterwards."""
    parent = Path("/var/tmp") / f"pgbackflow-test-verify-{secrets.token_hex(4)}"
    parent.mkdir(mode=0o755)
    parent.chmod(0o755)
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _processes_in(directory: Path) -> list[int]:
    """Pids whose working directory lies in ``directory`` (PostgreSQL chdirs to its data)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == str(directory) or cwd.startswith(f"{directory}/"):
            found.append(int(entry.name))
    return found


def _assert_cleaned(parent: Path) -> None:
    deadline = time.monotonic() + 5
    while _processes_in(parent) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_in(parent) == []
    assert list(parent.iterdir()) == []


# ---------------------------------------------------------------------------------------
# A source cluster with backups


@dataclass
class Source:
    """A running source cluster and the storage holding its physical backups."""

    cluster: EphemeralCluster
    toolset: Toolset
    admin: ConnectionSettings
    backup: ConnectionSettings
    storage: LocalFolderStorage
    key: MasterKey
    db_id: str
    root: Path

    @property
    def keyring(self) -> Keyring:
        return Keyring([self.key])

    def take_backup(self, *, incremental: bool) -> ph.PhysicalManifest:
        """What the physical-backup flow does, without Prefect."""
        facts = ph.read_cluster_facts(self.admin)
        plan = ph.plan_backup(
            facts, ph.list_physical_backups(self.storage, facts.db_id), incremental=incremental
        )
        backup_id = new_backup_id()
        started = datetime.now(UTC)
        prefix = ph.backup_prefix(facts.db_id, backup_id)
        if plan.parent is not None:
            with ph.parent_manifest_file(self.storage, plan.parent, self.keyring) as parent:
                result = ph.take_base_backup(
                    self.backup, self.toolset, [self.storage], self.key, prefix,
                    incremental_from=parent,
                )
        else:
            result = ph.take_base_backup(self.backup, self.toolset, [self.storage], self.key,
                                         prefix)
        manifest = ph.PhysicalManifest(
            backup_id=backup_id, db_id=facts.db_id, mode=plan.mode,
            parent_id=plan.parent.backup_id if plan.parent else None,
            full_id=plan.parent.full_id if plan.parent else backup_id,
            full_reason=plan.full_reason, system_identifier=result.system_identifier,
            timeline=result.timeline, start_lsn=result.start_lsn, end_lsn=result.end_lsn,
            wal_segment_size=facts.wal_segment_size, source=self.backup.display,
            server_version=facts.version, server_version_num=facts.version_num,
            pg_basebackup_version=self.toolset.version, started_at=started,
            finished_at=datetime.now(UTC), base=result.base.info,
            backup_manifest=result.backup_manifest.info, key_id=self.key.key_id_hex,
            cluster_size=facts.cluster_size, tool_version="pgbackflow test",
        )
        ph.write_manifest(self.storage, manifest, self.key)
        return manifest

    def inventories(self) -> dict[str, dict[str, int]]:
        """``{database: {table: rows}}`` of every connectable database."""
        with self.cluster.connect() as conn:
            names = [r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1").fetchall()]
        counts = {}
        for name in names:
            with self.cluster.connect(name) as conn:
                counts[name] = take_inventory(conn).rows_by_table()
        return counts


def _start_source(major: int, root: Path) -> Source:
    toolset = _toolset(major)
    cluster = EphemeralCluster(toolset, settings=SETTINGS, superuser=SUPERUSER).start()
    password = secrets.token_urlsafe(16)
    with cluster.connect() as conn:
        conn.execute(
            f"CREATE ROLE {BACKUP_ROLE} LOGIN REPLICATION IN ROLE pg_monitor "
            f"PASSWORD '{password}'"
        )
    admin = ConnectionSettings(host=cluster.host, port=cluster.port, user=cluster.superuser,
                               password=cluster.password)
    backup = ConnectionSettings(host=cluster.host, port=cluster.port, user=BACKUP_ROLE,
                                password=password)
    key = MasterKey.generate()
    storage = LocalFolderStorage(root / "store")
    db_id = ph.read_cluster_facts(admin).db_id
    return Source(cluster, toolset, admin, backup, storage, key, db_id, root)


def _wait_until_streamed(source: Source) -> None:
    """Until pg_receivewal has flushed everything the source wrote so far."""
    with source.cluster.connect() as conn:
        target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        assert target is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT bool_or(flush_lsn >= %s) FROM pg_stat_replication", (target[0],)
            ).fetchone()
            if row is not None and row[0]:
                return
            time.sleep(0.2)
    raise AssertionError("pg_receivewal did not catch up within 30 s")


@dataclass
class Scenario:
    """A source whose chain (full → incremental) and WAL are stored."""

    source: Source
    full: ph.PhysicalManifest
    incremental: ph.PhysicalManifest
    expected: dict[str, dict[str, int]]


@pytest.fixture(scope="module", params=MAJORS, ids=[f"pg{m}" for m in MAJORS])
def scenario(request: pytest.FixtureRequest) -> Iterator[Scenario]:
    root = Path("/var/tmp") / f"pgbackflow-test-src-{secrets.token_hex(4)}"
    root.mkdir(mode=0o755)
    source = _start_source(request.param, root)
    stop = threading.Event()
    errors: list[BaseException] = []
    shipper = WalShipper(root / "spool", [source.storage], source.key, source.db_id,
                         partial_interval=1)
    streamer = WalStreamer(source.admin, source.toolset, shipper, slot="pgbackflow_verify_test",
                           poll_interval=0.2)

    def stream() -> None:
        try:
            streamer.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        with source.cluster.connect() as conn:
            conn.execute("CREATE DATABASE app")
            conn.execute("CREATE TABLE events (id int PRIMARY KEY, note text)")
            conn.execute("INSERT INTO events SELECT g, 'e' || g FROM generate_series(1, 2000) g")
        with source.cluster.connect("app") as conn:
            conn.execute("CREATE SCHEMA sales")
            conn.execute('CREATE TABLE sales."Order Lines" (id bigint PRIMARY KEY, '
                         "qty int, body text)")
            conn.execute('INSERT INTO sales."Order Lines" SELECT g, g % 7, repeat(md5(g::text), '
                         "200) FROM generate_series(1, 300) g")  # TOASTed bodies
            conn.execute("CREATE TABLE public.parts (id int, region text) PARTITION BY "
                         "LIST (region)")
            conn.execute("CREATE TABLE public.parts_eu PARTITION OF public.parts FOR VALUES IN "
                         "('eu')")
            conn.execute("CREATE TABLE public.parts_us PARTITION OF public.parts FOR VALUES IN "
                         "('us')")
            conn.execute("INSERT INTO public.parts SELECT g, CASE WHEN g % 3 = 0 THEN 'us' "
                         "ELSE 'eu' END FROM generate_series(1, 900) g")
            conn.execute("CREATE INDEX ON public.parts (region, id)")
        full = source.take_backup(incremental=False)
        with source.cluster.connect("app") as conn:
            conn.execute('INSERT INTO sales."Order Lines" SELECT g, 1, \'late\' '
                         "FROM generate_series(301, 450) g")
            conn.execute("DELETE FROM public.parts WHERE id <= 100")
            conn.execute("SELECT pg_switch_wal()")
        incremental = source.take_backup(incremental=True)
        assert incremental.mode == "incremental", incremental.full_reason
        with source.cluster.connect() as conn:
            conn.execute("INSERT INTO events SELECT g, 'after' FROM generate_series(2001, 2500) g")
            # The backups' role disappears: the restored cluster has no role it could name.
            conn.execute(f"DROP ROLE {BACKUP_ROLE}")
            conn.execute("SELECT pg_switch_wal()")
        with source.cluster.connect("app") as conn:
            conn.execute("CREATE TABLE sales.after_backup AS SELECT g AS id "
                         "FROM generate_series(1, 77) g")
        _wait_until_streamed(source)
        expected = source.inventories()
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive() and errors == [], errors
        yield Scenario(source, full, incremental, expected)
    finally:
        stop.set()
        thread.join(timeout=60)
        source.cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _assert_counts_match(report: PhysicalVerificationReport, expected: dict[str, dict[str, int]]
                         ) -> None:
    restored = report.rows_by_database()
    assert set(restored) == set(expected)
    for database, rows in expected.items():
        assert restored[database] == rows, database


# ---------------------------------------------------------------------------------------
# Tests


def test_newest_chain_passes_with_every_relation_checked(
    scenario: Scenario, work_parent: Path
) -> None:
    steps: list[str] = []
    report = verify_physical_backup(
        scenario.source.storage, scenario.source.keyring, db_id=None, amcheck="all",
        heapallindexed=True, work_dir=work_parent, on_step=steps.append,
    )
    assert report.status == "passed", report.error
    assert report.error is None and report.problems == ()
    assert report.backup_id == scenario.incremental.backup_id
    assert report.chain == (scenario.full.backup_id, scenario.incremental.backup_id)
    assert report.db_id == scenario.source.db_id
    assert report.server_major == scenario.source.toolset.major
    assert report.superuser == SUPERUSER  # found although neither candidate role exists
    assert report.wal_files >= 2
    assert report.recovered_to is not None
    # Replay reached the end of the WAL: everything written after the incremental is there.
    _assert_counts_match(report, scenario.expected)
    assert {"postgres", "app", "template1"} <= {d.name for d in report.databases}
    app = next(d for d in report.databases if d.name == "app")
    assert app.rows['sales."Order Lines"'] == 450
    assert app.rows["sales.after_backup"] == 77
    assert app.schema_count == 2
    amcheck = report.amcheck
    assert amcheck is not None and amcheck.ok and amcheck.mode == "all"
    assert amcheck.heapallindexed
    # Every catalog, table, index and TOAST relation of three databases.
    assert amcheck.relations_checked is not None and amcheck.relations_checked > 500
    assert report.stored_bytes == scenario.full.stored_size + scenario.incremental.stored_size
    assert report.restored_bytes is not None and report.restored_bytes > 10_000_000
    durations = report.durations
    assert durations.restore_s is not None and durations.replay_s is not None
    assert durations.amcheck_s is not None and durations.counts_s is not None
    assert durations.total_s >= durations.restore_s + durations.replay_s
    assert any("combining 2 backups" in s for s in steps)
    assert "passed" in report.markdown()
    assert not Path(report.work_dir).exists()
    _assert_cleaned(work_parent)


def test_older_backup_replays_to_the_end_in_sample_mode(
    scenario: Scenario, work_parent: Path
) -> None:
    report = verify_physical_backup(
        scenario.source.storage, scenario.source.keyring, db_id=scenario.source.db_id,
        backup_id=scenario.full.backup_id, amcheck="sample", sample_tables=1,
        work_dir=work_parent,
    )
    assert report.status == "passed", report.error
    assert report.chain == (scenario.full.backup_id,)
    _assert_counts_match(report, scenario.expected)
    amcheck = report.amcheck
    assert amcheck is not None and amcheck.ok and amcheck.mode == "sample"
    # The catalogs plus one table (with its indexes and TOAST) per database: far from all.
    assert amcheck.relations_checked is not None and 0 < amcheck.relations_checked < 1000
    _assert_cleaned(work_parent)


def test_broken_chain_fails_without_leftovers(scenario: Scenario, work_parent: Path) -> None:
    copy = LocalFolderStorage(work_parent / "store-copy")
    shutil.copytree(scenario.source.storage.folder, copy.folder)
    full_manifest = copy.folder / ph.manifest_key(scenario.full)
    full_manifest.unlink()
    report = verify_physical_backup(
        copy, scenario.source.keyring, db_id=scenario.source.db_id, work_dir=work_parent
    )
    shutil.rmtree(copy.folder)
    assert report.status == "failed"
    assert report.error is not None and scenario.full.backup_id in report.error
    assert report.amcheck is None and report.databases == ()
    _assert_cleaned(work_parent)


def test_unknown_backup_id_is_an_input_error(scenario: Scenario) -> None:
    with pytest.raises(ObjectNotFoundError, match="20000101T000000Z-000000"):
        verify_physical_backup(scenario.source.storage, scenario.source.keyring,
                               db_id=scenario.source.db_id, backup_id="20000101T000000Z-000000")


def test_cancellation_stops_the_server_and_deletes_everything(
    scenario: Scenario, work_parent: Path
) -> None:
    seen: list[str] = []

    def interrupt_at_amcheck(step: str) -> None:
        seen.append(step)
        if step.startswith("checking"):
            # The server is up and promoted now: a cancellation must still clean up.
            assert _processes_in(work_parent)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        verify_physical_backup(
            scenario.source.storage, scenario.source.keyring, db_id=scenario.source.db_id,
            work_dir=work_parent, on_step=interrupt_at_amcheck,
        )
    assert any(s.startswith("checking") for s in seen)
    _assert_cleaned(work_parent)


# ---------------------------------------------------------------------------------------
# Real corruption


def _pg_ctl(source: Source, *args: str | Path) -> None:
    Tool(source.toolset.binary("pg_ctl")).run(
        ["-D", source.cluster.data_dir, *args], user=resolve_os_user(),
        cwd=source.cluster.data_dir, timeout=120,
    )


def _corrupt_first_tuple_xmin(path: Path) -> None:
    """Give the first tuple of block 0 an xmin from the future (the page header stays)."""
    with path.open("r+b") as data:
        page = bytearray(data.read(8192))
        (line_pointer,) = struct.unpack_from("<I", page, 24)  # first ItemIdData
        offset = line_pointer & 0x7FFF
        assert 24 < offset < 8192
        struct.pack_into("<I", page, offset, 0x7FFFFF00)  # t_xmin
        data.seek(0)
        data.write(page)


@pytest.mark.parametrize("major", (14, *MAJORS), ids=[f"pg{m}" for m in (14, *MAJORS)])
def test_corruption_in_the_backup_fails_the_verification(major: int, work_parent: Path) -> None:
    root = Path("/var/tmp") / f"pgbackflow-test-src-{secrets.token_hex(4)}"
    root.mkdir(mode=0o755)
    source = _start_source(major, root)
    try:
        with source.cluster.connect() as conn:
            conn.execute("CREATE TABLE victim (id int, note text)")
            conn.execute("INSERT INTO victim SELECT g, 'row ' || g FROM generate_series(1, 200) g")
            conn.execute("CREATE TABLE healthy AS SELECT g AS id FROM generate_series(1, 50) g")
            relation_file = conn.execute("SELECT pg_relation_filepath('victim')").fetchone()
            conn.execute("CHECKPOINT")
        assert relation_file is not None
        _pg_ctl(source, "-m", "fast", "-w", "stop")
        # pg_basebackup would refuse a page with a wrong checksum (PostgreSQL 18 enables
        # them by default): switch them off, as on a cluster created without them.
        Tool(source.toolset.binary("pg_checksums")).run(
            ["--disable", "-D", source.cluster.data_dir], user=resolve_os_user(), check=False,
            cwd=source.cluster.data_dir,
        )
        _corrupt_first_tuple_xmin(source.cluster.data_dir / relation_file[0])
        _pg_ctl(source, "-l", source.cluster.log_path, "-w", "start")
        # The backup role still exists here: it is how the superuser is discovered.
        source.take_backup(incremental=False)

        report = verify_physical_backup(
            source.storage, source.keyring, db_id=source.db_id, amcheck="sample",
            work_dir=work_parent,
        )
    finally:
        source.cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert report.status == "failed"
    assert report.superuser == SUPERUSER
    amcheck = report.amcheck
    assert amcheck is not None and not amcheck.ok and amcheck.exit_code != 0
    assert any("victim" in line for line in amcheck.problems), amcheck.problems
    assert report.error is not None and "pg_amcheck found problems" in report.error
    assert "victim" in report.error and "xmin" in report.error
    # The healthy table was still counted.
    postgres = next(d for d in report.databases if d.name == "postgres")
    assert postgres.rows["public.healthy"] == 50
    assert not Path(report.work_dir).exists()
    _assert_cleaned(work_parent)


def test_sandbox_settings_keep_the_server_inside() -> None:
    """No TCP, no preload libraries, no pid file outside; per-major settings only."""
    settings = sandbox_settings(Path("/d"), Path("/s"), 17)
    assert settings["listen_addresses"] == ""
    assert settings["unix_socket_directories"] == "/s"
    assert settings["hba_file"] == "/d/pg_hba.conf"
    assert settings["shared_preload_libraries"] == ""
    assert settings["external_pid_file"] == ""
    assert settings["summarize_wal"] == "off"
    assert "summarize_wal" not in sandbox_settings(Path("/d"), Path("/s"), 16)
