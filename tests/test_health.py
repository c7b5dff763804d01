"""Health checks end to end: a database stops, is reported down once, comes back, up once.

A real ``prefect server start`` whose scheduler runs the ``health-check`` deployment
(``health_check = "10s"`` here; 1 min by default), a real process worker, a real PostgreSQL
17 that the test halts and resumes, and the loopback webhook and SMTP receivers. Exactly two
notifications per receiver: down after three failed checks, up once it answers again —
however many checks fail or pass around them.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
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
    # A backup of the database (its deployment, on the worker): the checks tell its age.
    with prefect_server.http() as http:
        logical = http.get(f"deployments/name/logical-backup/logical-{DB}").json()
        created = http.post(f"deployments/{logical['id']}/create_flow_run", json={})
        assert created.status_code == 201, created.text
    backup_id = created.json()["id"]
    seen = len(_checks(prefect_server, deployed["id"]))
    prefect_server.wait_for("two more checks while up",
                            lambda: len(_checks(prefect_server, deployed["id"])) >= seen + 2,
                            3 * CHECK_S)
    for via in ("webhook", "smtp"):
        messages = _health_messages(site, via)
        assert [m.subject for m in messages] == [f"pgbackflow: {DB} is DOWN",
                                                 f"pgbackflow: {DB} is up again"], via

    def backed_up() -> bool:
        with prefect_server.http() as http:
            state = http.get(f"flow_runs/{backup_id}").json()["state"]
        assert state["type"] not in ("FAILED", "CRASHED", "CANCELLED"), state
        return bool(state["type"] == "COMPLETED")

    prefect_server.wait_for("the backup", backed_up, 3 * CHECK_S)
    status = prefect_server.wait_for(
        "a check that saw the backup",
        lambda: (row := _status(prefect_server)[DB])["last backup"] != "never" and row,
        3 * CHECK_S)
    assert status["state"] == "up" and status["last backup"].endswith(" ago"), status
    assert status["last verification"] == "never"  # the config verifies nothing
    table = prefect_server.run_cli("status").stdout  # the table, as a terminal shows it
    assert "fleet status: 1 databases" in table, table
    (row,) = [line for line in table.splitlines() if f" {DB} " in line]
    # state, last check and last backup ("… ago"), last verification "never"
    assert " up " in row and row.count(" ago ") == 2 and " never " in row, table


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


WAL_ID = "hc-wal"
#: The WAL thresholds of this test's cluster (its deploy config): a slot retaining more than
#: 50 MB, or more than a segment (16 MB) of WAL the streamer did not confirm for 15 s.
RETAINED_LIMIT = 50_000_000
STALLED_MINUTES = 0.25


def _receivewal_pids(spool: Path) -> list[int]:
    """The pg_receivewal processes writing into ``spool`` (the streamer's child)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"pg_receivewal") and \
                f"--directory={spool}".encode() in argv:
            pids.append(int(entry.name))
    return pids


def _retained(cluster: EphemeralCluster) -> int:
    """Bytes of WAL the streamer's slot keeps (the server's WAL position - restart_lsn)."""
    with cluster.connect() as conn:
        row = conn.execute("SELECT (pg_current_wal_lsn() - restart_lsn)::bigint, active "
                           "FROM pg_replication_slots WHERE slot_name = 'pgbackflow'").fetchone()
    assert row is not None and row[1], "the streamer does not hold its slot"
    return int(row[0])


def _write_wal(cluster: EphemeralCluster, until_retained: int) -> int:
    """Write WAL on the server (rows into a table) until the slot retains that much."""
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS wal_filler (g int, pad text)")
    while (retained := _retained(cluster)) <= until_retained:
        with cluster.connect() as conn:
            conn.execute("INSERT INTO wal_filler SELECT g, repeat('x', 200) "
                         "FROM generate_series(1, 20000) g")
    return retained


@pytest.fixture
def wal_cluster(prefect_server: PrefectServer, deployed: dict[str, Any],
                tmp_path: Path) -> Iterator[tuple[EphemeralCluster, Path]]:
    """A streamed cluster deployed as an operator would (the WAL streamer runs on the
    module's worker), and retired at the end (streamer stopped, slot dropped)."""
    cluster = EphemeralCluster(find_toolset(MAJOR), settings={
        "fsync": "off", "wal_sender_timeout": "5min"}).start()
    spool = tmp_path / "spool"
    write_key_file(tmp_path / "k", MasterKey.generate())
    (tmp_path / "store").mkdir()
    config, limit_gb = tmp_path / "cluster.toml", RETAINED_LIMIT / 1e9
    config.write_text(config_head(POOL, tmp_path / "k", tmp_path / "store", cluster,
                                  "HC_WAL_PASSWORD") + textwrap.dedent(f"""
        [notify]
        block = ["custom-webhook/hc-hook", "pgbackflow-smtp-email/hc-mail"]
        on_failure = ["wal"]
        on_success = ["wal"]
        [clusters.{WAL_ID}]
        server = "pg"
        storages = ["local"]
        full = "monthly"
        incremental = ""
        spool_dir = "{spool}"
        health_check = "1h"
        notify = {{ slot_retained_gb = {limit_gb}, wal_stalled_minutes = {STALLED_MINUTES} }}
    """))
    env = {"HC_WAL_PASSWORD": cluster.password}
    try:
        result = prefect_server.run_cli("deploy", "--config", str(config), env=env)
        assert f"started WAL streamer {WAL_ID}" in result.stdout, result.stdout
        assert f"+ automation pgbackflow health wal problem: {WAL_ID}" in result.stdout
        assert f"+ automation pgbackflow health wal recovered: {WAL_ID}" in result.stdout
        prefect_server.wait_for("the WAL streamer's pg_receivewal",
                                lambda: _receivewal_pids(spool), 120, 0.5)
        yield cluster, spool
    finally:
        for pid in _receivewal_pids(spool):
            os.kill(pid, signal.SIGCONT)
        prefect_server.run_cli("physical-retire", "--db-id", WAL_ID, "--yes", timeout=180,
                               check=False)
        cluster.stop()


def _run_check(server: PrefectServer) -> dict[str, Any]:
    """One run of the cluster's health-check deployment (with the config's thresholds),
    started now rather than by its hourly schedule; its end state."""
    with server.http() as http:
        deployment = http.get(f"deployments/name/health-check/health-{WAL_ID}").json()
    for _ in range(3):  # a run due by the schedule at the same moment cancels ours
        with server.http() as http:
            created = http.post(f"deployments/{deployment['id']}/create_flow_run", json={})
            assert created.status_code == 201, created.text
            run_id = created.json()["id"]

        def ended(run_id: str = run_id) -> dict[str, Any] | None:
            with server.http() as http:
                response = http.get(f"flow_runs/{run_id}")
            if response.status_code != 200:  # seen at load 20: an error answer; ask again
                print(f"GET flow_runs/{run_id}: {response.status_code} {response.text[:200]}")
                return None
            run: dict[str, Any] = response.json()
            return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED",
                                                   "CANCELLED") else None

        run: dict[str, Any] = server.wait_for(f"health check {run_id}", ended, CHECK_S, 0.5)
        if run["state"]["type"] != "CANCELLED":
            assert run["state"]["type"] == "COMPLETED", run["state"]
            return run
    pytest.fail("three health checks of the WAL cluster were cancelled", pytrace=False)


