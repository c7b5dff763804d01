"""Benchmark: pgbackflow physical backups vs pgBackRest and bare pg_basebackup, in one run.

Phase 1, full backups. Builds a database (pgbench scale 50 + a 2.5 M-row jsonb table, as
bench_logical_backup: 1.22 GB on PG 15; ``--scale 65`` comes near the issue's 1.44 GB) on a
throwaway PostgreSQL ``--major`` (default 15, the version of the issue's figures and the
newest one Debian bookworm's pgBackRest 2.45 supports: it refuses 17), checkpoints, then
times, on that same database, interleaved and best of ``--repeat``:

* pgBackRest ``backup --type=full`` with compress-type=zst (its default level, 3),
  process-max=2, start-fast=y, archive-check=n (no archive_command: the backup set holds no
  WAL, and pgBackRest does not encrypt it here);
* bare ``pg_basebackup -D DIR -Ft -Z client-zstd:5 -X fetch`` (from a zstd-capable
  toolset: the PG 14/15 wheels are built without zstd, a newer pg_basebackup is used then);
* bare ``pg_basebackup -D - -Ft -X fetch | zstd -T2 -5 > FILE`` (what our pipeline does,
  without encryption and Python);
* bare ``pg_basebackup -D - -Ft -X fetch > /dev/null``: the producer alone, a floor;
* ours, direct: ``read_cluster_facts`` + ``take_base_backup`` + ``write_manifest`` into a
  local folder, encrypted (the data path, no Prefect);
* ours, whole process: ``.venv/bin/pgbackflow physical-backup --to DIR --key-file F --json``
  (the console script, the password in ``PGPASSWORD``), timed from exec to exit around
  ``subprocess.run``: what a user's shell measures, issue 15's yardstick. The launcher hands
  the command to the warm daemon (pgbackflow/launcher.py) that one untimed command of the
  same environment started before the rounds; the daemons live in ``<work>/run``
  (``PGBACKFLOW_RUNTIME_DIR``) and are stopped at the end. The note says how many runs the
  daemon took (its log names each command; one it did not take ran cold, in its process);
* ours, CLI flow: ``pgbackflow physical-backup`` called in a Python process of its own after
  a warm-up flow (timed inside it, Prefect's and the interpreter's start-up excluded): the
  data path plus the flow, with its peak RSS.

Both CLI rows run against one warm ``prefect server start`` (a subprocess; PostgreSQL-backed
as README recommends for production, ``--backend sqlite`` for SQLite; as bench_cli). Within a
round the order is reversed every other round (pgBackRest and the whole process stay side by
side), so none always runs after the same neighbour. Every bare pg_basebackup uses
``--checkpoint=fast`` as ours does (pgBackRest: start-fast).

Phase 1b, restore of a full to a running, consistent (promoted) server, on the same PG
``--major`` cluster. Archiving into pgBackRest's stanza is switched on (its backup sets hold
no WAL), then pgBackRest and ours each take one full, and each is restored ``--repeat``
times, interleaved:

* pgBackRest ``restore`` (process-max as above, ``--archive-mode=off``) into a new
  directory, then ``pg_ctl start`` until ``pg_is_in_recovery()`` is false (replay from its
  archive through ``archive-get``, promotion at its end);
* ours, direct: plan_pitr → build_data_dir (decrypt, unpack; WAL fetched meanwhile) →
  configure_recovery → start_and_wait (replay of the backup's own WAL, promotion);
* ours, whole process: ``.venv/bin/pgbackflow pitr --target latest --start`` (the console
  script, through the same warm daemon as the backups), wall time from exec to exit.

The order is reversed every other round here too. Ratios of the whole process to pgBackRest
are printed for both, with issue 15's targets (backup < 1.0x, restore + start ≤ 1.0x).

Phase 2, incremental and point-in-time restore (PostgreSQL 17+, ``--pitr-major``, default
17). The same database is built on a PG 17 cluster (the phase-1 one is reused when the majors
are equal). Ours (direct and, if available, the CLI) and bare ``pg_basebackup -Fp`` take a
full; ``--change-pct`` (default 5) % of the rows of pgbench_accounts and of the jsonb table
are updated (a contiguous id range, so about that share of their pages changes;
``--scattered`` updates every Nth row instead, which touches nearly every page); then each
takes an incremental on its full. Before the fulls and before the incrementals the
benchmark checkpoints and waits (untimed) until the WAL summarizer has caught up, so that
whoever runs first does not pay for the others. Then the restore to the end of the chain ("latest"):

* ours: plan_pitr → build_data_dir (every link's objects decrypted and unpacked at once
  while the WAL is fetched, then pg_combinebackup) → configure_recovery → start_and_wait
  (replay and promotion);
* bare: ``pg_combinebackup full inc -o DIR`` of the plain-format backups, then
  ``pg_ctl start -w`` (replay of the WAL the backups carry).

No WAL is streamed: each backup carries the WAL that makes it consistent (``-X fetch``), so
the restore replays only that. Both restored servers are checked to hold the change.

Usage: .venv/bin/python -m tests.benchmarks.bench_physical [--scale 50] [--major 15]
       [--pitr-major 17] [--repeat 3] [--json] [--backend postgres|sqlite]
       [--only chain --restore-rounds 3]   (just the incremental phase and the chain's restore)
       [--pitr-major 0]   (phases 1 and 1b only: full backups and their restore)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from pgbackflow.tasks.cluster import EphemeralCluster, resolve_os_user
from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.errors import PgBackflowError
from pgbackflow.tasks.keys import Keyring, MasterKey, write_key_file
from pgbackflow.tasks.manifest import new_backup_id
from pgbackflow.tasks.physical import (
    BackupPlan,
    PhysicalManifest,
    backup_prefix,
    build_manifest,
    parent_manifest_file,
    read_cluster_facts,
    take_base_backup,
    write_manifest,
)
from pgbackflow.tasks.pitr import (
    allow_recovery_start,
    build_data_dir,
    configure_recovery,
    finish_restore,
    free_port,
    plan_pitr,
    start_and_wait,
)
from pgbackflow.tasks.process import OsUser, Tool
from pgbackflow.tasks.storage import LocalFolderStorage
from pgbackflow.tasks.toolsets import Toolset, find_toolset
from tests.benchmarks.bench_cli import PGBACKFLOW, stop_daemons, wait_for_daemon
from tests.benchmarks.bench_run_latency import prefect_backend

DB = "big"
STANZA = "bench"
ACCOUNTS_PER_SCALE = 100_000
PIPE_ZSTD = ("-T2", "-5")

CLI_CHILD = """
import json, sys, time

def vm(field):
    # VmHWM/VmRSS belong to this process image (ru_maxrss would include the parent's).
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0

from prefect import flow

@flow
def warm_up():
    return 1

warm_up()  # Prefect's own start-up (client, settings, first run) is not the backup's cost
baseline = vm("VmRSS")
from pgbackflow.cli import app
argv = json.loads(sys.argv[1])
started = time.perf_counter()
try:
    code = app(argv, standalone_mode=False)
except SystemExit as exc:
    code = exc.code
elapsed = time.perf_counter() - started
sys.stdout.write("\\nBENCH " + json.dumps({"seconds": elapsed, "code": code or 0,
                 "rss_mb": vm("VmHWM"), "baseline_mb": baseline}) + "\\n")
