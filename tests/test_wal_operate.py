"""The WAL streamer as a Prefect citizen, on a real server, worker and PostgreSQL 17.

One long-running run per cluster; automations start it again when it crashes (kill -9),
fails (server down past its retries) or its host is lost (the processes frozen: no
heartbeats, marked Crashed). No stream of Cancelled runs.
``physical-retire`` stops it for good and drops the replication slot.
Restart delays are printed (``-s`` shows them) and bounded by the issue's targets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import MasterKey, write_key_file
from pgbackflow.tasks.toolsets import find_toolset
from tests.fixtures.deploy_config import config_head
from tests.fixtures.prefect_server import (
    PrefectServer,
    flow_run_pids,
    postgres_backed_prefect_server,
)

POOL = "e2e-wal"
DB_ID = "walcluster"

pytestmark = [pytest.mark.pg, pytest.mark.slow]


def _streamer_runs(server: PrefectServer, deployment_id: str) -> list[dict[str, Any]]:
    with server.http() as http:
        runs: list[dict[str, Any]] = http.post("flow_runs/filter", json={
            "deployments": {"id": {"any_": [deployment_id]}}, "sort": "START_TIME_ASC",
        }).json()
    return runs


def _slot(cluster: EphemeralCluster) -> tuple[Any, ...] | None:
    with cluster.connect() as conn:
        return conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'pgbackflow'"
        ).fetchone()


@pytest.fixture(scope="module")
def wal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A server of its own, on PostgreSQL as in production (README "Operate"): its timing
    (heartbeats, automations) is not skewed by earlier tests, nor by SQLite's "database is
    locked", on which the server drops or delays the events the restarts react to (a
    66 s restart after kill -9 was seen in CI)."""
    with postgres_backed_prefect_server(tmp_path_factory.mktemp("wal-prefect-home")) as server:
        yield server


@pytest.fixture(scope="module")
def wal_site(
    wal_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[EphemeralCluster, dict[str, Any], Path]]:
    root = tmp_path_factory.mktemp("wal-operate")
    cluster = EphemeralCluster(find_toolset(17), settings={
        "fsync": "off", "wal_sender_timeout": "10s",
    }).start()
    key_file = root / "master.key"
    write_key_file(key_file, MasterKey.generate())
    (root / "store").mkdir()
    config = root / "pgbackflow.toml"
    config.write_text(config_head(POOL, key_file, root / "store", cluster, "E2E_WAL_PASSWORD")
                      + textwrap.dedent(f"""
        [clusters.{DB_ID}]
        server = "pg"
        storages = ["local"]
        full = "monthly"
        incremental = "hourly"
        spool_dir = "{root / 'spool'}"
    """))
    env = {"E2E_WAL_PASSWORD": cluster.password}
    try:
        result = wal_server.run_cli("deploy", "--config", str(config), env=env)
        assert f"started WAL streamer {DB_ID}" in result.stdout, result.stdout
        with wal_server.http() as http:
            deployment = http.get(f"deployments/name/wal-stream/wal-stream-{DB_ID}").json()
        assert deployment["schedules"] == []
        wal_server.start_worker(POOL, root / "worker", name="wal-worker")
        yield cluster, deployment, root
    finally:
        wal_server.stop_workers()
        cluster.stop()


def _wait_running(server: PrefectServer, deployment_id: str, other_than: set[str],
                  timeout: float) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        for run in _streamer_runs(server, deployment_id):
            if run["id"] not in other_than and run["state"]["type"] == "RUNNING":
                return run
        return None

    run: dict[str, Any] = server.wait_for("a running WAL streamer", check, timeout, 0.5)
    return run