def test_stalled_wal_and_a_slot_retaining_too_much_notify_once_and_their_recovery_once(
    prefect_server: PrefectServer, site: Site,
    wal_cluster: tuple[EphemeralCluster, Path],
) -> None:
    """The real WAL streamer deployment stops receiving (its pg_receivewal frozen) while
    the test writes WAL on the server: the health check (its deployment, the config's
    thresholds) reports the stall once, and its end once when the streamer goes on; then
    the slot retains more than the limit: once, and its end once. Four messages per
    receiver, however many checks run."""
    cluster, spool = wal_cluster

    def about(via: str) -> list[Message]:
        return site.receivers.inbox.about(f"WAL of {WAL_ID}", via)

    def expect(count: int, what: str) -> None:
        for via in ("webhook", "smtp"):
            prefect_server.wait_for(f"{what} over {via}",
                                    lambda via=via: len(about(via)) >= count, 30, 0.2)

    def caught_up() -> None:
        prefect_server.wait_for("the streamer to catch up",
                                lambda: _retained(cluster) < 16 * 1024 * 1024, 60, 0.5)

    _run_check(prefect_server)  # the slot moves: nothing to say
    assert not about("webhook")

    (receivewal,) = _receivewal_pids(spool)
    os.kill(receivewal, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        retained = _write_wal(cluster, 20_000_000)
        assert retained < RETAINED_LIMIT, retained
        _run_check(prefect_server)  # remembers where the slot stands (and since when)
        time.sleep(max(0.0, STALLED_MINUTES * 60 + 1 - (time.monotonic() - stopped)))
        _run_check(prefect_server)
        expect(1, "the stalled-WAL notification")
        _run_check(prefect_server)  # still stalled: nothing new
    finally:
        os.kill(receivewal, signal.SIGCONT)
    for via in ("webhook", "smtp"):
        (stalled,) = about(via)
        assert stalled.subject.startswith(f"pgbackflow: WAL of {WAL_ID}: no WAL received "
                                          "for "), stalled.subject
        assert "while the server wrote" in stalled.subject
        assert stalled.fields()["slot"] == "pgbackflow (active: True)"
    caught_up()
    _run_check(prefect_server)
    expect(2, "the WAL recovery notification")

    os.kill(receivewal, signal.SIGSTOP)
    try:
        assert _write_wal(cluster, RETAINED_LIMIT + 10_000_000) > RETAINED_LIMIT
        _run_check(prefect_server)
        expect(3, "the retained-WAL notification")
    finally:
        os.kill(receivewal, signal.SIGCONT)
    caught_up()
    _run_check(prefect_server)
    expect(4, "the second WAL recovery notification")
    _run_check(prefect_server)  # all well: nothing new
    time.sleep(3)
    for via in ("webhook", "smtp"):
        subjects = [m.subject for m in about(via)]
        assert len(subjects) == 4, subjects
        assert subjects[1] == subjects[3] == f"pgbackflow: WAL of {WAL_ID} recovered"
        assert subjects[2].startswith(f"pgbackflow: WAL of {WAL_ID}: slot pgbackflow "
                                      "retains 0.0"), subjects[2]
        assert "(limit 0.05 GB)" in subjects[2]
    # The same streamer run shipped on: pg_receivewal was only paused.
    assert _receivewal_pids(spool) == [receivewal]
