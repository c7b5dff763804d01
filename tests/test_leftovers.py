"""Leftovers of failed and killed writes, and what a backup does about them first.

A failed write removes its temporary at once, also on a full disk; a stopped (SIGTERM)
backup aborts its S3 upload; what a kill -9 leaves is swept at the start of the next backup
to that storage (and logged): at once for local writers of this machine that are gone,
after the grace period (``PGBACKFLOW_SWEEP_GRACE_HOURS``, default 24 h) otherwise.
Also here: the smaller faults of the same issue (a mistyped ``--to``, a missing ``--from``,
``decrypt`` over an existing file).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from psycopg import sql

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.errors import ConfigError, StorageError
from pgbackflow.tasks.keys import MasterKey, load_key_file, write_key_file
from pgbackflow.tasks.manifest import list_backups
from pgbackflow.tasks.pipeline import store_bytes
from pgbackflow.tasks.storage import (
    INCOMPLETE_DIR,
    SWEEP_GRACE_ENV,
    LocalFolderStorage,
    prepare_backup_storages,
    sweep_grace,
)
from tests.fixtures.mounts import tmpfs
from tests.fixtures.postgres import BigDatabase, PgServers, make_database, without_libpq_env
from tests.fixtures.prefect_server import PGBACKFLOW, as_users_run_it
from tests.fixtures.s3 import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY

if TYPE_CHECKING:
    from tests.fixtures.s3 import S3Bucket

pytestmark = pytest.mark.timeout(600)

CLI = PGBACKFLOW
PREFERRED_MAJOR = 17
MiB = 1024 * 1024
REMOVED = "removed the leftover of an interrupted write: "


# --------------------------------------------------------------------------- helpers


#: The flows' INFO logs on the CLI's stderr (it hides them by default).
SHOW_LOGS = {f"PREFECT_LOGGING_HANDLERS_CONSOLE{part}_LEVEL": "INFO"
             for part in ("", "_FLOW_RUNS", "_TASK_RUNS")}


@dataclass(frozen=True)
class Cli:
    """The console script with the session's Prefect API."""

    prefect_api: str
    key_file: Path

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        env = without_libpq_env(dict(os.environ))
        env.update(
            PREFECT_API_URL=self.prefect_api, PGBACKFLOW_RETRY_DELAYS="0.2", DO_NOT_TRACK="1",
        )
        env.update(extra)
        return env

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """Through the session's warm daemon, as users run it (``start_backup``'s commands,
        which tests kill, run in their own process)."""
        return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=300,
                              env=as_users_run_it(self.env(extra), own_settings=extra),
                              check=False)

    def backup(self, dbname_dsn: str, *targets: str, **extra: str
               ) -> subprocess.CompletedProcess[str]:
        to = [arg for target in targets for arg in ("--to", target)]
        return self.run("backup", "--db", dbname_dsn, *to, "--key-file", str(self.key_file),
                        **extra)

    def start_backup(self, dbname_dsn: str, target: str, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(CLI), "backup", "--db", dbname_dsn, "--to", target, "--key-file",
             str(self.key_file)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env(extra),
            start_new_session=True,
        )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line of a failed run (flow logs, if shown, are other lines)."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def only_error_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """The run printed nothing but one ``error:`` line, holding ``expected``."""
    line = error_line(result)
    assert [x for x in result.stderr.splitlines() if x.strip()] == [line], result.stderr
    for text in expected:
        assert text in line, line
    return line


def dsn(server: EphemeralCluster, dbname: str) -> str:
    return (f"postgresql://{server.superuser}:{server.password}@{server.host}:{server.port}/"
            f"{dbname}?sslmode=disable")


def temporaries(folder: Path) -> list[str]:
    incomplete = folder / INCOMPLETE_DIR
    return sorted(p.name for p in incomplete.iterdir()) if incomplete.exists() else []


def uploads(bucket: S3Bucket, prefix: str = "") -> list[str]:
    found = bucket.client().list_multipart_uploads(Bucket=bucket.bucket, Prefix=prefix)
    return [u["Key"] for u in found.get("Uploads", [])]


def objects(bucket: S3Bucket) -> list[str]:
    found = bucket.client().list_objects_v2(Bucket=bucket.bucket)
    return [o["Key"] for o in found.get("Contents", [])]


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"backup ended (exit {proc.returncode}) before {what}: "
                        f"{proc.communicate()[1]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def end(proc: subprocess.Popen[str], how: signal.Signals) -> str:
    """Send ``how`` (SIGKILL: to the whole group, as a machine crash; SIGTERM: to the CLI
    alone, as a stop or a cancelled run) and reap it; returns its stderr."""
    with contextlib.suppress(ProcessLookupError):
        if how == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, how)
    _, stderr = proc.communicate(timeout=120)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # pg_dump, if the CLI left it
    return stderr


def dead_pid() -> int:
    """A pid that belonged to a process of ours and is free now."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(pg_servers: PgServers, pg_majors: tuple[int, ...]) -> EphemeralCluster:
    return pg_servers(PREFERRED_MAJOR if PREFERRED_MAJOR in pg_majors else max(pg_majors))


