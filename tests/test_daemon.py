"""The warm daemon behind ``pgbackflow`` (pgbackflow/launcher.py, pgbackflow/daemon.py), run as
a user runs it: the console script, a real PostgreSQL and the session's Prefect server.

A command through the daemon must behave as the same command in its own process: same
result, exit code, one-line errors, stdin/stdout/stderr and terminal, Ctrl-C and a killed
launcher ending the backup (pg_dump included); the daemon binds to one environment, refuses
an unsafe runtime directory, replaces a stale socket, exits when idle and never stores the
password. Every daemon started here is stopped (and checked gone) in teardown.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgbackflow import launcher
from pgbackflow.daemon import GONE_GRACE_S
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.manifest import list_backups
from pgbackflow.tasks.storage import LocalFolderStorage
from tests import test_backup_failures as failures
from tests.fixtures.prefect_server import PGBACKFLOW
from tests.test_backup_failures import Cli, Source, drop_database, one_line_error

pytestmark = pytest.mark.timeout(300)

# That module's fixtures, reused: pytest registers a fixture under the module attribute's name.
server = failures.server
source = failures.source
key_file = failures.key_file
cli = failures.cli

CLI_TIMEOUT_S = 180
#: A daemon imports Prefect and every pgbackflow module before it listens.
WARM_TIMEOUT_S = 90
#: Seconds a backup gets to end after Ctrl-C.
INTERRUPT_LIMIT_S = 30
COMMAND_LINE = re.compile(r"command '([^']*)': process (\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --------------------------------------------------------------------------- helpers


def wait_for(what: str, condition: Callable[[], bool], timeout: float,
             step: float = 0.1) -> float:
    """Poll ``condition`` until true; seconds it took. Fails with ``what`` at the deadline."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
        time.sleep(step)
    return time.monotonic() - started


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie counts as gone: it runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a command child is its session's leader)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def children_named(parent: int, name: str) -> list[int]:
    """Live child processes of ``parent`` whose command name is ``name``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm, rest = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        fields = rest.split()
        if int(fields[1]) == parent and comm.split("(", 1)[1] == name and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def connectable(path: Path) -> bool:
    """Something listens on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _default_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


