"""Restore verification in real sandboxes, against real backups, through the real flow."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from pgbackflow.blocks import BackupEncryptionKey, LocalStorage, PostgresDatabase
from pgbackflow.flows.logical_backup import logical_backup
from pgbackflow.flows.verification import VerificationFailed, restore_verification
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import write_key_file
from pgbackflow.tasks.manifest import list_backups, write_manifest
from pgbackflow.tasks.sample_data import load_edge_case_database
from pgbackflow.tasks.toolsets import Toolset, find_toolset
from tests.fixtures.docker import volumes_mounted
from tests.fixtures.mounts import tmpfs
from tests.fixtures.postgres import PgDatabase, make_database
from tests.fixtures.prefect import settled_task_runs

pytestmark = pytest.mark.usefixtures("prefect_api")

STAGES = ["picked backup", "sandbox up", "restore done", "counted", "sandbox destroyed"]


@pytest.fixture(scope="module")
def encryption_key() -> BackupEncryptionKey:
    return BackupEncryptionKey.generate()


def db_block(server: EphemeralCluster, dbname: str) -> PostgresDatabase:
    return PostgresDatabase(
        host=server.host, port=server.port, database=dbname, user=server.superuser,
        password=SecretStr(server.password), sslmode="disable",
    )


def leftover_sandboxes() -> list[str]:
    """Work dirs of this process's local/docker sandboxes still on disk."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    return sorted(p.name for p in tmp.glob(f"pgbackflow-verify-*-{os.getpid()}-*"))


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    before = set(leftover_sandboxes())
    yield
    assert set(leftover_sandboxes()) - before == set()


def backup_of(server: EphemeralCluster, dbname: str, folder: Path,
              key: BackupEncryptionKey) -> LocalStorage:
    storage = LocalStorage(folder=str(folder))
    logical_backup(db_block(server, dbname), [storage], encryption_key=key)
    return storage


def our_containers(client: Any, owner: int | None = None) -> list[Any]:
    """Sandbox containers of ``owner`` (the process that ran the sandbox; default this one):
    other test processes run sandboxes of their own on the same engine meanwhile."""
    from pgbackflow.tasks.sandbox import SANDBOX_LABEL

    # ignore_removed: a container may go away between the listing and its inspection.
    labels = [SANDBOX_LABEL, f"pgbackflow.pid={owner or os.getpid()}"]
    return list(client.containers.list(all=True, filters={"label": labels},
                                       ignore_removed=True))


@pytest.mark.usefixtures("no_leftovers")
@pytest.mark.parametrize("sandbox", ["local", "docker"])
def test_successful_verification(
    pg_database: PgDatabase, tmp_path: Path, encryption_key: BackupEncryptionKey,
    sandbox: str, request: pytest.FixtureRequest,
) -> None:
    """Every table comes back with its rows; the report says so stage by stage."""
    client = request.getfixturevalue("docker_engine") if sandbox == "docker" else None
    started = time.time()
    with pg_database.connect() as conn:
        load_edge_case_database(conn)
    storage = backup_of(pg_database.server, pg_database.name, tmp_path / "b", encryption_key)
    manifest = list_backups(storage.open())[-1]

    state = restore_verification(storage, sandbox=sandbox,  # type: ignore[arg-type]
                                 encryption_key=encryption_key, return_state=True)
    report = state.result()
    assert report.status == "Successful", report.failure
    # The restore's stages are task runs of their own in the UI, named as in the restore flow.
    stages = {t.name.rsplit("-", 1)[0]
              for t in settled_task_runs(state.state_details.flow_run_id)}
    assert stages == {"pick-backup", "start-sandbox", "replay-globals", "pg-restore",
                      "count-rows"}
    assert report.failure is None
    assert report.backup_id == manifest.backup_id
    assert report.restore_exit_code == 0
    assert [entry.stage for entry in report.timeline] == STAGES
    assert [e.at for e in report.timeline] == sorted(e.at for e in report.timeline)
    assert {t.table: t.restored for t in report.tables} == manifest.rows_by_table()
    assert all(t.ok for t in report.tables)
    assert report.table_count == manifest.table_count
    assert report.schema_count == manifest.schema_count
    assert report.restored_size and report.restored_size > 0
    if client is None:
        assert f"PostgreSQL {pg_database.server.toolset.version}" in report.sandbox
    else:
        assert f"postgres:{pg_database.major}" in report.sandbox
        assert our_containers(client) == []
        # PGDATA lived on the image's anonymous volume: it went with the container.
        mounted = volumes_mounted(client, started, label=f"pgbackflow.pid={os.getpid()}")
        assert mounted, "the sandbox mounted no volume: PGDATA's volume cannot be checked"
        assert mounted & {v.name for v in client.volumes.list()} == set()


