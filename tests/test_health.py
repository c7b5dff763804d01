"""Health checks end to end: a database stops, is reported down once, comes back, up once.

A real ``prefect server start`` whose scheduler runs the ``health-check`` deployment
(``health_check = "10s"`` here; 1 min by default), a real process worker, a real PostgreSQL
17 that the test halts and resumes, and the loopback webhook and SMTP receivers. Exactly two
notifications per receiver: down after three failed checks, up once it answers again —
however many checks fail or pass around them.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import MasterKey, write_key_file
from pgbackflow.tasks.toolsets import find_toolset
from tests.fixtures.deploy_config import config_head
from tests.fixtures.notify import Message, Receivers, running_receivers, save_blocks
from tests.fixtures.prefect_server import PrefectServer, postgres_backed_prefect_server

MAJOR = 17
POOL = "hc-checks"
DB = "hc-db"
#: Seconds between checks in this test.
EVERY_S = 10
#: A check can take this long here, from its scheduled time to its end (a new process per
#: run on a loaded 2-core machine: 30-40 s were seen; a run due while one runs is cancelled).
CHECK_S = 60

pytestmark = [pytest.mark.pg, pytest.mark.slow]


@dataclass
class Site:
    cluster: EphemeralCluster
    config: Path
    env: dict[str, str]
    worker_dir: Path
    receivers: Receivers


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """This module's own server, on PostgreSQL: notifications must arrive within seconds,
    and a loaded SQLite-backed server delays or drops the events they react to."""
    with postgres_backed_prefect_server(tmp_path_factory.mktemp("health-prefect-home")) as server:
        yield server


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("health")
    password = f"canary-pw-{secrets.token_hex(6)}"
    cluster = EphemeralCluster(find_toolset(MAJOR), password=password,
                               settings={"fsync": "off"}).start()
    key_file = root / "master.key"
    write_key_file(key_file, MasterKey.generate())
    (root / "store").mkdir()
    config = root / "pgbackflow.toml"
    config.write_text(config_head(POOL, key_file, root / "store", cluster, "HC_PG_PASSWORD")
                      + textwrap.dedent(f"""
        [notify]
        block = ["custom-webhook/hc-hook", "pgbackflow-smtp-email/hc-mail"]
        on_failure = ["health"]
        on_success = ["health"]
        [databases.{DB}]
        server = "pg"
        database = "postgres"
        storages = ["local"]
        backup = "daily at 02:00"
        health_check = "{EVERY_S}s"
    """))
    try:
        with running_receivers() as receivers:
            yield Site(cluster, config, {"HC_PG_PASSWORD": password}, root / "worker",
                       receivers)
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def deployed(prefect_server: PrefectServer, site: Site) -> Iterator[dict[str, Any]]:
    with prefect_server.settings():
        save_blocks(site.receivers, "hc-hook", "hc-mail")
    result = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
    assert f"+ deployment health-check/health-{DB}" in result.stdout, result.stdout
    assert f"+ automation pgbackflow health down: {DB}" in result.stdout
    assert f"+ automation pgbackflow health up: {DB}" in result.stdout
    with prefect_server.http() as http:
        deployment = http.get(f"deployments/name/health-check/health-{DB}").json()
    assert {"db:" + DB, "job:health"} <= set(deployment["tags"])
    prefect_server.start_worker(POOL, site.worker_dir, name="hc-worker")
    yield deployment
    prefect_server.stop_workers()
    with prefect_server.http() as http:
        http.post(f"deployments/{deployment['id']}/pause_deployment")


def _checks(server: PrefectServer, deployment_id: str, state: str = "COMPLETED") -> list[Any]:
    with server.http() as http:
        runs: list[Any] = http.post("flow_runs/filter", json={
            "deployments": {"id": {"any_": [deployment_id]}},
            "flow_runs": {"state": {"type": {"any_": [state]}}},
            "sort": "END_TIME_DESC",
        }).json()
    return runs


def _status(server: PrefectServer) -> dict[str, Any]:
    rows = json.loads(server.run_cli("status", "--json").stdout)
    by_db: dict[str, Any] = {row["database"]: row for row in rows}
    return by_db


def _health_messages(site: Site, via: str) -> list[Message]:
    return [m for m in site.receivers.inbox.about(DB, via) if "health check" in m.body]


def test_down_after_three_checks_up_once_back_exactly_two_notifications(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    # The scheduler runs the checks; the first ones find the database up.
    prefect_server.wait_for("two completed health checks",
                            lambda: len(_checks(prefect_server, deployed["id"])) >= 2,
                            3 * CHECK_S)
    status = _status(prefect_server)[DB]
    assert status["state"] == "up" and status["version"].startswith(f"{MAJOR}.")
    assert status["last backup"] == "never"
    with prefect_server.http() as http:
        artifact = http.get("artifacts/fleet-status/latest").json()
    assert artifact["type"] == "table" and DB in json.dumps(artifact["data"])
    assert not _health_messages(site, "webhook")

    site.cluster.halt()
    halted = time.time()
    try:
        for via in ("webhook", "smtp"):
            (down,) = prefect_server.wait_for(
                f"the down notification over {via}",
                lambda via=via: _health_messages(site, via), 5 * CHECK_S, 0.5)
            assert down.subject == f"pgbackflow: {DB} is DOWN"
            fields = down.fields()
            assert fields["outcome"] == "down" and fields["checks failed in a row"] == "3"
            assert "connection" in fields["error"] or "refused" in fields["error"], fields
            assert down.at - halted >= 2 * EVERY_S, "down before three checks could fail"
        # More failed checks: still one notification.
        seen = len(_checks(prefect_server, deployed["id"]))
        prefect_server.wait_for("two more checks while down",
                                lambda: len(_checks(prefect_server, deployed["id"])) >= seen + 2,
                                3 * CHECK_S)
        assert _status(prefect_server)[DB]["state"] == "down"
        assert len(_health_messages(site, "webhook")) == 1
        assert len(_health_messages(site, "smtp")) == 1
    finally:
        site.cluster.resume()

    for via in ("webhook", "smtp"):
        prefect_server.wait_for(
            f"the up notification over {via}",
            lambda via=via: [m for m in _health_messages(site, via) if "up again" in m.subject],
            3 * CHECK_S, 0.5)
    seen = len(_checks(prefect_server, deployed["id"]))
    prefect_server.wait_for("two more checks while up",
                            lambda: len(_checks(prefect_server, deployed["id"])) >= seen + 2,
                            3 * CHECK_S)
    for via in ("webhook", "smtp"):
        messages = _health_messages(site, via)
        assert [m.subject for m in messages] == [f"pgbackflow: {DB} is DOWN",
                                                 f"pgbackflow: {DB} is up again"], via
    assert _status(prefect_server)[DB]["state"] == "up"


def _probe(ok: bool, at: int, slot: Any = None) -> Any:
    from datetime import UTC, datetime, timedelta

    from pgbackflow.tasks.health import Probe

    when = datetime(2026, 11, 30, tzinfo=UTC) + timedelta(minutes=at)
    return Probe(ok, when, version="17.11" if ok else None,
                 error=None if ok else "connection refused", slot=slot)


def test_flapping_database_announces_each_transition_once() -> None:
    """Pure state machine: down only after three failures in a row; a single failure between
    passes (flapping) announces nothing; up once after down."""
    from pgbackflow.tasks.health import HealthState, next_state

    state = HealthState("flappy")
    announced = []
    pattern = [True, False, True, False, False, True, False, False, False, False, False,
               True, True, False, True]
    for minute, ok in enumerate(pattern):
        state, transitions = next_state(state, _probe(ok, minute))
        announced += [(minute, t) for t in transitions]
    assert announced == [(8, "down"), (11, "up")]
    assert state.state == "up" and state.failures == 0


def test_slot_problems_are_announced_once_and_their_end_too() -> None:
    from pgbackflow.tasks.health import HealthState, SlotState, WalLimits, next_state

    limits = WalLimits(retained_bytes=10**9, stalled_s=15 * 60)
    segment = 16 * 1024 * 1024

    def slot(restart: int, server: int) -> SlotState:
        return SlotState("pgbackflow", True, True, "reserved", server - restart, restart, server)

    state, announced = HealthState("c1"), []
    steps = [slot(0, segment // 2)] + [slot(segment, segment * 3)] * 20 + [
        slot(segment * 3, segment * 3), slot(0, 2 * 10**9), slot(2 * 10**9, 2 * 10**9)]
    for minute, item in enumerate(steps):
        state, transitions = next_state(state, _probe(True, minute, item), wal=limits)
        announced += [(minute, t, state.wal_problem) for t in transitions]
    (stalled, recovered, retaining, recovered_again) = announced
    assert stalled[:2] == (16, "wal-problem") and "no WAL received for 15 min" in str(stalled[2])
    assert recovered[:2] == (21, "wal-recovered")
    assert retaining[:2] == (22, "wal-problem") and "retains 2.00 GB" in str(retaining[2])
    assert recovered_again[:2] == (23, "wal-recovered")


_RUN_HEALTH_CHECK = """
import json, os, sys
from pgbackflow.blocks.database import PostgresDatabase
from pgbackflow.flows.health import health_check
where = json.loads(sys.argv[1])
database = PostgresDatabase(host=where["host"], port=where["port"], user=where["user"],
                            password=os.environ["HC_PG_PASSWORD"])