@contextmanager
def short_dir() -> Iterator[Path]:
    """A 0700 directory with a short path: a socket's path must fit in 108 bytes, and pytest's
    tmp_path with a test's name is longer than the daemon's temporary socket name allows."""
    path = Path(tempfile.mkdtemp(prefix="pgbf-", dir="/tmp"))  # nosec B108 - ours, 0700
    try:
        yield private_dir(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def passwordless(source: Source) -> str:
    """A DSN of ``source`` without the password (PGPASSWORD supplies it)."""
    srv = source.server
    return f"postgresql://{srv.superuser}@{srv.host}:{srv.port}/{source.dbname}?sslmode=disable"


@dataclass
class DaemonCli:
    """The console script with the daemon on, in its own runtime directory and cwd."""

    base: Cli
    runtime: Path
    cwd: Path
    extra: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = self.base.env(PGBACKFLOW_DAEMON="on", PGBACKFLOW_RUNTIME_DIR=str(self.runtime))
        env.pop("PGBACKFLOW_DAEMON_IDLE_S", None)  # the caller's shell's, if any
        # pytest changes it per test and phase: each value would be another daemon's key.
        env.pop("PYTEST_CURRENT_TEST", None)
        env.update(self.extra)
        env.update(extra)
        return env

    def run(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(PGBACKFLOW), *args], capture_output=True, text=True,
                              timeout=CLI_TIMEOUT_S, env=self.env(**extra_env), cwd=self.cwd,
                              check=False)

    def timed(self, *args: str, **extra_env: str
              ) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        result = self.run(*args, **extra_env)
        return result, time.monotonic() - started

    def start(self, *args: str) -> subprocess.Popen[str]:
        # As a terminal's foreground job: SIGINT and SIGQUIT at their defaults even when this
        # test process was started in the background of a shell, which ignores them there
        # (the launcher keeps signals it was given ignored, as a process of its own would).
        return subprocess.Popen([str(PGBACKFLOW), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env(), cwd=self.cwd,
                                start_new_session=True, preexec_fn=_default_signals)

    def sockets(self) -> set[Path]:
        return set(self.runtime.glob("*.sock"))

    def pids(self) -> list[int]:
        return [d.pid for d in launcher.running_daemons(self.env())]

    def expected_address(self, **extra_env: str) -> launcher.DaemonAddress:
        where = launcher.address(self.env(**extra_env), str(self.cwd))
        assert where is not None, f"runtime directory {self.runtime} refused"
        return where

    def commands(self) -> list[tuple[str, int]]:
        """(sub-command, child pid) of every command any daemon here ran, in order."""
        found = []
        for log in sorted(self.runtime.glob("*.log")):
            found += [(m[1], int(m[2])) for m in COMMAND_LINE.finditer(log.read_text())]
        return found

    def wait_for_daemon(self, **extra_env: str) -> launcher.DaemonAddress:
        """The daemon of this environment, once it accepts commands (it moves its socket
        into place only then; no probe connection, which its log would report)."""
        where = self.expected_address(**extra_env)

        def listening() -> bool:
            return where.socket.exists() and where.key in {
                d.key for d in launcher.running_daemons(self.env(**extra_env))}

        wait_for(f"a daemon on {where.socket} (log: {where.log})", listening, WARM_TIMEOUT_S)
        return where

    def stop(self) -> None:
        """``pgbackflow daemon stop``, then every daemon's pid is gone."""
        pids = self.pids()
        result = self.run("daemon", "stop", "--json")
        assert result.returncode == 0, result.stderr
        stopped = {entry["pid"] for entry in json.loads(result.stdout)}
        assert stopped == set(pids), (stopped, pids)
        wait_for(f"daemons {pids} to exit", lambda: not any(alive(p) for p in pids), 20)
        assert self.pids() == []


@pytest.fixture(scope="module")
def daemon_cli(cli: Cli, tmp_path_factory: pytest.TempPathFactory,
               server: EphemeralCluster) -> Iterator[DaemonCli]:
    """The module's shared daemon environment (password only in PGPASSWORD, a terminal type
    so rich may colour a pty). Stops its daemons at the end."""
    with short_dir() as root:
        runner = DaemonCli(cli, private_dir(root / "run"), private_dir(root / "cwd"),
                           {"PGPASSWORD": server.password, "TERM": "xterm-256color"})
        yield runner
        runner.stop()


@pytest.fixture
def own_daemon_cli(cli: Cli) -> Iterator[DaemonCli]:
    """A runtime directory of this test's own (daemons with other settings)."""
    with short_dir() as root:
        runner = DaemonCli(cli, private_dir(root / "run"), private_dir(root / "cwd"))
        yield runner
        if runner.pids():  # the tests that started none need no `daemon stop`
            runner.stop()


@dataclass(frozen=True)
class FirstRuns:
    """A backup run in-process (no daemon yet), then one through the daemon it started."""

    folder: Path
    in_process: subprocess.CompletedProcess[str]
    in_process_s: float
    through_daemon: subprocess.CompletedProcess[str]
    through_daemon_s: float
    where: launcher.DaemonAddress
    commands_before: list[tuple[str, int]]
    commands_after: list[tuple[str, int]]
    sockets_before: set[Path]


@pytest.fixture(scope="module")
def first_runs(daemon_cli: DaemonCli, source: Source,
               tmp_path_factory: pytest.TempPathFactory) -> FirstRuns:
    folder = tmp_path_factory.mktemp("daemon-backups") / "store"
    dsn = passwordless(source)
    sockets_before = daemon_cli.sockets()
    in_process, in_process_s = daemon_cli.timed("backup", "--db", dsn, "--to", str(folder),
                                                "--json")
    assert in_process.returncode == 0, in_process.stderr
    where = daemon_cli.wait_for_daemon()
    before = daemon_cli.commands()
    through, through_s = daemon_cli.timed("backup", "--db", dsn, "--to", str(folder), "--json")
    print(f"backup in-process: {in_process_s:.2f} s; through the daemon: {through_s:.2f} s")
    return FirstRuns(folder, in_process, in_process_s, through, through_s, where, before,
                     daemon_cli.commands(), sockets_before)


@pytest.fixture(scope="module")
def locked_source(server: EphemeralCluster) -> Iterator[str]:
    """A database whose backends notice a vanished client within 0.2 s even while they wait
    for a lock: a pg_dump session that outlives its blocked dump means pg_dump still runs."""
    from tests.fixtures.postgres import make_database

    name = make_database(server, "dm", "CREATE TABLE t AS SELECT generate_series(1, 10) id")
    with server.connect() as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET client_connection_check_interval = '200ms'")
                     .format(sql.Identifier(name)))
    try:
        yield name
    finally:
        drop_database(server, name)


