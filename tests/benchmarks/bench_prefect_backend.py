"""Benchmark: 50 backups on a SQLite-backed vs a PostgreSQL-backed Prefect server, one run.

The scale-out setup of tests/test_scale_out.py: 50 small databases on 3 PostgreSQL 17
servers (``max_concurrent_backups`` 2 each), one config deployed with ``pgbackflow deploy``,
two ``pgbackflow worker`` processes (``--limit 3`` each). For each backend in turn, a fresh
``prefect server start`` (SQLite in its home, or PostgreSQL through
``PREFECT_API_DATABASE_CONNECTION_URL``), a fresh storage folder, the 50 runs created at once
over the REST API (as the scheduler does when 50 schedules share a minute), and measured:

- ``wall_s``: from the first run created to the last one in a final state;
- ``completed`` / ``not_completed``: runs by final state;
- ``api_503``: requests the server answered 503 (retryable: "database is locked", timeouts),
  counted from its log (``PREFECT_API_LOG_RETRYABLE_ERRORS``); ``api_500``: other errors;
- ``client_lines``: lines in the workers' output (flow-run logs included) naming 429, 503 or
  "database is locked"; ``create_503`` / ``create_timeouts``: 503 answers and 60 s read
  timeouts of the benchmark's own run creations (retried, as a script would);
  ``create_failed``: runs still not created after 5 minutes of retries.

Usage: .venv/bin/python -m tests.benchmarks.bench_prefect_backend [--databases 50]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import MasterKey, write_key_file
from tests.fixtures.prefect_server import (
    PrefectServer,
    postgres_backed_prefect_server,
    running_prefect_server,
)
from tests.test_scale_out import SERVERS, build_fleet, scale_config, start_worker

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
#: The server logs each request it answers 503 with this (PREFECT_API_LOG_RETRYABLE_ERRORS).
SERVER_ENV = {"PREFECT_API_LOG_RETRYABLE_ERRORS": "true"}
CLIENT_ERRORS = re.compile(r"\b(429|503)\b|database is locked", re.IGNORECASE)


@contextmanager
def prefect_backend(kind: str, home: Path) -> Iterator[PrefectServer]:
    """A fresh server on ``kind`` ("sqlite" or "postgres")."""
    if kind == "sqlite":
        with running_prefect_server(home, SERVER_ENV) as server:
            yield server
    else:
        with postgres_backed_prefect_server(home, SERVER_ENV) as server:
            yield server


def run_backend(kind: str, root: Path, clusters: list[EphemeralCluster],
                databases: dict[str, int], key_file: Path) -> dict[str, Any]:
    """Deploy, start two workers, create the 50 runs at once; the measures."""
    home = root / kind / "prefect"
    home.mkdir(parents=True)
    store = root / kind / "store"
    config = root / kind / "pgbackflow.toml"
    # A schedule that never fires during the run: the runs are created below, all at once.
    config.write_text(scale_config(key_file, store, clusters, databases, "0 3 1 1 *"))
    env = {f"SCALE_PG{i}_PASSWORD": c.password for i, c in enumerate(clusters)}
    with prefect_backend(kind, home) as server:
        server.run_cli("deploy", "--config", str(config), env=env, timeout=900)
        with server.http() as http:
            ids = [d["id"] for d in http.post("deployments/filter", json={}).json()
                   if d["name"].startswith("logical-")]
        assert len(ids) == len(databases), ids
        workers = [root / kind / name for name in ("w1", "w2")]
        for folder in workers:
            start_worker(server, folder, folder.name)
        started = time.monotonic()
        create_503 = create_timeouts = create_failed = 0
        created: list[str] = []
        with httpx.Client(base_url=server.api_url + "/", timeout=60) as http:
            for deployment_id in ids:
                # As a script would: retry 503s and timeouts (counted) for up to 5 minutes,
                # with an idempotency key so that a retry never makes a second run; a run
                # still not created then is counted and the benchmark goes on.
                deadline = time.monotonic() + 300
                body = {"idempotency_key": f"bench-{deployment_id}"}
                while True:
                    try:
                        response = http.post(f"deployments/{deployment_id}/create_flow_run",
                                             json=body)
                    except httpx.TimeoutException:
                        create_timeouts += 1
                        if time.monotonic() > deadline:
                            create_failed += 1
                            break
                        continue
                    if response.status_code != 503:
                        response.raise_for_status()
                        created.append(response.json()["id"])
                        break
                    create_503 += 1
                    if time.monotonic() > deadline:
                        create_failed += 1
                        break
                    time.sleep(1)

        # Every created run in a final state, or what there is after 30 minutes.
        wait_deadline = time.monotonic() + 1800
        while True:
            # Only the runs made above: the scheduler adds the deployments' next (yearly) runs.
            try:
                with server.http() as http:
                    found = http.post("flow_runs/filter", json={
                        "flow_runs": {"id": {"any_": created}}, "limit": 200}).json()
                runs = [r for r in found if isinstance(r, dict)]
            except httpx.HTTPError:  # the API not answering is measured, not fatal
                runs = []
            if (runs and all(r["state"]["type"] in FINAL for r in runs)) or \
                    time.monotonic() > wait_deadline:
                break
            time.sleep(2)
        wall = time.monotonic() - started
        server.stop_workers()
        server_log = server.log.read_text(errors="replace")
        client_lines = sum(len(CLIENT_ERRORS.findall((f / "out.log").read_text(errors="replace")))
                           for f in workers)
    states = Counter(r["state"]["type"] for r in runs)
    return {
        "backend": kind, "runs": len(runs), "wall_s": round(wall, 1),
        "completed": states.get("COMPLETED", 0),
        "not_completed": {k: v for k, v in states.items() if k != "COMPLETED"},
        "api_503": server_log.count("Encountered retryable exception in request"),
        "api_500": server_log.count("Encountered exception in request"),
        "client_lines": client_lines, "create_503": create_503,
        "create_timeouts": create_timeouts, "create_failed": create_failed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", type=int, default=50)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"],
                        choices=["sqlite", "postgres"])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-prefect-backend-") as tmp:
        root = Path(tmp)
        clusters: list[EphemeralCluster] = []
        try:
            databases = {f"db{n:02d}": n % SERVERS for n in range(args.databases)}
            build_fleet(clusters, databases)
            key_file = root / "master.key"
            write_key_file(key_file, MasterKey.generate())
            for kind in args.backends:
                result = run_backend(kind, root, clusters, databases, key_file)
                print(json.dumps(result), flush=True)
                results.append(result)
        finally:
            for cluster in clusters:
                cluster.stop()
    print(f"{'backend':10} {'runs':>5} {'wall s':>7} {'done':>5} {'503':>5} {'500':>5} "
          f"{'client':>6} {'create503':>9} {'timeouts':>8} {'not created':>11}")
    for r in results:
        print(f"{r['backend']:10} {r['runs']:>5} {r['wall_s']:>7} {r['completed']:>5} "
              f"{r['api_503']:>5} {r['api_500']:>5} {r['client_lines']:>6} "
              f"{r['create_503']:>9} {r['create_timeouts']:>8} {r['create_failed']:>11}")


if __name__ == "__main__":
    main()
