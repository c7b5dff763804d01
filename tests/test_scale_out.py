"""Scale-out: 50 databases on 3 PostgreSQL servers, one config, two workers, one Prefect server.

As a team runs it (README "Operate", "Scale-out"): a PostgreSQL-backed ``prefect server
start``, ``pgbackflow deploy`` of one config whose 50 backups are all scheduled in the same
minute, and two ``pgbackflow worker`` processes (separate folders, PREFECT_HOME, TMPDIR and
spool dirs) serving the pool. While they work, a thread samples every 100 ms which pg_dump
processes run and which of them are connected (``pg_stat_activity`` rows whose client port is
a pg_dump socket), per server. Asserted: each database has exactly one run for the slot and
exactly one new backup in storage, no run was taken by both workers, no server ever had more
dumps at once than its ``max_concurrent_backups``, and both workers ran backups. Then the
worker running a backup (held mid-dump by a table lock) is killed with -9, its whole process
tree as when a host is lost: the heartbeat automation made by deploy marks the run Crashed
and a later scheduled run of that database completes on the other worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import textwrap
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import MasterKey, write_key_file
from pgbackflow.tasks.toolsets import find_toolset
from tests.fixtures.prefect_server import (
    BIN,
    PrefectServer,
    flow_run_pids,
    postgres_backed_prefect_server,
)

pytestmark = [pytest.mark.pg, pytest.mark.slow, pytest.mark.timeout(1800)]

POOL = "scale-pool"
SERVERS = 3
DATABASES = 50
MAX_CONCURRENT = 2
WORKER_LIMIT = 3
#: Seconds from writing the config to the slot: the deploy (155-230 s at load 16-24) and
#: the workers' start (~40 s) must fit in.
LEAD_S = 330


@dataclass
class Fleet:
    """Three servers with their databases, one store, two workers, the deployments."""

    server: PrefectServer
    clusters: list[EphemeralCluster]
    databases: dict[str, int]  # db id → index of its cluster
    store: Path
    root: Path
    config: Path
    env: dict[str, str]
    slot: datetime
    deployments: dict[str, str] = field(default_factory=dict)  # db id → deployment id
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def worker_log(self, name: str) -> str:
        return (self.root / name / "out.log").read_text(errors="replace")


def scale_config(key_file: Path, store: Path, clusters: list[EphemeralCluster],
                 databases: dict[str, int], cron: str) -> str:
    """One config: ``servers.pg<i>`` per cluster, each database on its cluster, all with
    backup schedule ``cron`` (but ``victim``: every minute), no health checks."""
    text = textwrap.dedent(f"""
        [prefect]
        work_pool = "{POOL}"
        [key]
        file = "{key_file}"
        [storages.local]
        url = "{store}"
        maintenance = ""
    """)
    for index, cluster in enumerate(clusters):
        text += textwrap.dedent(f"""
            [servers.pg{index}]
            host = "{cluster.host}"
            port = {cluster.port}
            user = "{cluster.superuser}"
            password_env = "SCALE_PG{index}_PASSWORD"
            max_concurrent_backups = {MAX_CONCURRENT}
        """)
    for db_id, index in databases.items():
        # victim backs up every minute: the one killed mid-backup in the last test.
        text += textwrap.dedent(f"""
            [databases.{db_id}]
            server = "pg{index}"
            storages = ["local"]
            backup = "{'* * * * *' if db_id == 'victim' else cron}"
            health_check = "off"
        """)
    return text


def build_fleet(clusters: list[EphemeralCluster], databases: dict[str, int]) -> None:
    """Start :data:`SERVERS` PostgreSQL 17 servers into ``clusters`` (the caller stops them,
    also after a failure here) and create each database (id -> server index) with 20,000
    rows."""
    for _ in range(SERVERS):
        clusters.append(EphemeralCluster(find_toolset(17), password=secrets.token_hex(12),
                                         settings={"fsync": "off"}).start())
    for db_id, index in databases.items():
        with clusters[index].connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db_id)))
        with clusters[index].connect(db_id) as conn:
            conn.execute("CREATE TABLE t AS SELECT g, md5(g::text) AS note "
                         "FROM generate_series(1, 20000) g")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("scale-out")
    clusters: list[EphemeralCluster] = []
    try:
        databases = {f"db{n:02d}": n % SERVERS for n in range(DATABASES)}
        databases["victim"] = 0
        build_fleet(clusters, databases)
        key_file = root / "master.key"
        write_key_file(key_file, MasterKey.generate())
        store = root / "store"
        with postgres_backed_prefect_server(tmp_path_factory.mktemp("scale-prefect")) as server:
            config = root / "pgbackflow.toml"
            env = {f"SCALE_PG{i}_PASSWORD": c.password for i, c in enumerate(clusters)}
            # All 50 in the minute LEAD_S from now: one deploy (4-5 s per database at load
            # 20) and the workers' start must fit in before it.
            slot = (datetime.now(UTC) + timedelta(seconds=LEAD_S)).replace(
                second=0, microsecond=0)
            config.write_text(scale_config(key_file, store, clusters, databases,
                                           f"{slot.minute} * * * *"))
            started = time.monotonic()
            server.run_cli("deploy", "--config", str(config), env=env, timeout=900)
            print(f"deploy of {len(databases)} databases: {time.monotonic() - started:.0f} s; "
                  f"slot {slot:%H:%M}")
            fleet = Fleet(server=server, clusters=clusters, databases=databases, store=store,
                          root=root, config=config, env=env, slot=slot)
            with server.http() as http:
                for deployment in http.post("deployments/filter", json={}).json():
                    if deployment["name"].startswith("logical-"):
                        fleet.deployments[deployment["name"][8:]] = deployment["id"]
            assert set(fleet.deployments) == set(databases)
            for name in ("w1", "w2"):
                fleet.workers[name] = _start_worker(fleet, name)
            assert datetime.now(UTC) < slot - timedelta(seconds=5), (
                f"deploy and workers were not ready before the slot {slot:%H:%M}: raise LEAD_S")
            try:
                yield fleet
            finally:
                with server.http() as http:  # the schedules stop with the module
                    for deployment_id in fleet.deployments.values():
                        http.post(f"deployments/{deployment_id}/pause_deployment")
    finally:
        for cluster in clusters:
            cluster.stop()


def _start_worker(fleet: Fleet, name: str) -> subprocess.Popen[bytes]:
    return start_worker(fleet.server, fleet.root / name, name)


def start_worker(server: PrefectServer, folder: Path, name: str) -> subprocess.Popen[bytes]:
    """``pgbackflow worker`` with its own folder, PREFECT_HOME, TMPDIR and spool dir, ready."""
    for sub in ("home", "tmp", "spool"):
        (folder / sub).mkdir(parents=True)
    env = {**server.env, "PREFECT_HOME": str(folder / "home"),
           "TMPDIR": str(folder / "tmp"), "PGBACKFLOW_SPOOL_DIR": str(folder / "spool")}
    log = folder / "out.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "pgbackflow"), "worker", "--pool", POOL, "--name", name,
             "--limit", str(WORKER_LIMIT)],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server.workers.append(process)
    server.wait_for(f"worker {name} to start", lambda: b"started!" in log.read_bytes(),
                          120, 0.2)
    return process


# --- sampling: pg_dump processes and their pg_stat_activity rows, per server --------------

_PORT = re.compile(r"\bport=(\d+)")


def _pg_dumps() -> dict[int, list[int]]:
    """Server port → pids of running pg_dump processes (from their --dbname conninfo)."""
    found: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"/pg_dump"):
                match = _PORT.search(b" ".join(argv).decode(errors="replace"))
                if match:
                    found[int(match[1])].append(int(entry.name))
    return found


def _local_ports(pid: int) -> set[int]:
    """Local TCP ports of a process's sockets."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].split(":")[1], 16))
    return ports


