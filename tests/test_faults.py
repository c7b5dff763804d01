"""Hard faults become outcomes: what `pgbackflow backup` does when PostgreSQL or the Prefect
API goes away, run as a user runs it (the console script, real servers).

A lost database session is retried, each retry says what it waits for, and the last failure
is one line; an unreachable Prefect API is one line; a Prefect API that dies after the backup
is complete does not turn a good backup into a failure, and never hangs the command.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from pgbackflow.tasks.cluster import EphemeralCluster, free_port
from pgbackflow.tasks.storage import INCOMPLETE_DIR, LocalFolderStorage
from tests.fixtures.postgres import BIG_ROWS, BigDatabase, PgServers
from tests.fixtures.prefect_server import BIN, _stop, server_environment
from tests.test_backup_failures import (
    CLI,
    Cli,
    Source,
    closed_port,
    folder_leftovers,
    one_line_error,
    only_backup,
    table_counts,
)

pytestmark = pytest.mark.timeout(240)

PREFERRED_MAJOR = 17
#: Rows of the big table: pg_dump of it takes a few seconds, long enough to hit it mid-way.
DUMP_ROWS = BIG_ROWS
#: The whole command, retries included, must end well within this (it hung 181 s before).
COMMAND_LIMIT_S = 60
RETRY_LINE = re.compile(r"^database \S+ (not reachable \(.+\)|.+); retry (\d) of (\d) in \S+ s$")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(pg_servers: PgServers, pg_majors: tuple[int, ...]) -> EphemeralCluster:
    """One PostgreSQL server for the module: 17 if selected, else the newest selected."""
    return pg_servers(PREFERRED_MAJOR if PREFERRED_MAJOR in pg_majors else max(pg_majors))


@pytest.fixture(scope="module")
def big_source(big_database: BigDatabase) -> Source:
    """A database whose dump takes a few seconds (shared, read-only)."""
    server, name = big_database.server, big_database.name
    return Source(server, name, table_counts(server, name, ["public.big"]))


@pytest.fixture(scope="module")
def cli(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """The console script on the session's Prefect API, with quick retries (1 s, 2 s)."""
    from pgbackflow.tasks.keys import MasterKey, write_key_file

    key_file = tmp_path_factory.mktemp("fault-keys") / "master.key"
    write_key_file(key_file, MasterKey.generate())
    return Cli(prefect_api, key_file)


# --------------------------------------------------------------------------- helpers


def quick_env(cli: Cli, **extra: str) -> dict[str, str]:
    """The CLI's environment with the retry delays this module's timings assume."""
    return cli.env(PGBACKFLOW_RETRY_DELAYS="1,2", **extra)


def start_backup(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``pgbackflow backup ARGS`` in its own process group."""
    return subprocess.Popen(
        [str(CLI), "backup", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**env, "PYTHONFAULTHANDLER": "1"}, start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], limit: float = COMMAND_LIMIT_S
           ) -> subprocess.CompletedProcess[str]:
    """Wait for ``proc`` at most ``limit`` seconds (a hang fails the test, not the session)."""
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGABRT)  # faulthandler: every thread's stack, for the report
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"pgbackflow still running after {limit:.0f} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def dump_session(server: EphemeralCluster, dbname: str) -> int | None:
    """The pid of pg_dump's session once it is copying table data, else None."""
    with server.connect() as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query LIKE 'COPY %%'"
            " AND application_name = 'pgbackflow'", (dbname,),
        ).fetchone()
    return None if row is None else int(row[0])


def wait_for_dump(server: EphemeralCluster, dbname: str, proc: subprocess.Popen[str]) -> int:
    """Poll until pg_dump copies data; fail if the command ends first or never gets there."""
    deadline = time.monotonic() + 60
    while (pid := dump_session(server, dbname)) is None:
        if proc.poll() is not None:
            pytest.fail(f"pgbackflow ended before pg_dump ran:\n{proc.communicate()[1]}")
        if time.monotonic() > deadline:
            pytest.fail("pg_dump never started copying data")
        time.sleep(0.05)
    return pid


