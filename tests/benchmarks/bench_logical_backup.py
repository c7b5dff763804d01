"""Benchmark: pgbackflow logical backup vs bare pg_dump, measured in one run.

Builds a ~1.2 GB database (pgbench scale 50 + a 2.5 M-row jsonb table) on a throwaway
PostgreSQL, then times, on that same database:

* bare ``pg_dump -Fc -Z zstd:5 -f FILE``;
* the streaming pipeline alone (``tasks.logical.dump_database``, no Prefect) to a local folder;
* ``pgbackflow backup`` (the logical-backup flow) to a local folder;
* bare pg_dump + ``boto3 upload_file`` of that file to S3 (moto, local HTTP);
* ``pgbackflow backup`` to the same S3.

Each pgbackflow backup runs in its own process (flow call timed inside it, against an
already running Prefect API) and reports its peak RSS; a small database is backed up too,
to show that memory does not grow with database size. Prints ratios.

Usage: .venv/bin/python -m tests.benchmarks.bench_logical_backup [--scale 50] [--major 17]
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

import boto3
from moto.server import ThreadedMotoServer

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.toolsets import find_toolset

CHILD = """
import json, sys, time

def vm(field):
    # VmHWM/VmRSS belong to this process image; ru_maxrss would include the parent's RSS
    # at fork time (Linux carries it across execve).
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0

from pydantic import SecretStr
from pgbackflow.blocks import LocalStorage, PostgresDatabase, S3Storage
from pgbackflow.flows.logical_backup import logical_backup
args = json.loads(sys.argv[1])
db = PostgresDatabase(host=args["host"], port=args["port"], database=args["db"],
                      user=args["user"], password=SecretStr(args["password"]), sslmode="disable")
if args["target"].startswith("s3://"):
    bucket = args["target"][5:]
    storage = S3Storage(bucket=bucket, endpoint_url=args["endpoint"], region="us-east-1",
                        access_key_id="bench", secret_access_key=SecretStr("bench"))
else:
    storage = LocalStorage(folder=args["target"])
from prefect import flow

@flow
def warm_up():
    return 1

warm_up()  # Prefect's own start-up (client, settings, first run) is not the backup's cost
baseline = vm("VmRSS")
if args.get("pipeline_only"):
    # The data path without Prefect: pg_dump -> encryption -> storage, counts and globals.
    from pathlib import Path
    from pgbackflow.tasks.keys import load_key_file
    from pgbackflow.tasks.logical import dump_database
    from pgbackflow.tasks.toolsets import toolset_for_server
    settings = db.settings()
    toolset = toolset_for_server(args["major"])
    key = load_key_file(Path(args["key_file"]))
    started = time.perf_counter()
    result = dump_database(settings, toolset, [storage.open()], key, f"pipeline/{started}.pgbf")
    elapsed = time.perf_counter() - started
    print(json.dumps({"seconds": elapsed, "rss_mb": vm("VmHWM"), "baseline_mb": baseline,
                      "stored": result.write.info.stored_size}))
    sys.exit(0)
from pgbackflow.flows.common import cli_heartbeats  # as the CLI runs flows
with cli_heartbeats():
    started = time.perf_counter()
    report = logical_backup(db, [storage], key_file=args["key_file"])
    elapsed = time.perf_counter() - started
print(json.dumps({"seconds": elapsed, "rss_mb": vm("VmHWM"), "baseline_mb": baseline,
                  "stored": report.sizes.stored, "dump_s": report.duration_s}))
