"""Benchmark: `pgbackflow verify` vs doing the same by hand, measured in one run.

On one database (default: pgbench scale 50 + 2.5 M jsonb rows, ~1.2 GB) backed up once with
pgbackflow, times:

* bare: initdb + start a cluster, ``pg_restore -j N`` of the plain dump file, exact
  ``count(*)`` of every table, stop and remove the cluster;
* the restore-verification flow with the local sandbox;
* the restore-verification flow with the Docker sandbox (``postgres:<major>``).

Each flow run is its own process against an already running Prefect API. Target: ≤ 1.2x.

Usage: .venv/bin/python -m tests.benchmarks.bench_verification [--scale 50] [--major 17]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.inventory import take_inventory
from pgbackflow.tasks.sandbox import THROWAWAY_SETTINGS
from pgbackflow.tasks.toolsets import find_toolset
from tests.benchmarks.bench_logical_backup import build_database, run_child

VERIFY_CHILD = """
import json, sys, time
from pgbackflow.blocks import LocalStorage
from pgbackflow.flows.verification import restore_verification
from prefect import flow

@flow
def warm_up():
    return 1

warm_up()
args = json.loads(sys.argv[1])
from pgbackflow.flows.common import cli_heartbeats  # as the CLI runs flows
with cli_heartbeats():
    started = time.perf_counter()
    report = restore_verification(LocalStorage(folder=args["folder"]), sandbox=args["sandbox"],
                                  cpus=args["cpus"], memory_mb=args["memory_mb"],
                                  key_file=args["key_file"])
print(json.dumps({"seconds": time.perf_counter() - started, "status": report.status}))
"""


def bare_verification(major: int, dump_file: Path, jobs: int) -> float:
    """initdb + pg_restore -j + count every table + teardown, by hand."""
    toolset = find_toolset(major)
    settings = {k: v for k, v in THROWAWAY_SETTINGS.items()
                if k != "summarize_wal" or major >= 17}
    started = time.perf_counter()
    with EphemeralCluster(toolset, settings=settings) as cluster:
        with cluster.connect() as conn:
            conn.execute("CREATE DATABASE restored")
        subprocess.run(
            [str(toolset.binary("pg_restore")), "-h", cluster.host, "-p", str(cluster.port),
             "-U", cluster.superuser, "-d", "restored", f"--jobs={jobs}", "--no-tablespaces",
             str(dump_file)],
            env={**os.environ, "PGPASSWORD": cluster.password}, check=True,
        )
        with cluster.connect("restored") as conn:
            take_inventory(conn)
    return time.perf_counter() - started


def main() -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=50)
    parser.add_argument("--jsonb-rows", type=int, default=2_500_000)
    parser.add_argument("--major", type=int, default=17)
    parser.add_argument("--cpus", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=2)
    options = parser.parse_args()

    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from pgbackflow.tasks.keys import Keyring, MasterKey, write_key_file
    from pgbackflow.tasks.manifest import list_backups
    from pgbackflow.tasks.storage import LocalFolderStorage
    from pgbackflow.tasks.verify import spool_dump

    work = Path(tempfile.mkdtemp(prefix="pgbackflow-bench-verify-"))
    key = MasterKey.generate()
    key_file = work / "bench.key"
    write_key_file(key_file, key)
    jobs = max(1, int(options.cpus))
    toolset = find_toolset(options.major)
    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
               "PREFECT_LOGGING_LEVEL": "WARNING"}
        with EphemeralCluster(toolset) as cluster:
            print(f"building the database on PostgreSQL {toolset.version} ...", flush=True)
            size = build_database(cluster, "big", options.scale, options.jsonb_rows)
            run_child(cluster, "big", str(work / "backups"), key_file, None, env)
        storage = LocalFolderStorage(work / "backups")
        manifest = list_backups(storage)[-1]
        dump_file = work / "plain.dump"
        spool_dump(storage, manifest, Keyring([key]), dump_file)

        results: dict[str, float] = {"bare": float("inf"), "local": float("inf"),
                                     "docker": float("inf")}
        for _ in range(options.repeat):
            results["bare"] = min(results["bare"], bare_verification(options.major, dump_file,
                                                                     jobs))
            for sandbox in ("local", "docker"):
                args: dict[str, Any] = {"folder": str(work / "backups"), "sandbox": sandbox,
                                        "cpus": options.cpus, "memory_mb": 4096,
                                        "key_file": str(key_file)}
                out = subprocess.run([sys.executable, "-c", VERIFY_CHILD, json.dumps(args)],
                                     env=env, check=True, capture_output=True, text=True)
                run = json.loads(out.stdout.strip().splitlines()[-1])
                assert run["status"] == "Successful", run
                results[sandbox] = min(results[sandbox], float(run["seconds"]))

    print(f"\ndatabase {size / 1e9:.2f} GB, pg_restore -j {jobs}, best of {options.repeat}")
    print(f"{'bare initdb + pg_restore + counts':40} {results['bare']:8.2f} s")
    print(f"{'pgbackflow verify --sandbox local':40} {results['local']:8.2f} s  "
          f"{results['local'] / results['bare']:.2f}x (target ≤ 1.2)")
    print(f"{'pgbackflow verify --sandbox docker':40} {results['docker']:8.2f} s  "
          f"{results['docker'] / results['bare']:.2f}x (target ≤ 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