"""


@dataclass
class Row:
    """One measured command: every run's seconds and the stored bytes of the last run."""

    name: str
    runs: list[float] = field(default_factory=list)
    size: int | None = None
    rss_mb: float | None = None
    note: str = ""

    @property
    def best(self) -> float:
        """Fastest run (a shared 2-core machine is noisy)."""
        return min(self.runs) if self.runs else float("nan")

    def add(self, seconds: float, size: int | None, rss_mb: float | None = None) -> None:
        """Record one run."""
        self.runs.append(seconds)
        self.size = size
        if rss_mb is not None:
            self.rss_mb = max(self.rss_mb or 0.0, rss_mb)

    def to_json(self) -> dict[str, Any]:
        """Machine-readable form."""
        return {"name": self.name, "best_s": self.best if self.runs else None, "runs_s": self.runs,
                "bytes": self.size, "peak_rss_mb": self.rss_mb, "note": self.note or None}


# ---------------------------------------------------------------------------------------
# Helpers


def build_database(cluster: EphemeralCluster, name: str, scale: int, jsonb_rows: int) -> int:
    """pgbench tables + a jsonb table, as bench_logical_backup; returns the database's bytes.

    (A copy, not an import: that module does not pass mypy, and this one must.)
    """
    with cluster.connect() as conn:
        conn.execute(f"CREATE DATABASE {name}")
    subprocess.run(
        [str(cluster.toolset.binary("pgbench")), "-h", cluster.host, "-p", str(cluster.port),
         "-U", cluster.superuser, "-i", "-q", "-s", str(scale), name],
        env={**os.environ, "PGPASSWORD": cluster.password}, check=True, capture_output=True,
    )
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


def dir_size(path: Path) -> int:
    """Bytes of every file below ``path`` (or of the file itself)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def fresh(path: Path) -> Path:
    """``path``, removed if it exists (its parent created)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def ensure_command(command: str, package: str) -> str:
    """The path of ``command``, installing its Debian package quietly when missing."""
    found = shutil.which(command)
    if found:
        return found
    print(f"installing {package} (apt-get) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    found = shutil.which(command)
    if not found:
        raise SystemExit(f"{command} is still missing after apt-get install {package}")
    return found


def zstd_toolset(major: int) -> Toolset:
    """A toolset whose pg_basebackup compresses with zstd: ``major``'s, else the next newer."""
    for candidate in range(major, 19):
        with contextlib.suppress(PgBackflowError):
            toolset = find_toolset(candidate)
            if toolset.supports_zstd:
                return toolset
    raise SystemExit(f"no zstd-capable pg_basebackup for PostgreSQL {major} or newer")


def cli_available() -> bool:
    """Whether ``pgbackflow physical-backup`` exists in this checkout."""
    probe = subprocess.run([sys.executable, "-m", "pgbackflow.cli", "physical-backup", "--help"],
                           capture_output=True, check=False)
    return probe.returncode == 0


class Bare:
    """Bare pg_basebackup runs against one cluster (as root, password in the environment)."""

    def __init__(self, cluster: EphemeralCluster) -> None:
        self.cluster = cluster
        self.env = {**os.environ, "PGPASSWORD": cluster.password}

    def args(self, toolset: Toolset, *extra: str) -> list[str]:
        """pg_basebackup's command line, connection and fast checkpoint included."""
        c = self.cluster
        return [str(toolset.binary("pg_basebackup")), "-h", c.host, "-p", str(c.port),
                "-U", c.superuser, "--no-password", "--checkpoint=fast", "-X", "fetch", *extra]

    def run(self, toolset: Toolset, *extra: str) -> float:
        """Run to completion; wall seconds."""
        started = time.perf_counter()
        subprocess.run(self.args(toolset, *extra), env=self.env, check=True)
        return time.perf_counter() - started

    def pipe(self, toolset: Toolset, out: Path | None, zstd: str | None) -> float:
        """``pg_basebackup -D - -Ft -X fetch [| zstd ...] > out``; wall seconds."""
        started = time.perf_counter()
        with open(out if out else os.devnull, "wb") as sink:
            if zstd is None:
                subprocess.run(self.args(toolset, "-D", "-", "-Ft"), env=self.env, check=True,
                               stdout=sink)
            else:
                producer = subprocess.Popen(self.args(toolset, "-D", "-", "-Ft"), env=self.env,
                                            stdout=subprocess.PIPE)
                assert producer.stdout is not None
                consumer = subprocess.Popen([zstd, "-q", *PIPE_ZSTD], stdin=producer.stdout,
                                            stdout=sink)
                producer.stdout.close()
                if consumer.wait() != 0 or producer.wait() != 0:
                    raise SystemExit("pg_basebackup | zstd failed")
        return time.perf_counter() - started


class PgBackRest:
    """A pgBackRest stanza for the cluster, in a private config, run as the server's user."""

    def __init__(self, binary: str, cluster: EphemeralCluster, root: Path, user: OsUser,
                 process_max: int) -> None:
        self.tool = Tool(Path(binary))
        self.user = user
        self.root = root
        self.repo = root / "repo"
        for folder in (root, self.repo, root / "lock", root / "log", root / "spool"):
            folder.mkdir(parents=True, exist_ok=True)
            os.chown(folder, user.uid, user.gid)
        root.chmod(0o700)
        self.passfile = root / "pgpass"
        self._private_file(self.passfile, f"*:*:*:*:{cluster.password}\n")
        self.conf = root / "pgbackrest.conf"
        self._private_file(self.conf, f"""[global]
repo1-path={self.repo}
repo1-retention-full=999
compress-type=zst
process-max={process_max}
start-fast=y
archive-check=n
lock-path={root / 'lock'}
log-path={root / 'log'}
spool-path={root / 'spool'}
log-level-console=warn
log-level-file=off

[{STANZA}]
pg1-path={cluster.data_dir}
pg1-port={cluster.port}
pg1-socket-path={cluster.socket_dir}
pg1-user={cluster.superuser}
""")
        self.version = self.run("version").strip()

    def _private_file(self, path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchown(fd, self.user.uid, self.user.gid)
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def run(self, *args: str) -> str:
        """One pgbackrest command; its stdout."""
        result = self.tool.run(
            [f"--config={self.conf}", f"--stanza={STANZA}", *args],
            env={"PGPASSFILE": str(self.passfile)}, user=self.user, cwd=self.root,
        )
        return result.stdout.decode()

    def enable_archiving(self, cluster: EphemeralCluster) -> None:
        """WAL into the stanza (archive_command, restart): a restored set needs it to become
        consistent (pgBackRest's backups hold no WAL of their own)."""
        command = (f"{self.tool.path} --config={self.conf} --stanza={STANZA} "
                   "archive-push %p")
        with cluster.connect() as conn:
            conn.execute("ALTER SYSTEM SET archive_mode = on")
            conn.execute(f"ALTER SYSTEM SET archive_command = '{command}'")
        cluster.halt()
        cluster.resume()

    def restore(self, data_dir: Path) -> None:
        """``restore`` of the newest set into ``data_dir`` (recovery to the end of the
        archive, archiving off in the copy)."""
        data_dir.mkdir(mode=0o700)
        os.chown(data_dir, self.user.uid, self.user.gid)
        self.run("restore", f"--pg1-path={data_dir}", "--archive-mode=off")

    def full_backup(self) -> tuple[float, int]:
        """Time ``backup --type=full``; returns (seconds, bytes of the backup set)."""
        started = time.perf_counter()
        self.run("backup", "--type=full")
        seconds = time.perf_counter() - started
        info = json.loads(self.run("info", "--output=json"))
        label = info[0]["backup"][-1]["label"]
        return seconds, dir_size(self.repo / "backup" / STANZA / label)


def settle(cluster: EphemeralCluster, timeout: float = 900.0) -> float:
    """CHECKPOINT; on 17+ also wait until the WAL summarizer has reached its redo point.

    Otherwise the first backup after a bulk load pays for the dirty buffers, and the first
    incremental after a change waits for the summarizer (pg_basebackup does) while the others
    do not: the order would decide the figures. Returns the seconds it took.
    """
    started = time.perf_counter()
    with cluster.connect() as conn:
        conn.execute("CHECKPOINT")
        if cluster.major < 17:
            return time.perf_counter() - started
        row = conn.execute("SELECT redo_lsn::text FROM pg_control_checkpoint()").fetchone()
        assert row is not None
        deadline = time.monotonic() + timeout
        while True:
            done = conn.execute(
                "SELECT summarized_lsn >= %s::pg_lsn FROM pg_get_wal_summarizer_state()",
                (row[0],),
            ).fetchone()
            if done and done[0]:
                return time.perf_counter() - started
            if time.monotonic() > deadline:
                raise SystemExit(f"the WAL summarizer did not reach {row[0]} in {timeout:.0f} s")
            time.sleep(0.1)


def settings_of(cluster: EphemeralCluster) -> ConnectionSettings:
    """How our code connects to the cluster."""
    return ConnectionSettings(host=cluster.host, port=cluster.port, dbname=DB,
                              user=cluster.superuser, password=cluster.password,
                              sslmode="disable")


def ours_backup(settings: ConnectionSettings, toolset: Toolset, storage: LocalFolderStorage,
                key: MasterKey, parent: PhysicalManifest | None = None,
                ) -> tuple[PhysicalManifest, float]:
    """Our physical backup without Prefect, as the flow does it; (manifest, wall seconds)."""
    started = time.perf_counter()
    facts = read_cluster_facts(settings)
    backup_id = new_backup_id()
    began = datetime.now(UTC)
    prefix = backup_prefix(facts.db_id, backup_id)
    if parent is None:
        result = take_base_backup(settings, toolset, [storage], key, prefix)
    else:
        with parent_manifest_file(storage, parent, Keyring([key])) as parent_file:
            result = take_base_backup(settings, toolset, [storage], key, prefix,
                                      incremental_from=parent_file)
    plan = BackupPlan("full") if parent is None else BackupPlan("incremental", parent)
    manifest = build_manifest(backup_id, facts, settings, toolset, key, plan, result,
                              began)
    write_manifest(storage, manifest, key)
    return manifest, time.perf_counter() - started


def run_cli(cluster: EphemeralCluster, folder: Path, key_file: Path, env: dict[str, str],
            *, incremental: bool = False) -> dict[str, Any]:
    """``pgbackflow physical-backup`` in a fresh process; its own timing and peak RSS."""
    dsn = (f"host={cluster.host} port={cluster.port} user={cluster.superuser} dbname={DB} "
           "sslmode=disable")
    argv = ["physical-backup", "--db", dsn, "--to", str(folder), "--key-file", str(key_file),
            "--json", *(["--incremental"] if incremental else [])]
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CLI_CHILD, json.dumps(argv)],
                         env={**env, "PGPASSWORD": cluster.password},
                         capture_output=True, text=True, check=False)
    process_s = time.perf_counter() - started
    report, marker, tail = out.stdout.rpartition("\nBENCH ")
    if not marker or out.returncode != 0:
        raise SystemExit(f"pgbackflow physical-backup failed:\n{out.stdout}\n{out.stderr}")
    result: dict[str, Any] = json.loads(tail.strip().splitlines()[0])
    if result["code"]:
        raise SystemExit(f"pgbackflow physical-backup exited {result['code']}:\n"
                         f"{out.stdout}\n{out.stderr[-3000:]}")
    with contextlib.suppress(ValueError):
        result["report"] = json.loads(report)
    result["process_s"] = process_s
    result["stored"] = dir_size(folder)
    return result