def test_killed_or_failed_streamer_is_started_again(
    wal_server: PrefectServer, wal_site: tuple[EphemeralCluster, dict[str, Any], Path]
) -> None:
    cluster, deployment, root = wal_site
    first = _wait_running(wal_server, deployment["id"], set(), 120)
    wal_server.wait_for("the streamer to hold the slot",
                            lambda: (_slot(cluster) or (None,))[0], 60)
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 100000) g")
        conn.execute("SELECT pg_switch_wal()")
    wal_server.wait_for(
        "a shipped WAL segment",
        lambda: list((root / "store").rglob("*.pgbf")) and any(
            "wal" in str(p) for p in (root / "store").rglob("*")), 60,
    )

    # kill -9 of the flow process (pg_receivewal dies with it: parent-death signal).
    pids = flow_run_pids(first["id"])
    assert pids, "the streamer's process was not found"
    killed_at = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    try:
        second = _wait_running(wal_server, deployment["id"], {first["id"]}, 60)
        restart_s = time.monotonic() - killed_at
        print(f"\nWAL streamer restart after kill -9: {restart_s:.1f} s")
        assert restart_s < 60
        states = {r["id"]: r["state"]["type"] for r in _streamer_runs(wal_server,
                                                                       deployment["id"])}
        assert states[first["id"]] == "CRASHED"
    except BaseException:
        print(_timeline(wal_server, first["start_time"], first["id"]))
        print(_runs_table(wal_server, deployment["id"]))
        raise

    # The server is down longer than the run's retries: the run fails, and a new one is
    # started a minute later (not at once, so a streamer that cannot work is no storm).
    cluster.halt()
    try:
        wal_server.wait_for(
            "the streamer run to fail",
            lambda: next(r for r in _streamer_runs(wal_server, deployment["id"])
                         if r["id"] == second["id"])["state"]["type"] == "FAILED", 120,
        )
        failed_at = time.monotonic()
    finally:
        cluster.resume()
    third = _wait_running(wal_server, deployment["id"], {first["id"], second["id"]}, 150)
    print(f"WAL streamer started again after a failure: {time.monotonic() - failed_at:.1f} s")
    runs = _streamer_runs(wal_server, deployment["id"])
    states = {r["id"]: r["state"]["type"] for r in runs}
    assert states[second["id"]] == "FAILED"
    assert states[third["id"]] == "RUNNING"
    # One run per streamer lifetime, no stream of Cancelled runs: only duplicate starts end
    # Cancelled at once. Two restart automations may answer the same outage; and on the
    # SQLite-backed server a trigger's write that meets "database is locked" makes the server
    # evaluate the whole event again, so a reactive restart already evaluated for it fires
    # again (seen: three starts for one Failed event, two ended Cancelled).
    cancelled = [s for s in states.values() if s == "CANCELLED"]
    assert len(cancelled) <= 3
    assert len(runs) - len(cancelled) == 3


def _runs_table(server: PrefectServer, deployment_id: str) -> str:
    """Every streamer run with its state history (for failures)."""
    lines = []
    with server.http() as http:
        for run in _streamer_runs(server, deployment_id):
            history = http.get("flow_run_states/", params={"flow_run_id": run["id"]}).json()
            steps = ", ".join(f"{h['timestamp'][11:23]} {h['type']} {h['name']}"
                              f"{' (' + h['message'][:80] + ')' if h.get('message') else ''}"
                              for h in sorted(history, key=lambda h: h["timestamp"]))
            lines.append(f"run {run['id']} {run['name']}: {steps}")
    return "\n".join(lines)


def _events(server: PrefectServer, since: str, prefixes: list[str],
            resource_prefix: str | None = None) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"filter": {"occurred": {"since": since},
                                       "event": {"prefix": prefixes}, "order": "ASC"},
                            "limit": 50}
    if resource_prefix:
        body["filter"]["any_resource"] = {"id_prefix": [resource_prefix]}
    with server.http() as http:
        page = http.post("events/filter", json=body).json()
    events: list[dict[str, Any]] = page["events"]
    return events


def _timeline(server: PrefectServer, since: str, run_id: str) -> str:
    """A run's flow-run events and all automation and pgbackflow events (for failures)."""
    lines = []
    for event in (_events(server, since, ["prefect.flow-run."], f"prefect.flow-run.{run_id}")
                  + _events(server, since, ["prefect.automation.", "pgbackflow."])):
        ids = [event["resource"]["prefect.resource.id"]] + [
            r["prefect.resource.id"] for r in event.get("related", [])]
        if event["event"].startswith("prefect.flow-run.") and f"prefect.flow-run.{run_id}" \
                not in ids:
            continue
        lines.append(f"{event['occurred']} recv {event.get('received')} {event['event']} "
                     f"{event['resource'].get('prefect.resource.name', '')} "
                     f"{event['resource']['prefect.resource.id'][:60]} "
                     f"{event.get('payload', {}).get('reason', '')}")
    return "\n".join(lines)


