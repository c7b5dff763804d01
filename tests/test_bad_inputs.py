"""Bad inputs to the real `pgbackflow` command: one clean line, a non-zero exit, nothing made.

Each case runs the console script as a user would (a subprocess), in a folder of its own with
its own HOME and working directory, and checks:

- the exit code is not 0, and stderr holds no traceback;
- stderr has exactly one line starting with ``error:``, and it names the bad input;
- nothing was created: the case's folder (HOME, working directory, the inputs) is unchanged.

Commands that talk to Prefect use the session's test API (PREFECT_API_URL), so none starts a
temporary server of its own. The cases run in parallel: most of their time is Python start-up.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pgbackflow.tasks.keys import MasterKey, write_key_file
from tests.fixtures.postgres import PgServers

CLI = [sys.executable, "-c", "from pgbackflow.cli import main; main()"]
TIMEOUT_S = 120


@dataclass(frozen=True)
class Case:
    """One bad invocation.

    Attributes:
        id: Names the case in failures.
        args: The command line; ``{x}`` is replaced by the value of placeholder x (see
            ``_placeholders``): paths in the case's folder, the server's DSNs.
        names: Text the error line must contain (the bad input), after the same replacement.
        files: Inputs to create first, path (relative to the case's folder) -> content
            (str or bytes; None makes a folder).
        env: Extra environment.
    """

    id: str
    args: tuple[str, ...]
    names: str
    files: dict[str, str | bytes | None] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


KEY_TEXT = "pgbackflow-key-v1:" + "A" * 43 + "="  # replaced by a real key file below
GOOD_KEY = "good.key"
BACKUPS = "backups"  # an existing, empty storage folder
CONFIG = """[prefect]
work_pool = "backups"
[key]
file = "/etc/pgbackflow/master.key"
[storages.nas]
url = "/srv/backups"
[servers.db1]
host = "db1.internal"
[databases.shop]
server = "db1"
storages = ["nas"]
"""


def _inputs(**extra: str | bytes | None) -> dict[str, str | bytes | None]:
    return {BACKUPS: None, **extra}


CASES: list[Case] = [
    # ---------------------------------------------------------------- backup
    Case("backup-dsn-unknown-parameter", ("backup", "--db",
                                          "postgresql://u@127.0.0.1/db?sslmod=disable", "--to",
                                          "{tmp}/backups", "--key-file", "{key}"),
         "unknown parameter 'sslmod'"),
    Case("backup-dsn-garbage", ("backup", "--db", "postgresql://[::1", "--to", "{tmp}/backups",
                                "--key-file", "{key}"), "--db"),
    Case("backup-unreachable", ("backup", "--db", "postgresql://postgres@127.0.0.1:{closed}/x",
                                "--to", "{tmp}/backups", "--key-file", "{key}"), "{closed}"),
    Case("backup-wrong-password", ("backup", "--db", "{wrong_dsn}", "--to", "{tmp}/backups",
                                   "--key-file", "{key}"), "password"),
    Case("backup-missing-database", ("backup", "--db", "{missing_db_dsn}", "--to",
                                     "{tmp}/backups", "--key-file", "{key}"), "no_such_db"),
    Case("backup-storage-scheme", ("backup", "--db", "{dsn}", "--to", "ftp://host/x",
                                   "--key-file", "{key}"), "ftp://host/x"),
    Case("backup-storage-no-bucket", ("backup", "--db", "{dsn}", "--to", "s3:///prefix",
                                      "--key-file", "{key}"), "s3:///prefix"),
    Case("backup-storage-bad-bucket", ("backup", "--db", "{dsn}", "--to", "s3://Bad_Bucket!/p",
                                       "--key-file", "{key}"), "Bad_Bucket!"),
    Case("backup-storage-parent-missing", ("backup", "--db", "{dsn}", "--to",
                                           "{tmp}/no/such/folder", "--key-file", "{key}"),
         "{tmp}/no/such"),
    # One place spelled twice is one copy, not two (and two writers racing in one folder).
    Case("backup-same-storage-twice", ("backup", "--db", "{dsn}", "--to", "{tmp}/backups",
                                       "--to", "file://{tmp}/backups/", "--key-file", "{key}"),
         "is named twice"),
    Case("backup-missing-block", ("backup", "--db", "{dsn}", "--to",
                                  "block:pgbackflow-local-storage/no-such-block",
                                  "--key-file", "{key}"), "no-such-block"),
    Case("backup-key-missing", ("backup", "--db", "{dsn}", "--to", "{tmp}/backups",
                                "--key-file", "{tmp}/nope.key"), "{tmp}/nope.key"),
    Case("backup-key-garbage", ("backup", "--db", "{dsn}", "--to", "{tmp}/backups",
                                "--key-file", "{tmp}/garbage.key"), "{tmp}/garbage.key",
         files=_inputs(**{"garbage.key": "this is not a key\n"})),
    Case("backup-key-is-folder", ("backup", "--db", "{dsn}", "--to", "{tmp}/backups",
                                  "--key-file", "{tmp}/keydir"), "{tmp}/keydir",
         files=_inputs(keydir=None)),
    Case("backup-bad-db-id", ("backup", "--db", "{dsn}", "--to", "{tmp}/backups", "--key-file",
                              "{key}", "--db-id", "../etc"), "../etc"),
    # ---------------------------------------------------------------- restore
    Case("restore-bad-backup-id", ("restore", "../../etc/passwd", "--from", "{tmp}/backups",
                                   "--target", "{dsn}", "--key-file", "{key}"),
         "../../etc/passwd"),
    Case("restore-missing-storage", ("restore", "--from", "{tmp}/nothing-here", "--target",
                                     "{dsn}", "--key-file", "{key}"), "{tmp}/nothing-here"),
    Case("restore-empty-storage", ("restore", "--from", "{tmp}/backups", "--target", "{dsn}",
                                   "--key-file", "{key}"), "{tmp}/backups"),
    Case("restore-bad-jobs", ("restore", "--from", "{tmp}/backups", "--target", "{dsn}",
                              "--jobs", "0", "--key-file", "{key}"), "--jobs"),
    # ---------------------------------------------------------------- list / verify
    Case("list-storage-scheme", ("list", "--from", "gs://bucket/x"), "gs://bucket/x"),
    Case("list-bad-db-id", ("list", "--from", "{tmp}/backups", "--db-id", ".hidden"),
         ".hidden"),
    Case("list-key-garbage", ("list", "--from", "{tmp}/backups", "--key-file",
                              "{tmp}/garbage.key"), "{tmp}/garbage.key",
         files=_inputs(**{"garbage.key": b"\x00\xff" * 20})),
    Case("verify-bad-sandbox", ("verify", "--from", "{tmp}/backups", "--sandbox", "vm",
                                "--key-file", "{key}"), "vm"),
    Case("verify-empty-storage", ("verify", "--from", "{tmp}/backups", "--key-file", "{key}"),
         "{tmp}/backups"),
    # ---------------------------------------------------------------- physical
    Case("pitr-both-targets", ("pitr", "--from", "{tmp}/backups", "--target", "latest",
                               "--target-time", "2026-01-01 00:00:00+00", "--to-dir",
                               "{tmp}/restored"), "--target"),
    Case("pitr-bad-target", ("pitr", "--from", "{tmp}/backups", "--target", "yesterday",
                             "--to-dir", "{tmp}/restored"), "yesterday"),
    Case("pitr-bad-time", ("pitr", "--from", "{tmp}/backups", "--target-time", "not a time",
                           "--to-dir", "{tmp}/restored"), "not a time"),
    Case("pitr-dir-not-empty", ("pitr", "--from", "{tmp}/backups", "--target", "latest",
                                "--to-dir", "{tmp}/full"), "{tmp}/full",
         files=_inputs(**{"full/PG_VERSION": "17\n"})),
    Case("pitr-dir-parent-missing", ("pitr", "--from", "{tmp}/backups", "--target", "latest",
                                     "--to-dir", "{tmp}/no/such/pgdata", "--key-file", "{key}"),
         "{tmp}/no/such"),
    Case("pitr-empty-storage", ("pitr", "--from", "{tmp}/backups", "--target", "latest",
                                "--to-dir", "{tmp}/restored", "--key-file", "{key}"),
         "{tmp}/backups"),
    # Checked before anything is fetched (a server that cannot bind fails only after the
    # whole chain is on disk).
    Case("pitr-port-out-of-range", ("pitr", "--from", "{tmp}/backups", "--target", "latest",
                                    "--to-dir", "{tmp}/restored", "--start", "--port",
                                    "99999", "--key-file", "{key}"), "--port 99999"),
    Case("pitr-port-in-use", ("pitr", "--from", "{tmp}/backups", "--target", "latest",
                              "--to-dir", "{tmp}/restored", "--start", "--port", "{busy_port}",
                              "--key-file", "{key}"), "--port {busy_port} is in use"),
    Case("physical-backup-unreachable", ("physical-backup", "--db",
                                         "postgresql://repl@127.0.0.1:{closed}/postgres",
                                         "--to", "{tmp}/backups", "--key-file", "{key}"),
         "{closed}"),
    Case("physical-backup-wrong-password", ("physical-backup", "--db", "{wrong_dsn}", "--to",
                                            "{tmp}/backups", "--key-file", "{key}"),
         "password"),
    Case("physical-list-missing", ("physical-list", "--from", "{tmp}/gone"), "{tmp}/gone"),
    Case("verify-physical-empty", ("verify-physical", "--from", "{tmp}/backups", "--key-file",
                                   "{key}"), "{tmp}/backups"),
    Case("wal-stream-bad-slot", ("wal-stream", "--db", "{dsn}", "--to", "{tmp}/backups",
                                 "--slot", "Bad Slot!", "--key-file", "{key}"), "Bad Slot!"),
    # These two must fail before their slot exists (test_bad_inputs checks the server): a
    # slot left by a run that stopped holds the server's WAL for ever.
    Case("wal-stream-bad-spool", ("wal-stream", "--db", "{dsn}", "--to", "{tmp}/backups",
                                  "--spool-dir", "/proc/no-such/spool", "--slot",
                                  "bad_spool_case", "--key-file", "{key}"), "--spool-dir"),
    Case("wal-stream-missing-bucket", ("wal-stream", "--db", "{dsn}", "--to",
                                       "s3://no-such-bucket/p", "--slot", "bad_bucket_case",
                                       "--key-file", "{key}"), "no-such-bucket",
         # (the S3 client's model cache goes outside the case's folder, which must not change)
         env={"AWS_ENDPOINT_URL": "{s3}", "AWS_ACCESS_KEY_ID": "testing",
              "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
              "XDG_CACHE_HOME": "{tmp}-cache"}),
    # ---------------------------------------------------------------- decrypt / key
    Case("decrypt-missing-archive", ("decrypt", "--key-file", "{key}", "{tmp}/nope.pgbf",
                                     "{tmp}/out"), "{tmp}/nope.pgbf"),
    Case("decrypt-not-an-archive", ("decrypt", "--key-file", "{key}", "{tmp}/plain.txt",
                                    "{tmp}/out"), "{tmp}/plain.txt",
         files={"plain.txt": "hello, not an archive\n"}),
    Case("decrypt-target-exists", ("decrypt", "--key-file", "{key}", "{tmp}/plain.txt",
                                   "{tmp}/exists"), "{tmp}/exists",
         files={"plain.txt": "x", "exists": "keep me"}),
    Case("decrypt-key-empty", ("decrypt", "--key-file", "{tmp}/empty.key", "{tmp}/plain.txt",
                               "{tmp}/out"), "{tmp}/empty.key",
         files={"plain.txt": "x", "empty.key": ""}),
    Case("decrypt-key-wrong-prefix", ("decrypt", "--key-file", "{tmp}/v9.key",
                                      "{tmp}/plain.txt", "{tmp}/out"), "{tmp}/v9.key",
         files={"plain.txt": "x", "v9.key": KEY_TEXT.replace("v1", "v9") + "\n"}),
    Case("key-init-exists", ("key", "init", "--key-file", "{key}"), "{key}"),
    # A missing new key is not one "the backups were made with": the line says how to make it.
    Case("key-rotate-new-key-missing", ("key", "rotate", "--from", "{tmp}/backups",
                                        "--old-key-file", "{key}", "--new-key-file",
                                        "{tmp}/new.key"),
         "pgbackflow key init --key-file '{tmp}/new.key'"),
    Case("key-init-folder", ("key", "init", "--key-file", "{tmp}/kdir"), "{tmp}/kdir",
         files={"kdir": None}),
    Case("seal-missing-storage", ("key", "seal-manifests", "--from", "{tmp}/none",
                                  "--key-file", "{key}", "--yes"), "{tmp}/none"),
    # ---------------------------------------------------------------- deploy / schedules
    Case("deploy-config-missing", ("deploy", "--config", "{tmp}/nope.toml"), "{tmp}/nope.toml"),
    Case("deploy-config-not-toml", ("deploy", "--config", "{tmp}/bad.toml", "--dry-run"),
         "{tmp}/bad.toml", files={"bad.toml": "[prefect\nwork_pool = \n"}),
    Case("deploy-config-binary", ("deploy", "--config", "{tmp}/bin.toml", "--dry-run"),
         "{tmp}/bin.toml", files={"bin.toml": b"\xff\xfe\x00garbage"}),
    Case("deploy-config-bad-schedule", ("deploy", "--config", "{tmp}/c.toml", "--dry-run"),
         "every full moon", files={"c.toml": CONFIG + "backup = \"every full moon\"\n"}),
    Case("deploy-config-cron-never-fires", ("deploy", "--config", "{tmp}/c.toml", "--dry-run"),
         "0 0 30 2 *", files={"c.toml": CONFIG + "backup = \"0 0 30 2 *\"\n"}),
    Case("deploy-config-password", ("deploy", "--config", "{tmp}/c.toml", "--dry-run"),
         "password", files={"c.toml": CONFIG.replace('host = "db1.internal"',
                                                     'host = "db1.internal"\npassword = "x"')}),
    Case("schedule-verification-bad-preset", ("schedule-verification", "--db-id", "shop",
                                              "--from", "{tmp}/backups", "--pool", "verify",
                                              "--preset", "fortnightly", "--key-file",
                                              "/etc/pgbackflow/master.key"), "fortnightly"),
    Case("schedule-verification-bad-cron", ("schedule-verification", "--db-id", "shop",
                                            "--from", "{tmp}/backups", "--pool", "verify",
                                            "--cron", "61 25 * * *", "--key-file",
                                            "/etc/pgbackflow/master.key"), "61 25 * * *"),
    Case("schedule-verification-both", ("schedule-verification", "--db-id", "shop", "--from",
                                        "{tmp}/backups", "--pool", "verify", "--preset",
                                        "daily", "--cron", "0 3 * * *", "--key-file",
                                        "/etc/pgbackflow/master.key"), "--cron"),
    Case("schedule-physical-bad-full", ("schedule-physical", "--db-id", "c1", "--db-block",
                                        "db1", "--to", "{tmp}/backups", "--pool", "backups",
                                        "--full", "sometimes", "--key-file",
                                        "/etc/pgbackflow/master.key"), "sometimes"),
    # ---------------------------------------------------------------- toolsets
    Case("toolsets-install-future-major", ("toolsets", "install", "99"), "99"),
]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if not path.is_symlink()
    }


@dataclass
class Outcome:
    case: Case
    returncode: int
    stderr: str
    names: str
    before: dict[str, tuple[int, int]]
    after: dict[str, tuple[int, int]]
    seconds: float

    def problems(self) -> list[str]:
        found = []
        if self.returncode == -1:
            found.append("a hang")
        elif self.returncode == 0:
            found.append("exit code 0")
        if "Traceback" in self.stderr:
            found.append("a traceback")
        errors = [line for line in self.stderr.splitlines() if line.startswith("error:")]
        if len(errors) != 1:
            found.append(f"{len(errors)} 'error:' lines")
        elif self.names not in errors[0]:
            found.append(f"the error line does not name {self.names!r}")
        if self.after != self.before:
            made = sorted(set(self.after) - set(self.before))
            changed = sorted(k for k in self.before if self.after.get(k) != self.before[k])
            found.append(f"files made {made} changed {changed}")
        return found


@pytest.fixture(scope="module")
def placeholders(pg_servers: PgServers, s3_endpoint: str) -> dict[str, str]:
    server = pg_servers.get(17)
    base = f"{server.superuser}:{server.password}@{server.host}:{server.port}"
    return {
        "s3": s3_endpoint,
        "dsn": f"postgresql://{base}/postgres",
        "wrong_dsn": f"postgresql://{server.superuser}:wrong-password@{server.host}:"
                     f"{server.port}/postgres",
        "missing_db_dsn": f"postgresql://{base}/no_such_db",
        "closed": str(_closed_port()),
        "busy_port": str(server.port),
    }


def _run(case: Case, root: Path, values: dict[str, str], api: str) -> Outcome:
    folder = root / case.id
    home, work = folder / "home", folder / "work"
    for made in (home, work):
        made.mkdir(parents=True)
    key = folder / GOOD_KEY
    write_key_file(key, MasterKey.generate())
    for name, content in case.files.items():
        path = folder / name
        if content is None:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
    if BACKUPS not in case.files:
        (folder / BACKUPS).mkdir()
    names = {**values, "tmp": str(folder), "key": str(key)}
    args = [arg.format(**names) for arg in case.args]
    before = _snapshot(folder)
    env = {
        **os.environ,
        "HOME": str(home),
        "PREFECT_API_URL": api,
        "PGBACKFLOW_RETRY_DELAYS": "0.1",
        "PGPASSFILE": str(home / "no-pgpass"),
        "COLUMNS": "400",  # one error line stays one line
        **{name: value.format(**names) for name, value in case.env.items()},
    }
    env.pop("PGPASSWORD", None)
    started = time.monotonic()
    try:
        result = subprocess.run([*CLI, *args], cwd=work, env=env, capture_output=True,
                                text=True, timeout=TIMEOUT_S, check=False,
                                stdin=subprocess.DEVNULL)
        returncode, stderr = result.returncode, result.stderr
    except subprocess.TimeoutExpired as exc:
        returncode = -1
        stderr = f"timed out after {TIMEOUT_S} s: {exc.stderr!r}"
    return Outcome(case, returncode, stderr, case.names.format(**names), before,
                   _snapshot(folder), time.monotonic() - started)


def test_ids_are_unique() -> None:
    assert len({case.id for case in CASES}) == len(CASES) >= 50


@pytest.mark.timeout(600)
def test_bad_inputs(tmp_path: Path, placeholders: dict[str, str], prefect_api: str,
                    pg_servers: PgServers) -> None:
    # One case first: the test API's first flow runs are slow (its services start), and a
    # burst of them at once could outlast the timeout on a busy machine.
    warm_up = next(case for case in CASES if case.id == "backup-unreachable")
    first = _run(warm_up, tmp_path, placeholders, prefect_api)
    rest = [case for case in CASES if case is not warm_up]
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = [first, *pool.map(lambda case: _run(case, tmp_path, placeholders,
                                                        prefect_api), rest)]
    for outcome in sorted(outcomes, key=lambda o: -o.seconds)[:5]:
        print(f"slowest: {outcome.case.id} {outcome.seconds:.1f} s")
    failures = [
        f"{outcome.case.id}: {'; '.join(problems)} ({outcome.seconds:.0f} s, exit "
        f"{outcome.returncode}, stderr: "
        f"{outcome.stderr.strip()[-600:]!r})"
        for outcome in outcomes
        if (problems := outcome.problems())
    ]
    with pg_servers.get(17).connect() as conn:
        left = conn.execute("SELECT slot_name FROM pg_replication_slots "
                            "WHERE slot_name LIKE 'bad\\_%\\_case'").fetchall()
    if left:
        failures.append(f"replication slots left by failed wal-stream runs: {left}")
    assert not failures, f"{len(failures)} of {len(CASES)} cases failed:\n" + "\n".join(failures)