def drop(server: EphemeralCluster, name: str) -> None:
    with server.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@pytest.fixture(scope="module")
def small(server: EphemeralCluster) -> Iterator[str]:
    name = make_database(server, "small", "CREATE TABLE t AS SELECT generate_series(1, 100) id")
    try:
        yield dsn(server, name)
    finally:
        drop(server, name)


@pytest.fixture(scope="module")
def big(big_database: BigDatabase) -> str:
    """Two million rows of hex text (~150 MB, ~60 MB dumped): the dump streams for seconds."""
    return dsn(big_database.server, big_database.name)


@pytest.fixture(scope="module")
def cli(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    key_file = tmp_path_factory.mktemp("keys") / "master.key"
    write_key_file(key_file, MasterKey.generate())
    return Cli(prefect_api, key_file)


@pytest.fixture
def s3_env(s3_bucket: S3Bucket) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": s3_bucket.endpoint_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY, "AWS_DEFAULT_REGION": REGION}


# --------------------------------------------------------------------------- disk full


def test_write_on_a_full_disk_leaves_no_temporary(tmp_path: Path) -> None:
    """20 MiB into a 8 MiB filesystem: the error says full, the temporary is gone (the old
    writer flushed again while aborting, failed, and skipped the unlink)."""
    with tmpfs(tmp_path / "small", "size=8m") as mount:
        storage = LocalFolderStorage(mount / "backups")
        writer = storage.open_write("dump.pgbf")
        chunk = os.urandom(256 * 1024 + 17)
        with pytest.raises(StorageError, match=r"is full \(No space left on device\)"):
            for _ in range(80):
                writer.write(chunk)
        assert writer.closed
        assert temporaries(storage.folder) == []
        assert storage.list() == []
        # And the space is really back: the next, smaller object fits.
        storage.write_bytes("after", os.urandom(6 * MiB))
        assert [o.key for o in storage.list()] == ["after"]


def test_backup_to_a_full_disk_leaves_nothing(cli: Cli, big: str, tmp_path: Path) -> None:
    """`pgbackflow backup` into a 20 MB filesystem: one error line, no temporary, no object."""
    with tmpfs(tmp_path / "small", "size=20m") as mount:
        result = cli.backup(big, str(mount))
        assert "is full (No space left on device)" in error_line(result)
        assert temporaries(mount) == []
        assert [p for p in mount.rglob("*") if p.is_file()] == []


# --------------------------------------------------------------------------- stopped, killed


def test_sigterm_mid_dump_removes_the_temporary(cli: Cli, big: str, tmp_path: Path) -> None:
    folder = tmp_path / "backups"
    folder.mkdir()
    proc = cli.start_backup(big, str(folder))

    def streaming() -> bool:
        with contextlib.suppress(OSError):
            return any(p.stat().st_size > MiB for p in (folder / INCOMPLETE_DIR).iterdir())
        return False

    wait_for(streaming, proc, "the dump streamed into the folder")
    end(proc, signal.SIGTERM)
    assert proc.returncode != 0
    assert temporaries(folder) == []
    assert LocalFolderStorage(folder).list() == []


def test_sigterm_mid_upload_aborts_the_s3_upload(
    cli: Cli, big: str, s3_bucket: S3Bucket, s3_env: dict[str, str]
) -> None:
    proc = cli.start_backup(big, f"s3://{s3_bucket.bucket}/stop", **s3_env)
    wait_for(lambda: bool(uploads(s3_bucket)), proc, "the multipart upload started")
    time.sleep(0.5)  # a part or two on its way
    end(proc, signal.SIGTERM)
    assert proc.returncode != 0
    assert uploads(s3_bucket) == []
    assert objects(s3_bucket) == []


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # "pid (comm) state ppid ...": the comm may hold spaces, not ')'
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return ""


@pytest.fixture(scope="module")
def big_backup(cli: Cli, big: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("big-backup")
    done = cli.backup(big, str(folder))
    assert done.returncode == 0, done.stderr
    return folder


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_restore_drops_the_database_it_made(
    cli: Cli, big: str, big_backup: Path, server: EphemeralCluster, how: signal.Signals
) -> None:
    """Ctrl-C or SIGTERM while pg_restore fills a database the restore made: the database
    goes again (with pg_restore's session), so the same command can simply be rerun."""
    name = f"restored_{how.name.lower()}"
    target = dsn(server, name)
    proc = subprocess.Popen(
        [str(CLI), "restore", "latest", "--from", str(big_backup), "--target", target,
         "--key-file", str(cli.key_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli.env({}),
        # SIGINT at its default, as in a terminal: a job a shell started in the background
        # (as CI may run the tests) inherits it ignored, and Python keeps it ignored.
        start_new_session=True, preexec_fn=_default_sigint,
    )
    try:
        stderr = _interrupt_mid_copy(proc, server, name, how)
    finally:
        # Whatever failed: no stopped pg_restore left behind. Its session would keep every
        # later DROP DATABASE on this server waiting (for a barrier it never absorbs).
        for pid in [p for p in _children(proc.pid) if _comm(p) == "pg_restore"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # Ctrl-C: exit 130; SIGTERM: unwound, then ended by the signal (a service manager's
    # clean stop), as a process without a handler would have ended.
    assert proc.returncode == (130 if how == signal.SIGINT else -how), stderr
    assert stderr.strip().splitlines()[-1] == (
        "interrupted" if how == signal.SIGINT else "terminated"), stderr
    assert "Traceback" not in stderr, stderr
    with server.connect() as conn:
        left = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert left is None, f"the interrupted restore left database {name}"
    again = cli.run("restore", "latest", "--from", str(big_backup), "--target", target,
                    "--key-file", str(cli.key_file))
    assert again.returncode == 0, again.stderr
    drop(server, name)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_mid_copy(proc: subprocess.Popen[str], server: EphemeralCluster, name: str,
                        how: signal.Signals) -> str:
    """Wait until pg_restore copies into ``name``, hold it there (SIGSTOP: a fast machine
    finished the copy between the check and the signal), signal the command; its stderr."""

    def restoring() -> bool:
        with server.connect() as conn:
            return conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = %s AND query ILIKE 'COPY%%' "
                "AND state = 'active'", (name,)).fetchone() is not None

    deadline = time.monotonic() + 120
    while not restoring():
        assert proc.poll() is None, f"restore ended (exit {proc.returncode}) before pg_restore " \
            f"copied: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "pg_restore never started copying"
        time.sleep(0.05)
    # The command's unwinding kills pg_restore with SIGKILL, which a stopped process takes.
    restorers = [pid for pid in _children(proc.pid) if _comm(pid) == "pg_restore"]
    assert restorers, "pg_restore is not a child of the command"
    for pid in restorers:
        os.kill(pid, signal.SIGSTOP)
    os.kill(proc.pid, how)
    _, stderr = proc.communicate(timeout=120)
    return stderr


def test_kill_9_leftover_is_swept_by_the_next_backup(
    cli: Cli, big: str, small: str, tmp_path: Path
) -> None:
    """The temporary of a killed backup (its writer gone) goes at the next backup's start,
    long before the grace period, and the run's log says so."""
    folder = tmp_path / "backups"
    folder.mkdir()
    proc = cli.start_backup(big, str(folder))
    wait_for(lambda: temporaries(folder) != [], proc, "the dump started")
    time.sleep(0.5)
    end(proc, signal.SIGKILL)
    [leftover] = temporaries(folder)

    done = cli.backup(small, str(folder), **SHOW_LOGS)
    assert done.returncode == 0, done.stderr
    assert f"{REMOVED}{folder / INCOMPLETE_DIR / leftover} (" in done.stderr
    assert "its writer is gone" in done.stderr
    assert temporaries(folder) == []
    assert len(list_backups(LocalFolderStorage(folder))) == 1


@pytest.mark.parametrize("grace_hours", ["0.0005", "1000000"])
def test_kill_9_upload_is_aborted_by_the_next_backup_after_the_grace(
    grace_hours: str, cli: Cli, big: str, small: str, s3_bucket: S3Bucket,
    s3_env: dict[str, str],
) -> None:
    """S3 cannot tell a dead upload from a slow one: only uploads idle (no part uploaded)
    for longer than the grace go. (moto dates every upload's start 2010-11-10, so the idle
    time is the last part's age: 1.8 s for the short grace.)"""
    target = f"s3://{s3_bucket.bucket}/kill"
    proc = cli.start_backup(big, target, **s3_env)
    wait_for(lambda: bool(uploads(s3_bucket)), proc, "the multipart upload started")
    end(proc, signal.SIGKILL)
    [left] = uploads(s3_bucket)
    time.sleep(2)

    done = cli.backup(small, target, **s3_env, **{SWEEP_GRACE_ENV: grace_hours}, **SHOW_LOGS)
    assert done.returncode == 0, done.stderr
    if grace_hours == "0.0005":
        assert f"{REMOVED}s3://{s3_bucket.bucket}/{left} (incomplete upload started" in done.stderr
        assert uploads(s3_bucket) == []
    else:
        assert REMOVED not in done.stderr
        assert uploads(s3_bucket) == [left]


def test_sweep_keeps_live_and_young_temporaries(tmp_path: Path) -> None:
    """What the sweep removes and keeps, by kind of temporary."""
    storage = LocalFolderStorage(tmp_path / "backups")
    live = storage.open_write("live.pgbf")  # this process writes it: its lock is held
    live.write(b"x" * 100)
    incomplete = storage.incomplete_folder
    names = {
        "live": next(p.name for p in incomplete.iterdir()),
        "dead": f"{next(p.name for p in incomplete.iterdir()).split('-')[0]}-{dead_pid()}-"
                + "a" * 16,
        "other machine, young": f"{'f' * 12}-1-{'b' * 16}",
        "other machine, old": f"{'f' * 12}-2-{'c' * 16}",
        "old name format, old": f"{os.getpid()}-{'d' * 16}",
    }
    for kind, name in names.items():
        if kind != "live":
            (incomplete / name).write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86400
    for kind in ("live", "other machine, old", "old name format, old"):
        os.utime(incomplete / names[kind], (two_days_ago, two_days_ago))

    report = prepare_backup_storages([storage], grace=timedelta(hours=24))
    removed = {line.split(" (")[0] for line in report.removed}
    assert removed == {str(incomplete / names[k]) for k in
                       ("dead", "other machine, old", "old name format, old")}
    assert temporaries(storage.folder) == sorted(
        [names["live"], names["other machine, young"]])
    live.close()  # the live writer publishes as if nothing happened
    assert storage.read_bytes("live.pgbf") == b"x" * 100


def test_sweep_grace_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sweep_grace() == timedelta(hours=24)
    monkeypatch.setenv(SWEEP_GRACE_ENV, "1.5")
    assert sweep_grace() == timedelta(hours=1.5)
    assert sweep_grace(0) == timedelta(0)
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(SWEEP_GRACE_ENV, bad)
        with pytest.raises(ConfigError, match=rf"^{SWEEP_GRACE_ENV}='{bad}' is not a number"):
            sweep_grace()


# --------------------------------------------------------------------------- smaller faults


def test_to_a_mistyped_path_is_refused(cli: Cli, small: str, tmp_path: Path) -> None:
    """A missing folder whose parent is missing too is a typo: refused, nothing created.
    A missing folder in an existing parent is created (and the log says so)."""
    typo = tmp_path / "bakcups" / "db1"
    result = cli.backup(small, str(typo))
    line = error_line(result)
    assert f"local storage folder '{typo}' does not exist, nor does its parent" in line
    assert "nothing was written" in line
    assert not typo.parent.exists()

    fresh = tmp_path / "fresh"
    done = cli.backup(small, str(fresh), **SHOW_LOGS)
    assert done.returncode == 0, done.stderr
    assert f"storage folder {fresh} did not exist: created it" in done.stderr
    assert len(list_backups(LocalFolderStorage(fresh))) == 1


@pytest.mark.parametrize("command", [
    ["restore", "latest", "--target", "postgresql://u@127.0.0.1:1/x"],
    ["verify", "latest", "--sandbox", "local"],
    ["pitr", "--target", "latest", "--to-dir", "/tmp/pgbackflow-never-created"],
])
def test_from_a_missing_folder_says_so(cli: Cli, command: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    result = cli.run(*command, "--from", str(missing), "--key-file", str(cli.key_file))
    only_error_line(result, f"local storage folder '{missing}' does not exist: check the path")
    assert not missing.exists()
    assert not Path("/tmp/pgbackflow-never-created").exists()


def test_decrypt_refuses_to_overwrite_unless_forced(cli: Cli, tmp_path: Path) -> None:
    key = load_key_file(cli.key_file)
    storage = LocalFolderStorage(tmp_path / "store")
    store_bytes(b"plain dump bytes\n" * 1000, [storage], "dump.pgbf", key)
    archive = storage.folder / "dump.pgbf"
    output = tmp_path / "out" / "dump.custom"
    output.parent.mkdir()
    output.write_text("someone's work\n")
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep me\n")

    refused = cli.run("decrypt", str(archive), str(output), "--key-file", str(cli.key_file))
    only_error_line(refused, f"output '{output}' already exists: pass --force")
    assert output.read_text() == "someone's work\n"

    link = tmp_path / "out" / "link.custom"
    link.symlink_to(elsewhere)
    for target in (output, link):
        forced = cli.run("decrypt", str(archive), str(target), "--key-file",
                         str(cli.key_file), "--force")
        assert forced.returncode == 0, forced.stderr
        assert target.read_bytes() == b"plain dump bytes\n" * 1000
    assert not link.is_symlink() and elsewhere.read_text() == "keep me\n"
    # Plaintext of a backup is private, and no partial file stays behind.
    assert (output.stat().st_mode & 0o077) == 0
    assert sorted(p.name for p in output.parent.iterdir()) == ["dump.custom", "link.custom"]

    fresh = tmp_path / "out" / "new.custom"
    wrong_key = tmp_path / "wrong.key"
    write_key_file(wrong_key, MasterKey.generate())
    failed = cli.run("decrypt", str(archive), str(fresh), "--key-file", str(wrong_key))
    assert archive.name in error_line(failed)
    assert sorted(p.name for p in output.parent.iterdir()) == ["dump.custom", "link.custom"]
