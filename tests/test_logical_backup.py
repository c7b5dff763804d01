"""Logical backup and restore flows against real servers, storages and a real Prefect API."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql
from pydantic import SecretStr

from pgbackflow.blocks import BackupEncryptionKey, LocalStorage, PostgresDatabase, S3Storage
from pgbackflow.flows.logical_backup import logical_backup
from pgbackflow.flows.logical_restore import logical_restore
from pgbackflow.tasks.archive import ChunkTamperedError
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.errors import ConfigError, DatabaseError
from pgbackflow.tasks.logical import RestoreOptions
from pgbackflow.tasks.manifest import list_backups
from pgbackflow.tasks.sample_data import load_edge_case_database
from pgbackflow.tasks.toolsets import find_toolset
from tests.dbcompare import database_fingerprint, diff_fingerprints, table_row_counts
from tests.fixtures.postgres import PgDatabase, make_database
from tests.fixtures.s3 import S3Bucket

pytestmark = pytest.mark.usefixtures("prefect_api")


def db_block(server: EphemeralCluster, dbname: str) -> PostgresDatabase:
    return PostgresDatabase(
        host=server.host, port=server.port, database=dbname, user=server.superuser,
        password=SecretStr(server.password), sslmode="disable",
    )


def create_database(server: EphemeralCluster, prefix: str = "restored") -> str:
    return make_database(server, prefix)


@pytest.fixture(scope="module")
def encryption_key() -> BackupEncryptionKey:
    return BackupEncryptionKey.generate()


@pytest.fixture(params=["local", "s3"])
def storage_block(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[LocalStorage | S3Storage]:
    if request.param == "local":
        yield LocalStorage(folder=str(tmp_path / "backups"))
        return
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    yield S3Storage(
        bucket=bucket.bucket, prefix="pg", endpoint_url=bucket.endpoint_url, region=bucket.region,
        access_key_id=bucket.access_key_id, secret_access_key=SecretStr(bucket.secret_access_key),
    )


def test_round_trip_preserves_everything(
    pg_database: PgDatabase,
    storage_block: LocalStorage | S3Storage,
    encryption_key: BackupEncryptionKey,
) -> None:
    """Backup → restore gives identical content: rows, hashes, sequences, LOs, ACLs, comments."""
    with pg_database.connect() as conn:
        load_edge_case_database(conn)
        before = database_fingerprint(conn)
        counts = table_row_counts(conn)
    server = pg_database.server

    report = logical_backup(db_block(server, pg_database.name), [storage_block],
                            encryption_key=encryption_key)
    assert report.status == "complete"
    assert report.tables == counts
    assert report.server_version.split(".")[0] == str(server.major)
    assert report.pg_dump_version.split(".")[0] == str(server.major)
    assert report.compression == (
        "pg_dump zstd:5" if server.major >= 16 else "pgbackflow zstd:5"
    )

    manifests = list_backups(storage_block.open())
    assert [m.backup_id for m in manifests] == [report.backup_id]
    manifest = manifests[0]
    assert manifest.rows_by_table() == counts
    assert manifest.table_count == len(counts)
    assert manifest.key_id == encryption_key.master_key().key_id_hex

    target = create_database(server)
    summary = logical_restore(storage_block, db_block(server, target),
                              encryption_key=encryption_key)
    assert summary.count_differences == []
    assert summary.tables == counts
    with server.connect(target) as conn:
        after = database_fingerprint(conn)
    assert diff_fingerprints(before, after) == []


def test_counts_come_from_the_dump_snapshot_under_concurrent_writes(
    pg_servers: Any, tmp_path: Path, encryption_key: BackupEncryptionKey
) -> None:
    """Rows inserted while pg_dump runs are neither in the counts nor in the dump."""
    server: EphemeralCluster = pg_servers.get(17)
    source = create_database(server, "busy")
    with server.connect(source) as conn:
        conn.execute("CREATE TABLE ledger (id bigserial PRIMARY KEY, payload text NOT NULL)")
        conn.execute("INSERT INTO ledger (payload) SELECT md5(g::text) || md5((g*7)::text) "
                     "FROM generate_series(1, 600000) g")
        conn.execute("CREATE TABLE side (id int)")
        conn.execute("INSERT INTO side SELECT generate_series(1, 1000)")

    stop = threading.Event()
    inserted = [0]

    def writer() -> None:
        with server.connect(source) as conn:
            while not stop.is_set():
                # One statement, one transaction: a snapshot sees both rows or neither.
                conn.execute("WITH l AS (INSERT INTO ledger (payload) VALUES ('concurrent')) "
                             "INSERT INTO side VALUES (-1)")
                inserted[0] += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        storage = LocalStorage(folder=str(tmp_path / "b"))
        report = logical_backup(db_block(server, source), [storage], encryption_key=encryption_key)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    with server.connect(source) as conn:
        final = table_row_counts(conn)
    # Writes went on before and after the snapshot: the counts sit strictly in between.
    assert 600000 < report.tables["public.ledger"] < final["public.ledger"]
    # Both tables were counted in one snapshot: every writer loop adds one row to each.
    assert report.tables["public.ledger"] - 600000 == report.tables["public.side"] - 1000

    target = create_database(server)
    summary = logical_restore(storage, db_block(server, target), encryption_key=encryption_key)
    assert summary.tables == report.tables
    assert summary.count_differences == []


def test_restore_into_a_fresh_newer_server_with_globals(
    pg_servers: Any, tmp_path: Path, encryption_key: BackupEncryptionKey
) -> None:
    """A 14 backup restores into an empty 18 server; --with-globals recreates owners and grants."""
    old: EphemeralCluster = pg_servers.get(14)
    pg_servers.get(18)  # skip unless 18 is selected too
    source = create_database(old, "legacy")
    with old.connect(source) as conn:
        load_edge_case_database(conn)
        before = database_fingerprint(conn)
    storage = LocalStorage(folder=str(tmp_path / "b"))
    logical_backup(db_block(old, source), [storage], encryption_key=encryption_key)

    with EphemeralCluster(find_toolset(18), settings={"fsync": "off"}) as fresh:
        with fresh.connect() as conn:
            conn.execute("CREATE DATABASE plain")
            conn.execute("CREATE DATABASE with_roles")
        # Without the globals the owners/grants to missing roles are reported, not fatal.
        plain = logical_restore(storage, db_block(fresh, "plain"), encryption_key=encryption_key)
        assert set(plain.missing_roles) >= {"pgbf_owner", "pgbf_reader"}
        assert plain.count_differences == []

        full = logical_restore(storage, db_block(fresh, "with_roles"),
                               options=RestoreOptions(with_globals=True),
                               encryption_key=encryption_key)
        assert {"pgbf_owner", "pgbf_reader"} <= set(full.roles_created)
        assert "postgres" in full.roles_kept
        assert full.missing_roles == []
        with fresh.connect("with_roles") as conn:
            after = database_fingerprint(conn)
    assert diff_fingerprints(before, after) == []


def test_restore_refuses_what_would_lose_data(
    pg_servers: Any, tmp_path: Path, encryption_key: BackupEncryptionKey
) -> None:
    """Non-empty target needs --clean; older target major refused; --jobs and --create work."""
    server: EphemeralCluster = pg_servers.get(16)
    source = create_database(server, "orders")
    with server.connect(source) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO orders SELECT g, 'n' || g FROM generate_series(1, 5000) g")
    storage = LocalStorage(folder=str(tmp_path / "b"))
    report = logical_backup(db_block(server, source), [storage], encryption_key=encryption_key)

    busy = create_database(server, "busy")
    with server.connect(busy) as conn:
        conn.execute("CREATE TABLE keep_me (id int)")
        conn.execute("INSERT INTO keep_me VALUES (1)")
    with pytest.raises(ConfigError, match=r"is not empty .* use --clean"):
        logical_restore(storage, db_block(server, busy), encryption_key=encryption_key)
    with server.connect(busy) as conn:
        assert conn.execute("SELECT count(*) FROM keep_me").fetchone() == (1,)

    cleaned = logical_restore(storage, db_block(server, busy),
                              options=RestoreOptions(clean=True, jobs=2),
                              encryption_key=encryption_key)
    assert cleaned.tables["public.orders"] == 5000

    with pytest.raises(ConfigError, match=f"database '{source}' already exists"):
        logical_restore(storage, db_block(server, "postgres"),
                        options=RestoreOptions(create=True), encryption_key=encryption_key)

    other: EphemeralCluster = pg_servers.get(17)
    created = logical_restore(storage, db_block(other, "postgres"),
                              options=RestoreOptions(create=True), encryption_key=encryption_key)
    assert created.database == source
    assert created.tables["public.orders"] == 5000
    with other.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(source)))

    older: EphemeralCluster = pg_servers.get(15)
    empty = create_database(older)
    with pytest.raises(ConfigError, match="older than the backup's source"):
        logical_restore(storage, db_block(older, empty), backup_id=report.backup_id,
                        encryption_key=encryption_key)


def test_tampered_dump_stops_the_restore(
    pg_servers: Any, tmp_path: Path, encryption_key: BackupEncryptionKey
) -> None:
    """A flipped byte in the stored dump fails the restore with the object and chunk named."""
    server: EphemeralCluster = pg_servers.get(17)
    source = create_database(server, "src")
    with server.connect(source) as conn:
        conn.execute("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS h "
                     "FROM generate_series(1, 200000) g")
    folder = tmp_path / "b"
    report = logical_backup(db_block(server, source), [LocalStorage(folder=str(folder))],
                            encryption_key=encryption_key)
    dump = next(folder.rglob("dump.pgbf"))
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x20
    dump.write_bytes(bytes(data))

    target = create_database(server)
    with pytest.raises(ChunkTamperedError, match=r"dump\.pgbf: chunk \d+ failed authentication"):
        logical_restore(LocalStorage(folder=str(folder)), db_block(server, target),
                        backup_id=report.backup_id, encryption_key=encryption_key)


def test_artifacts_and_pg_dump_errors(
    pg_servers: Any, tmp_path: Path, encryption_key: BackupEncryptionKey
) -> None:
    """The UI gets a summary and a per-table count table; a pg_dump failure names its cause."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from pgbackflow.tasks.process import ToolFailedError

    server: EphemeralCluster = pg_servers.get(18)
    source = create_database(server, "art")
    with server.connect(source) as conn:
        conn.execute("CREATE TABLE visible AS SELECT generate_series(1, 42) AS id")
    storage = LocalStorage(folder=str(tmp_path / "b"))
    report = logical_backup(db_block(server, source), [storage], encryption_key=encryption_key)
    with get_client(sync_client=True) as client:
        def latest(key: str) -> Any:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )
            assert found, key
            return max(found, key=lambda a: a.created)
        summary = latest(f"backup-{report.db_id.replace('_', '-')}")
        assert report.backup_id in str(summary.data) and "complete" in str(summary.data)
        table = latest(f"backup-tables-{report.db_id.replace('_', '-')}")
        assert "visible" in str(table.data) and "42" in str(table.data)
        progress = latest(f"backup-progress-{report.db_id.replace('_', '-')}")
        assert progress.type == "progress" and progress.data == 100.0

    # A role that may connect but not read one table: pg_dump fails, its stderr explains.
    role, password = f"weak_{secrets.token_hex(3)}", secrets.token_hex(12)
    with server.connect(source) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)))
        conn.execute("CREATE TABLE secret_stuff (x int)")
        conn.execute(sql.SQL("GRANT SELECT ON visible TO {}").format(sql.Identifier(role)))
    weak = PostgresDatabase(host=server.host, port=server.port, database=source, user=role,
                            password=SecretStr(password), sslmode="disable")
    with pytest.raises(DatabaseError, match=r"counting rows failed \(permission denied for "
                       r"table secret_stuff\): grant the backup role SELECT"):
        logical_backup(weak, [storage], encryption_key=encryption_key)
    # Counting is fine but pg_dump itself cannot lock the table: its stderr is the error.
    with server.connect(source) as conn:
        conn.execute("ALTER TABLE secret_stuff ENABLE ROW LEVEL SECURITY")
        conn.execute(sql.SQL("GRANT SELECT ON secret_stuff TO {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE POLICY p ON secret_stuff TO {} USING (true)").format(
            sql.Identifier(role)))
    with pytest.raises(ToolFailedError, match=r"pg_dump failed \(exit code 1\): pg_dump: error:"):
        logical_backup(weak, [storage], encryption_key=encryption_key)
    assert [m.backup_id for m in list_backups(storage.open())] == [report.backup_id]
    # The failed run's progress artifact says it stopped instead of showing a running dump.
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"backup-progress-{report.db_id.replace('_', '-')}"])))
        stopped = max(found, key=lambda a: a.updated or a.created)
    assert "stopped after" in str(stopped.description) and stopped.data != 100.0