def console_env(cli_env: dict[str, str], cluster: EphemeralCluster, work: Path) -> dict[str, str]:
    """The environment of the console-script runs, as a user's shell has it: the password in
    PGPASSWORD; the daemons in a runtime directory of the benchmark's own."""
    return {**cli_env, "PGPASSWORD": cluster.password,
            "PGBACKFLOW_RUNTIME_DIR": str(work / "run")}


def daemon_commands(env: dict[str, str], command: str) -> int:
    """How many ``command`` runs the daemons of ``env``'s runtime directory took (each
    daemon logs the name of every command it forks)."""
    needle = f"command {command!r}"
    runtime = Path(env["PGBACKFLOW_RUNTIME_DIR"])
    return sum(log.read_text(errors="replace").count(needle) for log in runtime.glob("*.log"))


def run_console(argv: list[str], env: dict[str, str]) -> tuple[float, bool]:
    """``pgbackflow ARGV`` through the console script, as a user runs it: wall seconds from
    exec to exit, and whether the daemon ran it."""
    before = daemon_commands(env, argv[0])
    started = time.perf_counter()
    out = subprocess.run([PGBACKFLOW, *argv], env=env, capture_output=True, text=True,
                         check=False)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"pgbackflow {argv[0]} exited {out.returncode}:\n{out.stdout[-3000:]}\n"
                         f"{out.stderr[-3000:]}")
    in_daemon = daemon_commands(env, argv[0]) > before
    if not in_daemon:
        # It ran cold (another daemon key: pgbackflow's code or the packages changed under
        # us); the daemon it started serves the next run.
        wait_for_daemon(env)
    return seconds, in_daemon


def backup_argv(cluster: EphemeralCluster, folder: Path, key_file: Path) -> list[str]:
    """``physical-backup`` of the benchmark's database into ``folder`` (no password in it)."""
    dsn = (f"host={cluster.host} port={cluster.port} user={cluster.superuser} dbname={DB} "
           "sslmode=disable")
    return ["physical-backup", "--db", dsn, "--to", str(folder), "--key-file", str(key_file),
            "--json"]


def daemon_note(row: Row, served: list[bool]) -> None:
    """Say in ``row``'s note how many of its runs the daemon took."""
    row.note = (f"exec -> exit, {sum(served)}/{len(served)} runs in the daemon"
                + ("" if all(served) else " (the others cold, in their own process)"))


def stop_bench_daemons(env: dict[str, str]) -> None:
    """``pgbackflow daemon stop`` in the benchmark's runtime directory; a failure is
    reported, not raised (it must not hide the benchmark's own error)."""
    try:
        stop_daemons(env)
    except subprocess.CalledProcessError as exc:
        print(f"pgbackflow daemon stop exited {exc.returncode}: "
              f"{(exc.stderr or b'').decode(errors='replace').strip()[-500:]}", file=sys.stderr)