@dataclass
class Sampler:
    """Samples, every 100 ms, per server: pg_dump processes and pg_dump sessions."""

    clusters: list[EphemeralCluster]
    processes: dict[int, int] = field(default_factory=Counter)  # server index → max seen
    sessions: dict[int, int] = field(default_factory=Counter)
    samples: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        connections = [c.connect() for c in self.clusters]
        try:
            while not self.stop.wait(0.1):
                dumps = _pg_dumps()
                for index, (cluster, conn) in enumerate(zip(self.clusters, connections,
                                                            strict=True)):
                    pids = dumps.get(cluster.port, [])
                    ports = set().union(*(_local_ports(pid) for pid in pids)) if pids else set()
                    rows = conn.execute(
                        "SELECT client_port, datname FROM pg_stat_activity "
                        "WHERE backend_type = 'client backend'").fetchall()
                    # One pg_dump is one backup: its session(s) in one database.
                    dumping = {datname for port, datname in rows if port in ports}
                    self.processes[index] = max(self.processes[index], len(pids))
                    self.sessions[index] = max(self.sessions[index], len(dumping))
                self.samples += 1
        finally:
            for conn in connections:
                conn.close()


@contextlib.contextmanager
def sampling(clusters: list[EphemeralCluster]) -> Iterator[Sampler]:
    sampler = Sampler(clusters)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    try:
        yield sampler
    finally:
        sampler.stop.set()
        thread.join(10)


