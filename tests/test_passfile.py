"""The libpq passfile: children authenticate through it, and no password ever lands on disk.

On Linux ``libpq_password_env`` keeps the passfile in a memfd reached through
``/proc/<our pid>/fd/<n>``, so a SIGKILLed holder leaves nothing behind. These tests prove it
with real PostgreSQL 17 client binaries against a real scram-sha-256 server, and a random
canary password searched for in every recently written file under /tmp, /dev/shm and /var/tmp.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO

import pytest
from psycopg import sql

import pgbackflow.tasks.database
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.database import ConnectionSettings, libpq_conninfo, libpq_password_env
from pgbackflow.tasks.process import Tool
from tests.fixtures.postgres import PgServers

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="memfd passfiles are Linux-only")

REPO = Path(__file__).resolve().parents[1]
MAJOR = 17
SCANNED_DIRS = (Path("/tmp"), Path("/dev/shm"), Path("/var/tmp"))
SCAN_MAX_BYTES = 4 << 20  # passfiles are one line; big files (WAL, dumps) cannot be one
WAIT_S = 30

HOLDER_SCRIPT = """
import json, sys, time
from pathlib import Path

import pgbackflow.tasks.database
from pgbackflow.tasks.database import ConnectionSettings, libpq_conninfo, libpq_password_env
from pgbackflow.tasks.process import Tool

spec = json.loads(sys.stdin.readline())  # the password comes on stdin, never in argv
if spec["fallback"]:
    pgbackflow.tasks.database._memfd_passfile = lambda content: None
settings = ConnectionSettings(**spec["settings"])
with (
    libpq_password_env(settings) as env,
    Tool(Path(spec["psql"])).background(
        ["-w", "-X", "-q", "-c", "SELECT pg_sleep(600)", f"--dbname={libpq_conninfo(settings)}"],
        env=env,
    ) as child,
):
    print(json.dumps({"env": env, "child": child.pid}), flush=True)
    time.sleep(600)
