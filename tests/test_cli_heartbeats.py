"""A CLI command killed with -9 does not leave its runs Running in the UI.

CLI runs against a Prefect server send flow-run heartbeats; the first of them makes sure the
server has the "crash unresponsive runs" automation, which marks a run Crashed once its
heartbeats stop. Real ``prefect server start`` (its triggers service), real CLI process.

The kill test waits minutes for a timer (:data:`ZOMBIE_AFTER_S`), not for CPU: it runs beside
other tests (tests/fixtures/parallel.py), on a server of its own backed by PostgreSQL as in
production, so other tests' runs and SQLite's "database is locked" do not delay the events
the automation reacts to.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prefect.flow_engine
import psycopg
import pytest

import pgbackflow.flows.common  # noqa: F401  (installs the heartbeat thread under test)
from pgbackflow.deployments.automations import ZOMBIE_AFTER_S, ZOMBIE_AUTOMATION
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import MasterKey, write_key_file
from tests.fixtures.postgres import PgServers, make_database, without_libpq_env
from tests.fixtures.prefect_server import BIN, PrefectServer, postgres_backed_prefect_server

pytestmark = pytest.mark.timeout(600)


class _Engine:
    """What the heartbeat context reads from a flow-run engine."""

    heartbeat_seconds = 30
    flow_run = None

    def __init__(self) -> None:
        self.beats = threading.Semaphore(0)

    def _build_heartbeat_event_template(self) -> tuple[dict[str, str], list[Any]]:
        return {}, []

    def _emit_flow_run_heartbeat(self, resource: Any, related: Any) -> None:
        self.beats.release()


def test_the_heartbeat_thread_stops_at_once() -> None:
    """Prefect's own thread sleeps in 1 s steps and each run's end waits for it."""
    engine = _Engine()
    with prefect.flow_engine._send_heartbeats(engine):  # what FlowRunEngine.run_context calls
        assert engine.beats.acquire(timeout=5), "no heartbeat at the start of the run"
        time.sleep(0.3)  # Prefect's thread would now be ~0.7 s from its next look at "stop"
        started = time.monotonic()
    assert time.monotonic() - started < 0.2
    assert not [t for t in threading.enumerate() if t.name == "pgbackflow-heartbeat"]
    assert not engine.beats.acquire(timeout=0), "a second heartbeat within 30 s"


@pytest.fixture
def locked_database(pg_servers: PgServers, pg_majors: tuple[int, ...]
                    ) -> Iterator[tuple[EphemeralCluster, str, psycopg.Connection[Any]]]:
    """A database whose only table is locked by an open transaction: a dump of it waits."""
    server = pg_servers(17 if 17 in pg_majors else max(pg_majors))
    name = make_database(server, "hb", "CREATE TABLE t AS SELECT generate_series(1, 10) id")
    holder = server.connect(name)
    holder.autocommit = False
    holder.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
    try:
        yield server, name, holder
    finally:
        holder.rollback()
        holder.close()
        with server.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


@pytest.fixture(scope="module")
def heartbeat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server used by this module alone (see the module's docstring)."""
    with postgres_backed_prefect_server(tmp_path_factory.mktemp("heartbeat-prefect-home")
                                        ) as server:
        yield server


def _flow_runs(server: PrefectServer, tag: str) -> list[dict[str, Any]]:
    with server.http() as http:
        response = http.post("flow_runs/filter", json={
            "flow_runs": {"tags": {"all_": [tag]}}, "limit": 50})
        response.raise_for_status()
        runs: list[dict[str, Any]] = response.json()
        return runs


def _heartbeats(server: PrefectServer, run_id: str) -> int:
    with server.http() as http:
        response = http.post("events/filter", json={"filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{run_id}"]},
            "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 50})
        response.raise_for_status()
        return int(response.json()["total"])


def _delete_automation(server: PrefectServer, name: str) -> None:
    with server.http() as http:
        response = http.post("automations/filter", json={"automations": {"name": {"any_": [name]}}})
        response.raise_for_status()
        for automation in response.json():
            http.delete(f"automations/{automation['id']}").raise_for_status()


def _automations(server: PrefectServer, name: str) -> list[dict[str, Any]]:
    with server.http() as http:
        response = http.post("automations/filter", json={"automations": {"name": {"any_": [name]}}})
        response.raise_for_status()
        found: list[dict[str, Any]] = response.json()
        return found


def test_a_killed_cli_backup_ends_crashed(
    heartbeat_server: PrefectServer, locked_database: tuple[EphemeralCluster, str, Any],
    tmp_path: Path,
) -> None:
    server, name, _ = locked_database
    # A server only ever used from the CLI: the first CLI run creates the automation.
    _delete_automation(heartbeat_server, ZOMBIE_AUTOMATION)
    key_file = tmp_path / "master.key"
    write_key_file(key_file, MasterKey.generate())
    db_id = f"hb-{name}"
    dsn = (f"postgresql://{server.superuser}:{server.password}@{server.host}:{server.port}/"
           f"{name}?sslmode=disable")
    env = without_libpq_env(heartbeat_server.env)
    cli = subprocess.Popen(
        [str(BIN / "pgbackflow"), "backup", "--db", dsn, "--db-id", db_id,
         "--to", str(tmp_path / "store"), "--key-file", str(key_file)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        run = heartbeat_server.wait_for(
            "the CLI's backup run to be Running with a heartbeat",
            lambda: next((r for r in _flow_runs(heartbeat_server, f"db:{db_id}")
                          if r["state_type"] == "RUNNING"
                          and _heartbeats(heartbeat_server, r["id"])), None),
            120, interval=2)
        assert cli.poll() is None, "the backup ended although its table is locked"
        assert len(_automations(heartbeat_server, ZOMBIE_AUTOMATION)) == 1
        os.killpg(cli.pid, signal.SIGKILL)
        killed = time.monotonic()
        cli.wait(timeout=30)

        def crashed() -> dict[str, Any] | None:
            with heartbeat_server.http() as http:
                state = http.get(f"flow_runs/{run['id']}").json()["state"]
            return state if state["type"] == "CRASHED" else None

        state = heartbeat_server.wait_for("the killed run to be marked Crashed", crashed,
                                        ZOMBIE_AFTER_S + 180, interval=5)
        delay = time.monotonic() - killed
        print(f"killed CLI run marked Crashed {delay:.0f} s after kill -9")
        assert "no heartbeat" in state["message"]
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait(timeout=30)
