"""Scale-out: 50 databases on 3 PostgreSQL servers, one config, two workers, one Prefect server.

As a team runs it (README "Operate", "Scale-out"): a PostgreSQL-backed ``prefect server
start``, ``pgbackflow deploy`` of one config whose 50 backups are all scheduled in the same
minute, and two ``pgbackflow worker`` processes (separate folders, PREFECT_HOME, TMPDIR and
spool dirs) serving the pool deploy made (its flow-run command runs each worker's runs in that
worker's warm flow-run daemon, pgbackflow/engine.py). While they work, a thread samples every
250 ms which pg_dump processes run and which of them are connected (``pg_stat_activity`` rows
whose client port is a pg_dump socket), per server. The databases of one server are locked
(ACCESS EXCLUSIVE on their table) from before the slot until more of its runs are Running than
its limit and 20 s more, so its dumps queue up there. Asserted: each database has exactly one
run for the slot and exactly one new backup in storage, no run was taken by both workers, no
server ever had more dumps at once than its ``max_concurrent_backups`` and the locked one had
exactly that many (a missing or higher limit fails), and both workers ran backups. Then the
schedule of ``victim`` (every minute; paused until then) is resumed, and the worker running its
backup (held mid-dump by a table lock) is killed with -9, its whole process tree as when a host
is lost: the heartbeat automation made by deploy marks the run Crashed and a later scheduled
run of that database completes on the other worker.
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

import psycopg
import pytest
from prefect.workers.process import ProcessWorker
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
#: The server whose databases are locked at the slot: its dumps queue up for its limit.
HELD = 1
#: Seconds the locks stay after more of HELD's runs are Running than its limit: a dump let
#: through by a missing limit starts within them (Running to dump: median 4 s, max 17 s).
HOLD_S = 20
#: Sampling period (s): held dumps last HOLD_S; a /proc scan each 0.1 s cost 30-40 CPU-s.
SAMPLE_S = 0.25
#: A backup schedule that does not fire while the module runs (the first deploy's).
FAR_CRON = "0 3 1 1 *"
#: Seconds before the slot beyond twice the first deploy's time (the second deploy, the
#: scheduler's pass, the workers' start: ~30 s under load, in parallel with the deploy).
SLOT_MARGIN_S = 45


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
    backup schedule ``cron`` (but ``victim``: every minute, disabled), no health checks."""
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
        # victim backs up every minute: the one killed mid-backup in the last test, which
        # resumes it (disabled until then: its runs would take pg0's and the workers' slots).
        text += textwrap.dedent(f"""
            [databases.{db_id}]
            server = "pg{index}"
            storages = ["local"]
            backup = "{'* * * * *' if db_id == 'victim' else cron}"
            health_check = "off"
        """) + ("enabled = false\n" if db_id == "victim" else "")
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
            # First the fleet with its backups at a time that never comes while this runs,
            # and the workers; then, once their time is known, the same config with all 50
            # in one minute that leaves room for a second deploy (it changes 50 schedules:
            # as long as the first, at most) and the scheduler's pass over recently deployed
            # deployments (every 5 s), as an operator edits a config and deploys again.
            config.write_text(scale_config(key_file, store, clusters, databases, FAR_CRON))
            started = time.monotonic()
            server.run_cli("deploy", "--config", str(config), env=env, timeout=900)
            deploy_s = time.monotonic() - started
            with server.http() as http:
                deployments = {d["name"][8:]: d["id"] for d in
                               http.post("deployments/filter", json={}).json()
                               if d["name"].startswith("logical-")}
            assert set(deployments) == set(databases)
            # Both at once, as two hosts start theirs (~30 s under load, each).
            launched = {name: launch_worker(server, root / name, name) for name in ("w1", "w2")}
            slot = (datetime.now(UTC) + timedelta(seconds=2 * deploy_s + SLOT_MARGIN_S)
                    + timedelta(minutes=1)).replace(second=0, microsecond=0)
            config.write_text(scale_config(key_file, store, clusters, databases,
                                           f"{slot.minute} * * * *"))
            again = time.monotonic()
            server.run_cli("deploy", "--config", str(config), env=env, timeout=900)
            print(f"deploy of {len(databases)} databases: {deploy_s:.0f} s, again with the "
                  f"slot {slot:%H:%M}: {time.monotonic() - again:.0f} s")
            fleet = Fleet(server=server, clusters=clusters, databases=databases, store=store,
                          root=root, config=config, env=env, slot=slot, deployments=deployments)
            for name, (process, log) in launched.items():
                wait_started(server, name, log)
                fleet.workers[name] = process
            print(f"workers ready {time.monotonic() - started:.0f} s after the first deploy "
                  f"began; the slot in {(slot - datetime.now(UTC)).total_seconds():.0f} s")
            assert datetime.now(UTC) < slot - timedelta(seconds=5), (
                f"deploy and workers were not ready before the slot {slot:%H:%M}: raise "
                "SLOT_MARGIN_S")
            try:
                yield fleet
            finally:
                with server.http() as http:  # the schedules stop with the module
                    for deployment_id in fleet.deployments.values():
                        http.post(f"deployments/{deployment_id}/pause_deployment")
    finally:
        for cluster in clusters:
            cluster.stop()


