"""Where a logical restore writes: ``restore --create`` is bound to the dump's own database,
and verification restores backups of databases every server has (``postgres``,
``template1``).

Run as a user runs them: the console script against real servers, real sandboxes.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import psycopg
import pytest
from psycopg import sql
from pydantic import SecretStr

from pgbackflow.blocks import BackupEncryptionKey, LocalStorage, PostgresDatabase
from pgbackflow.flows.logical_backup import logical_backup
from pgbackflow.flows.verification import restore_verification
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import Keyring, MasterKey, load_key_file, write_key_file
from pgbackflow.tasks.manifest import LogicalManifest, list_backups, write_manifest
from pgbackflow.tasks.storage import LocalFolderStorage
from pgbackflow.tasks.toolsets import find_toolset
from tests.fixtures.postgres import PgServers, make_database, without_libpq_env
from tests.fixtures.prefect_server import PGBACKFLOW, as_users_run_it

pytestmark = pytest.mark.timeout(600)

CLI = PGBACKFLOW
PREFERRED_MAJOR = 17


def run_cli(prefect_api: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``pgbackflow ARGS`` with the session's Prefect API and no PG* of our environment,
    through the session's warm daemon as users run it."""
    env = without_libpq_env(dict(os.environ))
    env.update(PREFECT_API_URL=prefect_api, PGBACKFLOW_RETRY_DELAYS="0.2", DO_NOT_TRACK="1")
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=300,
                          env=as_users_run_it(env), check=False)