def dump_sessions(server: EphemeralCluster, dbname: str) -> list[Any]:
    """Sessions on ``dbname`` other than the locker's and ours (the backup's)."""
    with server.connect() as conn:
        return conn.execute(
            "SELECT pid, application_name, state, wait_event_type, query FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() "
            "AND query NOT LIKE 'LOCK TABLE t IN ACCESS EXCLUSIVE%%'", (dbname,)).fetchall()


def dump_waiting(server: EphemeralCluster, dbname: str) -> bool:
    return any(str(row[4]).startswith("LOCK TABLE") and "ACCESS SHARE" in str(row[4])
               for row in dump_sessions(server, dbname))


def start_blocked_backup(daemon_cli: DaemonCli, server: EphemeralCluster, dbname: str,
                         folder: Path) -> tuple[subprocess.Popen[str], int, list[int],
                                                psycopg.Connection[Any]]:
    """A backup through the daemon, waiting for the locked table: (launcher, command child,
    its pg_dump processes, the lock holder's connection)."""
    daemon_cli.wait_for_daemon()
    locker = server.connect(dbname)
    locker.execute("BEGIN")
    locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")  # held: pg_dump waits
    before = len(daemon_cli.commands())
    dsn = passwordless(Source(server, dbname, {}))
    process = daemon_cli.start("backup", "--db", dsn, "--to", str(folder))
    wait_for("the command to reach the daemon", lambda: len(daemon_cli.commands()) > before, 30)
    command, child = daemon_cli.commands()[-1]
    assert command == "backup"
    wait_for("pg_dump to wait for its lock", lambda: dump_waiting(server, dbname), 120, 0.3)
    assert process.poll() is None
    dumps = children_named(child, "pg_dump")
    assert dumps, f"no pg_dump process below the command's process {child}"
    return process, child, dumps, locker


def nothing_listed(folder: Path) -> None:
    if folder.exists():
        listed = [m.backup_id for m in list_backups(LocalFolderStorage(folder))]
        assert listed == [], f"an interrupted backup is listed: {listed}"


# --------------------------------------------------------------------------- 1-3: same results


def test_first_call_runs_in_process_and_starts_a_daemon(first_runs: FirstRuns,
                                                        daemon_cli: DaemonCli) -> None:
    """No daemon: the backup runs in-process and leaves a daemon; the next backup runs in
    it (its log names the command's process), faster, with the same result."""
    assert first_runs.sockets_before == set()
    assert first_runs.commands_before == [], "the first backup went through a daemon"
    assert first_runs.where.socket in daemon_cli.sockets()
    assert first_runs.through_daemon.returncode == 0, first_runs.through_daemon.stderr
    new = first_runs.commands_after[len(first_runs.commands_before):]
    assert [command for command, _ in new] == ["backup"], new
    assert not alive(new[0][1]), "the command's process outlived its command"
    reports = [json.loads(run.stdout) for run in (first_runs.in_process,
                                                  first_runs.through_daemon)]
    assert [r["status"] for r in reports] == ["complete", "complete"]
    assert reports[0]["tables"] == reports[1]["tables"]
    assert reports[0]["db_id"] == reports[1]["db_id"]
    assert reports[0]["backup_id"] != reports[1]["backup_id"]
    listed = daemon_cli.run("list", "--from", str(first_runs.folder), "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(b["backup_id"] for b in json.loads(listed.stdout)) == sorted(
        r["backup_id"] for r in reports)
    print(f"in-process {first_runs.in_process_s:.2f} s, "
          f"through the daemon {first_runs.through_daemon_s:.2f} s")
    assert first_runs.through_daemon_s < first_runs.in_process_s