print(json.dumps(health_check(database=database, db_id=where["db_id"], slot=where["slot"],
                              slot_retained_gb=0.02, backup_jobs=["full"]), default=str))
"""


def test_slot_retaining_too_much_wal_notifies_once_and_its_recovery_once(
    prefect_server: PrefectServer, site: Site, tmp_path: Path
) -> None:
    """A streamed cluster whose slot keeps more WAL than allowed (its streamer is not
    running: this config's pool has no worker): the deploy makes the WAL automations, the
    health check (run here as its deployment would run it) sees the slot, and one problem
    and one recovery notification arrive, however many checks run."""
    cluster_id, slot = "hc-cluster", "hc_slot"
    config = tmp_path / "cluster.toml"
    config.write_text(config_head("hc-no-worker", tmp_path / "k", tmp_path, site.cluster,
                                  "HC_PG_PASSWORD") + textwrap.dedent(f"""
        [notify]
        block = ["custom-webhook/hc-hook", "pgbackflow-smtp-email/hc-mail"]
        on_failure = ["wal"]
        on_success = ["wal"]
        [clusters.{cluster_id}]
        server = "pg"
        storages = ["local"]
        incremental = ""
        slot = "{slot}"
        health_check = "off"
        notify = {{ slot_retained_gb = 0.02 }}
    """))
    write_key_file(tmp_path / "k", MasterKey.generate())
    result = prefect_server.run_cli("deploy", "--config", str(config), env=site.env)
    assert f"+ automation pgbackflow health wal problem: {cluster_id}" in result.stdout
    with site.cluster.connect() as conn:
        conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
        conn.execute("CREATE TABLE wal_filler AS SELECT g, repeat('x', 200) AS pad "
                     "FROM generate_series(1, 150000) g")
        conn.execute("SELECT pg_switch_wal()")
    where = {"host": site.cluster.host, "port": site.cluster.port,
             "user": site.cluster.superuser, "db_id": cluster_id, "slot": slot}

    def check() -> dict[str, Any]:
        # In a process of its own, as a deployment run is: this process's Prefect event
        # client may still be bound to a server an earlier test on this worker used.
        done = subprocess.run(
            [sys.executable, "-c", _RUN_HEALTH_CHECK, json.dumps(where)],
            env={**prefect_server.env, **site.env}, capture_output=True, text=True,
            timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def about(via: str) -> list[Message]:
        return site.receivers.inbox.about(f"WAL of {cluster_id}", via)

    try:
        assert "retains" in str(check()["wal_problem"])
        for via in ("webhook", "smtp"):
            (problem,) = prefect_server.wait_for(f"the WAL problem over {via}",
                                                 lambda via=via: about(via), 30, 0.5)
            assert "slot hc_slot retains" in problem.subject
            assert problem.fields()["slot"] == f"{slot} (active: False)"
        check()  # still too much: nothing new
        with site.cluster.connect() as conn:  # a streamer caught up: the slot moves on
            conn.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())",
                         (slot,))
        assert check()["wal_problem"] is None
        for via in ("webhook", "smtp"):
            prefect_server.wait_for(f"the WAL recovery over {via}",
                                    lambda via=via: len(about(via)) == 2, 30, 0.5)
        check()
        time.sleep(5)
        for via in ("webhook", "smtp"):
            assert [m.subject for m in about(via)] == [
                f"pgbackflow: WAL of {cluster_id}: slot {slot} retains "
                f"{about(via)[0].subject.split(' retains ')[1]}",
                f"pgbackflow: WAL of {cluster_id} recovered"]
    finally:
        with site.cluster.connect() as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        with prefect_server.http() as http:
            for deployment in http.post("deployments/filter", json={"deployments": {
                    "tags": {"all_": [f"db:{cluster_id}"]}}}).json():
                http.post(f"deployments/{deployment['id']}/pause_deployment")