@pytest.mark.usefixtures("no_leftovers")
@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_damaged_archive_fails_first_line_names_it(
    pg_servers: Any, tmp_path: Path, encryption_key: BackupEncryptionKey, damage: str
) -> None:
    server: EphemeralCluster = pg_servers.get(17)
    source = make_database(server, "dmg", "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS h"
                           " FROM generate_series(1, 300000) g")
    storage = backup_of(server, source, tmp_path / "b", encryption_key)
    dump = next((tmp_path / "b").rglob("dump.pgbf"))
    data = bytearray(dump.read_bytes())
    if damage == "flipped":
        data[len(data) // 2] ^= 0x01
        expected = r"chunk \d+ failed authentication"
    else:
        cut = 102 + (1024 * 1024 + 36)  # header + exactly one full frame: a chunk boundary
        data = data[:cut]
        expected = r"archive truncated after chunk 0"
    dump.write_bytes(bytes(data))

    with pytest.raises(VerificationFailed) as excinfo:
        restore_verification(storage, sandbox="local", encryption_key=encryption_key)
    report = excinfo.value.report
    assert report.status == "Failed"
    assert report.failure is not None
    assert re.search(expected, report.failure), report.failure
    # The failure is the first thing the summary says.
    first_line = report.markdown().splitlines()[2]
    assert first_line.startswith("**") and "dump.pgbf" in first_line
    assert report.timeline[-1].stage == "sandbox destroyed"


def _toolset_with_extra_extension(base: Path, major: int) -> Toolset:
    """A copy of the major's toolset plus an extension no sandbox has."""
    original = find_toolset(major)
    root = base / f"toolset-{major}"
    shutil.copytree(original.bin_dir.parent, root, symlinks=True)
    extension_dir = root / "share" / "extension"
    (extension_dir / "pgbf_only_here.control").write_text(
        "comment = 'exists only on the source server'\ndefault_version = '1.0'\n"
        "relocatable = true\n"
    )
    (extension_dir / "pgbf_only_here--1.0.sql").write_text(
        "CREATE FUNCTION pgbf_answer() RETURNS int LANGUAGE sql AS 'SELECT 42';\n"
    )
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)  # the cluster's OS user
    return Toolset(major, original.version, root / "bin")


@pytest.mark.usefixtures("no_leftovers")
def test_restore_error_fails_with_pg_restore_message(
    pg_servers: Any, encryption_key: BackupEncryptionKey
) -> None:
    """A backup using an extension the sandbox lacks: Failed, with pg_restore's own error."""
    pg_servers.get(17)
    base = Path("/tmp") / f"pgbf-ext-{secrets.token_hex(4)}"
    base.mkdir(mode=0o755)
    try:
        toolset = _toolset_with_extra_extension(base, 17)
        with EphemeralCluster(toolset, settings={"fsync": "off"}) as source:
            with source.connect() as conn:
                conn.execute("CREATE DATABASE extdb")
            with source.connect("extdb") as conn:
                conn.execute("CREATE EXTENSION pgbf_only_here")
                conn.execute("CREATE TABLE answers AS SELECT pgbf_answer() AS a")
            storage = backup_of(source, "extdb", base / "b", encryption_key)
        with pytest.raises(VerificationFailed) as excinfo:
            restore_verification(storage, sandbox="local", encryption_key=encryption_key)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report = excinfo.value.report
    assert report.restore_exit_code not in (None, 0)
    assert report.failure is not None
    assert report.failure.startswith(f"pg_restore failed with exit code {report.restore_exit_code}")
    assert "pgbf_only_here" in report.failure
    assert any("pgbf_only_here" in line for line in report.pg_restore_errors)