def test_a_frozen_streamer_host_is_noticed_and_replaced(
    wal_server: PrefectServer, wal_site: tuple[EphemeralCluster, dict[str, Any], Path]
) -> None:
    """A lost host, simulated by SIGSTOP of the streamer run's processes: no heartbeats, no
    alive events, the process neither exits nor answers. Heartbeats come every 30 s; without
    one for 2 minutes the run is marked Crashed, and the crash starts a new streamer."""
    cluster, deployment, _ = wal_site
    running = _wait_running(wal_server, deployment["id"], set(), 120)
    holder = wal_server.wait_for("the streamer to hold the slot",
                                 lambda: (_slot(cluster) or (None,))[0], 60)
    # Streaming for a while (heartbeats sent), as a host that is lost in normal operation.
    time.sleep(35)
    earlier = {r["id"] for r in _streamer_runs(wal_server, deployment["id"])}
    pids = flow_run_pids(running["id"])
    assert pids, "the streamer's processes were not found"
    frozen_at = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        def crashed() -> bool:
            runs = {r["id"]: r for r in _streamer_runs(wal_server, deployment["id"])}
            return bool(runs[running["id"]]["state"]["type"] == "CRASHED")

        deadline = frozen_at + 300
        wal_server.wait_for("the frozen streamer to be marked Crashed", crashed,
                            deadline - time.monotonic(), 1)
        noticed_s = time.monotonic() - frozen_at
        replacement = _wait_running(wal_server, deployment["id"], earlier,
                                    max(1.0, deadline - time.monotonic()))
        replaced_s = time.monotonic() - frozen_at
        # The new streamer takes the slot once the server drops the frozen walsender
        # (wal_sender_timeout).
        wal_server.wait_for("the new streamer to take the slot",
                            lambda: (_slot(cluster) or (None,))[0] not in (None, holder), 120)
        with wal_server.http() as http:
            message = http.get(f"flow_runs/{running['id']}").json()["state"]["message"]
        print(f"\nWAL streamer host frozen: marked Crashed after {noticed_s:.1f} s "
              f"({message}), a new streamer running after {replaced_s:.1f} s")
        assert replacement["id"] not in earlier
        assert replaced_s < 300
    except BaseException:
        print(_timeline(wal_server, running["start_time"], running["id"]))
        raise
    finally:
        for pid in pids:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
    wal_server.wait_for("the frozen processes to be gone",
                        lambda: not flow_run_pids(running["id"]), 30)


def test_retire_drops_the_slot(
    wal_server: PrefectServer, wal_site: tuple[EphemeralCluster, dict[str, Any], Path]
) -> None:
    cluster, deployment, _ = wal_site
    _wait_running(wal_server, deployment["id"], set(), 120)
    wal_server.wait_for("the streamer to hold the slot",
                            lambda: (_slot(cluster) or (None,))[0], 60)
    refused = wal_server.run_cli("physical-retire", "--db-id", DB_ID, check=False)
    assert refused.returncode == 1 and "not retired" in refused.stderr
    assert _slot(cluster) is not None
    result = wal_server.run_cli("physical-retire", "--db-id", DB_ID, "--yes", timeout=180)
    assert "dropped replication slot 'pgbackflow'" in result.stdout, result.stdout
    assert _slot(cluster) is None
    with wal_server.http() as http:
        for name in (f"wal-stream/wal-stream-{DB_ID}", f"full-backup/full-{DB_ID}",
                     f"incremental-backup/incremental-{DB_ID}"):
            assert http.get(f"deployments/name/{name}").json()["paused"] is True
        automations = http.post("automations/filter", json={}).json()
    mine = [a for a in automations if a["name"].endswith(f": {DB_ID}")]
    assert mine and all(not a["enabled"] for a in mine)
    wal_server.wait_for(
        "the streamer run to end Cancelled",
        lambda: not [r for r in _streamer_runs(wal_server, deployment["id"])
                     if r["state"]["type"] in ("RUNNING", "PENDING", "SCHEDULED", "CANCELLING")],
        60,
    )