def one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """The run failed with exactly one ``error:`` line holding ``expected``."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def dsn(server: EphemeralCluster, dbname: str) -> str:
    return (f"postgresql://{server.superuser}:{server.password}@{server.host}:{server.port}/"
            f"{dbname}?sslmode=disable")


def rows(server: EphemeralCluster, dbname: str) -> dict[str, int]:
    """Exact rows of every user table."""
    counts: dict[str, int] = {}
    with server.connect(dbname) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables ORDER BY 1"
        ).fetchall()]
        for table in tables:
            row = conn.execute(f"SELECT count(*) FROM {table}".encode()).fetchone()
            assert row is not None
            counts[table] = int(row[0])
    return counts


def exists(server: EphemeralCluster, dbname: str) -> bool:
    with server.connect() as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (dbname,)).fetchone() is not None


def drop(server: EphemeralCluster, dbname: str) -> None:
    with server.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(dbname)))


# --------------------------------------------------------------------------- restore --create


@pytest.fixture(scope="module")
def server(pg_servers: PgServers, pg_majors: tuple[int, ...]) -> EphemeralCluster:
    return pg_servers(PREFERRED_MAJOR if PREFERRED_MAJOR in pg_majors else max(pg_majors))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "master.key"
    write_key_file(path, MasterKey.generate())
    return path


@pytest.fixture
def live(server: EphemeralCluster) -> Iterator[str]:
    """The "live" source database: the one a misdirected restore would write into."""
    name = make_database(
        server, "live",
        "CREATE TABLE public.orders (id int PRIMARY KEY, note text)",
        "INSERT INTO public.orders SELECT g, md5(g::text) FROM generate_series(1, 3000) g",
        "CREATE TABLE public.customers (id int PRIMARY KEY)",
        "INSERT INTO public.customers SELECT generate_series(1, 40)",
    )
    try:
        yield name
    finally:
        drop(server, name)


def backup(prefect_api: str, server: EphemeralCluster, dbname: str, folder: Path,
           key_file: Path) -> LogicalManifest:
    done = run_cli(prefect_api, "backup", "--db", dsn(server, dbname), "--to", str(folder),
                   "--key-file", str(key_file), "--json")
    assert done.returncode == 0, done.stderr
    keyring = Keyring([load_key_file(key_file)])
    [manifest] = list_backups(LocalFolderStorage(folder), keyring=keyring)
    return manifest


def restore(prefect_api: str, server: EphemeralCluster, folder: Path, key_file: Path,
            *options: str, target_db: str = "postgres") -> subprocess.CompletedProcess[str]:
    return run_cli(prefect_api, "restore", "latest", "--from", str(folder), "--target",
                   dsn(server, target_db), "--key-file", str(key_file), *options)


def test_create_refuses_a_manifest_that_names_another_database(
    prefect_api: str, server: EphemeralCluster, live: str, key_file: Path, tmp_path: Path
) -> None:
    """The manifest says ``copy_…`` (absent), the dump creates the live database: before,
    the existence check passed and pg_restore added rows to the live database."""
    folder = tmp_path / "backups"
    manifest = backup(prefect_api, server, live, folder, key_file)
    renamed = f"copy_{secrets.token_hex(4)}"
    # Re-sealed with the key: the binding must hold even for a manifest that authenticates.
    write_manifest(
        LocalFolderStorage(folder),
        manifest.model_copy(update={"database": manifest.database.model_copy(
            update={"name": renamed})}),
        load_key_file(key_file),
    )
    before = rows(server, live)

    refused = restore(prefect_api, server, folder, key_file, "--create", "--with-globals")
    one_line_error(refused, f"manifest names database '{renamed}'",
                   f"the dump creates '{live}'", "nothing was written")
    assert rows(server, live) == before
    assert not exists(server, renamed)


def test_create_into_an_existing_database_is_refused_or_replaced(
    prefect_api: str, server: EphemeralCluster, live: str, key_file: Path, tmp_path: Path
) -> None:
    """Without --clean: refused. With --clean while a session is open: pg_restore's own drop
    fails and it used to restore into the open database (rows doubled); now refused. With
    --clean on an idle database: replaced, rows exactly once."""
    folder = tmp_path / "backups"
    backup(prefect_api, server, live, folder, key_file)
    before = rows(server, live)

    one_line_error(restore(prefect_api, server, folder, key_file, "--create"),
                   f"database '{live}' already exists", "use --clean")
    one_line_error(restore(prefect_api, server, folder, key_file, "--create", "--clean",
                           target_db=live),
                   "is the database --create would make", "e.g. postgres")
    with psycopg.connect(dsn(server, live)) as session:
        session.execute("SELECT 1")
        one_line_error(restore(prefect_api, server, folder, key_file, "--create", "--clean"),
                       f"database '{live}' cannot be replaced", "close its sessions")
    assert rows(server, live) == before

    replaced = restore(prefect_api, server, folder, key_file, "--create", "--clean")
    assert replaced.returncode == 0, replaced.stderr
    assert rows(server, live) == before


def test_create_restores_under_the_dumps_name(
    prefect_api: str, server: EphemeralCluster, live: str, key_file: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "backups"
    backup(prefect_api, server, live, folder, key_file)
    before = rows(server, live)
    drop(server, live)
    done = restore(prefect_api, server, folder, key_file, "--create", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["database"] == live
    assert rows(server, live) == before


def test_restore_into_a_new_database_name_creates_it(
    prefect_api: str, server: EphemeralCluster, live: str, key_file: Path, tmp_path: Path
) -> None:
    """README's example: restore into a name that does not exist yet (no --create)."""
    folder = tmp_path / "backups"
    backup(prefect_api, server, live, folder, key_file)
    copy = f"{live}_copy"
    assert not exists(server, copy)
    try:
        done = restore(prefect_api, server, folder, key_file, "--json", target_db=copy)
        assert done.returncode == 0, done.stderr
        assert rows(server, copy) == rows(server, live)

        # A role that may not create databases gets one line, and nothing is created.
        role, password = f"nocreate_{secrets.token_hex(3)}", secrets.token_urlsafe(12)
        with server.connect() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)))
        target = (f"postgresql://{role}:{password}@{server.host}:{server.port}/"
                  f"{live}_other?sslmode=disable")
        refused = run_cli(prefect_api, "restore", "latest", "--from", str(folder), "--target",
                          target, "--key-file", str(key_file))
        one_line_error(refused, f"{live}_other", "does not exist",
                       f"role '{role}' may not create it")
        assert not exists(server, f"{live}_other")
    finally:
        drop(server, copy)


