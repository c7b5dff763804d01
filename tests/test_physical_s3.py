"""Physical backups, WAL and PITR against S3, as users run them: the CLI and an S3 endpoint.

The local S3 (moto over HTTP on loopback), reached the way users configure it: ``s3://``
URLs with the standard ``AWS_*`` variables. A PostgreSQL 17+ cluster streams its WAL with
``pgbackflow wal-stream --to s3://…``; ``pgbackflow physical-backup`` takes a full and an
incremental into the same bucket; ``pgbackflow pitr --from s3://… --start`` restores the chain
to a time between two commits and to the end; ``pgbackflow verify-physical`` replays and
checks it; everything read back from the bucket only (the spool of the streamer is removed
first).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import MasterKey, write_key_file
from pgbackflow.tasks.physical import physical_db_id
from pgbackflow.tasks.toolsets import find_toolset
from pgbackflow.tasks.wal import wal_object_key
from tests.fixtures.prefect_server import as_users_run_it
from tests.fixtures.s3 import S3Bucket
from tests.test_physical import (
    CLI,
    mark,
    restored_rows,
    server_sysid,
    stop_restored,
)

pytestmark = [pytest.mark.pg, pytest.mark.s3]

PREFIX = "pg"


def _newest_incremental_major(pg_majors: tuple[int, ...]) -> int:
    majors = [m for m in pg_majors if m >= 17]
    if not majors:
        pytest.fail("an incremental chain needs PostgreSQL 17 or newer: select one with "
                    "--pg-majors", pytrace=False)
    return max(majors)


def _wait_shipped(server: EphemeralCluster, bucket: S3Bucket, timeout: float = 60) -> None:
    """Until the WAL segment holding the server's current position is in the bucket,
    uploaded after this call began (a complete segment or the streamer's partial one)."""
    with server.connect() as conn:
        row = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
    assert row is not None
    db_id = physical_db_id(server_sysid(server))
    wanted = {f"{PREFIX}/{wal_object_key(db_id, name)}" for name in (row[0], row[0] + ".partial")}
    client = bucket.client()
    began = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = client.list_objects_v2(Bucket=bucket.bucket, Prefix=f"{PREFIX}/")
        for item in listed.get("Contents", []):
            if item["Key"] in wanted and item["LastModified"].timestamp() > began - 1:
                return
        time.sleep(0.3)
    raise AssertionError(f"WAL segment {row[0]} was not shipped to the bucket within {timeout} s")


def _pids_named(name: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and _proc_text(int(p.name), "comm").strip() == name]


def _proc_text(pid: int, what: str) -> str:
    try:
        return Path(f"/proc/{pid}/{what}").read_bytes().replace(b"\0", b"\n").decode(
            "utf-8", "replace")
    except OSError:
        return ""


def _assert_no_credentials(pid: int) -> None:
    environ = _proc_text(pid, "environ")
    assert environ, f"process {pid}: environment unreadable"
    names = {line.split("=", 1)[0] for line in environ.splitlines() if "=" in line}
    leaked = sorted(n for n in names if n.startswith(("AWS_", "PREFECT_")) or n == "PGPASSWORD")
    leaked = [n for n in leaked if n != "PREFECT__FLOW_RUN_ID"]  # an id, kept on purpose
    assert not leaked, f"process {pid} ({_proc_text(pid, 'comm').strip()}) holds {leaked}"


def test_chain_wal_pitr_and_verification_from_s3(
    pg_majors: tuple[int, ...], work_dir: Path, s3_bucket: S3Bucket, prefect_api: str
) -> None:
    work = work_dir  # reachable by the restored server's OS user (tests/fixtures/postgres)
    major = _newest_incremental_major(pg_majors)
    key_file = work / "master.key"
    write_key_file(key_file, MasterKey.generate())
    url = f"s3://{s3_bucket.bucket}/{PREFIX}"
    with EphemeralCluster(find_toolset(major), settings={"fsync": "off"}) as server:
        with server.connect() as conn:  # small on purpose: moto holds every object in memory
            conn.execute("CREATE TABLE marks (id serial PRIMARY KEY, v text NOT NULL)")
        dsn = (f"host={server.host} port={server.port} user={server.superuser} "
               "dbname=postgres sslmode=disable")
        # The AWS_* variables s3_bucket set point every command at the bucket.
        env = as_users_run_it({**os.environ, "PGPASSWORD": server.password,
                               "PREFECT_API_URL": prefect_api})

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                                  timeout=600, check=False)
            assert done.returncode == 0, f"pgbackflow {args[0]}: {done.stderr[-3000:]}"
            assert "Traceback" not in done.stderr
            return done

        spool = work / "spool"
        streamer = subprocess.Popen(
            [*CLI, "wal-stream", "--db", dsn, "--to", url, "--key-file", str(key_file),
             "--spool-dir", str(spool), "--partial-interval", "0.5"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            full: dict[str, Any] = json.loads(cli(
                "physical-backup", "--db", dsn, "--to", url, "--key-file", str(key_file),
                "--json").stdout)
            mark(server, "a1")
            time.sleep(1.0)
            between = mark(server, "b1")
            time.sleep(1.0)
            mark(server, "b2")
            incremental: dict[str, Any] = json.loads(cli(
                "physical-backup", "--db", dsn, "--to", url, "--key-file", str(key_file),
                "--incremental", "--json").stdout)
            mark(server, "c1")
            _wait_shipped(server, s3_bucket)
            # pg_receivewal runs as long as the streamer: it holds no S3 or Prefect secret.
            receivers = [pid for pid in _pids_named("pg_receivewal")
                         if str(spool) in _proc_text(pid, "cmdline")]
            assert receivers, "no pg_receivewal of this streamer found"
            for pid in receivers:
                _assert_no_credentials(pid)
        finally:
            # What a supervisor's stop does: the streamer ships what it has, then exits.
            streamer.send_signal(signal.SIGTERM)
            _, stderr = streamer.communicate(timeout=120)
        assert streamer.returncode == 0, stderr.decode()[-3000:]
        assert (full["mode"], incremental["mode"]) == ("full", "incremental")
        assert incremental["parent_id"] == full["backup_id"]
        # From here on only the bucket holds the WAL.
        shutil.rmtree(spool)

        listed = json.loads(cli("physical-list", "--from", url, "--key-file", str(key_file),
                                "--json").stdout)
        assert [b["backup_id"] for b in listed[0]["backups"]] == [
            full["backup_id"], incremental["backup_id"]]

        inside = work / "inside"
        report = json.loads(cli(
            "pitr", "--from", url, "--target-time", between.isoformat(), "--to-dir", str(inside),
            "--start", "--key-file", str(key_file), "--json").stdout)
        try:
            assert report["chain"] == [f"full {full['backup_id']}"]
            assert restored_rows(report["port"], server) == ["a1", "b1"]
            # The server left running outlives the command; its superusers can read its
            # environment (COPY ... FROM PROGRAM 'env'): none of the command's credentials.
            _assert_no_credentials(int((inside / "postmaster.pid").read_text().split()[0]))
        finally:
            stop_restored(inside, server)

        end = work / "end"
        report = json.loads(cli(
            "pitr", "--from", url, "--target", "latest", "--to-dir", str(end), "--start",
            "--key-file", str(key_file), "--json").stdout)
        try:
            assert report["chain"] == [f"full {full['backup_id']}",
                                       f"incremental {incremental['backup_id']}"]
            assert restored_rows(report["port"], server) == ["a1", "b1", "b2", "c1"]
        finally:
            stop_restored(end, server)

        verified = json.loads(cli("verify-physical", "--from", url, "--key-file",
                                  str(key_file), "--json").stdout)
        assert verified["status"] == "passed", verified
        assert verified["chain"] == [full["backup_id"], incremental["backup_id"]]
        rows = {d["name"]: d["rows"] for d in verified["databases"]}
        assert rows["postgres"]["public.marks"] == 4