def _run_record(db_id: str, prefect_api: str) -> list[tuple[str, list[str], list[str]]]:
    """(state, log messages in order, final task-run states) of each flow run of ``db_id``,
    oldest first, once the server has recorded them all."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterTags,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    from tests.fixtures.prefect import settled_task_runs

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"db:{db_id}"])),
            sort=FlowRunSort.START_TIME_ASC)
        record = []
        for run in runs:
            tasks = sorted(str(t.state_type) for t in settled_task_runs(run.id))
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            record.append((str(run.state_type), [log.message for log in sorted(
                logs, key=lambda log: log.timestamp)], tasks))
    return record


def test_a_daemon_run_reports_what_an_in_process_run_reports(first_runs: FirstRuns,
                                                              prefect_api: str) -> None:
    """The forked command sends its last log lines and events before it exits, as a process
    of its own does at interpreter exit (Prefect sends them from threading's exit hooks)."""
    db_id = json.loads(first_runs.in_process.stdout)["db_id"]
    def ends(logs: list[str]) -> list[str]:
        """One line per task run and the flow run's end (run names and first-run notes
        differ between the two)."""
        return [line for line in logs if line.startswith("Finished in state")]

    deadline = time.monotonic() + 30
    while True:  # log lines reach the server a moment after the command's exit
        (state_a, logs_a, tasks_a), (state_b, logs_b, tasks_b) = _run_record(db_id, prefect_api)
        if ends(logs_a) == ends(logs_b) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert state_a == state_b == "StateType.COMPLETED"
    assert tasks_a == tasks_b and tasks_a, (tasks_a, tasks_b)
    assert ends(logs_b) == ends(logs_a), (logs_a, logs_b)
    assert logs_b[-1].startswith("Finished in state Completed"), logs_b


def test_bad_input_through_the_daemon(first_runs: FirstRuns, daemon_cli: DaemonCli,
                                      tmp_path: Path) -> None:
    """A malformed DSN: one ``error:`` line, exit code 1, nothing on stdout, no traceback."""
    before = len(daemon_cli.commands())
    result = daemon_cli.run("backup", "--db", "host=127.0.0.1 dbname='unterminated",
                            "--to", str(tmp_path / "store"), "--json")
    one_line_error(result, "--db", "malformed")
    assert result.returncode == 1
    assert result.stdout == ""
    assert [c for c, _ in daemon_cli.commands()[before:]] == ["backup"]
    # A usage error keeps typer's exit code 2 (its message is several lines of usage).
    usage = daemon_cli.run("backup", "--no-such-option")
    assert usage.returncode == 2, usage
    assert "Traceback" not in usage.stderr and "No such option" in usage.stderr
    assert [c for c, _ in daemon_cli.commands()[before:]] == ["backup", "backup"]


def test_streams_through_the_daemon(first_runs: FirstRuns, daemon_cli: DaemonCli) -> None:
    """JSON on stdout only; stdin read by the command (``decrypt - -``, binary both ways)
    gives the bytes the in-process run gives."""
    report = json.loads(first_runs.through_daemon.stdout)  # the whole of stdout is JSON
    assert report["backup_id"] not in first_runs.through_daemon.stderr
    archives = sorted(p for p in first_runs.folder.rglob("*")
                      if p.is_file() and p.stat().st_size > 1000 and ".json" not in p.name)
    assert archives, sorted(first_runs.folder.rglob("*"))
    archive = archives[0].read_bytes()
    runs = {}
    for mode in ("on", "off"):
        before = len(daemon_cli.commands())
        result = subprocess.run([str(PGBACKFLOW), "decrypt", "-", "-", "--key-file",
                                 str(daemon_cli.base.key_file)], input=archive,
                                capture_output=True, timeout=CLI_TIMEOUT_S, cwd=daemon_cli.cwd,
                                env=daemon_cli.env(PGBACKFLOW_DAEMON=mode), check=False)
        assert result.returncode == 0, result.stderr.decode()
        through = [c for c, _ in daemon_cli.commands()[before:]]
        assert through == (["decrypt"] if mode == "on" else []), (mode, through)
        runs[mode] = result
    assert runs["on"].stdout == runs["off"].stdout
    assert len(runs["on"].stdout) > 0 and runs["on"].stdout != archive


def test_the_command_sees_the_launchers_terminal(first_runs: FirstRuns,
                                                 daemon_cli: DaemonCli) -> None:
    """Under a pty the command's output is a terminal's (colours); through a pipe it is not."""
    import fcntl
    import struct
    import termios

    args = ("list", "--from", str(first_runs.folder))
    piped = daemon_cli.run(*args)
    assert piped.returncode == 0, piped.stderr
    assert not ANSI.search(piped.stdout), piped.stdout
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("4H", 40, 100, 0, 0))
    before = len(daemon_cli.commands())
    try:
        process = subprocess.Popen([str(PGBACKFLOW), *args], stdin=slave, stdout=slave,
                                   stderr=slave, env=daemon_cli.env(), cwd=daemon_cli.cwd)
    finally:
        os.close(slave)
    output = b""
    deadline = time.monotonic() + CLI_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                if process.poll() is not None and not select.select([master], [], [], 0.2)[0]:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:  # EIO: every end of the slave is closed
                assert exc.errno == errno.EIO
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=30) == 0, output
    finally:
        os.close(master)
    text = output.decode(errors="replace")
    assert [c for c, _ in daemon_cli.commands()[before:]] == ["list"]
    assert ANSI.search(text), f"no colours on a terminal:\n{text}"
    widest = max(len(ANSI.sub("", line)) for line in text.splitlines())
    assert widest <= 100, f"wider than the 100-column terminal: {widest}"