def in_order(round_number: int, steps: list[Callable[[], None]]) -> None:
    """Run ``steps``; every other round backwards (who runs after whom changes)."""
    for step in (steps if round_number % 2 else list(reversed(steps))):
        step()


# ---------------------------------------------------------------------------------------
# Phase 1: full backups


def full_phase(cluster: EphemeralCluster, work: Path, key: MasterKey, key_file: Path,
               options: argparse.Namespace, cli_env: dict[str, str] | None,
               proc_env: dict[str, str] | None) -> dict[str, Any]:
    """Full backups of the same database by every contender, interleaved, best of N."""
    toolset = cluster.toolset
    bare = Bare(cluster)
    zstd = ensure_command("zstd", "zstd")
    zstd_pgbb = zstd_toolset(cluster.major)
    rows = {
        "pgbackrest": Row(f"pgBackRest full (zst, process-max={options.process_max})"),
        "ours_proc": Row("pgbackflow physical-backup (whole process)"),
        "bare_z": Row("bare pg_basebackup -Ft -Z client-zstd:5"),
        "bare_pipe": Row("bare pg_basebackup -D - -Ft | zstd -T2 -5"),
        "bare_null": Row("bare pg_basebackup -D - -Ft > /dev/null"),
        "ours": Row("pgbackflow direct (take_base_backup)"),
        "ours_cli": Row("pgbackflow physical-backup (CLI flow, in-proc)"),
    }
    if zstd_pgbb.major != cluster.major:
        rows["bare_z"].note = f"pg_basebackup {zstd_pgbb.version}: PG {cluster.major}'s lacks zstd"
    rows["bare_null"].note = "the producer alone"

    backrest: PgBackRest | None = None
    try:
        binary = ensure_command("pgbackrest", "pgbackrest")
        backrest = PgBackRest(binary, cluster, work / "pgbackrest", resolve_os_user(),
                              options.process_max)
        backrest.run("stanza-create")
        rows["pgbackrest"].name = (f"{backrest.version} full (zst:3, "
                                   f"process-max={options.process_max})")
    except (PgBackflowError, subprocess.CalledProcessError, SystemExit) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        rows["pgbackrest"].note = f"unavailable: {reason[:160]}"
        print(f"pgBackRest: {rows['pgbackrest'].note}", flush=True)
        backrest = None

    settings = settings_of(cluster)
    storage = LocalFolderStorage(work / "ours")
    raw_bytes = 0
    served: list[bool] = []
    if proc_env is not None:
        # Untimed, as a user's first command: it runs in its own process and starts the
        # daemon the timed runs go to (and registers what a first run registers).
        print("whole-process warm-up: one untimed physical-backup, then the daemon ...",
              flush=True)
        run_console(backup_argv(cluster, fresh(work / "ours-proc"), key_file), proc_env)
        shutil.rmtree(work / "ours-proc")
        wait_for_daemon(proc_env)
    settle(cluster)

    def pgbackrest() -> None:
        if backrest is not None:
            rows["pgbackrest"].add(*backrest.full_backup())

    def whole_process() -> None:
        if proc_env is None:
            return
        folder = fresh(work / "ours-proc")
        seconds, in_daemon = run_console(backup_argv(cluster, folder, key_file), proc_env)
        rows["ours_proc"].add(seconds, dir_size(folder))
        served.append(in_daemon)
        shutil.rmtree(folder)

    def cli_flow() -> None:
        if cli_env is None:
            return
        folder = fresh(work / "ours-cli")
        run = run_cli(cluster, folder, key_file, cli_env)
        rows["ours_cli"].add(run["seconds"], run["stored"], run["rss_mb"])
        rows["ours_cli"].note = (f"timed inside; its process {run['process_s']:.1f} s; "
                                 f"Prefect runtime {run['baseline_mb']:.0f} MB of the RSS")
        shutil.rmtree(folder)

    def direct() -> None:
        nonlocal raw_bytes
        manifest, seconds = ours_backup(settings, toolset, storage, key)
        rows["ours"].add(seconds, manifest.stored_size)
        raw_bytes = manifest.base.raw_size
        shutil.rmtree(storage.folder)

    def bare_z() -> None:
        target = fresh(work / "bare-z")
        seconds = bare.run(zstd_pgbb, "-D", str(target), "-Ft", "-Z", "client-zstd:5")
        rows["bare_z"].add(seconds, dir_size(target))
        shutil.rmtree(target)

    def bare_pipe() -> None:
        target = fresh(work / "bare-pipe.tar.zst")
        rows["bare_pipe"].add(bare.pipe(toolset, target, zstd), dir_size(target))
        target.unlink()

    def bare_null() -> None:
        rows["bare_null"].add(bare.pipe(toolset, None, None), None)

    loads: list[float] = []
    for round_number in range(1, options.repeat + 1):
        loads.append(os.getloadavg()[0])
        print(f"full backups, round {round_number}/{options.repeat} (load {loads[-1]:.2f}) ...",
              flush=True)
        in_order(round_number, [pgbackrest, whole_process, cli_flow, direct, bare_z, bare_pipe,
                                bare_null])
        print("  " + ", ".join(f"{key} {row.runs[-1]:.1f}" for key, row in rows.items()
                               if row.runs), flush=True)
    if proc_env is None:
        rows["ours_proc"].note = "not measured: no Prefect API (--no-cli)"
    else:
        daemon_note(rows["ours_proc"], served)
    if cli_env is None:
        # TODO(cli): `pgbackflow physical-backup` was not available; rerun once it exists.
        rows["ours_cli"].note = "not measured: pgbackflow physical-backup is not available"
    if backrest is not None:
        rows["pgbackrest"].note = "no WAL in the set (archive-check=n), not encrypted"
    restore = restore_full_phase(cluster, work, key, key_file, backrest, options, proc_env)
    return {"server": toolset.version, "rows": rows, "raw_bytes": raw_bytes,
            "restore": restore, "loads": loads}


# ---------------------------------------------------------------------------------------
# Phase 1b: restore of a full to a running, consistent server


