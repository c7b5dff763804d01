"""Benchmark: whole ``pgbackflow`` processes as users run them, against bare PostgreSQL tools.

One warm ``prefect server start`` (a subprocess on its own port, PostgreSQL-backed as README
recommends for production; its ``PREFECT_API_URL`` is given to every child), one
PostgreSQL 17 cluster with a tiny database (100 rows) and a big one (pgbench + a jsonb table,
``--big-gb``, default ~1.4 GB). For ``--rounds`` rounds, interleaved (who goes first
alternates), each command is a fresh process timed from exec to exit (``time.perf_counter``
around ``subprocess.run``):

- tiny: ``pgbackflow backup`` vs bare ``pg_dump -Fc -Z zstd:5``; the fixed cost is the
  difference (target ≤ 1.0 s); ``pgbackflow verify --sandbox local`` of it vs bare;
- floors: ``python -c pass``, ``python -c "import prefect"``, ``pgbackflow --version``;
- big: ``pgbackflow backup`` vs bare ``pg_dump -Fc -Z zstd:5`` (target ≤ 1.10x), then
  ``pgbackflow verify --sandbox local --cpus 2`` vs bare initdb + ``pg_restore -j2`` of the
  bare dump + exact ``count(*)`` of every table + teardown (target ≤ 1.2x; the bare side runs
  in this process, as bench_verification.py times it, so it pays no interpreter start).

Secrets go the way users pass them: the password in ``PGPASSWORD``, the master key in a key
file; neither is in any argv. The 1-minute load average is printed per round (the machine
is shared). ``--profile`` runs one tiny backup under ``PYTHONPROFILEIMPORTTIME`` and one under
py-spy (sampling, all waits included; cProfile of the main thread if py-spy is not installed)
and prints where its wall time goes.

Usage: .venv/bin/python -m tests.benchmarks.bench_cli [--rounds 3] [--big-gb 1.4]
       [--profile] [--skip-big] [--wait-load 1.5 [--wait-max 600]]
       [--backend postgres|sqlite]
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import MasterKey, write_key_file
from pgbackflow.tasks.toolsets import find_toolset
from tests.benchmarks.bench_logical_backup import build_database
from tests.benchmarks.bench_run_latency import prefect_backend
from tests.benchmarks.bench_verification import bare_verification
from tests.fixtures.prefect_server import BIN, PrefectServer

PGBACKFLOW = str(BIN / "pgbackflow")
PYTHON = str(BIN / "python")
# Measured here (PG 17.11, after VACUUM, pg_database_size in 10^9 bytes): pgbench scale 57 +
# 2.87 M jsonb rows is 1.39 GB; both parts scale linearly. (machine-facts.md's "scale 50 +
# 2.5 M rows is 1.42 GB" no longer holds: that builds 1.20 GB, so `--big-gb 1.4` built a
# 1.20 GB database until 2026-12-01, whose shorter dump made the fixed cost weigh more.)
GB_PER_SCALE_UNIT = 1.39 / 57
JSONB_ROWS_PER_GB = 2_870_000 / 1.39


@dataclass
class Series:
    """Wall times of one command over the rounds."""

    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds)

    def span(self) -> str:
        return f"{min(self.seconds):.2f}-{max(self.seconds):.2f}"


@dataclass
class Setup:
    """What every timed command needs: the server, the cluster, the key, the folders."""

    server: PrefectServer
    cluster: EphemeralCluster
    key_file: Path
    work: Path

    def env(self) -> dict[str, str]:
        """As a user's shell has it; the CLI's daemons in a runtime directory of their own."""
        return {**self.server.env, "PGPASSWORD": self.cluster.password,
                "PGBACKFLOW_RUNTIME_DIR": str(self.work / "run")}

    def dsn(self, database: str) -> str:
        """A DSN without the password (it comes from PGPASSWORD, as a user's shell has it)."""
        c = self.cluster
        return f"host={c.host} port={c.port} user={c.superuser} dbname={database} sslmode=disable"

    def backup_argv(self, database: str) -> list[str]:
        return [PGBACKFLOW, "backup", "--db", self.dsn(database),
                "--to", str(self.work / f"store-{database}"), "--key-file", str(self.key_file),
                "--json"]

    def verify_argv(self, database: str) -> list[str]:
        return [PGBACKFLOW, "verify", "--from", str(self.work / f"store-{database}"),
                "--sandbox", "local", "--cpus", "2", "--memory-mb", "4096",
                "--key-file", str(self.key_file), "--json"]

    def pg_dump_argv(self, database: str) -> list[str]:
        c = self.cluster
        return [str(c.toolset.binary("pg_dump")), "-h", c.host, "-p", str(c.port),
                "-U", c.superuser, "-Fc", "-Z", "zstd:5",
                "-f", str(self.work / f"bare-{database}.dump"), database]


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one process from exec to exit; its output only if it fails."""
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} exited {result.returncode}:\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return elapsed


def timed_call(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def load() -> float:
    return os.getloadavg()[0]


def interleave(round_no: int, pairs: list[tuple[Series, Callable[[], float]]]) -> None:
    """Run each measurement once; odd rounds in reverse order, so neither side always goes
    first (after the other's page cache and CPU boost)."""
    order = pairs if round_no % 2 == 0 else list(reversed(pairs))
    for series, measure in order:
        series.seconds.append(measure())


def _backup_and_verify(setup: Setup, size: str, series: dict[str, Series], round_no: int,
                       env: dict[str, str]) -> None:
    """One round of ``size``: bare pg_dump against ``pgbackflow backup``, then the bare
    verification of the bare dump against ``pgbackflow verify``, each pair interleaved."""
    dump = setup.work / f"bare-{size}.dump"
    interleave(round_no, [
        (series[f"bare pg_dump {size}"], lambda: timed(setup.pg_dump_argv(size), env)),
        (series[f"pgbackflow backup {size}"], lambda: timed(setup.backup_argv(size), env)),
    ])
    interleave(round_no, [
        (series[f"bare verify {size}"],
         lambda: timed_call(lambda: bare_verification(17, dump, 2))),
        (series[f"pgbackflow verify {size}"], lambda: timed(setup.verify_argv(size), env)),
    ])


def _print_round(size: str, round_no: int, load_now: float, series: dict[str, Series]) -> None:
    print(f"{size} round {round_no + 1}: load {load_now:.2f}, "
          + ", ".join(f"{s.name} {s.seconds[-1]:.2f}" for s in series.values()), flush=True)


def _size_series(size: str) -> list[str]:
    return [f"bare pg_dump {size}", f"pgbackflow backup {size}", f"bare verify {size}",
            f"pgbackflow verify {size}"]


def tiny_rounds(setup: Setup, rounds: int) -> tuple[dict[str, Series], list[float]]:
    env = setup.env()
    names = ["python -c pass", "python -c 'import prefect'", "pgbackflow --version",
             "pgbackflow backup tiny, no daemon", *_size_series("tiny")]
    series = {name: Series(name) for name in names}
    # Warm-up (not timed): the first run after the server start registers block types,
    # the first verify needs a backup; later runs find both as a user's Nth run does. The
    # first command also starts the CLI's daemon (pgbackflow/launcher.py), as a user's first
    # command does: the timed ones run in it.
    timed(setup.backup_argv("tiny"), env)
    timed(setup.pg_dump_argv("tiny"), env)
    wait_for_daemon(env)
    no_daemon = {**env, "PGBACKFLOW_DAEMON": "off"}
    loads = []
    for round_no in range(rounds):
        loads.append(load())
        interleave(round_no, [
            (series["python -c pass"], lambda: timed([PYTHON, "-c", "pass"], env)),
            (series["python -c 'import prefect'"],
             lambda: timed([PYTHON, "-c", "import prefect"], env)),
            (series["pgbackflow --version"], lambda: timed([PGBACKFLOW, "--version"], env)),
            (series["pgbackflow backup tiny, no daemon"],
             lambda: timed(setup.backup_argv("tiny"), no_daemon)),
        ])
        _backup_and_verify(setup, "tiny", series, round_no, env)
        _print_round("tiny", round_no, loads[-1], series)
    return series, loads


def big_rounds(setup: Setup, rounds: int) -> tuple[dict[str, Series], list[float]]:
    env = setup.env()
    series = {name: Series(name) for name in _size_series("big")}
    loads = []
    for round_no in range(rounds):
        loads.append(load())
        _backup_and_verify(setup, "big", series, round_no, env)
        _print_round("big", round_no, loads[-1], series)
    return series, loads


def wait_for_daemon(env: dict[str, str], patience_s: float = 120) -> None:
    """Until the daemon the first command started serves (it imports for ~2 s)."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        status = subprocess.run([PGBACKFLOW, "daemon", "status", "--json"], env=env,
                                capture_output=True, text=True, check=True)
        if any(Path(d["socket"]).exists() for d in json.loads(status.stdout)):
            return
        time.sleep(0.5)
    raise RuntimeError("no pgbackflow daemon serves after the first command")


def stop_daemons(env: dict[str, str]) -> None:
    subprocess.run([PGBACKFLOW, "daemon", "stop"], env=env, capture_output=True, check=True)


def wait_for_load(limit: float | None, patience_s: float, phase: str) -> None:
    """Start a phase once the shared machine's 1-min load is ≤ ``limit`` (or after
    ``patience_s`` regardless): the other agents' test runs come and go."""
    if limit is None:
        return
    deadline = time.monotonic() + patience_s
    while load() > limit and time.monotonic() < deadline:
        time.sleep(10)
    print(f"load before the {phase} phase: {load():.2f} (wanted ≤ {limit})", flush=True)


def print_table(series: dict[str, Series], loads: list[float], title: str) -> None:
    print(f"\n{title} (1-min load per round: {', '.join(f'{x:.2f}' for x in loads)})")
    print(f"{'command (fresh process, exec → exit)':38} {'best s':>8} {'range s':>13}")
    for s in series.values():
        print(f"{s.name:38} {s.best:8.2f} {s.span():>13}")


def ratio_line(name: str, ours: Series, bare: Series, target: float) -> None:
    per_round = [o / b for o, b in zip(ours.seconds, bare.seconds, strict=True)]
    ratio = ours.best / bare.best
    print(f"{name:40} {ratio:5.2f}x best/best (per round {min(per_round):.2f}-"
          f"{max(per_round):.2f}x), target ≤ {target:.2f}x: "
          f"{'met' if ratio <= target else 'NOT met'}")


def fixed_cost_line(ours: Series, bare: Series, target_s: float,
                    name: str = "fixed cost of a backup (tiny - bare)") -> None:
    per_round = [o - b for o, b in zip(ours.seconds, bare.seconds, strict=True)]
    cost = ours.best - bare.best
    print(f"{name:40} {cost:5.2f} s best/best (per round "
          f"{min(per_round):.2f}-{max(per_round):.2f} s), target ≤ {target_s:.1f} s: "
          f"{'met' if cost <= target_s else 'NOT met'}")


# --- profile ----------------------------------------------------------------------------

PACKAGES = {"prefect", "fastapi", "pydantic", "sqlalchemy", "httpx", "boto3", "botocore",
            "psycopg", "typer", "rich", "cryptography", "docker", "uvicorn", "starlette"}
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def import_times(setup: Setup) -> None:
    """Top-level imports of one tiny backup (``-X importtime``), by cumulative time."""
    # Profiled in its own process (no daemon): where a cold command's time goes.
    env = {**setup.env(), "PYTHONPROFILEIMPORTTIME": "1", "PGBACKFLOW_DAEMON": "off"}
    started = time.perf_counter()
    result = subprocess.run(setup.backup_argv("tiny"), env=env, capture_output=True, text=True,
                            check=True)
    wall = time.perf_counter() - started
    top: list[tuple[int, str]] = []
    packages: dict[str, int] = {}
    for line in result.stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if not match:
            continue
        if match.group(3) == " ":  # one space: imported by the program itself
            top.append((int(match.group(2)), match.group(4)))
        if match.group(4) in PACKAGES:  # its first import, wherever it happens
            packages[match.group(4)] = int(match.group(2))
    total = sum(us for us, _ in top)
    print(f"\n-X importtime of one tiny backup (wall {wall:.2f} s with the import tracing): "
          f"top-level imports {total / 1e6:.2f} s in all")
    for us, name in sorted(top, reverse=True)[:8]:
        print(f"  {us / 1e6:6.2f} s  {name}")
    print("  packages, cumulative at their first import (nested in the above):")
    for name, us in sorted(packages.items(), key=lambda item: -item[1]):
        print(f"  {us / 1e6:6.2f} s  {name}")


def package_of(path: str) -> str:
    """The top package of a frame's path (py-spy prints them relative to sys.path)."""
    return path.split("site-packages/")[-1].split("/", 1)[0].removesuffix(".py")


FRAME = re.compile(r"^(.*) \((.*):\d+\)$")
WAITS = {"wait", "join", "acquire", "_wait_for_tstate_lock", "sleep", "result", "select"}


def categorize(stack: list[tuple[str, str]]) -> str:
    """Which part of a run one main-thread sample belongs to."""
    if not stack:
        return "other (CLI, typer, interpreter)"
    functions = [function for function, _ in stack]
    paths = [path for _, path in stack]
    if "_find_and_load" in functions:
        modules = [package_of(path) for function, path in stack
                   if function == "<module>" and not path.startswith(("pgbackflow", "<"))]
        return f"import {modules[0] if modules else 'pgbackflow (own code)'}"
    if "dump_database" in functions:
        return "the dump itself (pg_dump -> encrypt -> storage)"
    if any(p.startswith(("httpx/", "httpcore/")) for p in paths):
        return "Prefect API round trips (HTTP, main thread)"
    waiting = stack[-1][0].rsplit(".", 1)[-1] in WAITS
    if "Flow.__call__" in functions:
        return "flow/task engine, " + ("waiting" if waiting else "CPU") + " (no HTTP)"
    if any(p.startswith("prefect/") for p in paths):
        return "Prefect outside the flow run, " + ("waiting (exit: flush of logs/events)"
                                                  if waiting else "CPU (settings, clients)")
    return "other (CLI, typer, interpreter)"


def py_spy_profile(setup: Setup, py_spy: str) -> None:
    """Where one tiny backup's wall time goes: py-spy samples of the main thread, idle too."""
    raw = setup.work / "py-spy.txt"
    rate = 250
    argv = [py_spy, "record", "--idle", "--threads", "--rate", str(rate), "--format", "raw",
            "--output", str(raw), "--", *setup.backup_argv("tiny")]
    wall = timed(argv, {**setup.env(), "PGBACKFLOW_DAEMON": "off"})
    categories: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        frames_text, _, count_text = line.rpartition(" ")
        thread, *frames = frames_text.split(";")
        if not thread.endswith("MainThread"):  # the flow and task runs are on the main one
            continue
        stack = [(m.group(1), m.group(2)) for f in frames if (m := FRAME.match(f))]
        count = int(count_text)
        categories[categorize(stack)] += count
        if "_find_and_load" not in {function for function, _ in stack}:
            for function, path in set(stack):
                if path.startswith(("prefect/", "pgbackflow/")):
                    functions[f"{function} ({path})"] += count
    sampled = sum(categories.values()) / rate
    print(f"\npy-spy of one tiny backup: wall {wall:.2f} s under py-spy, main thread sampled "
          f"{sampled:.2f} s (the rest: interpreter start before the first sample, exit)")
    for name, count in categories.most_common(16):
        print(f"  {count / rate:6.2f} s  {name}")
    print("  heaviest functions outside imports (inclusive, main thread):")
    for name, count in functions.most_common(16):
        print(f"  {count / rate:6.2f} s    {name}")


def cprofile_profile(setup: Setup) -> None:
    """Fallback without py-spy: cProfile of the main thread of one tiny backup."""
    out = setup.work / "cli.prof"
    argv = [PYTHON, "-m", "cProfile", "-o", str(out), "-m", "pgbackflow.cli",
            *setup.backup_argv("tiny")[1:]]
    wall = timed(argv, setup.env())
    print(f"\ncProfile of one tiny backup (wall {wall:.2f} s), top cumulative:")
    pstats.Stats(str(out)).sort_stats("cumulative").print_stats(25)


COUNT_CHILD = """
import atexit, collections, json, re, sys, threading, time
import httpx
calls, seconds = collections.Counter(), collections.Counter()

def record(request, started):
    path = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "ID", request.url.path.split("/api/", 1)[-1])
    main = threading.current_thread() is threading.main_thread()
    key = f"{request.method} {path} ({'main thread' if main else 'background'})"
    calls[key] += 1
    seconds[key] += time.perf_counter() - started

def wrap(cls):
    original = cls.send
    if cls is httpx.AsyncClient:
        async def send(self, request, *args, **kwargs):
            started = time.perf_counter()
            try:
                return await original(self, request, *args, **kwargs)
            finally:
                record(request, started)
    else:
        def send(self, request, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(self, request, *args, **kwargs)
            finally:
                record(request, started)
    cls.send = send

wrap(httpx.Client)
wrap(httpx.AsyncClient)

@atexit.register  # registered first, so it runs after Prefect's own flush at exit
def report():
    counts = {key: [calls[key], seconds[key]] for key in calls}
    sys.stderr.write("\\nCOUNTS " + json.dumps(counts) + "\\n")

sys.argv = ["pgbackflow", *sys.argv[1:]]
from pgbackflow.cli import main
main()
"""


def api_requests(setup: Setup) -> None:
    """The API requests of one tiny backup, counted in its process (httpx's send wrapped)."""
    argv = [PYTHON, "-c", COUNT_CHILD, *setup.backup_argv("tiny")[1:]]
    result = subprocess.run(argv, env=setup.env(), capture_output=True, text=True, check=True)
    counts: dict[str, list[float]] = json.loads(result.stderr.rpartition("\nCOUNTS ")[2])
    main = [v for k, v in counts.items() if k.endswith("(main thread)")]
    print(f"\nAPI requests of one tiny backup: {sum(int(v[0]) for v in counts.values())}, "
          f"{sum(int(v[0]) for v in main)} of them on the main thread taking "
          f"{sum(v[1] for v in main):.2f} s (the run waits for these)")
    for key, (calls, seconds) in sorted(counts.items(), key=lambda item: -item[1][1]):
        print(f"  {int(calls):3d} x {seconds:5.2f} s  {key}")


def profile(setup: Setup) -> None:
    import_times(setup)
    py_spy = shutil.which("py-spy", path=str(BIN))
    if py_spy:
        py_spy_profile(setup, py_spy)
    else:
        cprofile_profile(setup)
    api_requests(setup)


# --- setup ------------------------------------------------------------------------------


def create_tiny(cluster: EphemeralCluster) -> None:
    with cluster.connect() as conn:
        conn.execute("CREATE DATABASE tiny")
    with cluster.connect("tiny") as conn:
        conn.execute("CREATE TABLE t AS SELECT generate_series(1, 100) AS id")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big-gb", type=float, default=1.4, help="size of the big database")
    parser.add_argument("--skip-big", action="store_true", help="tiny database only")
    parser.add_argument("--profile", action="store_true", help="profile one tiny backup")
    parser.add_argument("--wait-load", type=float, default=None,
                        help="before each phase, wait for a 1-min load ≤ this ...")
    parser.add_argument("--wait-max", type=float, default=600, help="... up to this many s")
    parser.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres",
                        help="the Prefect server's database")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pgbackflow-bench-cli-") as tmp:
        work = Path(tmp)
        key_file = work / "master.key"
        write_key_file(key_file, MasterKey.generate())
        with EphemeralCluster(find_toolset(17)) as cluster, \
                prefect_backend(options.backend, work / "prefect") as server:
            setup = Setup(server, cluster, key_file, work)
            try:
                tiny, tiny_loads, big, big_loads, size = _phases(setup, cluster, options)
            finally:
                stop_daemons(setup.env())
    _print_results(options, tiny, tiny_loads, big, big_loads, size)
    return 0