# --------------------------------------------------------------------------- 4-5: interruptions


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_ctrl_z_stops_and_fg_continues_the_whole_job(
    first_runs: FirstRuns, daemon_cli: DaemonCli, server: EphemeralCluster, locked_source: str,
    tmp_path: Path,
) -> None:
    """SIGTSTP to the launcher (a terminal's Ctrl-Z) stops it and the command (as it stops a
    process of its own: pg_dump runs in a session of its own either way); SIGCONT (``fg``)
    runs them on, and the backup completes once the lock is released."""
    folder = tmp_path / "store"
    process, child, _dumps, locker = start_blocked_backup(daemon_cli, server, locked_source,
                                                          folder)
    try:
        os.kill(process.pid, signal.SIGTSTP)
        wait_for("the launcher and the command to stop", lambda: all(
            _state(pid) == "T" for pid in (process.pid, child)), 10, 0.1)
        os.kill(process.pid, signal.SIGCONT)
        wait_for("the launcher and the command to run on", lambda: all(
            _state(pid) != "T" for pid in (process.pid, child)), 10, 0.1)
    finally:
        locker.rollback()
        locker.close()
        with contextlib.suppress(OSError):  # a failed test: nothing stays stopped
            os.kill(process.pid, signal.SIGCONT)
            os.killpg(child, signal.SIGCONT)
    _stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_S)
    assert process.returncode == 0, stderr
    assert len(list_backups(LocalFolderStorage(folder))) == 1


def test_ctrl_c_ends_a_backup_through_the_daemon(
    first_runs: FirstRuns, daemon_cli: DaemonCli, server: EphemeralCluster, locked_source: str,
    tmp_path: Path,
) -> None:
    """SIGINT to the launcher mid-dump: exit 130, "interrupted", pg_dump gone (its session
    ends while the table is still locked), nothing listed."""
    folder = tmp_path / "store"
    process, child, dumps, locker = start_blocked_backup(daemon_cli, server, locked_source,
                                                         folder)
    try:
        os.kill(process.pid, signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=INTERRUPT_LIMIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the backup still runs {INTERRUPT_LIMIT_S} s after SIGINT; its "
                        f"sessions: {dump_sessions(server, locked_source)}", pytrace=False)
        assert process.returncode == 130, (stdout, stderr)
        assert "interrupted" in stderr, stderr
        assert "Traceback" not in stderr, stderr
        elapsed = wait_for("the pg_dump session to end",
                           lambda: not dump_sessions(server, locked_source), 5)
        print(f"pg_dump session gone {elapsed:.2f} s after the launcher's exit")
        assert not alive(child) and session_members(child) == []
        assert not [pid for pid in dumps if alive(pid)], f"pg_dump {dumps} still runs"
    finally:
        locker.rollback()
        locker.close()
        if process.poll() is None:  # a failed test: let it end with the lock released
            process.communicate(timeout=CLI_TIMEOUT_S)
    nothing_listed(folder)