# --------------------------------------------------------------------------- verification


@pytest.fixture(scope="module")
def own_cluster(pg_majors: tuple[int, ...]) -> Iterator[EphemeralCluster]:
    """A server of our own: its ``postgres`` and ``template1`` databases get user tables."""
    major = PREFERRED_MAJOR if PREFERRED_MAJOR in pg_majors else max(pg_majors)
    with EphemeralCluster(find_toolset(major), settings={"fsync": "off"}) as cluster:
        for dbname in ("postgres", "template1"):
            with cluster.connect(dbname) as conn:
                conn.execute("CREATE SCHEMA shop")
                conn.execute("CREATE TABLE shop.items AS SELECT g AS id, md5(g::text) AS h "
                             "FROM generate_series(1, 2500) g")
                conn.execute(f"CREATE TABLE public.marks_{dbname} (v int)".encode())
                conn.execute(f"INSERT INTO public.marks_{dbname} VALUES (1), (2), (3)".encode())
        yield cluster


@pytest.fixture(scope="module")
def encryption_key() -> BackupEncryptionKey:
    return BackupEncryptionKey.generate()


def backup_of(cluster: EphemeralCluster, dbname: str, folder: Path,
              key: BackupEncryptionKey) -> LocalStorage:
    storage = LocalStorage(folder=str(folder))
    database = PostgresDatabase(
        host=cluster.host, port=cluster.port, database=dbname, user=cluster.superuser,
        password=SecretStr(cluster.password), sslmode="disable",
    )
    logical_backup(database, [storage], encryption_key=key)
    return storage


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize(("dbname", "sandbox"), [
    ("postgres", "local"), ("template1", "local"), ("postgres", "docker"),
])
def test_verification_of_a_database_the_sandbox_already_has(
    dbname: str, sandbox: str, own_cluster: EphemeralCluster, encryption_key: BackupEncryptionKey,
    tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    """Before: CREATE DATABASE postgres in the sandbox → DuplicateDatabase traceback."""
    if sandbox == "docker":
        request.getfixturevalue("docker_engine")
    storage = backup_of(own_cluster, dbname, tmp_path / "b", encryption_key)
    [manifest] = list_backups(storage.open())
    assert manifest.database.name == dbname

    kind: Literal["docker", "local"] = "docker" if sandbox == "docker" else "local"
    report = restore_verification(storage, sandbox=kind, encryption_key=encryption_key)
    assert report.status == "Successful", report.failure
    assert report.database == dbname
    restored = {t.table: t.restored for t in report.tables}
    assert restored == manifest.rows_by_table() == rows(own_cluster, dbname)
    assert restored["shop.items"] == 2500 and restored[f"public.marks_{dbname}"] == 3


def test_cli_verify_of_the_postgres_database(
    prefect_api: str, own_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    """As the issue measured it: ``verify latest --sandbox local``, exit 0, no traceback."""
    key_file = tmp_path / "master.key"
    write_key_file(key_file, MasterKey.generate())
    folder = tmp_path / "backups"
    done = run_cli(prefect_api, "backup", "--db", dsn(own_cluster, "postgres"), "--to",
                   str(folder), "--key-file", str(key_file))
    assert done.returncode == 0, done.stderr
    verified = run_cli(prefect_api, "verify", "latest", "--from", str(folder), "--sandbox",
                       "local", "--key-file", str(key_file), "--json")
    assert verified.returncode == 0, verified.stderr
    report: dict[str, Any] = json.loads(verified.stdout)
    assert report["status"] == "Successful" and report["database"] == "postgres"
    assert {t["table"]: t["restored"] for t in report["tables"]} == rows(own_cluster, "postgres")