def _phases(setup: Setup, cluster: EphemeralCluster, options: argparse.Namespace) -> tuple[
        dict[str, Series], list[float], dict[str, Series], list[float], int]:
    """The tiny rounds (and the profile), then the big database's rounds."""
    create_tiny(cluster)
    print(f"Prefect server {setup.server.api_url} ({options.backend}), PostgreSQL "
          f"{cluster.toolset.version}; load {load():.2f}", flush=True)
    wait_for_load(options.wait_load, options.wait_max, "tiny")
    tiny, tiny_loads = tiny_rounds(setup, options.rounds)
    if options.profile:
        profile(setup)
    big: dict[str, Series] = {}
    big_loads: list[float] = []
    size = 0
    if not options.skip_big:
        scale = max(1, round(options.big_gb / GB_PER_SCALE_UNIT))
        rows = int(options.big_gb * JSONB_ROWS_PER_GB)
        print(f"building the big database: pgbench -s {scale} + {rows} jsonb rows ...",
              flush=True)
        size = build_database(cluster, "big", scale, rows)
        print(f"big database: {size / 1e9:.2f} GB", flush=True)
        wait_for_load(options.wait_load, options.wait_max, "big")
        big, big_loads = big_rounds(setup, options.rounds)
    return tiny, tiny_loads, big, big_loads, size


def _print_results(options: argparse.Namespace, tiny: dict[str, Series], tiny_loads: list[float],
                   big: dict[str, Series], big_loads: list[float], size: int) -> None:
    print_table(tiny, tiny_loads, f"tiny database (100 rows), {options.rounds} rounds")
    print()
    fixed_cost_line(tiny["pgbackflow backup tiny"], tiny["bare pg_dump tiny"], 1.0)
    fixed_cost_line(tiny["pgbackflow backup tiny, no daemon"], tiny["bare pg_dump tiny"], 1.0,
                    "fixed cost without the daemon")
    if big:
        print_table(big, big_loads, f"big database ({size / 1e9:.2f} GB), {options.rounds} "
                    "rounds")
        print()
        ratio_line("logical backup vs bare pg_dump", big["pgbackflow backup big"],
                   big["bare pg_dump big"], 1.10)
        ratio_line("verify --sandbox local vs bare", big["pgbackflow verify big"],
                   big["bare verify big"], 1.2)


if __name__ == "__main__":
    sys.exit(main())