def test_a_killed_launcher_ends_its_command(
    first_runs: FirstRuns, daemon_cli: DaemonCli, server: EphemeralCluster, locked_source: str,
    tmp_path: Path,
) -> None:
    """kill -9 of the launcher mid-dump: the command's process and pg_dump end within the
    grace time; the daemon goes on serving."""
    folder = tmp_path / "store"
    process, child, dumps, locker = start_blocked_backup(daemon_cli, server, locked_source,
                                                         folder)
    daemons = daemon_cli.pids()
    try:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)  # (its pipes stay open while the command holds them)
        limit = GONE_GRACE_S + 10
        gone = wait_for(f"the command's process {child} and its session to end",
                        lambda: session_members(child) == [], limit)
        sessions = wait_for("the pg_dump session to end",
                            lambda: not dump_sessions(server, locked_source), limit - gone)
        print(f"killed launcher: command gone after {gone:.2f} s, pg_dump session after "
              f"{gone + sessions:.2f} s")
        assert not [pid for pid in dumps if alive(pid)], f"pg_dump {dumps} still runs"
    finally:
        locker.rollback()
        locker.close()
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    process.stderr.close()
    nothing_listed(folder)
    assert daemon_cli.pids() == daemons and all(alive(pid) for pid in daemons)
    before = len(daemon_cli.commands())
    listed = daemon_cli.run("list", "--from", str(first_runs.folder), "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 2
    assert [c for c, _ in daemon_cli.commands()[before:]] == ["list"]


# --------------------------------------------------------------------------- 10-11


def test_the_password_stays_out_of_the_daemon(first_runs: FirstRuns, daemon_cli: DaemonCli,
                                               server: EphemeralCluster) -> None:
    """PGPASSWORD only: after backups through the daemon, neither its command line nor any
    file of its runtime directory holds the password."""
    assert first_runs.through_daemon.returncode == 0
    password = server.password.encode()
    assert len(password) >= 8
    pids = daemon_cli.pids()
    assert pids
    for pid in pids:
        assert password not in Path(f"/proc/{pid}/cmdline").read_bytes()
        # Nor its environment: each command brings its PGPASSWORD, no daemon keeps one.
        assert password not in Path(f"/proc/{pid}/environ").read_bytes()
    checked = []
    for path in daemon_cli.runtime.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert password not in path.read_bytes(), path
            checked.append(path.name)
    assert any(name.endswith(".log") for name in checked), checked


def test_each_command_brings_its_own_password(first_runs: FirstRuns, daemon_cli: DaemonCli,
                                              source: Source, tmp_path: Path) -> None:
    """A script that backs up each database with its own PGPASSWORD (and AWS keys): every
    command runs in the one daemon, with the password it was given, not the daemon's."""
    sockets = daemon_cli.sockets()
    before = len(daemon_cli.commands())
    folder = tmp_path / "store"
    wrong = daemon_cli.run("backup", "--db", passwordless(source), "--to", str(folder),
                           PGPASSWORD="not-the-password", AWS_SECRET_ACCESS_KEY="other")
    one_line_error(wrong, "password authentication failed")
    assert "not-the-password" not in wrong.stderr + wrong.stdout
    right = daemon_cli.run("backup", "--db", passwordless(source), "--to", str(folder),
                           "--json", AWS_SECRET_ACCESS_KEY="another")
    assert right.returncode == 0, right.stderr
    assert [c for c, _ in daemon_cli.commands()[before:]] == ["backup", "backup"]
    assert daemon_cli.sockets() == sockets, "another daemon was started"
    assert len(list_backups(LocalFolderStorage(folder))) == 1


def test_daemon_status_and_unknown_action(first_runs: FirstRuns, daemon_cli: DaemonCli) -> None:
    """``daemon status --json`` lists the running daemon; an unknown action is one line."""
    result = daemon_cli.run("daemon", "status", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [(d["key"], d["socket"]) for d in listed] == [
        (first_runs.where.key, str(first_runs.where.socket))]
    assert listed[0]["pid"] in daemon_cli.pids() and alive(listed[0]["pid"])
    one_line_error(daemon_cli.run("daemon", "frobnicate"), "frobnicate", "status or stop")


# --------------------------------------------------------------------------- 6-9: own daemons


def test_an_idle_daemon_exits(own_daemon_cli: DaemonCli) -> None:
    """PGBACKFLOW_DAEMON_IDLE_S=2: the daemon exits after 2 idle seconds, socket removed."""
    own_daemon_cli.extra["PGBACKFLOW_DAEMON_IDLE_S"] = "2"
    result = own_daemon_cli.run("--help")
    assert result.returncode == 0, result.stderr
    where = own_daemon_cli.wait_for_daemon()
    (pid,) = own_daemon_cli.pids()
    gone = wait_for("the idle daemon to exit", lambda: not alive(pid), 20)
    print(f"idle daemon exited {gone:.1f} s after it was seen listening")
    assert not where.socket.exists()
    assert "idle for 2 s, exiting" in where.log.read_text()


def test_one_daemon_per_environment(own_daemon_cli: DaemonCli) -> None:
    """Another variable: another daemon; a volatile one (PWD, COLUMNS): the same one.
    ``daemon stop`` stops both."""
    assert own_daemon_cli.run("--help").returncode == 0
    first = own_daemon_cli.wait_for_daemon()
    other = own_daemon_cli.expected_address(PGBACKFLOW_TEST_MARKER="1")
    assert other.socket != first.socket
    assert own_daemon_cli.run("--help", PGBACKFLOW_TEST_MARKER="1").returncode == 0
    own_daemon_cli.wait_for_daemon(PGBACKFLOW_TEST_MARKER="1")
    assert own_daemon_cli.sockets() == {first.socket, other.socket}
    before = COMMAND_LINE.findall(first.log.read_text())
    volatile = own_daemon_cli.run("--help", PWD="/nowhere", COLUMNS="77", SHLVL="9")
    assert volatile.returncode == 0, volatile.stderr
    after = COMMAND_LINE.findall(first.log.read_text())
    assert [c for c, _ in after[len(before):]] == ["(other)"], "not run by the first daemon"
    assert own_daemon_cli.sockets() == {first.socket, other.socket}
    status = own_daemon_cli.run("daemon", "status", "--json")
    assert {d["socket"] for d in json.loads(status.stdout)} == {str(first.socket),
                                                                 str(other.socket)}
    # An argument that is no command (here a DSN with a password, typed first by mistake)
    # is not written to the daemon's log: it logs command names only.
    mistyped = own_daemon_cli.run("postgresql://alice:pw-typed-first@db/x", "backup")
    assert mistyped.returncode != 0
    assert COMMAND_LINE.findall(first.log.read_text())[-1][0] == "backup"  # a name it knows
    assert "pw-typed-first" not in first.log.read_text()
    own_daemon_cli.stop()
    wait_for("the stopped daemons' sockets to go", lambda: not own_daemon_cli.sockets(), 10)


def test_daemon_key_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key changes with a variable, a settings file in the cwd and a code file's mtime;
    not with the volatile variables."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {"HOME": str(tmp_path), "A": "1", "PWD": str(cwd)}
    key = launcher.daemon_key(env, str(cwd))
    assert launcher.daemon_key(dict(env), str(cwd)) == key
    assert launcher.daemon_key({**env, "A": "2"}, str(cwd)) != key
    assert launcher.daemon_key({**env, "B": ""}, str(cwd)) != key
    for name in launcher.VOLATILE_ENV:
        assert launcher.daemon_key({**env, name: "changed"}, str(cwd)) == key, name
    # A worker's per-run variables (two underscores) are volatile; Prefect settings are not.
    assert launcher.daemon_key({**env, "PREFECT__FLOW_RUN_ID": "x"}, str(cwd)) == key
    assert launcher.daemon_key({**env, "PREFECT_API_URL": "http://x"}, str(cwd)) != key
    # What a command reads when it connects is its own (libpq's, AWS's); pgbackflow's
    # settings are not.
    for name in ("PGPASSWORD", "PGHOST", "PGSSLMODE", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        assert launcher.daemon_key({**env, name: "changed"}, str(cwd)) == key, name
    assert launcher.daemon_key({**env, "PGBACKFLOW_RETRY_DELAYS": "1"}, str(cwd)) != key
    other_cwd = tmp_path / "other"
    other_cwd.mkdir()
    assert launcher.daemon_key(env, str(other_cwd)) == key  # no settings file in either
    (cwd / "prefect.toml").write_text("[api]\n")
    with_settings = launcher.daemon_key(env, str(cwd))
    assert with_settings != key
    (cwd / "prefect.toml").write_text("[api]\nurl = 'http://x'\n")
    assert launcher.daemon_key(env, str(cwd)) not in (key, with_settings)
    (cwd / "prefect.toml").unlink()
    assert launcher.daemon_key(env, str(cwd)) == key
    code = tmp_path / "module.py"
    code.write_text("x = 1\n")
    monkeypatch.setattr(launcher, "_code_files", lambda: iter([code]))
    with_code = launcher.daemon_key(env, str(cwd))
    os.utime(code, ns=(1_000_000_000, 1_000_000_000))
    assert launcher.daemon_key(env, str(cwd)) != with_code


@pytest.mark.parametrize("kind", ["group-readable", "symlink", "too-long"])
def test_unsafe_runtime_dir_runs_in_process(kind: str, own_daemon_cli: DaemonCli,
                                            tmp_path: Path) -> None:
    """A runtime directory others may read, a symlink, or one whose path leaves no room for
    a socket name (108 bytes): the command runs in-process and nothing is created there
    (a daemon that cannot bind there would crash on every command)."""
    if kind == "too-long":
        unsafe = private_dir(tmp_path / ("x" * 70))
        look_in = unsafe
    elif kind == "group-readable":
        unsafe = tmp_path / "open"
        unsafe.mkdir(mode=0o755)
        unsafe.chmod(0o755)
        look_in = unsafe
    else:
        look_in = private_dir(tmp_path / "target")
        unsafe = tmp_path / "link"
        unsafe.symlink_to(look_in, target_is_directory=True)
    result = own_daemon_cli.run("--help", PGBACKFLOW_RUNTIME_DIR=str(unsafe))
    assert result.returncode == 0, result.stderr
    assert "backup" in result.stdout
    assert sorted(look_in.iterdir()) == []
    assert own_daemon_cli.sockets() == set()


def test_a_stale_socket_is_replaced(own_daemon_cli: DaemonCli) -> None:
    """A socket file nobody listens on: the command runs in-process, a new daemon replaces
    the file and serves the next command."""
    where = own_daemon_cli.expected_address()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(where.socket))
    stale.close()  # the file stays; connecting is refused
    stale_inode = where.socket.stat().st_ino
    assert not connectable(where.socket)
    result = own_daemon_cli.run("--help")
    assert result.returncode == 0, result.stderr
    assert own_daemon_cli.commands() == []
    wait_for("a daemon to replace the stale socket",
             lambda: where.socket.exists() and where.socket.stat().st_ino != stale_inode,
             WARM_TIMEOUT_S)
    assert connectable(where.socket)
    again = own_daemon_cli.run("--help")
    assert again.returncode == 0, again.stderr
    assert [c for c, _ in own_daemon_cli.commands()] == ["(other)"]


def test_a_command_that_ended_before_its_start_was_told_is_not_run_again(
    tmp_path: Path,
) -> None:
    """The daemon's first answer is the command's exit (it ran and ended before "started"
    reached the launcher, as a quick command under load did): the launcher reports that
    exit code and never runs the command a second time itself (a `list` printed twice)."""
    import threading

    runtime = Path(tempfile.mkdtemp(prefix="pgbf-"))  # short: a socket path's 108 bytes
    try:
        path = runtime / "fake.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        received: list[dict[str, Any]] = []

        def fake_daemon() -> None:
            conn, _ = listener.accept()
            with conn:
                payload, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
                for fd in fds:
                    os.close(fd)
                received.append(json.loads(payload))
                conn.sendall(b'{"exit": 3}\n{"started": 1}\n')

        thread = threading.Thread(target=fake_daemon, daemon=True)
        thread.start()
        where = launcher.DaemonAddress("k" * 32, path, "cli")
        assert launcher.run_in_daemon(where, ["list", "--from", "/x"], str(tmp_path)) == 3
        thread.join(10)
        assert received and received[0]["argv"] == ["pgbackflow", "list", "--from", "/x"]
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
