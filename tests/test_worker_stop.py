"""``pgbackflow worker`` and ``pgbackflow agent`` stop within 10 s of SIGTERM, runs included.

Real processes: a PostgreSQL-backed ``prefect server start``, the config-driven deploy, the
worker started as a service manager starts it (its own session; SIGTERM to its pid only, as
``kill PID`` or ``docker stop`` send it). ``prefect worker start`` alone exits in 1-3 s but
leaves its flow-run processes running unwatched (each in its own session); the supervisor must
end them: the run ends in a final state, no process of the run is left (pg_dump included), no
connection of it stays on the database, and what it wrote is either gone or a dead writer's
temporary that the next backup sweeps.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import MasterKey, write_key_file
from pgbackflow.tasks.storage import LocalFolderStorage
from pgbackflow.tasks.toolsets import find_toolset
from tests.fixtures.deploy_config import config_head
from tests.fixtures.prefect_server import (
    BIN,
    PrefectServer,
    flow_run_pids,
    postgres_backed_prefect_server,
)

pytestmark = [pytest.mark.pg, pytest.mark.slow]

POOL = "stop-pool"
STOP_LIMIT_S = 10.0
#: Each command backs up its own database: a run ended by a stop keeps its database's
#: concurrency slot until the lease expires (60 s).
COMMANDS = ("worker", "agent")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Site:
    server: PrefectServer
    cluster: EphemeralCluster
    store: Path
    root: Path
    deployments: dict[str, str]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("worker-stop")
    cluster = EphemeralCluster(find_toolset(17), password=secrets.token_hex(12),
                               settings={"fsync": "off"}).start()
    try:
        with cluster.connect() as conn:
            for command in COMMANDS:
                conn.execute(f"CREATE DATABASE victim_{command}")
        for command in COMMANDS:
            with cluster.connect(f"victim_{command}") as conn:
                conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        key_file = root / "master.key"
        write_key_file(key_file, MasterKey.generate())
        store = root / "store"
        config = root / "pgbackflow.toml"
        config.write_text(config_head(POOL, key_file, store, cluster, "STOP_PG_PASSWORD")
                          + "".join(textwrap.dedent(f"""
            [databases.victim_{command}]
            server = "pg"
            storages = ["local"]
            backup = "daily at 03:00"
            health_check = "off"
        """) for command in COMMANDS))
        with postgres_backed_prefect_server(tmp_path_factory.mktemp("stop-prefect")) as server:
            server.run_cli("deploy", "--config", str(config),
                           env={"STOP_PG_PASSWORD": cluster.password})
            with server.http() as http:
                deployments = {command: http.get(
                    f"deployments/name/logical-backup/logical-victim_{command}").json()["id"]
                    for command in COMMANDS}
            yield Site(server=server, cluster=cluster, store=store, root=root,
                       deployments=deployments)
    finally:
        cluster.stop()


def _start(site: Site, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``pgbackflow ARGS`` in its own session (as a service manager starts it), ready."""
    folder = site.root / name
    folder.mkdir()
    log = folder / "out.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(BIN / "pgbackflow"), *args], cwd=folder,
                                   env=site.server.env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    site.server.workers.append(process)  # killed with the server if the test fails
    site.server.wait_for(f"{name} to start", lambda: b"started!" in log.read_bytes(), 120,
                         0.2)
    return process, log


def _sigterm(process: subprocess.Popen[bytes], log: Path) -> float:
    """SIGTERM to the pid only; seconds until it exited (fails after 60 s)."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 60 s after SIGTERM:\n{log.read_text()[-3000:]}",
                    pytrace=False)
    elapsed = time.monotonic() - started
    assert process.returncode == 0, log.read_text()[-3000:]
    return elapsed


@pytest.mark.parametrize("command", COMMANDS)
def test_idle_worker_stops_at_once(site: Site, command: str) -> None:
    process, log = _start(site, f"idle-{command}", command, "--pool", POOL)
    elapsed = _sigterm(process, log)
    print(f"idle {command}: stopped {elapsed:.1f} s after SIGTERM")
    assert elapsed <= STOP_LIMIT_S, log.read_text()[-3000:]


def _dump_waiting(cluster: EphemeralCluster, dbname: str) -> bool:
    """pg_dump of ``dbname`` is connected and waits for its table lock (mid-backup)."""
    with cluster.connect() as conn:
        rows = conn.execute(
            "SELECT query FROM pg_stat_activity WHERE datname = %s "
            "AND query LIKE 'LOCK TABLE%%ACCESS SHARE MODE'", (dbname,)).fetchall()
    return bool(rows)


def _backup_connections(cluster: EphemeralCluster, dbname: str) -> list[Any]:
    with cluster.connect() as conn:
        return conn.execute(
            "SELECT pid, application_name, state, query FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)).fetchall()


@pytest.mark.parametrize("command", COMMANDS)
def test_worker_with_a_backup_running_stops_and_ends_the_run(site: Site, command: str) -> None:
    """A backup blocked mid-dump (its table locked) is ended: Crashed/Failed, nothing left."""
    server = site.server
    process, log = _start(site, f"busy-{command}", command, "--pool", POOL)
    dbname = f"victim_{command}"
    locker = site.cluster.connect(dbname)
    try:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")  # held: pg_dump waits
        with server.http() as http:
            run = http.post(f"deployments/{site.deployments[command]}/create_flow_run",
                            json={}).json()
        server.wait_for("pg_dump to wait for its lock", lambda: _dump_waiting(site.cluster, dbname),
                        180, 0.5)
        pids = flow_run_pids(run["id"])
        assert pids, "no process of the run found"
        elapsed = _sigterm(process, log)
        print(f"{command} with a backup running: stopped {elapsed:.1f} s after SIGTERM")
        assert elapsed <= STOP_LIMIT_S, log.read_text()[-3000:]
        left = flow_run_pids(run["id"])
        assert not left, f"processes of the run still running: {left}"
        with server.http() as http:
            state = http.get(f"flow_runs/{run['id']}").json()["state"]
        assert state["type"] in FINAL - {"COMPLETED"}, state
    finally:
        locker.close()
    # Its lock granted, the dead pg_dump's session notices the client is gone.
    server.wait_for("the run's database sessions to end",
                    lambda: not _backup_connections(site.cluster, dbname), 30, 0.5)
    storage = LocalFolderStorage(site.store)
    published = [o.key for o in storage.list("") if dbname in o.key] \
        if site.store.exists() else []
    assert not published, f"a killed backup published objects: {published}"
    leftovers = sorted(p.name for p in storage.incomplete_folder.glob("*")) \
        if storage.incomplete_folder.exists() else []
    sweepable = {Path(line.split()[0]).name for line in
                 storage.list_stale_writes(timedelta(days=1))} if leftovers else set()
    assert set(leftovers) <= sweepable, (leftovers, sweepable)
    with server.http() as http:
        still = http.get(f"flow_runs/{run['id']}").json()["state"]
    assert still["type"] == state["type"], "the run changed state after the stop"