def wait_promoted(port: int, cluster: EphemeralCluster, timeout: float = 600.0) -> None:
    """Until the server at ``port`` accepts connections and is out of recovery."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.OperationalError), psycopg.connect(
            host="127.0.0.1", port=port, user=cluster.superuser, password=cluster.password,
            dbname=DB, connect_timeout=5,
        ) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row is not None and not row[0]:
                return
        time.sleep(0.1)
    raise SystemExit(f"the restored server on port {port} was not promoted in {timeout:.0f} s")


def branches(port: int, cluster: EphemeralCluster) -> int:
    """Rows of pgbench_branches on a restored server (a check that it holds the data)."""
    with psycopg.connect(host="127.0.0.1", port=port, user=cluster.superuser,
                         password=cluster.password, dbname=DB) as conn:
        row = conn.execute("SELECT count(*) FROM pgbench_branches").fetchone()
    return int(row[0]) if row else -1


def run_cli_pitr(store: Path, target: Path, key_file: Path, env: dict[str, str], port: int,
                 ) -> tuple[float, bool]:
    """``pgbackflow pitr --target latest --start --port PORT`` through the console script (so
    the warm daemon runs it, as it does a user's): wall seconds from exec to exit, and
    whether the daemon ran it."""
    return run_console(["pitr", "--from", str(store), "--to-dir", str(target), "--target",
                        "latest", "--start", "--port", str(port), "--key-file", str(key_file)],
                       env)


def ours_restore(storage: LocalFolderStorage, db_id: str, key: MasterKey, target: Path,
                 toolset: Toolset, user: OsUser) -> tuple[int, dict[str, float], int]:
    """Our PITR to the end without Prefect, as the flow does it; (port, stage seconds,
    WAL files fetched)."""
    stages: dict[str, float] = {}
    mark = time.perf_counter()
    plan = plan_pitr(storage, db_id, None)
    stages["plan"] = time.perf_counter() - mark
    mark = time.perf_counter()
    combine_began: list[float] = []

    def on_step(message: str) -> None:
        if message.startswith("combining"):
            combine_began.append(time.perf_counter())

    fetched = build_data_dir(storage, plan, Keyring([key]), target, toolset,
                             on_step=on_step, mark_incomplete=True)
    ended = time.perf_counter()
    # A chain: unpack (+ WAL fetched meanwhile), then pg_combinebackup; a full: unpack only.
    stages["unpack"] = (combine_began[0] if combine_began else ended) - mark
    if combine_began:
        stages["combine"] = ended - combine_began[0]
    mark = time.perf_counter()
    port = free_port()
    configure_recovery(target, None, port=port)
    allow_recovery_start(target)
    start_and_wait(target, toolset, user)
    finish_restore(target)
    stages["start"] = time.perf_counter() - mark  # replay and promotion
    return port, stages, len(fetched)


def restore_full_phase(cluster: EphemeralCluster, work: Path, key: MasterKey, key_file: Path,
                       backrest: PgBackRest | None, options: argparse.Namespace,
                       proc_env: dict[str, str] | None) -> dict[str, Any]:
    """A full backup of the same data by pgBackRest and by us, each restored to a running,
    promoted server (pgBackRest: restore + start with recovery from its archive; ours: PITR
    to latest from the backup's own WAL; ours again as a whole ``pgbackflow pitr`` process),
    interleaved, best of ``--repeat``."""
    toolset = cluster.toolset
    user = resolve_os_user()
    rows = {
        "pgbackrest": Row("pgBackRest restore + start"),
        "ours": Row("pgbackflow PITR (direct) + start"),
        "ours_cli": Row("pgbackflow pitr --start (whole process)"),
    }
    if backrest is None:
        rows["pgbackrest"].note = "pgBackRest unavailable"
        return {"rows": rows, "stages_s": {}}
    print("restore of a full: archiving into the stanza, one full backup each ...", flush=True)
    backrest.enable_archiving(cluster)
    backrest.run("backup", "--type=full", "--archive-check=y")
    storage = LocalFolderStorage(work / "restore-store")
    full, _ = ours_backup(settings_of(cluster), toolset, storage, key)
    stages: dict[str, list[float]] = {}
    expected = options.scale
    served: list[bool] = []

    def pgbackrest() -> None:
        assert backrest is not None
        target = work / "restore-backrest"
        os.sync()  # untimed: the previous run's dirty pages must not slow this one
        with stopped_after(target, toolset, user):
            started = time.perf_counter()
            backrest.restore(target)
            restored_s = time.perf_counter() - started
            port = free_port()
            with (target / "postgresql.auto.conf").open("a") as conf:
                conf.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\n"
                           "unix_socket_directories = '/tmp'\n")
            Tool(toolset.binary("pg_ctl")).run(
                ["-D", target, "-l", target / "postgres.log", "-w", "-t", "3600", "start"],
                user=user, cwd=target, timeout=None)
            wait_promoted(port, cluster)
            rows["pgbackrest"].add(time.perf_counter() - started, None)
            stages.setdefault("pgbackrest_restore", []).append(restored_s)
            if branches(port, cluster) != expected:
                raise SystemExit("pgBackRest's restored server lacks the data")

    def direct() -> None:
        target = work / "restore-ours"
        os.sync()
        with stopped_after(target, toolset, user):
            started = time.perf_counter()
            port, ours_stages, _ = ours_restore(storage, full.db_id, key, target, toolset,
                                                user)
            rows["ours"].add(time.perf_counter() - started, None)
            for name, seconds in ours_stages.items():
                stages.setdefault(f"ours_{name}", []).append(seconds)
            if branches(port, cluster) != expected:
                raise SystemExit("our restored server lacks the data")

    def whole_process() -> None:
        if proc_env is None:
            return
        target = work / "restore-cli"
        os.sync()
        with stopped_after(target, toolset, user):
            port = free_port()
            seconds, in_daemon = run_cli_pitr(storage.folder, target, key_file, proc_env,
                                              port)
            rows["ours_cli"].add(seconds, None)
            served.append(in_daemon)
            if branches(port, cluster) != expected:
                raise SystemExit("the restored server of pgbackflow pitr lacks the data")

    loads: list[float] = []
    for round_number in range(1, options.repeat + 1):
        loads.append(os.getloadavg()[0])
        print(f"restores of a full, round {round_number}/{options.repeat} "
              f"(load {loads[-1]:.2f}) ...", flush=True)
        in_order(round_number, [pgbackrest, whole_process, direct])
        print("  " + ", ".join(f"{key} {row.runs[-1]:.1f}" for key, row in rows.items()
                               if row.runs), flush=True)
    if proc_env is None:
        rows["ours_cli"].note = "not measured: no Prefect API (--no-cli)"
    else:
        daemon_note(rows["ours_cli"], served)
    best = {name: min(values) for name, values in stages.items()}
    rows["pgbackrest"].note = (f"restore {best['pgbackrest_restore']:.1f} s (process-max="
                               f"{options.process_max}), the rest start + replay from the "
                               "archive")
    rows["ours"].note = (f"plan {best['ours_plan']:.1f} s, unpack {best['ours_unpack']:.1f} s, "
                         f"start + replay {best['ours_start']:.1f} s")
    return {"rows": rows, "stages_s": best, "loads": loads}


# ---------------------------------------------------------------------------------------
# Phase 2: incremental and point-in-time restore


def apply_change(cluster: EphemeralCluster, options: argparse.Namespace) -> int:
    """Update ``--change-pct`` % of pgbench_accounts and events; returns accounts changed."""
    accounts = options.scale * ACCOUNTS_PER_SCALE
    if options.scattered:
        every = max(1, round(100 / options.change_pct))
        account_filter, event_filter = f"aid % {every} = 0", f"id % {every} = 0"
    else:
        account_filter = f"aid <= {int(accounts * options.change_pct / 100)}"
        event_filter = f"id <= {int(options.jsonb_rows * options.change_pct / 100)}"
    with cluster.connect(DB) as conn:
        cursor = conn.execute(
            f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE {account_filter}"
        )
        changed = cursor.rowcount
        conn.execute(f"UPDATE events SET doc = doc || '{{\"changed\": true}}' WHERE {event_filter}")
    return changed


def changed_accounts(port: int, cluster: EphemeralCluster) -> int:
    """Rows of pgbench_accounts a restored server shows as changed."""
    with psycopg.connect(host="127.0.0.1", port=port, user=cluster.superuser,
                         password=cluster.password, dbname=DB) as conn:
        row = conn.execute("SELECT count(*) FROM pgbench_accounts WHERE abalance <> 0").fetchone()
    return int(row[0]) if row else -1


@contextlib.contextmanager
def stopped_after(data_dir: Path, toolset: Toolset, user: OsUser) -> Iterator[None]:
    """Stop the server of ``data_dir`` (if it runs) and remove the directory, at the end."""
    try:
        yield
    finally:
        if (data_dir / "postmaster.pid").exists():
            Tool(toolset.binary("pg_ctl")).run(["-D", data_dir, "-m", "fast", "-w", "stop"],
                                               user=user, check=False, timeout=120)
        shutil.rmtree(data_dir, ignore_errors=True)


def chown_tree(root: Path, user: OsUser) -> None:
    """Hand a data directory to the server's OS user."""
    os.chown(root, user.uid, user.gid)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), user.uid, user.gid, follow_symlinks=False)