@pytest.mark.usefixtures("no_leftovers")
def test_counts_disagreeing_with_the_manifest_fail_naming_the_table(
    pg_servers: Any, tmp_path: Path, encryption_key: BackupEncryptionKey
) -> None:
    server: EphemeralCluster = pg_servers.get(16)
    source = make_database(server, "cnt",
                           "CREATE TABLE accounts AS SELECT generate_series(1, 1000) AS id",
                           "CREATE TABLE notes AS SELECT generate_series(1, 10) AS id")
    storage = backup_of(server, source, tmp_path / "b", encryption_key)
    opened = storage.open()
    manifest = list_backups(opened)[-1]
    # Counts that disagree in a manifest the key holder sealed (an unsealed edit is refused
    # before any restore: tests/test_hostile_manifests.py).
    tables = tuple(t.model_copy(update={"rows": 999}) if t.table == "accounts" else t
                   for t in manifest.tables)
    write_manifest(opened, manifest.model_copy(update={"tables": tables}),
                   encryption_key.master_key())

    with pytest.raises(VerificationFailed) as excinfo:
        restore_verification(storage, sandbox="local", encryption_key=encryption_key)
    report = excinfo.value.report
    assert report.failure == (
        "restored data differs from the backup: table public.accounts: 1000 rows, expected 999"
    )
    failing = [t.table for t in report.tables if not t.ok]
    assert failing == ["public.accounts"]


def test_not_enough_disk_is_refused_before_starting(
    pg_servers: Any, tmp_path: Path, encryption_key: BackupEncryptionKey
) -> None:
    """The free-disk check (2x the backup + 1 GB) runs before any sandbox starts."""
    server: EphemeralCluster = pg_servers.get(17)
    source = make_database(server, "dsk",
                           "CREATE TABLE t AS SELECT generate_series(1, 100) AS id")
    storage = backup_of(server, source, tmp_path / "b", encryption_key)
    # TMPDIR on a 64 MB filesystem (entered by the cluster's OS user: mode 1777).
    with tmpfs(Path("/tmp") / f"pgbf-small-{secrets.token_hex(4)}", "size=64m,mode=1777") as small:
        old_tmpdir = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(small)
        tempfile.tempdir = None
        try:
            with pytest.raises(VerificationFailed) as excinfo:
                restore_verification(storage, sandbox="local", encryption_key=encryption_key)
        finally:
            if old_tmpdir is None:
                os.environ.pop("TMPDIR")
            else:
                os.environ["TMPDIR"] = old_tmpdir
            tempfile.tempdir = None
    small.rmdir()
    report = excinfo.value.report
    assert report.failure is not None and "not enough free disk" in report.failure
    assert [e.stage for e in report.timeline] == ["picked backup", "sandbox destroyed"]