"""


@dataclass(frozen=True)
class Canary:
    """A login role whose random password must never be found outside memory."""

    server: EphemeralCluster
    role: str
    password: str
    token: str  # the random core of the password: what the scans search for

    @property
    def settings(self) -> ConnectionSettings:
        return ConnectionSettings(
            host=self.server.host, port=self.server.port, dbname="postgres", user=self.role,
            password=self.password, sslmode="disable",
        )

    def binary(self, name: str) -> Path:
        return self.server.toolset.binary(name)


@pytest.fixture
def canary(pg_servers: PgServers) -> Iterator[Canary]:
    server = pg_servers(MAJOR)
    role = f"canary_{secrets.token_hex(4)}"
    token = secrets.token_hex(16)
    # ':' and '\\' exercise the passfile escaping.
    password = f"pw:{token}\\x"
    with server.connect() as conn:
        # Hashed client-side: not even the server sees the plaintext (no statement log risk).
        verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER REPLICATION PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(verifier.decode())
            )
        )
    try:
        yield Canary(server, role, password, token)
    finally:
        with server.connect() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def passfiles_on_disk(canary: Canary, *pids: int) -> set[Path]:
    """The ``*.pgpass`` files under the scanned directories that are this test's: holding the
    canary's password, or named after this process or one of ``pids`` (the fallback's
    ``pgbackflow-<pid>-*.pgpass``). Tests in other pytest workers write passfiles of their own
    meanwhile; theirs hold neither."""
    prefixes = tuple(f"pgbackflow-{pid}-" for pid in (os.getpid(), *pids))
    found: set[Path] = set()
    for top in SCANNED_DIRS:
        for root, _dirs, files in os.walk(top):
            for name in files:
                if not name.endswith(".pgpass"):
                    continue
                path = Path(root, name)
                if name.startswith(prefixes):
                    found.add(path)
                    continue
                try:
                    if canary.token.encode() in path.read_bytes():
                        found.add(path)
                except OSError:
                    continue  # gone meanwhile (another worker's), or not a file
    return found


def files_containing(needle: str, since: float) -> list[Path]:
    """Regular files under the scanned directories, written since ``since``, holding ``needle``."""
    raw = needle.encode()
    hits: list[Path] = []
    for top in SCANNED_DIRS:
        for root, _dirs, files in os.walk(top):
            for name in files:
                path = Path(root, name)
                try:
                    info = path.lstat()
                    if (not stat.S_ISREG(info.st_mode) or info.st_size > SCAN_MAX_BYTES
                            or max(info.st_mtime, info.st_ctime) < since - 1):
                        continue
                    if raw in path.read_bytes():
                        hits.append(path)
                except OSError:
                    continue
    return hits


def assert_nothing_on_disk(canary: Canary, since: float, passfiles_before: set[Path],
                           *pids: int) -> None:
    assert passfiles_on_disk(canary, *pids) - passfiles_before == set()
    assert files_containing(canary.token, since) == []


def run_client(canary: Canary, tool: str, args: list[str], env: dict[str, str]) -> bytes:
    """Run a PostgreSQL 17 client that must authenticate via the passfile (never prompting)."""
    argv = ["--no-password", *args]
    assert not any(canary.token in arg for arg in argv)
    return Tool(canary.binary(tool)).run(argv, env=env).stdout


def test_memfd_passfile_is_an_in_memory_0600_file() -> None:
    settings = ConnectionSettings(host="db.example", port=5433, user="u:1", password="p\\w:d")
    with libpq_password_env(settings) as env:
        path = env["PGPASSFILE"]
        assert re.fullmatch(rf"/proc/{os.getpid()}/fd/\d+", path)
        assert os.readlink(path).startswith("/memfd:pgbackflow-pgpass")
        # What libpq checks: stat() (following the link) gives a regular file, no group/world.
        info = os.stat(path)
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert Path(path).read_text() == "db.example:5433:*:u\\:1:p\\\\w\\:d\n"
        with pytest.raises(PermissionError):  # sealed: nobody can rewrite it
            Path(path).write_text("x")
    # Closed on exit (the fd number may since have been reused for something else).
    assert not os.path.exists(path) or not os.readlink(path).startswith("/memfd:pgbackflow")


def test_no_password_no_passfile() -> None:
    with libpq_password_env(ConnectionSettings(host="h")) as env:
        assert env == {}


def test_pg17_clients_authenticate_through_the_memfd(canary: Canary, tmp_path: Path) -> None:
    since = time.time()
    passfiles_before = passfiles_on_disk(canary)
    settings = canary.settings
    conninfo = libpq_conninfo(settings)
    with libpq_password_env(settings) as env:
        assert env["PGPASSFILE"].startswith(f"/proc/{os.getpid()}/fd/")
        who = run_client(canary, "psql", ["-X", "-A", "-t", "-c", "SELECT current_user",
                                          f"--dbname={conninfo}"], env)
        assert who.decode().strip() == canary.role
        # Parallel pg_dump: every worker opens its own connection.
        run_client(canary, "pg_dump", ["--format=directory", "--jobs=2",
                                       f"--file={tmp_path / 'dump'}", f"--dbname={conninfo}"], env)
        # pg_dumpall connects once per database.
        run_client(canary, "pg_dumpall", ["--globals-only", "--no-role-passwords",
                                          f"--dbname={conninfo}"], env)
        # The replication protocol (pg_basebackup, pg_receivewal) reads the same passfile.
        run_client(canary, "pg_basebackup", ["--format=tar", "--wal-method=none",
                                             "--checkpoint=fast", "--no-manifest",
                                             f"--pgdata={tmp_path / 'base'}",
                                             f"--dbname={conninfo}"], env)
        assert (tmp_path / "base" / "base.tar").stat().st_size > 0
        assert_nothing_on_disk(canary, since, passfiles_before)
    assert_nothing_on_disk(canary, since, passfiles_before)


def test_wrong_password_in_the_memfd_is_refused(canary: Canary) -> None:
    settings = replace(canary.settings, password="wrong")
    with libpq_password_env(settings) as env:
        result = Tool(canary.binary("psql")).run(
            ["--no-password", "-X", "-c", "SELECT 1", f"--dbname={libpq_conninfo(settings)}"],
            env=env, check=False,
        )
    assert result.returncode != 0
    assert "password authentication failed" in result.stderr_tail


def _read_line(stream: IO[str], timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no output within {timeout}s"
    return stream.readline()


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _sleeping_sessions(canary: Canary) -> int:
    with canary.server.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND query LIKE %s",
            (canary.role, "SELECT pg_sleep%"),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _start_holder(canary: Canary, tmp_path: Path, *, fallback: bool) -> tuple[
    subprocess.Popen[str], dict[str, str], int
]:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    holder = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write(json.dumps({
        "settings": asdict(canary.settings), "psql": str(canary.binary("psql")),
        "fallback": fallback,
    }) + "\n")
    holder.stdin.close()
    try:
        line = _read_line(holder.stdout, WAIT_S)
    except AssertionError:
        holder.kill()
        _, err = holder.communicate()
        raise AssertionError(f"holder failed: {err}") from None
    shown = json.loads(line)
    return holder, shown["env"], int(shown["child"])


def _reap(holder: subprocess.Popen[str]) -> None:
    if holder.poll() is None:
        holder.kill()
    holder.wait()
    for stream in (holder.stdout, holder.stderr):
        if stream is not None:
            stream.close()


def _proc_bytes(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


def test_sigkilled_holder_leaves_no_password_anywhere(canary: Canary, tmp_path: Path) -> None:
    since = time.time()
    passfiles_before = passfiles_on_disk(canary)
    holder, env, psql_pid = _start_holder(canary, tmp_path, fallback=False)
    try:
        passfile = env["PGPASSFILE"]
        assert passfile.startswith(f"/proc/{holder.pid}/fd/")
        # psql (another process, same user, no inherited fd) logged in through the path...
        _wait_for(lambda: _sleeping_sessions(canary) == 1, "psql to log in via the memfd")
        # ...as can we: the path works for any process of ours while the holder lives.
        assert canary.password.replace("\\", "\\\\").replace(":", "\\:") in Path(
            passfile).read_text()
        for pid in (holder.pid, psql_pid):
            assert canary.token.encode() not in _proc_bytes(pid, "cmdline")
            assert canary.token.encode() not in _proc_bytes(pid, "environ")
        assert f"PGPASSFILE={passfile}".encode() in _proc_bytes(psql_pid, "environ").split(b"\0")
        assert_nothing_on_disk(canary, since, passfiles_before, holder.pid, psql_pid)

        holder.send_signal(signal.SIGKILL)
        holder.wait(WAIT_S)
        assert holder.returncode == -signal.SIGKILL
        # The memfd died with its only holder; psql got SIGTERM from its parent's death.
        assert not os.path.exists(passfile)
        _wait_for(lambda: not Path(f"/proc/{psql_pid}").exists(), "psql to exit")
        assert_nothing_on_disk(canary, since, passfiles_before, holder.pid, psql_pid)
    finally:
        _reap(holder)


def test_fallback_passfile_of_a_sigkilled_holder_is_swept(
    canary: Canary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without memfd the passfile is a temp file named by pid: SIGKILL leaves it, and the next
    use removes it because its pid is dead."""
    since = time.time()
    holder, env, psql_pid = _start_holder(canary, tmp_path, fallback=True)
    try:
        passfile = Path(env["PGPASSFILE"])
        assert passfile.parent == tmp_path
        assert re.fullmatch(rf"pgbackflow-{holder.pid}-\w+\.pgpass", passfile.name)
        assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
        _wait_for(lambda: _sleeping_sessions(canary) == 1, "psql to log in via the temp file")
        holder.send_signal(signal.SIGKILL)
        holder.wait(WAIT_S)
        _wait_for(lambda: not Path(f"/proc/{psql_pid}").exists(), "psql to exit")
        assert passfile.exists()  # the limitation the memfd removes
        # Also proves the scan used by the other tests finds a leaked password.
        assert files_containing(canary.token, since) == [passfile]
    finally:
        _reap(holder)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with libpq_password_env(canary.settings) as env:
        assert env["PGPASSFILE"].startswith("/proc/")
    assert not passfile.exists()
    assert not any(canary.token.encode() in path.read_bytes()
                   for path in tmp_path.rglob("*") if path.is_file())