def restore_chain_ours(cluster: EphemeralCluster, storage: LocalFolderStorage, db_id: str,
                       key: MasterKey, work: Path, row: Row, steps: dict[str, float]) -> int:
    """Our PITR of the chain to the end, timed into ``row`` (the best run's stages kept);
    returns the changed rows the restored server shows."""
    toolset, user = cluster.toolset, resolve_os_user()
    print("phase 2: restore with pgbackflow ...", flush=True)
    restored = work / "restore-ours"
    os.sync()  # untimed: earlier phases' dirty pages must not slow whichever restore runs first
    with stopped_after(restored, toolset, user):
        started = time.perf_counter()
        port, stages, fetched = ours_restore(storage, db_id, key, restored, toolset, user)
        seconds = time.perf_counter() - started
        if not row.runs or seconds < row.best:
            steps.update({f"ours_{name}": value for name, value in stages.items()})
            row.note = (f"plan {stages['plan']:.1f} s, unpack {stages['unpack']:.1f} s, "
                        f"combine {stages['combine']:.1f} s, start+replay "
                        f"{stages['start']:.1f} s, {fetched} WAL fetched")
        row.add(seconds, None)
        return changed_accounts(port, cluster)


def restore_chain_bare(cluster: EphemeralCluster, bare_full: Path, bare_inc: Path, work: Path,
                       row: Row, steps: dict[str, float]) -> int:
    """``pg_combinebackup`` of the plain backups + start, timed into ``row``; returns the
    changed rows the restored server shows."""
    toolset, user = cluster.toolset, resolve_os_user()
    print("phase 2: restore by hand (pg_combinebackup) ...", flush=True)
    restored = work / "restore-bare"
    os.sync()
    with stopped_after(restored, toolset, user):
        started = time.perf_counter()
        Tool(toolset.binary("pg_combinebackup")).run(
            [str(bare_full), str(bare_inc), "--output", str(restored)], timeout=None)
        port = free_port()
        with (restored / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\n"
                       "unix_socket_directories = '/tmp'\n")
        chown_tree(restored, user)
        built = time.perf_counter() - started
        mark = time.perf_counter()
        Tool(toolset.binary("pg_ctl")).run(
            ["-D", restored, "-l", restored / "postgres.log", "-w", "-t", "3600", "start"],
            user=user, cwd=restored, timeout=None)
        seconds = time.perf_counter() - started
        if not row.runs or seconds < row.best:
            steps["bare_build"], steps["bare_start"] = built, time.perf_counter() - mark
            row.note = (f"combine {steps['bare_build']:.1f} s, start+replay "
                        f"{steps['bare_start']:.1f} s")
        row.add(seconds, None)
        return changed_accounts(port, cluster)


