"""WAL streamer restarts that wait minutes by design: a lost host is noticed (no heartbeat for
ZOMBIE_AFTER_S, 2 minutes) and replaced; a run failed past its retries is started again a
minute later, not at once. Real PostgreSQL-backed Prefect server, worker, PostgreSQL 17 (the
site: tests/fixtures/wal_site.py, one of this module's own).

Most of each test is waiting for a timer, with deadlines minutes wider than it: they run
beside other tests, started first so the waits overlap them (tests/fixtures/parallel.py,
``LONG_WAITS``). kill -9 (restarted at once, within 60 s) is tests/test_wal_operate.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from pgbackflow.tasks.cluster import EphemeralCluster
from tests.fixtures.prefect_server import PrefectServer, flow_run_pids
from tests.fixtures.wal_site import (
    settled_states,
    slot_holder,
    streamer_runs,
    timeline,
    wait_running,
)

pytestmark = [pytest.mark.pg, pytest.mark.slow]


def test_a_frozen_streamer_host_is_noticed_and_replaced(
    wal_server: PrefectServer, wal_site: tuple[EphemeralCluster, dict[str, Any], Path]
) -> None:
    """A lost host, simulated by SIGSTOP of the streamer run's processes: no heartbeats, no
    alive events, the process neither exits nor answers. Heartbeats come every 30 s; without
    one for 2 minutes the run is marked Crashed, and the crash starts a new streamer."""
    cluster, deployment, _ = wal_site
    running = wait_running(wal_server, deployment["id"], set(), 120)
    holder = wal_server.wait_for("the streamer to hold the slot",
                                 lambda: (slot_holder(cluster) or (None,))[0], 60)
    # Streaming for a while (heartbeats sent), as a host that is lost in normal operation.
    time.sleep(35)
    earlier = {r["id"] for r in streamer_runs(wal_server, deployment["id"])}
    pids = flow_run_pids(running["id"])
    assert pids, "the streamer's processes were not found"
    frozen_at = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        def crashed() -> bool:
            runs = {r["id"]: r for r in streamer_runs(wal_server, deployment["id"])}
            return bool(runs[running["id"]]["state"]["type"] == "CRASHED")

        deadline = frozen_at + 300
        wal_server.wait_for("the frozen streamer to be marked Crashed", crashed,
                            deadline - time.monotonic(), 1)
        noticed_s = time.monotonic() - frozen_at
        replacement = wait_running(wal_server, deployment["id"], earlier,
                                    max(1.0, deadline - time.monotonic()))
        replaced_s = time.monotonic() - frozen_at
        # The new streamer takes the slot once the server drops the frozen walsender
        # (wal_sender_timeout).
        wal_server.wait_for("the new streamer to take the slot",
                            lambda: (slot_holder(cluster) or (None,))[0] not in (None, holder), 120)
        with wal_server.http() as http:
            message = http.get(f"flow_runs/{running['id']}").json()["state"]["message"]
        print(f"\nWAL streamer host frozen: marked Crashed after {noticed_s:.1f} s "
              f"({message}), a new streamer running after {replaced_s:.1f} s")
        assert replacement["id"] not in earlier
        assert replaced_s < 300
    except BaseException:
        print(timeline(wal_server, running["start_time"], running["id"]))
        raise
    finally:
        for pid in pids:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
    wal_server.wait_for("the frozen processes to be gone",
                        lambda: not flow_run_pids(running["id"]), 30)


def test_failed_streamer_is_started_again_a_minute_later(
    wal_server: PrefectServer, wal_site: tuple[EphemeralCluster, dict[str, Any], Path]
) -> None:
    """The server is down longer than the run's retries: the run fails, and a new one is
    started a minute later (not at once, so a streamer that cannot work is no storm)."""
    cluster, deployment, _ = wal_site
    running = wait_running(wal_server, deployment["id"], set(), 120)
    earlier = {r["id"] for r in streamer_runs(wal_server, deployment["id"])}
    cluster.halt()
    try:
        wal_server.wait_for(
            "the streamer run to fail",
            lambda: next(r for r in streamer_runs(wal_server, deployment["id"])
                         if r["id"] == running["id"])["state"]["type"] == "FAILED", 120,
        )
        failed_at = time.monotonic()
    finally:
        cluster.resume()
    started = wait_running(wal_server, deployment["id"], earlier, 150)
    print(f"WAL streamer started again after a failure: {time.monotonic() - failed_at:.1f} s")
    # One run per streamer lifetime, no stream of Cancelled runs: only duplicate starts end
    # Cancelled, once a worker starts them. Two restart automations may answer the same
    # outage; and on the SQLite-backed server a trigger's write that meets "database is
    # locked" makes the server evaluate the whole event again, so a reactive restart already
    # evaluated for it fires again (seen: three starts for one Failed event, two ended
    # Cancelled).
    states = wal_server.wait_for("duplicate starts to end", lambda: settled_states(
        wal_server, deployment["id"]), 60)
    assert states[running["id"]] == "FAILED"
    assert states[started["id"]] == "RUNNING"
    new = [state for run_id, state in states.items() if run_id not in earlier]
    cancelled = [state for state in new if state == "CANCELLED"]
    assert len(cancelled) <= 3
    assert len(new) - len(cancelled) == 1