def test_fallback_temp_file_works_and_is_removed(
    canary: Canary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pgbackflow.tasks.database, "_memfd_passfile", lambda content: None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with libpq_password_env(canary.settings) as env:
        path = Path(env["PGPASSFILE"])
        assert path.parent == tmp_path
        assert re.fullmatch(rf"pgbackflow-{os.getpid()}-\w+\.pgpass", path.name)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        who = run_client(canary, "psql", [
            "-X", "-A", "-t", "-c", "SELECT current_user",
            f"--dbname={libpq_conninfo(canary.settings)}",
        ], env)
        assert who.decode().strip() == canary.role
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_only_stale_passfiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    day_old = time.time() - 2 * 24 * 3600

    def make(name: str, *, old: bool = False) -> Path:
        path = tmp_path / name
        path.write_text("h:5432:*:u:secret\n")
        path.chmod(0o600)
        if old:
            os.utime(path, (day_old, day_old))
        return path

    dead_pid = make(f"pgbackflow-{dead.pid}-abc_123.pgpass")
    live_pid = make(f"pgbackflow-{os.getpid()}-abc_123.pgpass")
    legacy_old = make("pgbackflow-k2j_9x0a.pgpass", old=True)
    legacy_fresh = make("pgbackflow-7hq0zz1b.pgpass")
    legacy_in_use = make("pgbackflow-inuse123.pgpass", old=True)
    unrelated = make("other-1.pgpass", old=True)
    link = tmp_path / f"pgbackflow-{dead.pid}-link.pgpass"
    link.symlink_to(legacy_fresh)
    user = subprocess.Popen(
        ["sleep", "60"], env={**os.environ, "PGPASSFILE": str(legacy_in_use)}
    )
    try:
        with libpq_password_env(ConnectionSettings(host="h", password="secret")):
            pass
    finally:
        user.kill()
        user.wait()
    assert not dead_pid.exists() and not legacy_old.exists()
    assert live_pid.exists() and legacy_fresh.exists() and legacy_in_use.exists()
    assert unrelated.exists() and link.is_symlink()


def test_env_names_the_passfile_not_the_password() -> None:
    """The env never carries the password itself, only a path."""
    password = f"canary-{secrets.token_hex(8)}"
    with libpq_password_env(ConnectionSettings(host="h", password=password)) as env:
        assert password not in json.dumps(env)
        assert password in Path(env["PGPASSFILE"]).read_text()