def pitr_phase(cluster: EphemeralCluster, work: Path, key: MasterKey, key_file: Path,
               options: argparse.Namespace, cli_env: dict[str, str] | None) -> dict[str, Any]:
    """Full, a change, incremental; then restore the chain, ours vs bare."""
    toolset = cluster.toolset
    bare = Bare(cluster)
    settings = settings_of(cluster)
    storage = LocalFolderStorage(work / "pitr-store")
    rows = {
        "ours_full": Row("pgbackflow direct full"),
        "ours_inc": Row("pgbackflow direct incremental"),
        "cli_full": Row("pgbackflow physical-backup (CLI) full"),
        "cli_inc": Row("pgbackflow physical-backup --incremental"),
        "bare_full": Row("bare pg_basebackup -Fp full"),
        "bare_inc": Row("bare pg_basebackup -Fp --incremental"),
        "bare_inc_z": Row("bare pg_basebackup -Ft -Z client-zstd:5 --incr."),
        "pitr_ours": Row("restore: pgbackflow PITR (latest)"),
        "pitr_bare": Row("restore: pg_combinebackup + start"),
    }
    rows["bare_full"].note = rows["bare_inc"].note = "plain, uncompressed"

    settled_s = settle(cluster)
    print(f"phase 2: full backups (checkpoint + WAL summarizer caught up: {settled_s:.1f} s) ...",
          flush=True)
    full, seconds = ours_backup(settings, toolset, storage, key)
    rows["ours_full"].add(seconds, full.stored_size)
    cli_folder = work / "pitr-cli"
    if cli_env is not None:
        run = run_cli(cluster, fresh(cli_folder), key_file, cli_env)
        rows["cli_full"].add(run["seconds"], run["stored"], run["rss_mb"])
    bare_full = fresh(work / "bare-full")
    rows["bare_full"].add(bare.run(toolset, "-D", str(bare_full), "-Fp"), dir_size(bare_full))

    print(f"changing {options.change_pct}% of the rows "
          f"({'scattered' if options.scattered else 'contiguous'}) ...", flush=True)
    started = time.perf_counter()
    expected = apply_change(cluster, options)
    change_s = time.perf_counter() - started
    summarized_s = settle(cluster)

    print("phase 2: incremental backups ...", flush=True)
    inc, seconds = ours_backup(settings, toolset, storage, key, parent=full)
    rows["ours_inc"].add(seconds, inc.stored_size)
    if cli_env is not None:
        before = dir_size(cli_folder)
        run = run_cli(cluster, cli_folder, key_file, cli_env, incremental=True)
        mode = run.get("report", {}).get("mode", "?")
        rows["cli_inc"].add(run["seconds"], run["stored"] - before, run["rss_mb"])
        rows["cli_inc"].note = f"mode: {mode}"
        shutil.rmtree(cli_folder)
    else:
        rows["cli_full"].note = rows["cli_inc"].note = "not measured: CLI not available"
    bare_inc = fresh(work / "bare-inc")
    manifest_arg = f"--incremental={bare_full / 'backup_manifest'}"
    rows["bare_inc"].add(bare.run(toolset, "-D", str(bare_inc), "-Fp", manifest_arg),
                         dir_size(bare_inc))
    target = fresh(work / "bare-inc-z")
    rows["bare_inc_z"].add(
        bare.run(toolset, "-D", str(target), "-Ft", "-Z", "client-zstd:5", manifest_arg),
        dir_size(target),
    )
    shutil.rmtree(target)

    steps: dict[str, float] = {}
    for round_ in range(options.restore_rounds):  # interleaved: the load changes by the minute
        ours_rows = restore_chain_ours(cluster, storage, full.db_id, key, work, rows["pitr_ours"],
                                       steps)
        bare_rows = restore_chain_bare(cluster, bare_full, bare_inc, work, rows["pitr_bare"],
                                       steps)
        print(f"  round {round_ + 1}: ours {rows['pitr_ours'].runs[-1]:.1f} s, bare "
              f"{rows['pitr_bare'].runs[-1]:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    shutil.rmtree(bare_full)
    shutil.rmtree(bare_inc)
    if not ours_rows == bare_rows == expected:
        raise SystemExit(f"restored data differ: changed rows expected {expected}, "
                         f"ours {ours_rows}, bare {bare_rows}")
    steps["settle_before_fulls"] = settled_s
    steps["settle_after_change"] = summarized_s
    return {"server": toolset.version, "rows": rows, "changed_accounts": expected,
            "change_s": change_s, "steps_s": steps}


# ---------------------------------------------------------------------------------------
# Report


def ratio(top: Row, bottom: Row, attribute: str) -> float | None:
    """``top / bottom`` of best seconds or size; None when either is missing."""
    if attribute == "time":
        if not top.runs or not bottom.runs:
            return None
        return top.best / bottom.best
    if not top.size or not bottom.size:
        return None
    return top.size / bottom.size


def show_rows(rows: dict[str, Row]) -> None:
    """The table of one phase."""
    print(f"{'':47} {'best s':>7} {'range s':>12} {'MB':>8} {'RSS MB':>7}  note")
    for row in rows.values():
        if not row.runs:
            print(f"{row.name:47} {'-':>7} {'':>12} {'':>8} {'':>7}  {row.note}")
            continue
        spread = f"{min(row.runs):.1f}-{max(row.runs):.1f}" if len(row.runs) > 1 else ""
        size = f"{row.size / 1e6:8.1f}" if row.size is not None else f"{'':8}"
        rss = f"{row.rss_mb:7.0f}" if row.rss_mb is not None else f"{'':7}"
        print(f"{row.name:47} {row.best:7.2f} {spread:>12} {size} {rss}  {row.note}")


def fmt(value: float | None, suffix: str = "x") -> str:
    """A ratio for people."""
    return "n/a" if value is None else f"{value:.3f}{suffix}"


def report(db_size: int, full: dict[str, Any] | None, pitr: dict[str, Any] | None,
           options: argparse.Namespace) -> dict[str, Any]:
    """Print the tables and ratios; return the machine-readable summary."""
    ratios: dict[str, float | None] = {}
    summary: dict[str, Any] = {"database_bytes": db_size}
    if full is not None:
        summary["full"] = _report_full(db_size, full, options, ratios)
    if pitr is not None:
        prow: dict[str, Row] = pitr["rows"]
        how = "every Nth row" if options.scattered else "a contiguous id range"
        print(f"\nIncremental and restore, PostgreSQL {pitr['server']}, the same database "
              f"built again; change: {options.change_pct}% of the rows of pgbench_accounts and "
              f"events ({how}, {pitr['change_s']:.1f} s, then checkpoint + WAL summarizer "
              f"catch-up {pitr['steps_s']['settle_after_change']:.1f} s, untimed); restore to "
              "the end of the chain, no WAL streamed (the backups carry their WAL)")
        show_rows(prow)
        ratios.update({
            "ours_incremental_pct_of_full": _pct(prow["ours_inc"], prow["ours_full"]),
            "cli_incremental_pct_of_full": _pct(prow["cli_inc"], prow["cli_full"]),
            "bare_incremental_pct_of_full_plain": _pct(prow["bare_inc"], prow["bare_full"]),
            "ours_inc_vs_bare_inc_z_time": ratio(prow["ours_inc"], prow["bare_inc_z"], "time"),
            "ours_inc_vs_bare_inc_z_size": ratio(prow["ours_inc"], prow["bare_inc_z"], "size"),
            "pitr_ours_vs_bare_time": ratio(prow["pitr_ours"], prow["pitr_bare"], "time"),
        })
        print("\nratios:")
        print(f"  incremental size, % of its full: ours "
              f"{fmt(ratios['ours_incremental_pct_of_full'], '%')}, CLI "
              f"{fmt(ratios['cli_incremental_pct_of_full'], '%')}, bare plain "
              f"{fmt(ratios['bare_incremental_pct_of_full_plain'], '%')}")
        print(f"  ours incremental / bare -Ft -Z client-zstd:5 --incremental: time "
              f"{fmt(ratios['ours_inc_vs_bare_inc_z_time'])}, size "
              f"{fmt(ratios['ours_inc_vs_bare_inc_z_size'])}")
        print(f"  restore ours / bare pg_combinebackup + start: time "
              f"{fmt(ratios['pitr_ours_vs_bare_time'])} (target ≤ 1.5)")
        summary["pitr"] = {
            "server": pitr["server"], "change_pct": options.change_pct,
            "scattered": options.scattered, "changed_accounts": pitr["changed_accounts"],
            "steps_s": pitr["steps_s"], "rows": {k: r.to_json() for k, r in prow.items()},
        }
    summary["ratios"] = ratios
    return summary


def _report_full(db_size: int, full: dict[str, Any], options: argparse.Namespace,
                 ratios: dict[str, float | None]) -> dict[str, Any]:
    """The full-backup phase's tables and ratios (into ``ratios``); its summary."""
    rows: dict[str, Row] = full["rows"]
    print(f"\nFull backups of a {db_size / 1e9:.2f} GB database, PostgreSQL {full['server']} "
          f"(best of {options.repeat}, interleaved; 1-min load per round: "
          f"{', '.join(f'{x:.2f}' for x in full['loads'])})")
    show_rows(rows)
    ratios.update({
        "ours_vs_pgbackrest_time": ratio(rows["ours"], rows["pgbackrest"], "time"),
        "ours_vs_pgbackrest_size": ratio(rows["ours"], rows["pgbackrest"], "size"),
        "cli_vs_pgbackrest_time": ratio(rows["ours_cli"], rows["pgbackrest"], "time"),
        "cli_vs_pgbackrest_size": ratio(rows["ours_cli"], rows["pgbackrest"], "size"),
        "ours_vs_bare_pipe_time": ratio(rows["ours"], rows["bare_pipe"], "time"),
        "ours_vs_bare_pipe_size": ratio(rows["ours"], rows["bare_pipe"], "size"),
        "ours_vs_bare_z_time": ratio(rows["ours"], rows["bare_z"], "time"),
        "ours_vs_bare_z_size": ratio(rows["ours"], rows["bare_z"], "size"),
        "cli_vs_ours_time": ratio(rows["ours_cli"], rows["ours"], "time"),
        "process_vs_pgbackrest_time": ratio(rows["ours_proc"], rows["pgbackrest"], "time"),
        "process_vs_pgbackrest_size": ratio(rows["ours_proc"], rows["pgbackrest"], "size"),
        "process_vs_ours_time": ratio(rows["ours_proc"], rows["ours"], "time"),
    })
    print("\nratios (best runs):")
    print(target_line("whole process / pgBackRest full", rows["ours_proc"], rows["pgbackrest"],
                      1.0, strict=True))
    print(f"  whole process / pgBackRest: size {fmt(ratios['process_vs_pgbackrest_size'])} "
          f"(target ≤ 1.05); whole process / ours direct: time "
          f"{fmt(ratios['process_vs_ours_time'])} (start-up, Prefect and the daemon's share)")
    print(f"  ours direct / pgBackRest: time {fmt(ratios['ours_vs_pgbackrest_time'])} "
          f"(target < 1), size {fmt(ratios['ours_vs_pgbackrest_size'])} (target ≤ 1.05)")
    print(f"  ours CLI    / pgBackRest: time {fmt(ratios['cli_vs_pgbackrest_time'])} "
          f"(target < 1), size {fmt(ratios['cli_vs_pgbackrest_size'])} (target ≤ 1.05)")
    print(f"  ours direct / bare | zstd -T2 -5: time {fmt(ratios['ours_vs_bare_pipe_time'])}, "
          f"size {fmt(ratios['ours_vs_bare_pipe_size'])}")
    print(f"  ours direct / bare -Z client-zstd:5: time {fmt(ratios['ours_vs_bare_z_time'])}, "
          f"size {fmt(ratios['ours_vs_bare_z_size'])}")
    print(f"  ours CLI / ours direct (Prefect's share): time {fmt(ratios['cli_vs_ours_time'])}")
    raw = full["raw_bytes"]
    speeds = {key: raw / 1e6 / rows[key].best for key in ("bare_null", "bare_pipe", "ours")
              if rows[key].runs}
    print(f"  pg_basebackup's tar stream: {raw / 1e6:.0f} MB; MB/s: "
          + ", ".join(f"{rows[key].name} {speed:.0f}" for key, speed in speeds.items()))
    restore_rows: dict[str, Row] = full["restore"]["rows"]
    print(f"\nRestore of a full to a running, promoted server, PostgreSQL {full['server']} "
          f"(best of {options.repeat}, interleaved; 1-min load per round: "
          f"{', '.join(f'{x:.2f}' for x in full['restore']['loads'])})")
    show_rows(restore_rows)
    ratios["restore_full_ours_vs_pgbackrest_time"] = ratio(
        restore_rows["ours"], restore_rows["pgbackrest"], "time")
    ratios["restore_full_cli_vs_pgbackrest_time"] = ratio(
        restore_rows["ours_cli"], restore_rows["pgbackrest"], "time")
    print(f"  ours direct / pgBackRest restore + start: time "
          f"{fmt(ratios['restore_full_ours_vs_pgbackrest_time'])} (target ≤ 1.0)")
    print(target_line("whole process pitr / pgBackRest restore + start", restore_rows["ours_cli"],
                      restore_rows["pgbackrest"], 1.0, strict=False))
    return {"server": full["server"], "repeat": options.repeat, "raw_bytes": raw,
            "loads": full["loads"], "rows": {k: r.to_json() for k, r in rows.items()},
            "restore": {"rows": {k: r.to_json() for k, r in restore_rows.items()},
                        "stages_s": full["restore"]["stages_s"],
                        "loads": full["restore"]["loads"]}}


def target_line(name: str, ours: Row, theirs: Row, target: float, *, strict: bool) -> str:
    """``ours / theirs`` of the best runs against issue 15's ``target`` (``<`` when
    ``strict``, else ``≤``), with the per-round range of the interleaved runs."""
    value = ratio(ours, theirs, "time")
    if value is None:
        return f"  {name:50} n/a (not measured), target {'<' if strict else '≤'} {target:.1f}x"
    per_round = [o / t for o, t in zip(ours.runs, theirs.runs, strict=True)]
    met = value < target if strict else value <= target
    return (f"  {name:50} {value:5.3f}x best/best (per round {min(per_round):.2f}-"
            f"{max(per_round):.2f}x), target {'<' if strict else '≤'} {target:.1f}x: "
            f"{'met' if met else 'NOT met'}")


def _pct(part: Row, whole: Row) -> float | None:
    if part.size is None or not whole.size:
        return None
    return 100.0 * part.size / whole.size


# ---------------------------------------------------------------------------------------


def main() -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale (50 ≈ 750 MB)")
    parser.add_argument("--jsonb-rows", type=int, default=2_500_000)
    parser.add_argument("--major", type=int, default=15, help="server of the full-backup phase")
    parser.add_argument("--pitr-major", type=int, default=17,
                        help="server of the incremental/restore phase (17+; 0 skips it)")
    parser.add_argument("--repeat", type=int, default=3, help="full-backup rounds; best kept")
    parser.add_argument("--process-max", type=int, default=2, help="pgBackRest process-max")
    parser.add_argument("--change-pct", type=float, default=5.0)
    parser.add_argument("--scattered", action="store_true",
                        help="change every Nth row instead of a contiguous range")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI (Prefect) runs")
    parser.add_argument("--only", choices=["chain"],
                        help="chain: only the incremental phase and the chain's restore")
    parser.add_argument("--restore-rounds", type=int, default=1,
                        help="chain restores (ours, then bare) repeated; best kept")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    parser.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres",
                        help="the Prefect server's database")
    options = parser.parse_args()
    if options.pitr_major and options.pitr_major < 17:
        parser.error("--pitr-major must be 17 or newer (incremental backups), or 0 to skip")
    if options.only == "chain":
        if not options.pitr_major:
            parser.error("--only chain needs --pitr-major")
        options.major = options.pitr_major  # the database is built once, on that server

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    work = Path(tempfile.mkdtemp(prefix="pgbackflow-bench-physical-"))
    work.chmod(0o755)  # the restored servers' OS user walks down to their data directories
    key = MasterKey.generate()
    key_file = work / "bench.key"
    write_key_file(key_file, key)
    use_cli = not options.no_cli and cli_available()
    if not use_cli:
        print("the CLI runs are skipped"
              + ("" if options.no_cli else ": pgbackflow physical-backup is not available"))

    try:
        with contextlib.ExitStack() as stack:
            cli_env: dict[str, str] | None = None
            if use_cli:
                server = stack.enter_context(prefect_backend(options.backend, work / "prefect"))
                print(f"Prefect server {server.api_url} ({options.backend})", flush=True)
                cli_env = server.env
            cluster = stack.enter_context(EphemeralCluster(find_toolset(options.major)))
            proc_env = None if cli_env is None else console_env(cli_env, cluster, work)
            # The in-process CLI flow keeps its quieter logging (it always had it).
            cli_env = None if cli_env is None else {**cli_env, "PREFECT_LOGGING_LEVEL": "WARNING"}
            if proc_env is not None:
                # Unwound first (before the cluster and the Prefect API stop), also on errors.
                stack.callback(stop_bench_daemons, proc_env)
            print(f"building the database (pgbench -s {options.scale} + {options.jsonb_rows} "
                  f"jsonb rows) on PostgreSQL {cluster.toolset.version} ...", flush=True)
            db_size = build_database(cluster, DB, options.scale, options.jsonb_rows)
            print(f"database: {db_size / 1e9:.2f} GB", flush=True)
            full = (None if options.only == "chain"
                    else full_phase(cluster, work, key, key_file, options, cli_env, proc_env))
            pitr = None
            if options.pitr_major:
                if options.pitr_major != options.major:
                    cluster.stop()
                    cluster = stack.enter_context(
                        EphemeralCluster(find_toolset(options.pitr_major)))
                    print(f"building the same database on PostgreSQL "
                          f"{cluster.toolset.version} ...", flush=True)
                    build_database(cluster, DB, options.scale, options.jsonb_rows)
                pitr = pitr_phase(cluster, work, key, key_file, options, cli_env)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = report(db_size, full, pitr, options)
    if options.json:
        print("\n" + json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