def create_pool(server: PrefectServer) -> None:
    """A process pool whose flow-run processes are Prefect's engine itself, each importing
    Prefect (made before deploy, which leaves an existing pool alone; the benchmarks compare
    it with deploy's pool, whose runs go to a warm daemon). By default the process worker
    starts ``prefect.runner._workspace_supervisor``, which prepares the workspace and starts
    the engine as its child: two interpreters importing Prefect per run (~2 CPU-s each)."""
    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["command"]["default"] = (
        f"{BIN / 'python'} -m prefect.engine")
    with server.http() as http:
        http.post("work_pools/", json={"name": POOL, "type": "process",
                                       "base_job_template": template}).raise_for_status()


def pause(server: PrefectServer, deployment_id: str, paused: bool = True) -> None:
    """Pause (or resume) a deployment's schedules, as an operator does in the UI."""
    with server.http() as http:
        action = "pause_deployment" if paused else "resume_deployment"
        http.post(f"deployments/{deployment_id}/{action}").raise_for_status()


def launch_worker(server: PrefectServer, folder: Path,
                  name: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``pgbackflow worker`` with its own folder, PREFECT_HOME, TMPDIR and spool dir; its log."""
    for sub in ("home", "tmp", "spool"):
        (folder / sub).mkdir(parents=True)
    # Polling every 3 s, not the fixtures' 1 s: a worker's poll each second cost the server
    # ~2 CPU-s a minute (measured); a freed slot waits 1.5 s more on average.
    # Its runs in its own flow-run daemon (its PREFECT_HOME and TMPDIR make it another one
    # than the other worker's), as in production; kill -9 of the worker's tree kills it too
    # (the supervisor, a subreaper, inherits it from the first run that started it).
    env = {**server.env, "PREFECT_HOME": str(folder / "home"),
           "TMPDIR": str(folder / "tmp"), "PGBACKFLOW_SPOOL_DIR": str(folder / "spool"),
           "PREFECT_WORKER_QUERY_SECONDS": "3", "PGBACKFLOW_DAEMON": "on",
           "PGBACKFLOW_RUNTIME_DIR": server.env.get("PGBACKFLOW_RUNTIME_DIR")
           or str(server.daemon_dir())}
    log = folder / "out.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "pgbackflow"), "worker", "--pool", POOL, "--name", name,
             "--limit", str(WORKER_LIMIT)],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server.workers.append(process)
    return process, log


def wait_started(server: PrefectServer, name: str, log: Path) -> None:
    server.wait_for(f"worker {name} to start", lambda: b"started!" in log.read_bytes(),
                    120, 0.2)


def start_worker(server: PrefectServer, folder: Path, name: str) -> subprocess.Popen[bytes]:
    """A launched worker (:func:`launch_worker`), ready."""
    process, log = launch_worker(server, folder, name)
    wait_started(server, name, log)
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
    """Samples, every :data:`SAMPLE_S`, per server: pg_dump processes and pg_dump sessions."""

    clusters: list[EphemeralCluster]
    processes: dict[int, int] = field(default_factory=Counter)  # server index → max seen
    sessions: dict[int, int] = field(default_factory=Counter)
    samples: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        connections = [c.connect() for c in self.clusters]
        try:
            while not self.stop.wait(SAMPLE_S):
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
def locked(cluster: EphemeralCluster, dbnames: list[str]) -> Iterator[None]:
    """Table ``t`` of each of ``dbnames`` locked (ACCESS EXCLUSIVE) until the connections
    close: a pg_dump there waits, connected, for its ACCESS SHARE lock."""
    connections: list[psycopg.Connection[Any]] = []
    try:
        for dbname in dbnames:
            conn = cluster.connect(dbname)
            connections.append(conn)
            conn.execute("BEGIN")
            conn.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        for conn in connections:
            conn.close()


def hold_until_queued(server: PrefectServer, sampler: Sampler, deployment_ids: list[str],
                      timeout: float) -> int:
    """Wait until the held server has had :data:`MAX_CONCURRENT` dumps at once and more of
    its runs are Running than that (the rest wait for its slot, or would dump if unlimited),
    then :data:`HOLD_S` more; the most of its runs seen Running at once."""
    deadline = time.monotonic() + timeout
    queued_at: float | None = None
    most = 0
    with server.http() as http:
        while time.monotonic() < deadline:
            running = len(http.post("flow_runs/filter", json={
                "deployments": {"id": {"any_": deployment_ids}},
                "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}).json())
            most = max(most, running)
            if queued_at is None and running > MAX_CONCURRENT \
                    and sampler.sessions[HELD] >= MAX_CONCURRENT:
                queued_at = time.monotonic()
            if queued_at is not None and time.monotonic() - queued_at >= HOLD_S:
                break
            time.sleep(1)
    return most


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


# --- CPU accounting: where the machine's 2 cores went during the backups -----------------

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int, children: bool = True) -> float:
    """CPU seconds of a process (and of its children it has reaped)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return sum(int(f) for f in fields[11:15 if children else 13]) / _TICK
    return 0.0


def _postmaster(port: int) -> int | None:
    """The pid of the PostgreSQL postmaster listening on ``port`` (from its postmaster.pid)."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
            if argv[0].endswith("/postgres") and "-D" in argv:
                lines = (Path(argv[argv.index("-D") + 1]) / "postmaster.pid").read_text()
                if lines.splitlines()[3].strip() == str(port):
                    return int(entry.name)
    return None


def _machine_cpu() -> float:
    """CPU seconds every core of the machine spent busy (all processes, others' too)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK


def _worker_processes(supervisor: int, tree: list[int]) -> list[int]:
    """The supervisor and its ``prefect worker start`` child (not the flow-run daemon, also
    its child once the run that started it ended)."""
    found = [supervisor]
    for pid in tree:
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"worker" in argv and b"start" in argv:
                found.append(pid)
    return found


def cpu_counters(fleet: Fleet) -> dict[str, float]:
    """CPU seconds so far: flow-run processes (with their pg_dumps), the worker processes
    themselves, the Prefect server, its PostgreSQL, the three servers backed up, the machine."""
    counters: dict[str, float] = defaultdict(float)
    for worker in fleet.workers.values():
        tree = _tree(worker.pid)
        own = sum(_cpu(pid, children=False) for pid in _worker_processes(worker.pid, tree))
        counters["workers"] += own
        counters["flow runs"] += sum(_cpu(pid) for pid in tree) - own
    counters["prefect server"] = sum(_cpu(pid) for pid in _tree(fleet.server.process.pid))
    url = (Path(f"/proc/{fleet.server.process.pid}/environ").read_bytes().split(b"\0"))
    port = next((int(item.rsplit(b":", 1)[1].split(b"/")[0]) for item in url
                 if item.startswith(b"PREFECT_API_DATABASE_CONNECTION_URL=")), 0)
    backend = _postmaster(port)
    counters["prefect's postgres"] = sum(_cpu(pid) for pid in _tree(backend)) if backend else 0
    counters["3 servers"] = sum(sum(_cpu(pid) for pid in _tree(postmaster))
                                for postmaster in map(_postmaster, (c.port for c in
                                                                    fleet.clusters))
                                if postmaster)
    counters["this test (sampler)"] = _cpu(os.getpid(), children=False)
    counters["machine"] = _machine_cpu()
    return counters


def cpu_report(before: dict[str, float], after: dict[str, float]) -> str:
    return "CPU s: " + ", ".join(f"{name} {after[name] - before[name]:.0f}" for name in after)


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


def _at(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def _spread(values: list[float]) -> str:
    """``median/max`` of seconds, for the timeline."""
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[len(ordered) // 2]:.0f}/{ordered[-1]:.0f}"


def timeline(server: PrefectServer, runs: list[dict[str, Any]], slot: datetime) -> str:
    """Where the runs' time went, from their states and their dump task runs: seconds
    (median/max) from the slot to the worker's pick-up (Pending), from there to the flow-run
    process's Running state (its start-up), from Running to the dump (inspection and the
    wait for the database's and server's concurrency slots), the dump, and the rest (globals,
    manifest, catalog); and the most runs Running at once."""
    phases: dict[str, list[float]] = defaultdict(list)
    spans: list[tuple[datetime, datetime]] = []
    with server.http() as http:
        dumps = {}
        for run in runs:
            for task_run in http.post("task_runs/filter", json={
                    "flow_runs": {"id": {"any_": [run["id"]]}}, "limit": 50}).json():
                if task_run["name"].startswith("dump-database"):
                    dumps[run["id"]] = task_run
            states = http.get("flow_run_states/", params={"flow_run_id": run["id"]}).json()
            pending = min((_at(s["timestamp"]) for s in states if s["type"] == "PENDING"),
                          default=None)
            running, end = _at(run["start_time"]), _at(run["end_time"])
            dump = dumps.get(run["id"], {})
            dump_start, dump_end = _at(dump.get("start_time")), _at(dump.get("end_time"))
            if pending:
                phases["pick-up"].append((pending - slot).total_seconds())
            if pending and running:
                phases["start-up"].append((running - pending).total_seconds())
            if running and dump_start:
                phases["to dump"].append((dump_start - running).total_seconds())
            if dump_start and dump_end:
                phases["dump"].append((dump_end - dump_start).total_seconds())
            if dump_end and end:
                phases["after dump"].append((end - dump_end).total_seconds())
            if running and end:
                spans.append((running, end))
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    busy = most = 0
    for _, step in edges:
        busy += step
        most = max(most, busy)
    return (", ".join(f"{name} {_spread(values)}" for name, values in phases.items())
            + f" s (median/max); at most {most} runs Running at once")


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

    held = [db for db in fifty if fleet.databases[db] == HELD]
    wait_s = (fleet.slot - datetime.now(UTC)).total_seconds()
    with sampling(fleet.clusters) as sampler:
        with locked(fleet.clusters[HELD], held):
            time.sleep(max(0.0, wait_s))
            started, cpu_before = time.monotonic(), cpu_counters(fleet)
            most_held = hold_until_queued(server, sampler, [fleet.deployments[db] for db in held],
                                          420)
            released = time.monotonic() - started
        runs = server.wait_for("the 50 scheduled backups to end", all_final, 900, 2)
        elapsed, cpu_after = time.monotonic() - started, cpu_counters(fleet)
    print(f"pg{HELD}'s databases locked until {released:.0f} s after the slot; at most "
          f"{most_held} of its runs Running at once")
    print(f"50 backups: last one ended {elapsed:.0f} s after the slot; {sampler.samples} "
          f"samples; most pg_dumps at once per server {dict(sampler.processes)}, "
          f"their sessions {dict(sampler.sessions)}; {cpu_report(cpu_before, cpu_after)}")

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
    print(f"runs per worker: {dict(per_worker)}; {timeline(server, runs, fleet.slot)}")
    assert set(per_worker) == {"w1", "w2"}, per_worker
    # One backup per database in storage.
    backups = Counter(b["db_id"] for b in _backups(fleet) if b["db_id"] in fifty)
    assert backups == Counter({db: 1 for db in fifty}), backups
    # The per-server limit held: never more dumps at once on a server than its limit, and on
    # the held one, where more of its runs were Running than that, exactly the limit.
    assert sampler.samples > 100
    assert most_held > MAX_CONCURRENT, f"pg{HELD} never had more runs than its limit"
    assert all(n <= MAX_CONCURRENT for n in sampler.processes.values()), sampler.processes
    assert all(n <= MAX_CONCURRENT for n in sampler.sessions.values()), sampler.sessions
    assert sampler.processes[HELD] == sampler.sessions[HELD] == MAX_CONCURRENT, (
        sampler.processes, sampler.sessions)


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
        pause(server, victim, paused=False)  # every minute from now on

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