def test_dump_replaced_by_another_valid_archive_is_refused_before_use(
    pg_servers: Any, tmp_path: Path, encryption_key: BackupEncryptionKey
) -> None:
    """Every chunk authenticates, but it is not the object the manifest describes: its
    header's object id is not the manifest's, so none of it reaches pg_restore (the SHA-256,
    which used to catch it, is known only after the last byte)."""
    from pgbackflow.tasks.archive import ArchiveError

    server: EphemeralCluster = pg_servers.get(17)
    source = make_database(server, "swap", "CREATE TABLE t AS SELECT generate_series(1, 10) AS id")
    folder = tmp_path / "b"
    storage = LocalStorage(folder=str(folder))
    first = logical_backup(db_block(server, source), [storage], encryption_key=encryption_key)
    with server.connect(source) as conn:
        conn.execute("INSERT INTO t VALUES (11)")
    second = logical_backup(db_block(server, source), [storage], encryption_key=encryption_key)
    dumps = {b: next(folder.rglob(f"{b}/dump.pgbf")) for b in (first.backup_id, second.backup_id)}
    dumps[first.backup_id].write_bytes(dumps[second.backup_id].read_bytes())

    target = create_database(server)
    with pytest.raises(ArchiveError, match="another archive than the manifest names"):
        logical_restore(storage, db_block(server, target), backup_id=first.backup_id,
                        encryption_key=encryption_key)
    with server.connect(target) as conn:
        assert conn.execute("SELECT to_regclass('public.t')").fetchone() == (None,)