def test_cli_verify_exit_codes_and_json(
    pg_servers: Any, tmp_path: Path, prefect_api: str
) -> None:
    server: EphemeralCluster = pg_servers.get(15)
    source = make_database(server, "cli",
                           "CREATE TABLE t AS SELECT generate_series(1, 321) AS id")
    key = BackupEncryptionKey.generate()
    key_file = tmp_path / "k.key"
    write_key_file(key_file, key.master_key())
    backup_of(server, source, tmp_path / "b", key)
    cli = str(Path(sys.executable).with_name("pgbackflow"))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    ok = subprocess.run([cli, "verify", "--from", str(tmp_path / "b"), "--sandbox", "local",
                         "--key-file", str(key_file), "--json"],
                        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["status"] == "Successful"
    assert report["tables"] == [{"table": "public.t", "expected": 321, "restored": 321}]

    dump = next((tmp_path / "b").rglob("dump.pgbf"))
    dump.write_bytes(dump.read_bytes()[:-10])
    bad = subprocess.run([cli, "verify", "--from", str(tmp_path / "b"), "--sandbox", "local",
                          "--key-file", str(key_file), "--json"],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["status"] == "Failed"
    assert bad.stderr.strip().splitlines()[-1].startswith("error: verification failed:")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_cancel_during_restore_removes_the_container(
    pg_servers: Any, tmp_path: Path, prefect_api: str, docker_engine: Any, how: int
) -> None:
    """SIGTERM (how a worker stops a cancelled run) or Ctrl-C mid-restore: Cancelled,
    container gone, and the command ends as every command does then (Ctrl-C: exit 130;
    SIGTERM: dies of it, which a service manager counts as a clean stop)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    server: EphemeralCluster = pg_servers.get(17)
    source = make_database(server, "cancel",
                           "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS a,"
                           " md5((g+1)::text) AS b FROM generate_series(1, 3000000) g",
                           "CREATE INDEX ON big (a)")
    key = BackupEncryptionKey.generate()
    key_file = tmp_path / "k.key"
    write_key_file(key_file, key.master_key())
    backup_of(server, source, tmp_path / "b", key)

    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("pgbackflow")), "verify", "--from",
         str(tmp_path / "b"), "--sandbox", "docker", "--key-file", str(key_file)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # SIGINT at its default, as in a terminal (CI runs the suite as a background job).
        preexec_fn=_sigint_as_in_a_terminal,
    )
    deadline = time.monotonic() + 120
    restoring = False
    while time.monotonic() < deadline and not restoring:
        for container in our_containers(docker_engine, proc.pid):
            try:
                top = container.top() if container.status == "running" else {}
            except Exception:  # the container went away between list and top
                top = {}
            restoring = any("pg_restore" in " ".join(p) for p in top.get("Processes") or [])
        time.sleep(0.1)
    assert restoring, "pg_restore never started in the sandbox"
    proc.send_signal(how)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == (130 if how == signal.SIGINT else -how), stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        "interrupted" if how == signal.SIGINT else "terminated"), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert our_containers(docker_engine, proc.pid) == []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["restore-verification"])),
            sort=FlowRunSort.START_TIME_DESC, limit=1,
        )
    assert runs[0].state is not None and runs[0].state.is_cancelled(), runs[0].state


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.usefixtures("no_leftovers")
def test_timeout_fails_and_destroys_the_sandbox(
    pg_servers: Any, tmp_path: Path, encryption_key: BackupEncryptionKey
) -> None:
    server: EphemeralCluster = pg_servers.get(16)
    source = make_database(server, "slow",
                           "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS a"
                           " FROM generate_series(1, 1500000) g",
                           "CREATE INDEX ON big (a)")
    storage = backup_of(server, source, tmp_path / "b", encryption_key)
    with pytest.raises(VerificationFailed) as excinfo:
        restore_verification(storage, sandbox="local", timeout_s=1,
                             encryption_key=encryption_key)
    report = excinfo.value.report
    assert report.failure == (
        "verification timed out after 1 s: give it more time (timeout) or more CPUs"
    )
    assert report.timeline[-1].stage == "sandbox destroyed"


def test_sandbox_work_dirs_follow_the_sandbox_dir_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PGBACKFLOW_SANDBOX_DIR (the stack's agent: a host folder at the same path) holds the
    work dirs; a missing folder is a one-line error naming the setting."""
    from pgbackflow.tasks.docker_sandbox import DockerSandbox
    from pgbackflow.tasks.errors import ConfigError
    from pgbackflow.tasks.sandbox import SANDBOX_DIR_ENV

    monkeypatch.setenv(SANDBOX_DIR_ENV, str(tmp_path))
    sandbox = DockerSandbox(17)
    try:
        assert sandbox.work_dir.parent == tmp_path
        assert sandbox.dump_dir.is_relative_to(tmp_path)
    finally:
        shutil.rmtree(sandbox.work_dir)
    monkeypatch.setenv(SANDBOX_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as refused:
        DockerSandbox(17)
    assert str(refused.value) == (
        f"{SANDBOX_DIR_ENV}={tmp_path / 'missing'} is not a writable folder: create it for this "
        "user, or unset it to use the temporary folder")
    assert list(tmp_path.iterdir()) == []
