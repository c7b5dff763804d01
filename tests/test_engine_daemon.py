"""Deployment runs in the warm daemon: the pool's flow-run command ``python -m
pgbackflow.engine`` (what ``pgbackflow deploy`` gives the pools it creates) runs Prefect's
engine in a forked child of a warm daemon, as a worker starts it.

Real processes: a PostgreSQL-backed ``prefect server start``, the config-driven deploy,
``pgbackflow worker`` started as a service manager starts it, runs triggered over the REST
API. The first run of a worker has no daemon yet: it runs as ``python -m prefect.engine``
and starts one; later runs go to the daemon (its log names each run). A SIGTERM to the worker
still ends a run the daemon runs within 10 s, with nothing of it left: no process, no
database session, no daemon.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from pgbackflow.deployments.apply import flow_run_command
from pgbackflow.tasks.catalog import read_catalog
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import Keyring, MasterKey, load_key_file, write_key_file
from pgbackflow.tasks.storage import LocalFolderStorage
from pgbackflow.tasks.toolsets import find_toolset
from tests.fixtures.deploy_config import config_head
from tests.fixtures.prefect_server import (
    BIN,
    PrefectServer,
    daemon_pids,
    flow_run_pids,
    postgres_backed_prefect_server,
)

pytestmark = [pytest.mark.pg, pytest.mark.slow]

POOL = "daemon-pool"
DATABASES = ("quick", "victim")
STOP_LIMIT_S = 10.0
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Site:
    server: PrefectServer
    cluster: EphemeralCluster
    store: Path
    key: Path
    runtime: Path
    env: dict[str, str]
    deployments: dict[str, str]
    worker: subprocess.Popen[bytes]
    worker_log: Path


def _daemon_logs(runtime: Path) -> str:
    return "".join(log.read_text() for log in sorted(runtime.glob("*.log")))


def _command_pid(runtime: Path, run_id: str) -> int:
    """The daemon's child that runs ``run_id`` (its log names it)."""
    match = re.search(rf"'flow run {run_id}': process (\d+)", _daemon_logs(runtime))
    assert match, _daemon_logs(runtime)
    return int(match.group(1))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("engine-daemon")
    runtime = root / "run"
    runtime.mkdir(mode=0o700)
    cluster = EphemeralCluster(find_toolset(17), password=secrets.token_hex(12),
                               settings={"fsync": "off"}).start()
    try:
        with cluster.connect() as conn:
            for name in DATABASES:
                conn.execute(f"CREATE DATABASE {name}")
        for name in DATABASES:
            with cluster.connect(name) as conn:
                conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        key_file = root / "master.key"
        write_key_file(key_file, MasterKey.generate())
        store = root / "store"
        config = root / "pgbackflow.toml"
        config.write_text(config_head(POOL, key_file, store, cluster, "DAEMON_PG_PASSWORD")
                          + "".join(textwrap.dedent(f"""
            [databases.{name}]
            server = "pg"
            storages = ["local"]
            backup = "daily at 03:00"
            health_check = "off"
        """) for name in DATABASES))
        with postgres_backed_prefect_server(tmp_path_factory.mktemp("daemon-prefect")) as server:
            server.run_cli("deploy", "--config", str(config),
                           env={"DAEMON_PG_PASSWORD": cluster.password})
            with server.http() as http:
                pool = http.get(f"work_pools/{POOL}").json()
                deployments = {name: http.get(
                    f"deployments/name/logical-backup/logical-{name}").json()["id"]
                    for name in DATABASES}
            command = pool["base_job_template"]["variables"]["properties"]["command"]
            # deploy's interpreter (the console script's python3) and the engine module.
            interpreter, *rest = shlex.split(command["default"])
            assert rest == shlex.split(flow_run_command())[1:], command
            assert Path(interpreter).resolve() == Path(sys.executable).resolve(), command
            env = {**server.env, "PGBACKFLOW_DAEMON": "on",
                   "PGBACKFLOW_RUNTIME_DIR": str(runtime),
                   "PREFECT_WORKER_QUERY_SECONDS": "1"}
            folder = root / "worker"
            folder.mkdir()
            worker_log = folder / "out.log"
            with worker_log.open("wb") as out:
                worker = subprocess.Popen(
                    [str(BIN / "pgbackflow"), "worker", "--pool", POOL], cwd=folder, env=env,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            server.workers.append(worker)  # killed with the server if a test fails
            try:
                server.wait_for("the worker to start", lambda: b"started!" in
                                worker_log.read_bytes(), 120, 0.2)
                yield Site(server, cluster, store, key_file, runtime, env, deployments, worker,
                           worker_log)
            finally:
                for pid in daemon_pids(runtime):
                    os.kill(pid, signal.SIGKILL)
    finally:
        cluster.stop()


def _run(site: Site, database: str) -> dict[str, Any]:
    with site.server.http() as http:
        run: dict[str, Any] = http.post(
            f"deployments/{site.deployments[database]}/create_flow_run", json={}).json()
    return run


def _state(site: Site, run_id: str) -> dict[str, Any]:
    with site.server.http() as http:
        state: dict[str, Any] = http.get(f"flow_runs/{run_id}").json()["state"]
    return state


def _wait_final(site: Site, run_id: str) -> dict[str, Any]:
    state: dict[str, Any] = site.server.wait_for(
        f"run {run_id} to end", lambda: (s := _state(site, run_id))["type"] in FINAL and s,
        180, 0.2)
    return state


def _seconds_to_completed(site: Site, run_id: str) -> float:
    with site.server.http() as http:
        states = http.get("flow_run_states/", params={"flow_run_id": run_id}).json()
    at = {s["type"]: datetime.fromisoformat(s["timestamp"].replace("Z", "+00:00"))
          for s in states}
    return (at["COMPLETED"] - at["SCHEDULED"]).total_seconds()


def test_deployment_runs_go_to_the_daemon(site: Site) -> None:
    # The worker's first run finds no daemon: it runs as `python -m prefect.engine` and
    # starts one for the next.
    first = _run(site, "quick")
    assert _wait_final(site, first["id"])["type"] == "COMPLETED", site.worker_log.read_text()
    site.server.wait_for("a flow-run daemon to serve",
                         lambda: "serving" in _daemon_logs(site.runtime), 60, 0.2)
    assert f"flow run {first['id']}" not in _daemon_logs(site.runtime)
    for _ in range(2):
        run = _run(site, "quick")
        state = _wait_final(site, run["id"])
        assert state["type"] == "COMPLETED", (state, site.worker_log.read_text()[-3000:])
        assert f"flow run {run['id']}" in _daemon_logs(site.runtime), \
            _daemon_logs(site.runtime)
        print(f"daemon run {run['id']}: created -> Completed "
              f"{_seconds_to_completed(site, run['id']):.2f} s")
    catalog = read_catalog(LocalFolderStorage(site.store), Keyring([load_key_file(site.key)]))
    backups = [b for db in catalog.databases if db.db_id == "quick" for b in db.backups]
    assert len(backups) == 3, backups
    assert all(b.status == "verified" and not b.missing for b in backups), backups
    # Warm runs print nothing of their own on the worker's output (runpy warned that the
    # warm process had imported prefect.engine, once per run).
    assert "RuntimeWarning" not in site.worker_log.read_text(), site.worker_log.read_text()


def _dump_waiting(cluster: EphemeralCluster, dbname: str) -> bool:
    with cluster.connect() as conn:
        return bool(conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = %s "
            "AND query LIKE 'LOCK TABLE%%ACCESS SHARE MODE'", (dbname,)).fetchall())


