"""Benchmark: retention planning over a large catalog on S3 (moto), time and memory.

Populates a moto S3 bucket with hourly logical backups (3 objects each: dump, globals, a
sealed manifest), daily physical backups (3 objects each) and WAL segments, in the
proportions of a busy storage, then times the listing alone (``list_s``: the floor, moto's
time to build the pages plus ours to parse them), ``read_catalog`` (the listing, every
manifest read and authenticated, 8 at a time) plus ``plan_retention`` (GFS 24h 7d 4w 12m
2y), and measures the planning's peak Python memory (tracemalloc, a third pass) at several
catalog sizes. The first pass reads every manifest (cold cache), the second finds them in
the local manifest cache (tasks/catalog.py: a manifest is fetched again when its size or
upload time changed; cached bytes are authenticated like fetched ones).

Usage: .venv/bin/python -m tests.benchmarks.bench_retention [--objects 100000 50000 25000]
Target (issue 12): plan in under 10 s for 100,000 objects.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3

from pgbackflow.tasks.catalog import read_catalog
from pgbackflow.tasks.cluster import free_port
from pgbackflow.tasks.retention import KeepGFS, Policy, plan_retention
from pgbackflow.tasks.storage import S3ObjectStorage, _parse_listing
from tests.test_retention import (
    CLUSTER,
    DB,
    GRACE,
    RING,
    Writer,
    write_logical,
    write_physical,
)

GFS = Policy((KeepGFS(hours=24, days=7, weeks=4, months=12, years=2),))


class _PutWriter(Writer):
    """Writes with one PUT (no HEAD after it): populating is not what is measured."""

    def __init__(self, storage: S3ObjectStorage) -> None:
        super().__init__(storage)
        self.s3 = storage

    def put(self, key: str, data: bytes, modified: datetime) -> None:
        self.s3.client.put_object(Bucket=self.s3.bucket, Key=f"{self.s3.prefix}/{key}",
                                  Body=data)


def populate(storage: S3ObjectStorage, objects: int, now: datetime) -> dict[str, int]:
    """About ``objects`` objects: 40 % logical backups, 3 % physical, the rest WAL."""
    logical = int(objects * 0.40) // 3
    physical = int(objects * 0.03) // 3
    wal = objects - 3 * logical - 3 * physical
    writer = _PutWriter(storage)
    newest = now.replace(minute=5, second=0, microsecond=0) - timedelta(hours=1)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: write_logical(writer, newest - timedelta(hours=i), i),
                      range(logical)))
        first_day = (now - timedelta(days=physical)).replace(hour=1, minute=30)
        previous: str | None = None
        for day in range(physical):  # chains: serial (each names its parent)
            moment = first_day + timedelta(days=day)
            full = day % 7 == 0
            previous = write_physical(writer, moment, 100000 + day, day * 4 + 1,
                                      None if full else previous, None)
        list(pool.map(
            lambda n: writer.put(
                f"physical/{CLUSTER}/wal/{1:08X}{n // 256:08X}{n % 256:08X}.pgbf", b"w", now),
            range(1, wal + 1)))
    return {"logical_backups": logical, "physical_backups": physical, "wal_segments": wal}


def listing_breakdown(storage: S3ObjectStorage) -> dict[str, Any]:
    """Where a listing's time goes: the server building its pages (raw GETs of presigned
    ListObjectsV2 URLs, nothing parsed), our parser, and botocore's generic one on the same
    pages."""
    import urllib3
    from botocore.parsers import RestXMLParser

    http = urllib3.PoolManager()
    pages: list[bytes] = []
    started = time.perf_counter()
    for root in ("logical/", "physical/"):
        token: str | None = None
        while True:
            params = {"Bucket": storage.bucket, "Prefix": f"{storage.prefix}/{root}",
                      **({"ContinuationToken": token} if token else {})}
            url = storage.client.generate_presigned_url("list_objects_v2", Params=params)
            body = http.request("GET", url).data
            pages.append(body)
            parsed: dict[str, Any] = {}
            _parse_listing({"status_code": 200, "body": body}, parsed)
            token = parsed.get("NextContinuationToken")
            if not parsed.get("IsTruncated"):
                break
    server_s = time.perf_counter() - started
    started = time.perf_counter()
    for body in pages:
        _parse_listing({"status_code": 200, "body": body}, {})
    ours_s = time.perf_counter() - started
    shape = storage.client.meta.service_model.operation_model("ListObjectsV2").output_shape
    assert shape is not None
    started = time.perf_counter()
    for body in pages:
        RestXMLParser().parse({"body": body, "headers": {}, "status_code": 200}, shape)
    botocore_s = time.perf_counter() - started
    return {"pages": len(pages), "server_pages_s": round(server_s, 2),
            "parse_ours_s": round(ours_s, 2), "parse_botocore_s": round(botocore_s, 2)}


def measure(storage: S3ObjectStorage) -> dict[str, Any]:
    policies = {DB: GFS, CLUSTER: GFS}
    breakdown = listing_breakdown(storage)
    # The listing alone (both roots at once, as read_catalog lists them).
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        listed = sum(map(len, pool.map(storage.list, ("logical/", "physical/"))))
    list_s = round(time.perf_counter() - started, 2)
    timings = []
    for _ in ("cold cache", "warm cache"):
        started = time.perf_counter()
        catalog = read_catalog(storage, RING, grace=GRACE)
        read_s = time.perf_counter() - started
        plan = plan_retention(catalog, policies, grace=GRACE)
        timings.append((round(read_s, 2), round(time.perf_counter() - started, 2)))
    tracemalloc.start()
    catalog = read_catalog(storage, RING, grace=GRACE)
    plan_retention(catalog, policies, grace=GRACE)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"objects": listed, **breakdown, "list_s": list_s,
            "cold_catalog_s": timings[0][0], "cold_plan_s": timings[0][1],
            "warm_catalog_s": timings[1][0], "warm_plan_s": timings[1][1],
            "peak_mb": round(peak / 1e6, 1),
            "deleted": sum(len(p.deleted) for p in plan.databases),
            "wal_deleted": sum(len(p.wal_delete) for p in plan.databases)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, nargs="+", default=[25000, 50000, 100000])
    args = parser.parse_args()
    # Its own process: in-process, moto's threads would share the GIL with the reader.
    host, port = "127.0.0.1", free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            break
        time.sleep(0.2)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1",
                      PGBACKFLOW_CACHE_DIR=tempfile.mkdtemp(prefix="pgbackflow-bench-cache-"))
    results = []
    try:
        for count in args.objects:
            bucket = f"bench-{count}"
            storage = S3ObjectStorage(bucket, "pg", endpoint_url=f"http://{host}:{port}",
                                      region="us-east-1")
            boto3.client("s3", endpoint_url=f"http://{host}:{port}",
                         region_name="us-east-1").create_bucket(Bucket=bucket)
            started = time.perf_counter()
            shape = populate(storage, count, datetime.now(UTC))
            populated_s = round(time.perf_counter() - started, 1)
            result = {**shape, "populate_s": populated_s, **measure(storage)}
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
