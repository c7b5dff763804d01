"""Smoke tests of the per-major test servers and of EphemeralCluster itself."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgbackflow.tasks.cluster import EphemeralCluster, resolve_os_user
from pgbackflow.tasks.errors import ConfigError, DatabaseError
from pgbackflow.tasks.process import pid_alive
from pgbackflow.tasks.toolsets import Toolset, find_toolset
from tests.fixtures.postgres import PgDatabase, PgServers

DEBIAN_15 = Path("/usr/lib/postgresql/15/bin/postgres")


def _setting(cluster: EphemeralCluster, name: str) -> str:
    with cluster.connect() as conn:
        row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    assert row is not None
    return str(row[0])


def _all_cmdlines() -> dict[int, str]:
    cmdlines = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:  # the process ended meanwhile
                continue
            cmdlines[int(entry.name)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return cmdlines


@pytest.fixture
def newest_toolset(pg_majors: tuple[int, ...]) -> Toolset:
    """Toolset of the newest selected major, for tests that build their own cluster."""
    if not pg_majors:
        pytest.skip("no PostgreSQL major selected")
    return find_toolset(max(pg_majors))


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp dir the cluster's unprivileged OS user can enter (pytest's tmp_path is 700)."""
    path = Path(tempfile.mkdtemp(prefix="pgbackflow-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_server_runs_the_selected_major(pg_server: EphemeralCluster) -> None:
    assert int(_setting(pg_server, "server_version_num")) // 10000 == pg_server.major
    assert _setting(pg_server, "server_version").startswith(pg_server.toolset.version)


def test_server_settings(pg_server: EphemeralCluster) -> None:
    assert _setting(pg_server, "wal_level") == "replica"
    assert _setting(pg_server, "max_wal_senders") == "10"
    assert _setting(pg_server, "listen_addresses") == "127.0.0.1"
    assert _setting(pg_server, "fsync") == "off"
    if pg_server.major >= 17:
        assert _setting(pg_server, "summarize_wal") == "on"


def test_wrong_password_is_refused(pg_server: EphemeralCluster) -> None:
    bad = make_conninfo(pg_server.conninfo(), password="not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(bad, connect_timeout=5)


def test_password_is_not_exposed(pg_server: EphemeralCluster) -> None:
    password = pg_server.password
    assert len(password) >= 16
    assert password not in repr(pg_server)
    postmaster_pid = int((pg_server.data_dir / "postmaster.pid").read_text().splitlines()[0])
    cmdlines = _all_cmdlines()
    assert str(pg_server.data_dir) in cmdlines[postmaster_pid]
    leaking = [pid for pid, cmdline in cmdlines.items() if password in cmdline]
    assert leaking == []
    assert password not in pg_server.log_path.read_text()
    assert not (pg_server.socket_dir / "pwfile").exists()


def test_server_runs_as_unprivileged_user(pg_server: EphemeralCluster) -> None:
    stat = pg_server.data_dir.stat()
    assert stat.st_uid != 0
    assert stat.st_mode & 0o077 == 0
    assert (pg_server.socket_dir / f".s.PGSQL.{pg_server.port}").is_socket()


def test_pg_database_is_fresh_and_reachable(pg_database: PgDatabase) -> None:
    assert pg_database.major == pg_database.server.major
    assert pg_database.server.password not in repr(pg_database)
    with psycopg.connect(pg_database.conninfo) as conn:
        row = conn.execute(
            "SELECT current_database(), count(*) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
        ).fetchone()
    assert row == (pg_database.name, 0)


@pytest.mark.pg
def test_cluster_lifecycle_and_cleanup(newest_toolset: Toolset, shared_tmp: Path) -> None:
    cluster = EphemeralCluster(newest_toolset, password="s3cret-pass", base_dir=shared_tmp)
    with pytest.raises(DatabaseError, match="not started"):
        _ = cluster.data_dir
    with cluster:
        root = cluster.socket_dir
        assert cluster.running
        with cluster.connect() as conn:
            assert conn.autocommit
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    assert not cluster.running
    assert not root.exists()
    cluster.stop()  # idempotent
    assert list(shared_tmp.iterdir()) == []


def _watchdogs_of(root: Path) -> list[int]:
    """Pids of watchdog processes (tasks/watchdog.py) that watch ``root``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"pgbackflow.tasks.watchdog" in argv and str(root).encode() in argv:
                found.append(int(entry.name))
    return found


def _wait(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.pg
def test_a_killed_owner_leaves_no_server_and_no_files(
    newest_toolset: Toolset, shared_tmp: Path
) -> None:
    """A process that started a cluster and was killed with SIGKILL (a killed test run or
    verification) leaves nothing: its watchdog stops the server and deletes the files."""
    owner = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from pathlib import Path\n"
         "from pgbackflow.tasks.cluster import EphemeralCluster\n"
         "from pgbackflow.tasks.toolsets import find_toolset\n"
         f"cluster = EphemeralCluster(find_toolset({newest_toolset.major}), "
         f"base_dir=Path({str(shared_tmp)!r})).start()\n"
         "print(cluster.data_dir, flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
    )
    try:
        assert owner.stdout is not None
        data_dir = Path(owner.stdout.readline().strip())
        postmaster = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
        assert pid_alive(postmaster)
        assert _watchdogs_of(data_dir.parent)
    finally:
        owner.kill()
        owner.wait()
    _wait("the server to stop", lambda: not pid_alive(postmaster))
    _wait("the files to go", lambda: not data_dir.parent.exists())
    _wait("the watchdog to end", lambda: not _watchdogs_of(data_dir.parent))
    assert list(shared_tmp.iterdir()) == []


def test_a_stopped_cluster_lets_its_watchdog_go(newest_toolset: Toolset, shared_tmp: Path) -> None:
    with EphemeralCluster(newest_toolset, base_dir=shared_tmp) as cluster:
        root = cluster.socket_dir
        _wait("the watchdog to start", lambda: bool(_watchdogs_of(root)))
    _wait("the watchdog to end", lambda: not _watchdogs_of(root), timeout=10)


@pytest.mark.pg
def test_failed_start_reports_log_and_cleans_up(newest_toolset: Toolset, shared_tmp: Path) -> None:
    cluster = EphemeralCluster(
        newest_toolset, settings={"shared_buffers": "lots"}, base_dir=shared_tmp
    )
    with pytest.raises(DatabaseError, match="shared_buffers") as info:
        cluster.start()
    assert "\n" not in str(info.value)
    assert cluster.password not in str(info.value)
    assert not cluster.running
    assert list(shared_tmp.iterdir()) == []


@pytest.mark.pg
def test_port_taken_before_start_is_retried(newest_toolset: Toolset) -> None:
    cluster = EphemeralCluster(newest_toolset)
    first_port = cluster.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", first_port))
        squatter.listen()
        with cluster:
            assert cluster.port != first_port
            assert _setting(cluster, "port") == str(cluster.port)


@pytest.mark.pg
def test_debian_toolset_runs_a_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not DEBIAN_15.exists():
        pytest.fail(f"Debian PostgreSQL 15 is not installed ({DEBIAN_15} missing; .ci/run "
                    "installs postgresql-15)", pytrace=False)
    # An empty toolsets home makes discovery fall through to Debian's install.
    monkeypatch.setenv("PGBACKFLOW_TOOLSETS", str(tmp_path))
    toolset = find_toolset(15)
    assert toolset.bin_dir == DEBIAN_15.parent
    with EphemeralCluster(toolset, settings={"fsync": "off"}) as cluster:
        assert int(_setting(cluster, "server_version_num")) // 10000 == 15


def test_reserved_and_bad_settings_are_rejected(newest_toolset: Toolset) -> None:
    with pytest.raises(ConfigError, match="port"):
        EphemeralCluster(newest_toolset, settings={"port": "5432"})
    with pytest.raises(ConfigError, match="GUC"):
        EphemeralCluster(newest_toolset, settings={"fsync = off; x": "y"})
    with pytest.raises(ConfigError, match="line break"):
        EphemeralCluster(newest_toolset, password="a\nb")


def test_os_user_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"no-such-user-xyz.*does not exist"):
        resolve_os_user("no-such-user-xyz")
    with pytest.raises(ConfigError, match="is root"):
        resolve_os_user("root")
    monkeypatch.setenv("PGBACKFLOW_CLUSTER_USER", "no-such-user-xyz")
    with pytest.raises(ConfigError, match="PGBACKFLOW_CLUSTER_USER"):
        resolve_os_user()
    monkeypatch.delenv("PGBACKFLOW_CLUSTER_USER")
    user = resolve_os_user()
    assert user.uid != 0
    if os.geteuid() != 0:
        assert user.uid == os.geteuid()


def test_pg_servers_factory(pg_servers: PgServers, pg_majors: tuple[int, ...]) -> None:
    if not pg_majors:
        pytest.skip("no PostgreSQL major selected")
    major = max(pg_majors)
    server = pg_servers(major)
    assert server is pg_servers.get(major)
    assert server.running and server.major == major
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL 99 is not selected"):
        pg_servers.get(99)