# --- API reads ----------------------------------------------------------------------------


def runs_of(server: PrefectServer, deployment_ids: list[str]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    with server.http() as http:
        offset = 0
        while True:
            page = http.post("flow_runs/filter", json={
                "deployments": {"id": {"any_": deployment_ids}}, "limit": 200,
                "offset": offset, "sort": "EXPECTED_START_TIME_ASC"}).json()
            runs += page
            if len(page) < 200:
                return runs
            offset += 200


def _when(run: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00"))


def _backups(fleet: Fleet) -> list[dict[str, Any]]:
    result = fleet.server.run_cli("list", "--from", str(fleet.store), "--json", timeout=300)
    backups: list[dict[str, Any]] = json.loads(result.stdout)
    return backups


def _submitted_by(fleet: Fleet) -> dict[str, list[str]]:
    """Flow run id → the workers whose log says they ran it (both try a run at times: the
    server lets one have it and tells the other to abort; a run waiting for its deployment's
    slot is aborted and submitted again later)."""
    found: dict[str, list[str]] = defaultdict(list)
    for name in fleet.workers:
        log = fleet.worker_log(name)
        tries = Counter(re.findall(r"submitting flow run '([0-9a-f-]{36})'", log))
        tries.subtract(re.findall(r"Aborted submission of flow run '([0-9a-f-]{36})'", log))
        for run_id, count in tries.items():
            found[run_id] += [name] * count
    return found


def test_fifty_backups_in_one_minute_on_two_workers(fleet: Fleet) -> None:
    server = fleet.server
    fifty = [db for db in fleet.databases if db != "victim"]
    ids = [fleet.deployments[db] for db in fifty]
    by_id = {fleet.deployments[db]: db for db in fifty}

    def slot_runs() -> list[dict[str, Any]]:
        return [r for r in runs_of(server, ids) if _when(r) == fleet.slot]

    def all_final() -> list[dict[str, Any]] | None:
        runs = slot_runs()
        done = [r for r in runs if r["state"]["type"] in
                ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
        return runs if len(runs) >= DATABASES and len(done) == len(runs) else None

    wait_s = (fleet.slot - datetime.now(UTC)).total_seconds()
    with sampling(fleet.clusters) as sampler:
        time.sleep(max(0.0, wait_s))
        started = time.monotonic()
        runs = server.wait_for("the 50 scheduled backups to end", all_final, 900, 2)
        elapsed = time.monotonic() - started
    print(f"50 backups: last one ended {elapsed:.0f} s after the slot; {sampler.samples} "
          f"samples; most pg_dumps at once per server {dict(sampler.processes)}, "
          f"their sessions {dict(sampler.sessions)}")

    # Exactly one run per database for the slot, each completed.
    per_deployment = Counter(by_id[r["deployment_id"]] for r in runs)
    assert per_deployment == Counter({db: 1 for db in fifty}), per_deployment
    failed = [(by_id[r["deployment_id"]], r["state"]["type"], r["state"].get("message"))
              for r in runs if r["state"]["type"] != "COMPLETED"]
    assert not failed, failed
    # None ran twice: every run was submitted by exactly one worker, once.
    submitted = _submitted_by(fleet)
    twice = {r["id"]: submitted.get(r["id"]) for r in runs if len(submitted.get(r["id"], [])) != 1}
    assert not twice, f"runs not submitted exactly once: {twice}"
    # Spread over both workers.
    per_worker = Counter(submitted[r["id"]][0] for r in runs)
    print(f"runs per worker: {dict(per_worker)}")
    assert set(per_worker) == {"w1", "w2"}, per_worker
    # One backup per database in storage.
    backups = Counter(b["db_id"] for b in _backups(fleet) if b["db_id"] in fifty)
    assert backups == Counter({db: 1 for db in fifty}), backups
    # The per-server limit held (and the sampler saw dumps: it could have seen too many).
    assert sampler.samples > 100
    assert max(sampler.processes.values()) >= 1, "the sampler never saw a pg_dump"
    assert all(n <= MAX_CONCURRENT for n in sampler.processes.values()), sampler.processes
    assert all(n <= MAX_CONCURRENT for n in sampler.sessions.values()), sampler.sessions


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it (by parent pid)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rpartition(")")[2].split()[1])
    tree, frontier = [pid], {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier}
        tree += frontier
    return tree


def test_worker_killed_mid_backup(fleet: Fleet) -> None:
    """kill -9 of the worker (its whole tree, as a lost host) running victim's backup."""
    server = fleet.server
    victim = fleet.deployments["victim"]
    cluster = fleet.clusters[fleet.databases["victim"]]
    locker = cluster.connect("victim")
    try:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")  # victim's pg_dump waits

        def blocked_run() -> dict[str, Any] | None:
            for run in runs_of(server, [victim]):
                if run["state"]["type"] == "RUNNING" and any(
                        pid in _pg_dumps().get(cluster.port, [])
                        for pid in flow_run_pids(run["id"])):
                    return run
            return None

        run = server.wait_for("a victim backup to be mid-dump", blocked_run, 240, 1)
        pids = set(flow_run_pids(run["id"]))
        killed = next(name for name, worker in fleet.workers.items()
                      if pids & set(_tree(worker.pid)))
        survivor = next(name for name in fleet.workers if name != killed)
        for pid in _tree(fleet.workers[killed].pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed_at, killed_wall = time.monotonic(), datetime.now(UTC)
        fleet.workers[killed].wait(10)
        assert not flow_run_pids(run["id"])
    finally:
        locker.close()

    def state_of(run_id: str) -> str:
        with server.http() as http:
            state: str = http.get(f"flow_runs/{run_id}").json()["state"]["type"]
            return state

    server.wait_for("the killed run to be marked Crashed",
                    lambda: state_of(run["id"]) == "CRASHED", 360, 2)
    crashed_after = time.monotonic() - killed_at

    def next_completed() -> dict[str, Any] | None:
        # Completed after the kill (runs queued for the one slot may run out of order).
        later = [r for r in runs_of(server, [victim]) if r["state"]["type"] == "COMPLETED"
                 and datetime.fromisoformat(r["end_time"].replace("Z", "+00:00"))
                 > killed_wall]
        return later[0] if later else None

    completed = server.wait_for("a later victim run to complete", next_completed, 300, 2)
    print(f"killed {killed} mid-backup: run Crashed after {crashed_after:.0f} s, the next "
          f"one completed {time.monotonic() - killed_at:.0f} s after the kill")
    assert _submitted_by(fleet)[completed["id"]] == [survivor]
    assert any(b["db_id"] == "victim" and b["backup_id"] for b in _backups(fleet))
