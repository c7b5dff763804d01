"""The verification agent: budget sharing, worker start, container limits from the share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pgbackflow.tasks.budget import plan_budget
from pgbackflow.tasks.errors import ConfigError

CLI = str(Path(sys.executable).with_name("pgbackflow"))


def test_budget_floor_lowers_concurrency_instead_of_failing() -> None:
    plan = plan_budget(max_cpu=1, max_ram_mb=700, max_disk_gb=5, max_concurrent_jobs=2)
    assert plan.concurrent_jobs == 1
    assert (plan.per_job.cpus, plan.per_job.memory_mb) == (1.0, 700)
    assert plan.note is not None and "advertising 1 concurrent job instead of 2" in plan.note

    roomy = plan_budget(max_cpu=4, max_ram_mb=4096, max_disk_gb=50, max_concurrent_jobs=2)
    assert roomy.concurrent_jobs == 2 and roomy.note is None
    assert (roomy.per_job.cpus, roomy.per_job.memory_mb) == (2.0, 2048)
    assert roomy.disk_bytes == 50 * 1024**3

    memory_bound = plan_budget(max_cpu=8, max_ram_mb=1500, max_disk_gb=5, max_concurrent_jobs=4)
    assert memory_bound.concurrent_jobs == 2

    with pytest.raises(ConfigError, match="cannot run one verification"):
        plan_budget(max_cpu=0.5, max_ram_mb=4096, max_disk_gb=5, max_concurrent_jobs=1)
    with pytest.raises(ConfigError, match="--max-ram-mb 0 must be positive"):
        plan_budget(max_cpu=1, max_ram_mb=0, max_disk_gb=5, max_concurrent_jobs=1)


def test_agent_cli_advertises_what_the_budget_covers() -> None:
    result = subprocess.run(
        [CLI, "agent", "--pool", "verify", "--max-cpu", "1", "--max-ram-mb", "700",
         "--max-concurrent-jobs", "2", "--dry-run", "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["concurrent_jobs"] == 1
    assert plan["per_job"] == {"cpus": 1.0, "memory_mb": 700}
    assert "advertising 1 concurrent job instead of 2" in result.stderr
    assert plan["command"][-4:-2] == ["--limit", "1"]


def test_agent_starts_a_worker_for_the_pool(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client

    pool = f"verify-{os.getpid()}"
    proc = subprocess.Popen(
        [CLI, "agent", "--pool", pool, "--max-cpu", "2", "--max-ram-mb", "2048"],
        env={**os.environ, "PREFECT_API_URL": prefect_api}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        workers: list[Any] = []
        deadline = time.monotonic() + 90
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline and not workers:
                time.sleep(1)
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                try:
                    workers = client.read_workers_for_work_pool(pool)
                except Exception:  # the pool appears when the worker registers
                    workers = []
            pool_info = client.read_work_pool(pool)
        assert workers and workers[0].name.startswith("pgbackflow-agent-")
        assert pool_info.type == "process"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_container_limits_are_the_per_job_share(pg_servers: Any, docker_engine: Any) -> None:
    """The sandbox container gets exactly the job's share (read back from the Docker API)."""
    from pgbackflow.tasks.docker_sandbox import DockerSandbox

    major = max(pg_servers.majors)
    plan = plan_budget(max_cpu=1, max_ram_mb=700, max_disk_gb=5, max_concurrent_jobs=2)
    with DockerSandbox(major, plan.per_job) as sandbox:
        container = docker_engine.containers.get(sandbox.container_name)
        host = container.attrs["HostConfig"]
        assert host["NanoCpus"] == 1_000_000_000
        assert host["Memory"] == 700 * 1024 * 1024
        assert host["NetworkMode"] == "none"
        assert host["CapDrop"] == ["ALL"]
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["PidsLimit"] == plan.per_job.pids
    with pytest.raises(Exception, match="No such container"):
        docker_engine.containers.get(sandbox.container_name)


def test_startup_sweep_removes_leftovers_of_a_crashed_run(
    pg_servers: Any, docker_engine: Any
) -> None:
    """A sandbox container whose owner process died is removed by the next sandbox start."""
    import socket

    from pgbackflow.tasks.docker_sandbox import DockerSandbox
    from pgbackflow.tasks.sandbox import SANDBOX_LABEL

    major = max(pg_servers.majors)
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = docker_engine.containers.create(
        f"postgres:{major}", command=["sleep", "600"], entrypoint=[],
        labels={SANDBOX_LABEL: "1", "pgbackflow.host": socket.gethostname(),
                "pgbackflow.pid": str(dead.pid)},
        network_mode="none",
    )
    foreign = docker_engine.containers.create(
        f"postgres:{major}", command=["sleep", "600"], entrypoint=[],
        labels={SANDBOX_LABEL: "1", "pgbackflow.host": "another-agent-host",
                "pgbackflow.pid": str(dead.pid)},
        network_mode="none",
    )
    try:
        with DockerSandbox(major):
            names = {c.name for c in docker_engine.containers.list(all=True, ignore_removed=True)}
            assert orphan.name not in names
            assert foreign.name in names  # another host's agent owns it
    finally:
        foreign.remove(force=True, v=True)


def test_disk_budget_is_checked_before_a_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime

    from pgbackflow.tasks.budget import ENV_MAX_DISK_BYTES, disk_budget_from_environment
    from pgbackflow.tasks.errors import StorageError
    from pgbackflow.tasks.manifest import DatabaseInfo, LogicalManifest, StoredObjectInfo
    from pgbackflow.tasks.verify import check_free_disk

    stored = StoredObjectInfo(key="k", raw_size=1, stored_size=600 * 1024**2, sha256="0" * 64)
    manifest = LogicalManifest(
        backup_id="b", database=DatabaseInfo(db_id="d", name="d", host="h", port=1,
                                             system_identifier=None, database_oid=1),
        server_version="17.1", server_version_num=170001, pg_dump_version="17.1",
        compression="x", started_at=datetime.now(UTC), finished_at=datetime.now(UTC),
        dump=stored, globals=stored, key_id="k", snapshot="s", tables=(), schema_count=0,
        table_count=0, database_size=0, tool_version="t",
    )
    monkeypatch.setenv(ENV_MAX_DISK_BYTES, str(2 * 1024**3))
    with pytest.raises(StorageError, match=r"more than the agent's disk budget of 2\.1 GB"):
        check_free_disk(manifest, Path("/tmp"), disk_budget_from_environment())
    check_free_disk(manifest, Path("/tmp"), 4 * 1024**3)  # 2x1.2 GB + 1 GB fits in 4 GB