def _sessions(cluster: EphemeralCluster, dbname: str) -> list[Any]:
    with cluster.connect() as conn:
        return conn.execute("SELECT pid, application_name, query FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()",
                            (dbname,)).fetchall()


def test_worker_sigterm_ends_a_run_of_the_daemon(site: Site) -> None:
    """Last in the module: it stops the worker."""
    site.server.wait_for("a flow-run daemon to serve",
                         lambda: "serving" in _daemon_logs(site.runtime), 120, 0.2)
    daemons = daemon_pids(site.runtime)
    assert daemons, _daemon_logs(site.runtime)
    locker = site.cluster.connect("victim")
    try:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")  # held: pg_dump waits
        run = _run(site, "victim")
        site.server.wait_for("pg_dump to wait for its lock",
                             lambda: _dump_waiting(site.cluster, "victim"), 180, 0.5)
        child = _command_pid(site.runtime, run["id"])  # the run went to the daemon
        assert _alive(child)
        started = time.monotonic()
        site.worker.send_signal(signal.SIGTERM)
        site.worker.wait(timeout=60)
        elapsed = time.monotonic() - started
        print(f"worker with a daemon run: stopped {elapsed:.1f} s after SIGTERM")
        log = site.worker_log.read_text()
        assert site.worker.returncode == 0, log[-3000:]
        assert elapsed <= STOP_LIMIT_S, log[-3000:]
        assert not flow_run_pids(run["id"]), "processes of the run still running"
        assert not _alive(child), "the daemon's child running the run is still there"
        assert not [pid for pid in daemons if pid in daemon_pids(site.runtime)], \
            "the daemon outlived its worker"
        # Stopped, not killed: its socket is gone and its log says why.
        assert not list(site.runtime.rglob("*.sock")), list(site.runtime.rglob("*.sock"))
        assert "received SIGTERM, exiting" in _daemon_logs(site.runtime), \
            _daemon_logs(site.runtime)[-2000:]
        state = _state(site, run["id"])
        assert state["type"] in FINAL - {"COMPLETED"}, state
    finally:
        locker.close()
    site.server.wait_for("the run's database sessions to end",
                         lambda: not _sessions(site.cluster, "victim"), 30, 0.5)
    storage = LocalFolderStorage(site.store)
    published = [o.key for o in storage.list("") if "victim" in o.key] \
        if site.store.exists() else []
    assert not published, f"a stopped backup published objects: {published}"