"""


def sh(cluster: EphemeralCluster, binary: str, *args: str) -> float:
    """Run a toolset binary against the cluster; return wall seconds."""
    env = {**os.environ, "PGPASSWORD": cluster.password}
    started = time.perf_counter()
    subprocess.run(
        [str(cluster.toolset.binary(binary)), "-h", cluster.host, "-p", str(cluster.port),
         "-U", cluster.superuser, *args],
        env=env, check=True, stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def build_database(cluster: EphemeralCluster, name: str, scale: int, jsonb_rows: int) -> int:
    """pgbench tables + a jsonb table; returns the database size in bytes."""
    with cluster.connect() as conn:
        conn.execute(f"CREATE DATABASE {name}")
    sh(cluster, "pgbench", "-i", "-q", "-s", str(scale), name)
    with cluster.connect(name) as conn:
        conn.execute(
            "CREATE TABLE events AS SELECT g AS id, jsonb_build_object("
            "'user', g % 10000, 'kind', (ARRAY['view','click','buy'])[1 + g % 3], "
            "'payload', md5(g::text), 'ts', now() - make_interval(secs => g)) AS doc "
            f"FROM generate_series(1, {jsonb_rows}) g"
        )
        conn.execute("VACUUM ANALYZE")
        row = conn.execute(f"SELECT pg_database_size('{name}')").fetchone()
    return int(row[0]) if row else 0


def run_child(cluster: EphemeralCluster, db: str, target: str, key_file: Path,
              endpoint: str | None, env: dict[str, str],
              pipeline_only: bool = False) -> dict[str, Any]:
    """One pgbackflow backup in a fresh process; its own timing and peak RSS."""
    args = {"host": cluster.host, "port": cluster.port, "db": db, "user": cluster.superuser,
            "password": cluster.password, "target": target, "key_file": str(key_file),
            "endpoint": endpoint, "pipeline_only": pipeline_only, "major": cluster.major}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env,
                         check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale (50 ≈ 750 MB)")
    parser.add_argument("--jsonb-rows", type=int, default=2_500_000)
    parser.add_argument("--major", type=int, default=17)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; best kept")
    options = parser.parse_args()

    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from pgbackflow.tasks.keys import MasterKey, write_key_file

    work = Path(tempfile.mkdtemp(prefix="pgbackflow-bench-"))
    key_file = work / "bench.key"
    write_key_file(key_file, MasterKey.generate())
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    endpoint = f"http://127.0.0.1:{moto._server.server_port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="bench", aws_secret_access_key="bench")

    toolset = find_toolset(options.major)
    with EphemeralCluster(toolset) as cluster, prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
               "PREFECT_LOGGING_LEVEL": "WARNING"}
        print(f"building the database (pgbench -s {options.scale} + {options.jsonb_rows} "
              f"jsonb rows) on PostgreSQL {toolset.version} ...", flush=True)
        size = build_database(cluster, "big", options.scale, options.jsonb_rows)
        small_size = build_database(cluster, "small", 1, 50_000)
        print(f"database: {size / 1e9:.2f} GB", flush=True)

        dump_file = work / "bare.dump"
        s3.create_bucket(Bucket="bare")
        s3.create_bucket(Bucket="ours")
        bare = upload = float("inf")
        ours_local: dict[str, Any] = {"seconds": float("inf")}
        ours_s3: dict[str, Any] = {"seconds": float("inf")}
        pipeline: dict[str, Any] = {"seconds": float("inf")}
        # Interleaved and best-of-N: a shared 2-core machine is noisy.
        for _ in range(options.repeat):
            bare = min(bare, sh(cluster, "pg_dump", "-Fc", "-Z", "zstd:5", "-f", str(dump_file),
                                "big"))
            run = run_child(cluster, "big", str(work / "local"), key_file, None, env)
            ours_local = min(ours_local, run, key=lambda r: float(r["seconds"]))
            run = run_child(cluster, "big", str(work / "pipeline"), key_file, None, env,
                            pipeline_only=True)
            pipeline = min(pipeline, run, key=lambda r: float(r["seconds"]))
            started = time.perf_counter()
            s3.upload_file(str(dump_file), "bare", "bare.dump")
            upload = min(upload, time.perf_counter() - started)
            run = run_child(cluster, "big", "s3://ours", key_file, endpoint, env)
            ours_s3 = min(ours_s3, run, key=lambda r: float(r["seconds"]))
            # moto keeps objects in memory: drop this round's so RSS and speed stay comparable.
            for bucket in ("bare", "ours"):
                for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
                    s3.delete_object(Bucket=bucket, Key=item["Key"])
        bare_size = dump_file.stat().st_size
        small = run_child(cluster, "small", str(work / "small"), key_file, None, env)

    moto.stop()
    rows = [
        ("bare pg_dump -Fc -Z zstd:5 -f", bare, bare_size, None),
        ("pipeline alone → local (no Prefect)", pipeline["seconds"], pipeline["stored"],
         pipeline["rss_mb"]),
        ("pgbackflow backup → local", ours_local["seconds"], ours_local["stored"],
         ours_local["rss_mb"]),
        ("bare pg_dump + boto3 upload", bare + upload, bare_size, None),
        ("pgbackflow backup → S3 (moto)", ours_s3["seconds"], ours_s3["stored"],
         ours_s3["rss_mb"]),
    ]
    print(f"\n{'':38} {'seconds':>8} {'MB':>8} {'peak RSS MB':>12}")
    for name, seconds, stored, rss in rows:
        rss_text = f"{rss:12.0f}" if rss is not None else f"{'':12}"
        print(f"{name:38} {seconds:8.2f} {stored / 1e6:8.1f} {rss_text}")
    print(f"(best of {options.repeat} runs each)")
    print(f"\nratio local: {ours_local['seconds'] / bare:.3f}x bare pg_dump (target ≤ 1.05); "
          f"pipeline alone {pipeline['seconds'] / bare:.3f}x")
    print(f"ratio S3:    {ours_s3['seconds'] / (bare + upload):.3f}x bare pg_dump + upload "
          "(target ≤ 1.05)")
    print(f"peak RSS: {ours_local['rss_mb']:.0f} MB for {size / 1e9:.2f} GB (S3: "
          f"{ours_s3['rss_mb']:.0f} MB), {small['rss_mb']:.0f} MB for {small_size / 1e6:.0f} MB "
          "(target ≤ 150, flat)")
    print(f"of which the Prefect runtime before the backup: {ours_local['baseline_mb']:.0f} MB; "
          f"the backup's data path added {ours_local['rss_mb'] - ours_local['baseline_mb']:.0f} MB"
          f" (local), {ours_s3['rss_mb'] - ours_s3['baseline_mb']:.0f} MB (S3), "
          f"{small['rss_mb'] - small['baseline_mb']:.0f} MB (small)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