def incomplete_writes(folder: Path) -> list[Path]:
    """Temporaries of unfinished writes in a storage folder."""
    return sorted(path for path in (folder / INCOMPLETE_DIR).rglob("*") if path.is_file())


def retry_lines(stderr: str) -> list[re.Match[str]]:
    """The "…; retry N of M in S s" lines the CLI printed."""
    return [m for line in stderr.splitlines() if (m := RETRY_LINE.match(line.strip()))]


def non_retry_lines(stderr: str) -> list[str]:
    """Everything on stderr but the retry lines."""
    return [line for line in stderr.splitlines()
            if line.strip() and not RETRY_LINE.match(line.strip())]


@contextmanager
def own_prefect_server(home: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A `prefect server start` of this test alone (killing the session's would hurt others)."""
    port = free_port()
    env = server_environment(home, port)
    with (home / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    api_url = env["PREFECT_API_URL"]
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server not healthy after 120 s"
            time.sleep(0.5)
        yield api_url, process
    finally:
        _stop(process)


# --------------------------------------------------------------------------- Prefect API


def test_closed_prefect_api_port_is_one_line(cli: Cli, big_source: Source, tmp_path: Path
                                             ) -> None:
    """PREFECT_API_URL at a closed port: one line naming the URL and what to do."""
    api = f"http://127.0.0.1:{closed_port()}/api"
    started = time.monotonic()
    result = subprocess.run(
        [str(CLI), "backup", "--db", big_source.dsn(), "--to", str(tmp_path)],
        capture_output=True, text=True, timeout=COMMAND_LIMIT_S, check=False,
        env=quick_env(cli, PREFECT_API_URL=api),
    )
    line = one_line_error(result, f"Prefect API at {api} is not reachable: ",
                          "start it or fix PREFECT_API_URL")
    assert "Connection refused" in line, line
    assert time.monotonic() - started < 30
    assert folder_leftovers(tmp_path) == []


def test_prefect_api_killed_mid_backup(big_source: Source, cli: Cli, tmp_path: Path) -> None:
    """The API dies while pg_dump runs: the backup completes, is listed, and the command says
    so with a warning and exits 0, within a bounded time."""
    folder = tmp_path / "backups"
    folder.mkdir()
    home = tmp_path / "prefect-home"
    home.mkdir()
    with own_prefect_server(home) as (api_url, server_process):
        env = quick_env(cli, PREFECT_API_URL=api_url, PREFECT_HOME=str(home))
        proc = start_backup(env, "--db", big_source.dsn(), "--to", str(folder))
        wait_for_dump(big_source.server, big_source.dbname, proc)
        _stop(server_process)
        killed_at = time.monotonic()
        result = finish(proc)
    took = time.monotonic() - killed_at
    print(f"finished {took:.1f} s after the API died:\n{result.stderr}")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"warning: Prefect API at {api_url} is not reachable: "), lines
    manifest = only_backup(LocalFolderStorage(folder))
    assert f"backup {manifest.backup_id} is complete in " in lines[0], lines
    assert {t.table: t.rows for t in manifest.tables}["big"] == DUMP_ROWS
    assert manifest.backup_id in result.stdout
    assert incomplete_writes(folder) == []
    assert took < COMMAND_LIMIT_S


# --------------------------------------------------------------------------- PostgreSQL


def test_unreachable_database_says_what_it_waits_for(cli: Cli, big_source: Source,
                                                     tmp_path: Path) -> None:
    """A wrong port: each retry is one line on stderr, then one error line."""
    port = closed_port()
    dsn = big_source.dsn(port=port)
    result = subprocess.run(
        [str(CLI), "backup", "--db", dsn, "--to", str(tmp_path)], capture_output=True,
        text=True, timeout=COMMAND_LIMIT_S, check=False, env=quick_env(cli),
    )
    print(result.stderr)
    where = f"{big_source.server.host}:{port}/{big_source.dbname}"
    assert [m.group(0) for m in retry_lines(result.stderr)] == [
        f"database {where} not reachable (connection refused); retry 1 of 2 in 1 s",
        f"database {where} not reachable (connection refused); retry 2 of 2 in 2 s",
    ]
    others = non_retry_lines(result.stderr)
    one_line_error(
        subprocess.CompletedProcess(result.args, result.returncode, "", "\n".join(others)),
        f"{where}: connection refused",
    )
    assert folder_leftovers(tmp_path) == []


def test_dump_session_terminated_is_retried(cli: Cli, big_source: Source, tmp_path: Path
                                            ) -> None:
    """pg_terminate_backend of pg_dump's session mid-dump: one retry, then a good backup."""
    proc = start_backup(quick_env(cli), "--db", big_source.dsn(), "--to", str(tmp_path))
    pid = wait_for_dump(big_source.server, big_source.dbname, proc)
    with big_source.server.connect() as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    result = finish(proc)
    print(result.stderr)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    retries = retry_lines(result.stderr)
    assert len(retries) == 1, result.stderr
    where = f"{big_source.server.host}:{big_source.server.port}/{big_source.dbname}"
    # pg_dump reports the server's reason, or only the symptom when the FATAL message lost
    # the race with the closed socket.
    assert retries[0].group(0) in {
        f"database {where} connection lost during the dump (pg_dump: {reason}); retry 1 of 2 "
        "in 1 s"
        for reason in ("terminating connection due to administrator command",
                       "server closed the connection unexpectedly")
    }, retries[0].group(0)
    assert non_retry_lines(result.stderr) == []
    manifest = only_backup(LocalFolderStorage(tmp_path))
    assert {t.table: t.rows for t in manifest.tables}["big"] == DUMP_ROWS
    assert incomplete_writes(tmp_path) == []  # the killed attempt's temporary is gone


def test_server_down_mid_dump_fails_in_one_line(cli: Cli, big_source: Source, tmp_path: Path
                                                ) -> None:
    """PostgreSQL shut down mid-dump and not back: retries, one error line, nothing listed,
    no temporaries."""
    server = big_source.server
    proc = start_backup(quick_env(cli), "--db", big_source.dsn(), "--to", str(tmp_path))
    wait_for_dump(server, big_source.dbname, proc)
    server.halt()
    try:
        result = finish(proc)
    finally:
        server.resume()
    print(result.stderr)
    retries = retry_lines(result.stderr)
    assert [(m.group(2), m.group(3)) for m in retries] == [("1", "2"), ("2", "2")], result.stderr
    # The first retry is for the lost session, the second waits for the server to be back.
    assert retries[0].group(0).startswith(
        f"database {server.host}:{server.port}/{big_source.dbname} connection lost during the "
        "dump ("), retries[0].group(0)
    assert "not reachable (connection refused)" in retries[1].group(0), retries[1].group(0)
    others = non_retry_lines(result.stderr)
    one_line_error(
        subprocess.CompletedProcess(result.args, result.returncode, "", "\n".join(others)),
        f"{server.host}:{server.port}/{big_source.dbname}", "connection refused",
    )
    assert folder_leftovers(tmp_path) == []  # no backup, no partial dump, no temporary


# --------------------------------------------------------------------------- anything else

_BROKEN_TOOLSETS = """
import sys
import pgbackflow.tasks.toolsets as toolsets
def broken():
    raise ValueError("toolset index is garbled\\nsecond line")
toolsets.available_toolsets = broken
from pgbackflow.cli import main
sys.argv = ["pgbackflow", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_unexpected_exception_is_one_line(debug: bool) -> None:
    """An exception pgbackflow did not foresee (injected into the real console entry point):
    one line naming its type and first line, the traceback only with --debug."""
    flags = ["--debug"] if debug else []
    result = subprocess.run(
        [sys.executable, "-c", _BROKEN_TOOLSETS, *flags, "toolsets", "list"],
        capture_output=True, text=True, timeout=COMMAND_LIMIT_S, check=False,
    )
    expected = ("error: unexpected ValueError: toolset index is garbled; rerun with --debug "
                "for the traceback")
    assert result.returncode == 1, result.stderr
    if debug:
        assert "Traceback" in result.stderr and expected in result.stderr, result.stderr
    else:
        assert result.stderr.strip() == expected, result.stderr
