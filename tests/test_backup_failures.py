"""How `pgbackflow backup` and `restore` fail, run as a user runs them: the console script.

Every bad input ends with one actionable ``error:`` line, a non-zero exit and untouched
storage; a killed backup leaves nothing listed; secrets never leave the process that holds
them; a backup that fails in one of several storages says where it is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from psycopg import sql

from pgbackflow.tasks.archive import DEFAULT_CHUNK_SIZE, FRAME_HEADER_BYTES, HEADER_BYTES, TAG_BYTES
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import WRONG_KEY_HINT, MasterKey, write_key_file
from pgbackflow.tasks.manifest import LogicalManifest, list_backups
from pgbackflow.tasks.storage import INCOMPLETE_DIR, LocalFolderStorage, S3ObjectStorage, Storage
from pgbackflow.tasks.toolsets import toolsets_home
from tests.fixtures.postgres import BigDatabase, PgServers, make_database, without_libpq_env
from tests.fixtures.prefect import settled_task_runs
from tests.fixtures.prefect_server import PGBACKFLOW, as_users_run_it
from tests.fixtures.s3 import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

    from tests.fixtures.s3 import S3Bucket

pytestmark = pytest.mark.timeout(300)

CLI = PGBACKFLOW
CLI_TIMEOUT_S = 180
PREFERRED_MAJOR = 17


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Source:
    """A source database on the test server and what it holds."""

    server: EphemeralCluster
    dbname: str
    counts: dict[str, int]

    def dsn(self, *, user: str | None = None, password: str | None = None,
            dbname: str | None = None, port: int | None = None) -> str:
        """A libpq URI for this database (the superuser's by default)."""
        user = user or self.server.superuser
        password = self.server.password if password is None else password
        return (
            f"postgresql://{user}:{password}@{self.server.host}:{port or self.server.port}/"
            f"{dbname or self.dbname}?sslmode=disable"
        )


@dataclass
class Cli:
    """Runs the console script with a shared Prefect API, quick retries and a key file."""

    prefect_api: str
    key_file: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The child's environment: ours (AWS_* of the s3 fixture included) minus PG*."""
        # No stray PGPASSWORD/PGHOST/PGBACKFLOW_TOOLSETS of the caller's shell.
        env = without_libpq_env(dict(os.environ))
        env.update(
            PREFECT_API_URL=self.prefect_api,
            PGBACKFLOW_RETRY_DELAYS="0.2",
            PGBACKFLOW_KEY_FILE=str(self.key_file),
            DO_NOT_TRACK="1",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        env.update(extra)
        return env

    def run(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        """Run ``pgbackflow ARGS`` to completion, through the session's warm daemon as users
        run it; with a setting of its own (PGBACKFLOW_TOOLSETS) in a process of its own
        (a daemon keyed by it would serve one command). ``start``'s commands, which tests
        kill, always run in their own."""
        return subprocess.run(
            [str(CLI), *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
            env=as_users_run_it(self.env(**extra_env), own_settings=extra_env), check=False,
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Start ``pgbackflow ARGS`` in its own process group (for killpg)."""
        return subprocess.Popen(
            [str(CLI), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=self.env(), start_new_session=True,
        )


RETRY_LINE = re.compile(r"; retry \d+ of \d+ in \S+ s$")


def one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Assert a failed run printed exactly one ``error:`` line holding ``expected``."""
    assert result.returncode != 0, f"expected failure, got success: {result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    # Retries of a transient failure each say what they wait for, before the error.
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not RETRY_LINE.search(line)]
    assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
    line = lines[0]
    print(line)  # shown by pytest -rP / -s: what the user saw
    assert line.startswith("error: "), line
    for text in expected:
        assert text in line, f"{text!r} missing from: {line}"
    return line


def folder_leftovers(folder: Path) -> list[str]:
    """Everything in ``folder`` except an empty incomplete-writes folder."""
    if not folder.exists():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        found += [str(here / name) for name in filenames]
        found += [
            str(here / name) for name in dirnames
            if not (here == folder and name == INCOMPLETE_DIR)
        ]
    return sorted(found)


def bucket_contents(bucket: S3Bucket) -> tuple[list[str], list[str]]:
    """(object keys, in-progress multipart upload keys) of the test bucket."""
    client, name = bucket.client(), bucket.bucket
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=name).get("Contents", [])]
    uploads = [u["Key"] for u in client.list_multipart_uploads(Bucket=name).get("Uploads", [])]
    return objects, uploads


def file_tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def user_relations(server: EphemeralCluster, dbname: str) -> int:
    """Tables, views and sequences outside the system schemas."""
    with server.connect(dbname) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r','p','v','m','S','f') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname !~ '^pg_toast'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def aws_env(endpoint: str) -> dict[str, str]:
    """AWS_* variables that point a child at the test S3 server."""
    return {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY, "AWS_DEFAULT_REGION": REGION,
    }


def closed_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def only_backup(storage: Storage) -> LogicalManifest:
    """The single complete backup in ``storage``."""
    backups = list_backups(storage)
    assert len(backups) == 1, [m.backup_id for m in backups]
    return backups[0]


def create_database(server: EphemeralCluster, *statements: str) -> str:
    """A new database on ``server`` prepared by ``statements``."""
    return make_database(server, "bf", *statements)


def drop_database(server: EphemeralCluster, name: str) -> None:
    """Drop a database made by :func:`create_database`."""
    with server.connect() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def table_counts(server: EphemeralCluster, dbname: str, tables: list[str]) -> dict[str, int]:
    """Exact row counts of ``schema.table`` names."""
    counts = {}
    with server.connect(dbname) as conn:
        for table in tables:
            row = conn.execute(f"SELECT count(*) FROM {table}".encode()).fetchone()
            assert row is not None
            counts[table] = int(row[0])
    return counts


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(pg_servers: PgServers, pg_majors: tuple[int, ...]) -> EphemeralCluster:
    """One PostgreSQL server for the whole module: 17 if selected, else the newest selected."""
    major = PREFERRED_MAJOR if PREFERRED_MAJOR in pg_majors else max(pg_majors)
    return pg_servers(major)


@pytest.fixture(scope="module")
def source(server: EphemeralCluster) -> Iterator[Source]:
    """A small database with two schemas (big enough that pg_dump runs for a moment)."""
    name = create_database(
        server,
        "CREATE SCHEMA sales",
        "CREATE TABLE public.items (id int PRIMARY KEY, label text NOT NULL)",
        "INSERT INTO public.items SELECT g, md5(g::text) FROM generate_series(1, 50000) g",
        "CREATE TABLE sales.orders (id bigserial PRIMARY KEY, item int REFERENCES public.items,"
        " qty int)",
        "INSERT INTO sales.orders (item, qty) SELECT 1 + g % 50000, g % 7 "
        "FROM generate_series(1, 20000) g",
    )
    try:
        yield Source(server, name, table_counts(server, name, ["public.items", "sales.orders"]))
    finally:
        drop_database(server, name)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A master key file for this module's backups."""
    path = tmp_path_factory.mktemp("keys") / "master.key"
    write_key_file(path, MasterKey.generate())
    return path


@pytest.fixture(scope="module")
def cli(prefect_api: str, key_file: Path) -> Cli:
    """The console script, wired to the session's Prefect API."""
    assert CLI.exists(), f"console script missing: {CLI}"
    return Cli(prefect_api, key_file)


@pytest.fixture(scope="module")
def made_backup(cli: Cli, source: Source, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one complete backup of ``source``."""
    folder = tmp_path_factory.mktemp("made-backup")
    result = cli.run("backup", "--db", source.dsn(), "--to", str(folder), "--json")
    assert result.returncode == 0, result.stderr
    only_backup(LocalFolderStorage(folder))
    return folder


@pytest.fixture
def empty_target(server: EphemeralCluster) -> Iterator[str]:
    """An empty database to restore into."""
    name = create_database(server)
    try:
        yield name
    finally:
        drop_database(server, name)


_INTERRUPTED_AFTER_PUBLISHING = """
import signal, sys
import pgbackflow.flows.logical_backup as logical
from pgbackflow.tasks.process import unwind
def interrupted(*args, **kwargs):
    unwind(signal.SIGINT, None)  # Ctrl-C right after the manifest was written
logical.publish_summary = interrupted
from pgbackflow.cli import main
sys.argv = ["pgbackflow", *sys.argv[1:]]
main()
"""


def test_interrupted_after_the_backup_was_stored_says_it_is_there(
    cli: Cli, source: Source, tmp_path: Path
) -> None:
    """Ctrl-C after the manifest was written: the command ends as interrupted (130), and
    says the backup had been stored complete (it said only "interrupted", which read as
    lost, while `list` showed the backup)."""
    folder = tmp_path / "store"
    folder.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_AFTER_PUBLISHING, "backup", "--db", source.dsn(),
         "--to", str(folder)],
        env=cli.env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 130, result.stderr[-2000:]
    backup = only_backup(LocalFolderStorage(folder))
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "interrupted", result.stderr[-2000:]
    assert lines[-2] == f"backup {backup.backup_id} had been stored complete in {folder}", lines


# --------------------------------------------------------------------------- bad input: backup


def test_malformed_dsn(cli: Cli, tmp_path: Path, s3_bucket: S3Bucket) -> None:
    """A malformed DSN is refused up front, without echoing its (secret-bearing) text."""
    folder = tmp_path / "backups"
    dsn = "host=127.0.0.1 password=SECRET-PIECE dbname='unterminated"
    result = cli.run("backup", "--db", dsn, "--to", str(folder),
                     "--to", f"s3://{s3_bucket.bucket}/prod")
    line = one_line_error(result, "--db", "malformed", "use postgresql://")
    assert "SECRET-PIECE" not in result.stderr + result.stdout, line
    assert folder_leftovers(folder) == []
    assert bucket_contents(s3_bucket) == ([], [])


@pytest.mark.parametrize("case", ["wrong-password", "unreachable-host", "missing-database"])
def test_unusable_source(
    case: str, cli: Cli, source: Source, tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    """Wrong password, refused connection (retried) and missing database: one line naming
    the server and database, what to do, and nothing in either storage."""
    folder = tmp_path / "backups"
    where = f"@{source.server.host}:{source.server.port}/{source.dbname}"
    if case == "wrong-password":
        dsn = source.dsn(password="not-the-password")
        expected = [where, "password authentication failed", "check the password"]
    elif case == "unreachable-host":
        port = closed_port()
        dsn = source.dsn(port=port)
        expected = [f"@{source.server.host}:{port}/{source.dbname}", "connection refused",
                    "check host and port"]
    else:
        dsn = source.dsn(dbname="no_such_db")
        expected = [f"@{source.server.host}:{source.server.port}/no_such_db", "does not exist",
                    "create it"]
    started = time.monotonic()
    result = cli.run("backup", "--db", dsn, "--to", str(folder),
                     "--to", f"s3://{s3_bucket.bucket}/prod")
    line = one_line_error(result, *expected)
    assert "not-the-password" not in result.stderr and source.server.password not in line
    assert folder_leftovers(folder) == []
    assert bucket_contents(s3_bucket) == ([], [])
    assert time.monotonic() - started < 60
    # Only the refused connection may pass: it is retried (once, PGBACKFLOW_RETRY_DELAYS),
    # the permanent errors are not.
    run, task_runs = flow_run_with("logical-backup", str(folder))
    assert run["state"]["type"] == "FAILED"
    (inspect,) = [t for t in task_runs if t["name"].startswith("inspect-source")]
    assert inspect["run_count"] == (2 if case == "unreachable-host" else 1)


def test_queries_cancelled_by_the_server(cli: Cli, server: EphemeralCluster,
                                         tmp_path: Path) -> None:
    """A database whose statement_timeout cancels our queries: one line that names the
    setting to check (not psycopg's "QueryCanceled"), nothing stored."""
    name = create_database(server, "CREATE TABLE t AS SELECT generate_series(1, 300000) id")
    try:
        with server.connect() as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} SET statement_timeout = '1ms'").format(
                sql.Identifier(name)))
        folder = tmp_path / "backups"
        source = Source(server, name, {})
        result = cli.run("backup", "--db", source.dsn(), "--to", str(folder))
        line = one_line_error(result, f"/{name}", "the server cancelled a query",
                              "statement_timeout")
        assert "QueryCanceled" not in line
        assert folder_leftovers(folder) == []
    finally:
        drop_database(server, name)


@pytest.fixture(scope="module")
def newer_server_run(
    cli: Cli, source: Source, tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str,
    s3_admin_client: S3Client,
) -> Iterator[tuple[Path, subprocess.CompletedProcess[str]]]:
    """A backup offered only toolsets older than the server: (folder, finished run)."""
    home = toolsets_home()
    major = source.server.major
    older = sorted(
        int(p.name) for p in home.iterdir()
        if p.name.isdigit() and int(p.name) < major and (p / "bin" / "pg_dump").exists()
    )
    if not older:
        pytest.fail(f"no toolset older than PostgreSQL {major} in {home} (CI installs 14-18: "
                    "`python -m pgbackflow.tasks.toolsets install 14 15 16 17 18`)",
                    pytrace=False)
    staged = tmp_path_factory.mktemp("old-toolsets")
    for old in older:
        (staged / str(old)).symlink_to(home / str(old), target_is_directory=True)
    folder = tmp_path_factory.mktemp("newer-server") / "backups"
    bucket = f"test-{secrets.token_hex(6)}"
    s3_admin_client.create_bucket(Bucket=bucket)
    try:
        result = cli.run(
            "backup", "--db", source.dsn(), "--to", str(folder), "--to", f"s3://{bucket}",
            PGBACKFLOW_TOOLSETS=str(staged), PGBACKFLOW_TOOLSETS_ONLY="1",
            **aws_env(s3_endpoint),
        )
        objects = s3_admin_client.list_objects_v2(Bucket=bucket).get("Contents", [])
        uploads = s3_admin_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert (objects, uploads) == ([], [])
        yield folder, result
    finally:
        s3_admin_client.delete_bucket(Bucket=bucket)


def test_server_newer_than_every_pg_dump(
    newer_server_run: tuple[Path, subprocess.CompletedProcess[str]], source: Source,
) -> None:
    """With only older pg_dumps available the backup is refused: it names the server's
    major, what is available and how to install the right one; nothing is stored."""
    folder, result = newer_server_run
    major = source.server.major
    one_line_error(result, f"major {major} or newer", "available majors",
                   f"pgbackflow toolsets install {major}")
    assert folder_leftovers(folder) == []


def test_server_newer_than_every_pg_dump_names_the_server(
    newer_server_run: tuple[Path, subprocess.CompletedProcess[str]], source: Source,
) -> None:
    """The missing-toolset error names the database it was backing up, like every other
    source error does."""
    _, result = newer_server_run
    one_line_error(result, f"@{source.server.host}:{source.server.port}/{source.dbname}")


@pytest.fixture(scope="module")
def missing_bucket_run(
    cli: Cli, source: Source, s3_endpoint: str, s3_admin_client: S3Client
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """A backup into a bucket that does not exist: (bucket name, finished run)."""
    missing = f"missing-{secrets.token_hex(4)}"
    result = cli.run(
        "backup", "--db", source.dsn(), "--to", f"s3://{missing}/prod", **aws_env(s3_endpoint)
    )
    buckets = [b["Name"] for b in s3_admin_client.list_buckets().get("Buckets", [])]
    assert missing not in buckets
    return missing, result


def test_missing_bucket_fails_cleanly(
    missing_bucket_run: tuple[str, subprocess.CompletedProcess[str]],
) -> None:
    """A bucket that does not exist: non-zero exit, one error line, nothing created."""
    _, result = missing_bucket_run
    one_line_error(result)


def test_missing_bucket_error_names_the_bucket(
    missing_bucket_run: tuple[str, subprocess.CompletedProcess[str]],
) -> None:
    """The error line names the missing bucket and says to create it."""
    missing, result = missing_bucket_run
    one_line_error(result, f"'{missing}'", "does not exist", "create it")


def test_unwritable_folder(cli: Cli, source: Source, read_only_dir: Path) -> None:
    """A folder on a read-only filesystem: one line naming the folder and what to do."""
    folder = read_only_dir / "backups"
    result = cli.run("backup", "--db", source.dsn(), "--to", str(folder))
    one_line_error(result, str(folder), "not writable", "choose another folder")
    assert folder_leftovers(read_only_dir) == []


# --------------------------------------------------------------------------- bad input: restore


def test_unknown_backup_id(
    cli: Cli, source: Source, made_backup: Path, empty_target: str
) -> None:
    """Restoring an id that is not in the storage names the id and the storage, says to
    run `pgbackflow list`, and leaves the target and the storage alone."""
    before = file_tree(made_backup)
    bogus = "20200101T000000Z-abcdef"
    result = cli.run("restore", "--from", str(made_backup),
                     "--target", source.dsn(dbname=empty_target), bogus)
    one_line_error(result, f"'{bogus}'", str(made_backup), "pgbackflow list")
    assert user_relations(source.server, empty_target) == 0
    assert file_tree(made_backup) == before


def test_wrong_key_file(
    cli: Cli, source: Source, made_backup: Path, empty_target: str, key_file: Path,
    tmp_path: Path,
) -> None:
    """Restoring with another key file names both key ids and says which key to use; the
    target stays empty and the storage unchanged."""
    other = tmp_path / "other.key"
    other_key = MasterKey.generate()
    write_key_file(other, other_key)
    manifest = only_backup(LocalFolderStorage(made_backup))
    before = file_tree(made_backup)
    result = cli.run("restore", "--from", str(made_backup), "--key-file", str(other),
                     "--target", source.dsn(dbname=empty_target))
    one_line_error(result, "wrong encryption key", manifest.key_id, other_key.key_id_hex,
                   WRONG_KEY_HINT)
    assert user_relations(source.server, empty_target) == 0
    assert file_tree(made_backup) == before


# --------------------------------------------------------------------------- kill -9 mid-dump


@pytest.fixture(scope="module")
def big_source(big_database: BigDatabase) -> Source:
    """Two million rows of hex text (~150 MB): pg_dump streams for seconds."""
    server, name = big_database.server, big_database.name
    return Source(server, name, table_counts(server, name, ["public.big", "public.small"]))


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    """Poll ``condition`` while ``proc`` runs; fail if it ends first or it takes too long."""
    deadline = time.monotonic() + 120
    while not condition():
        if proc.poll() is not None:
            _, stderr = proc.communicate()
            pytest.fail(f"backup ended (exit {proc.returncode}) before {what}: {stderr}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the CLI's whole process group and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def tool_pids(tool: str, marker: str) -> list[int]:
    """Processes running ``tool`` whose argv mentions ``marker``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(os.fsdecode(argv[0])).name == tool and marker.encode() in b" ".join(argv):
            found.append(int(entry.name))
    return found


def assert_no_orphaned_pg_dump(dbname: str) -> None:
    """pg_dump of ``dbname`` ends once its reader is gone (broken pipe), within seconds."""
    deadline = time.monotonic() + 20
    while pids := tool_pids("pg_dump", f"dbname={dbname}"):
        if time.monotonic() > deadline:
            for pid in pids:  # started by this test's backup: do not leave them running
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            pytest.fail(f"pg_dump {pids} kept running after the backup was killed")
        time.sleep(0.1)


def kill_backup_when(
    cli: Cli, source: Source, target: str, ready: Callable[[], bool], what: str
) -> None:
    """Start a backup, SIGKILL its whole process group once ``ready()``; pg_dump dies too."""
    proc = cli.start("backup", "--db", source.dsn(), "--to", target, "--json")
    try:
        wait_for(ready, proc, what)
        assert proc.poll() is None
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert_no_orphaned_pg_dump(source.dbname)


def test_kill_9_mid_dump_local_folder(cli: Cli, big_source: Source, tmp_path: Path) -> None:
    """kill -9 while the dump streams into a folder: nothing listed, no manifest, no
    lingering pg_dump; the next backup succeeds with the source's exact counts."""
    folder = tmp_path / "backups"
    storage = LocalFolderStorage(folder)
    incomplete = folder / INCOMPLETE_DIR

    def streaming() -> bool:
        with contextlib.suppress(OSError):
            return any(entry.stat().st_size > 0 for entry in os.scandir(incomplete))
        return False

    kill_backup_when(cli, big_source, str(folder), streaming,
                     "the dump started streaming into the folder")

    assert storage.list() == []
    assert list_backups(storage) == []
    assert list(folder.rglob("manifest.json")) == []
    assert any(incomplete.iterdir()), "the killed writer's temp file should be left behind"

    result = cli.run("backup", "--db", big_source.dsn(), "--to", str(folder), "--json")
    assert result.returncode == 0, result.stderr
    manifest = only_backup(storage)
    assert manifest.rows_by_table() == big_source.counts
    assert json.loads(result.stdout)["backup_id"] == manifest.backup_id


def test_kill_9_mid_upload_s3(cli: Cli, big_source: Source, s3_bucket: S3Bucket) -> None:
    """kill -9 while the dump streams into S3 as a multipart upload: the upload left behind
    is not listed, no manifest exists; the next backup succeeds."""
    client = s3_bucket.client()
    storage = S3ObjectStorage(
        s3_bucket.bucket, "kill", endpoint_url=s3_bucket.endpoint_url, region=s3_bucket.region,
        access_key_id=s3_bucket.access_key_id, secret_access_key=s3_bucket.secret_access_key,
    )

    def uploading() -> bool:
        uploads = client.list_multipart_uploads(Bucket=s3_bucket.bucket).get("Uploads", [])
        return any(
            client.list_parts(Bucket=s3_bucket.bucket, Key=u["Key"], UploadId=u["UploadId"])
            .get("Parts")
            for u in uploads
        )

    target = f"s3://{s3_bucket.bucket}/kill"
    kill_backup_when(cli, big_source, target, uploading, "the first multipart part was uploaded")

    objects, uploads = bucket_contents(s3_bucket)
    assert objects == []
    assert uploads, "the killed writer's multipart upload should be left behind"
    assert storage.list() == []
    assert list_backups(storage) == []

    result = cli.run("backup", "--db", big_source.dsn(), "--to", target, "--json")
    assert result.returncode == 0, result.stderr
    manifest = only_backup(storage)
    assert manifest.rows_by_table() == big_source.counts


# --------------------------------------------------------------------------- secrets


class ProcSampler:
    """Samples every process's argv (and pg_* children's environment) for secrets.

    Args:
        needles: Byte strings that must never appear.
        cli_argv: The CLI's own argv, which holds the DSN the user typed; a process whose
            argv ends with it is the CLI (behind its interpreter) or a fork of it before
            exec, not a leak.
        ours: What a tool's argv holds when it works for this test (its login role). The
            scan sees every process of the machine; another test's tool (a Docker sandbox's
            pg_restore, which needs no password) is not judged, though its argv is still
            searched for the needles.
    """

    TOOLS = frozenset({"pg_dump", "pg_dumpall", "pg_restore"})

    def __init__(self, needles: list[bytes], cli_argv: list[str], ours: bytes) -> None:
        self.needles = needles
        self.ours = ours
        self.cli_cmdline = b"\0".join(os.fsencode(a) for a in cli_argv) + b"\0"
        self.tools_seen: dict[str, int] = {}
        self.problems: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ProcSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for entry in os.scandir("/proc"):
                if entry.name.isdigit() and int(entry.name) != me:
                    self._check(entry.path)
            self.scans += 1
            time.sleep(0.005)

    def _check(self, proc_dir: str) -> None:
        try:
            cmdline = Path(proc_dir, "cmdline").read_bytes()
        except OSError:
            return
        if not cmdline or cmdline.endswith(self.cli_cmdline):
            return
        tool = Path(os.fsdecode(cmdline.split(b"\0", 1)[0])).name
        if any(needle in cmdline for needle in self.needles):
            self.problems.append(f"secret in argv of {tool}: {cmdline!r}")
        if tool not in self.TOOLS or self.ours not in cmdline:
            return
        try:
            environ = Path(proc_dir, "environ").read_bytes().split(b"\0")
        except OSError:
            return
        if not environ or environ == [b""]:
            return  # not exec'd yet or already a zombie
        self.tools_seen[tool] = self.tools_seen.get(tool, 0) + 1
        names = {item.split(b"=", 1)[0] for item in environ}
        if any(needle in item for item in environ for needle in self.needles):
            self.problems.append(f"secret in the environment of {tool}")
        if b"PGPASSWORD" in names:
            self.problems.append(f"{tool} got PGPASSWORD")
        if b"PGPASSFILE" not in names:
            self.problems.append(f"{tool} got no PGPASSFILE")


def _paged(read: Callable[[int], list[Any]]) -> list[Any]:
    items: list[Any] = []
    while batch := read(len(items)):
        items += batch
    return items


def prefect_records(flow_name: str) -> dict[str, str]:
    """JSON of every run of ``flow_name`` with its task runs, logs, and of all artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    records: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        runs = _paged(lambda offset: client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])), limit=100,
            offset=offset,
        ))
        for run in runs:
            records[f"flow run {run.id}"] = run.model_dump_json()
            only_run = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))

            def task_runs(offset: int, f: FlowRunFilter = only_run) -> list[Any]:
                return client.read_task_runs(flow_run_filter=f, limit=100, offset=offset)

            def logs(offset: int, f: LogFilter = log_filter) -> list[Any]:
                return client.read_logs(log_filter=f, limit=100, offset=offset)

            records[f"task runs of {run.id}"] = json.dumps(
                [t.model_dump(mode="json") for t in _paged(task_runs)]
            )
            records[f"logs of {run.id}"] = json.dumps([log.message for log in _paged(logs)])
        artifacts = _paged(lambda offset: client.read_artifacts(limit=100, offset=offset))
        records["artifacts"] = json.dumps([a.model_dump(mode="json") for a in artifacts])
    return records


def flow_run_with(flow_name: str, text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The one run of ``flow_name`` whose record mentions ``text``, and its task runs."""
    records = prefect_records(flow_name)
    ids = [name.removeprefix("flow run ") for name, record in records.items()
           if name.startswith("flow run ") and text in record]
    assert len(ids) == 1, f"{len(ids)} runs of {flow_name} mention {text!r}"
    task_runs = [t.model_dump(mode="json") for t in settled_task_runs(ids[0])]
    return json.loads(records[f"flow run {ids[0]}"]), task_runs


@pytest.fixture
def canary_role(source: Source) -> Iterator[tuple[str, str]]:
    """A superuser login role with a unique password: (role, password)."""
    role, password = f"canary_{secrets.token_hex(4)}", f"CANARY-{secrets.token_hex(12)}"
    with source.server.connect() as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    try:
        yield role, password
    finally:
        with source.server.connect() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_canary_password_and_key_never_leak(
    cli: Cli, source: Source, canary_role: tuple[str, str], key_file: Path, tmp_path: Path,
) -> None:
    """The password is never in child argv or environment (pg_dump gets PGPASSFILE, not
    PGPASSWORD), CLI output, stored files, Prefect runs, task runs, logs, artifacts or a
    failing run's error; the master key never appears in any of them either."""
    role, password = canary_role
    key_text = key_file.read_text().strip().splitlines()[-1]
    key_b64 = key_text.split(":", 1)[1]
    needles = [password, key_b64]
    folder = tmp_path / "backups"
    dsn = source.dsn(user=role, password=password)
    passfiles_before = set(Path(tempfile.gettempdir()).glob("pgbackflow-*.pgpass"))

    argv = [str(CLI), "backup", "--db", dsn, "--to", str(folder), "--json"]
    with ProcSampler([password.encode(), key_b64.encode()], argv,
                     ours=f"user={role}".encode()) as sampler:
        # pg_dump of this small database lives ~0.1 s, which a loaded machine's sampler
        # missed (CI, four workers): a table lock holds it (and the row count) until the
        # sampler has read its argv and environment.
        with source.server.connect(source.dbname) as lock:
            lock.execute("BEGIN")
            lock.execute("LOCK TABLE public.items IN ACCESS EXCLUSIVE MODE")
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=cli.env())
            deadline = time.monotonic() + CLI_TIMEOUT_S
            while (not sampler.tools_seen.get("pg_dump") and proc.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            lock.execute("COMMIT")
        stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, stderr
    assert sampler.tools_seen.get("pg_dump", 0) > 0, (
        f"no pg_dump observed in {sampler.scans} scans: the sampling proved nothing"
    )
    assert sampler.problems == []
    assert set(Path(tempfile.gettempdir()).glob("pgbackflow-*.pgpass")) == passfiles_before

    wrong = cli.run("backup", "--db", source.dsn(user=role, password=f"WRONG-{password}"),
                    "--to", str(folder))
    one_line_error(wrong, f"'{role}'", "password authentication failed")
    wrong_debug = cli.run("--debug", "backup", "--to", str(folder),
                          "--db", source.dsn(user=role, password=f"WRONG-{password}"))
    assert wrong_debug.returncode == 1

    captured = {
        "backup stdout": stdout, "backup stderr": stderr,
        "failed backup output": wrong.stdout + wrong.stderr,
        "--debug failed backup output": wrong_debug.stdout + wrong_debug.stderr,
    }
    stored = file_tree(folder)
    assert any(name.endswith("manifest.json") for name in stored)
    captured.update({name: data.decode("latin-1") for name, data in stored.items()})
    records = prefect_records("logical-backup")
    ours = [name for name, text in records.items()
            if name.startswith("flow run") and role in text]
    assert len(ours) >= 3, "the three runs with the canary role should be in the API"
    assert any(name.startswith("logs of") and text != "[]" for name, text in records.items())
    captured.update(records)
    for name, text in captured.items():
        for needle in needles:
            assert needle not in text, f"secret found in {name}"


# --------------------------------------------------------------------------- 3-2-1, tampering


def test_one_of_two_storages_fails(
    cli: Cli, source: Source, s3_bucket: S3Bucket, tmp_path: Path, empty_target: str,
) -> None:
    """Folder + missing bucket: exit 1 with one line saying the backup is complete in the
    folder and failed in the bucket; the folder's backup is listed and restores."""
    folder = tmp_path / "backups"
    missing = f"missing-{secrets.token_hex(4)}"
    result = cli.run("backup", "--db", source.dsn(), "--to", str(folder),
                     "--to", f"s3://{missing}/prod")
    assert result.returncode == 1
    manifest = only_backup(LocalFolderStorage(folder))
    one_line_error(result, f"backup {manifest.backup_id} is complete in {folder}",
                   f"failed in s3://{missing}/prod", f"'{missing}' does not exist", "create it")

    restored = cli.run("restore", "--from", str(folder), "--target",
                       source.dsn(dbname=empty_target), manifest.backup_id, "--json")
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["status"] == "restored"
    assert table_counts(source.server, empty_target, list(source.counts)) == source.counts


def test_tampered_dump_fails_restore(
    cli: Cli, source: Source, made_backup: Path, tmp_path: Path, empty_target: str,
) -> None:
    """One flipped byte in the middle of dump.pgbf: restore exits 1 with an integrity error
    naming the object and the chunk, and the restore run is reported failed."""
    tampered = tmp_path / "tampered"
    shutil.copytree(made_backup, tampered)
    (dump,) = tampered.rglob("dump.pgbf")
    data = bytearray(dump.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0x01
    frame = FRAME_HEADER_BYTES + DEFAULT_CHUNK_SIZE + TAG_BYTES
    chunk, within = divmod(middle - HEADER_BYTES, frame)
    assert within >= FRAME_HEADER_BYTES, "the flipped byte should be in a chunk's body"
    dump.write_bytes(bytes(data))

    result = cli.run("restore", "--from", str(tampered),
                     "--target", source.dsn(dbname=empty_target))
    assert result.returncode == 1
    one_line_error(result, str(dump), f"chunk {chunk} failed authentication")

    run, task_runs = flow_run_with("logical-restore", str(tampered))
    assert run["state"]["type"] == "FAILED"
    assert f"chunk {chunk}" in (run["state"]["message"] or "")
    (restore_task,) = [t for t in task_runs if t["name"].startswith("pg-restore")]
    assert restore_task["state"]["type"] == "FAILED"
