"""Benchmark: how long a deployment run of a tiny database takes, created → Completed.

What an operator waits for after pressing "Run" in the UI or calling the REST API: a warm
``pgbackflow worker`` (already polling), one logical-backup deployment of a database of 100
rows deployed from a config, and runs created one at a time over the REST API
(``POST /deployments/{id}/create_flow_run``), each awaited before the next. From each run's
state history (the server's timestamps):

- ``pickup``: created (Scheduled) → Pending: the worker's poll
  (``PREFECT_WORKER_QUERY_SECONDS``, Prefect's default 10 s);
- ``start``: Pending → Running: the flow-run process starts (Python, Prefect, the flow's
  module) and reports in;
- ``run``: Running → Completed: the backup itself, its artifacts and states;
- ``total``: created → Completed. Target (issue 15): ≤ 5 s.

Each ``--query-seconds`` value gets a worker of its own (the earlier one stopped first).
Medians and maxima over ``--runs`` runs are printed, one line per setting.
By default the pool is the one ``pgbackflow deploy`` creates: its flow-run command is
``<python> -m pgbackflow.engine``, Prefect's engine run in the warm daemon the worker's first
run starts (the runs timed come after that warm-up run). ``--engine-command``: the pool's
command is Prefect's engine in a fresh interpreter per run (``<python> -m prefect.engine``,
as test_scale_out sets it).

Usage: .venv/bin/python -m tests.benchmarks.bench_run_latency [--runs 5]
       [--query-seconds 10 5 2 1] [--backend postgres|sqlite] [--engine-command]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from psycopg import sql

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import MasterKey, write_key_file
from pgbackflow.tasks.toolsets import find_toolset
from tests.fixtures.prefect_server import (
    BIN,
    PrefectServer,
    postgres_backed_prefect_server,
    running_prefect_server,
)
from tests.test_scale_out import create_pool, scale_config, start_worker

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
DATABASE = "tiny"


@contextmanager
def prefect_backend(kind: str, home: Path) -> Iterator[PrefectServer]:
    """A fresh server on ``kind`` ("postgres", as the stack runs it, or "sqlite")."""
    factory = postgres_backed_prefect_server if kind == "postgres" else running_prefect_server
    with factory(home) as server:
        yield server


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def stage_seconds(states: list[dict[str, Any]]) -> dict[str, float]:
    """pickup / start / run / total from one run's state history (server timestamps)."""
    first: dict[str, datetime] = {}
    for state in sorted(states, key=lambda s: s["timestamp"]):
        first.setdefault(state["type"], _at(state["timestamp"]))
    created, pending = first["SCHEDULED"], first["PENDING"]
    running, completed = first["RUNNING"], first["COMPLETED"]
    return {
        "pickup": (pending - created).total_seconds(),
        "start": (running - pending).total_seconds(),
        "run": (completed - running).total_seconds(),
        "total": (completed - created).total_seconds(),
    }


def run_once(server: PrefectServer, deployment_id: str) -> dict[str, float]:
    """Create one run over the REST API, wait for its end, return its stage times."""
    with server.http() as http:
        run_id = http.post(f"deployments/{deployment_id}/create_flow_run", json={}).json()["id"]
    deadline = time.monotonic() + 300
    while True:
        with server.http() as http:
            run = http.get(f"flow_runs/{run_id}").json()
        if run["state"]["type"] in FINAL or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if run["state"]["type"] != "COMPLETED":
        raise RuntimeError(f"run {run_id} ended {run['state']['type']}: "
                           f"{run['state'].get('message')}")
    with server.http() as http:
        states = http.get("flow_run_states/", params={"flow_run_id": run_id}).json()
    return stage_seconds(states)


def measure(kind: str, runs: int, query_seconds: list[float],
            engine_command: bool = False) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-run-latency-") as tmp:
        root = Path(tmp)
        cluster = EphemeralCluster(find_toolset(17), password=secrets.token_hex(12),
                                   settings={"fsync": "off"}).start()
        try:
            with cluster.connect() as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
            with cluster.connect(DATABASE) as conn:
                conn.execute("CREATE TABLE t AS SELECT generate_series(1, 100) AS id")
            key_file = root / "master.key"
            write_key_file(key_file, MasterKey.generate())
            config = root / "pgbackflow.toml"
            # A schedule that never fires while this runs: the runs are created below.
            config.write_text(scale_config(key_file, root / "store", [cluster],
                                           {DATABASE: 0}, "0 3 1 1 *"))
            home = root / "prefect"
            home.mkdir()
            with prefect_backend(kind, home) as server:
                # The daemons of this run (deploy's, the worker's) in a directory of its own.
                server.env["PGBACKFLOW_RUNTIME_DIR"] = str(root / "run")
                if engine_command:
                    create_pool(server)  # before deploy, which leaves a pool alone
                server.run_cli("deploy", "--config", str(config),
                               env={"SCALE_PG0_PASSWORD": cluster.password}, timeout=600)
                with server.http() as http:
                    deployment_id = next(
                        d["id"] for d in http.post("deployments/filter", json={}).json()
                        if d["name"] == f"logical-{DATABASE}")
                for seconds in query_seconds:
                    server.env["PREFECT_WORKER_QUERY_SECONDS"] = f"{seconds:g}"
                    start_worker(server, root / f"worker-{seconds:g}", f"w{seconds:g}")
                    run_once(server, deployment_id)  # warm: the first run imports cold
                    stages = [run_once(server, deployment_id) for _ in range(runs)]
                    server.stop_workers()
                    row: dict[str, Any] = {"backend": kind, "query_seconds": seconds,
                                           "runs": runs, "engine_command": engine_command}
                    for name in ("pickup", "start", "run", "total"):
                        values = [s[name] for s in stages]
                        row[name] = round(statistics.median(values), 2)
                        row[f"{name}_max"] = round(max(values), 2)
                    print(json.dumps(row), flush=True)
                    results.append(row)
        finally:
            cluster.stop()
            # deploy's CLI daemon (the worker's went with the worker); idle ones would exit.
            subprocess.run([str(BIN / "pgbackflow"), "daemon", "stop"], check=False,
                           capture_output=True,
                           env={**os.environ, "PGBACKFLOW_RUNTIME_DIR": str(root / "run")})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--query-seconds", type=float, nargs="+", default=[10, 5, 2, 1])
    parser.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--engine-command", action="store_true",
                        help="flow runs start as python -m prefect.engine (the pool's command)")
    args = parser.parse_args()
    results = measure(args.backend, args.runs, args.query_seconds, args.engine_command)
    command = ("python -m prefect.engine" if args.engine_command
               else "deploy's: python -m pgbackflow.engine (warm daemon)")
    print(f"\nmedian (max) seconds over {args.runs} runs, {args.backend} backend, flow-run "
          f"command: {command}; target: total ≤ 5 s")
    print(f"{'query s':>8} {'pickup':>13} {'start':>13} {'run':>13} {'total':>13}")
    for r in results:
        cells = " ".join(f"{r[n]:>6.2f} ({r[n + '_max']:>4.1f})"
                         for n in ("pickup", "start", "run", "total"))
        print(f"{r['query_seconds']:>8g} {cells}")


if __name__ == "__main__":
    main()
