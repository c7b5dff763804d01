"""Hostile storage: someone can write to the backups (local folder or S3) but has no key.

Real backups of real PostgreSQL servers are taken through the flows, then their manifests
are tampered with the way a storage writer could: ids turned into ``../`` paths, the newest
manifest replaced by an older one (rolled back), valid manifests copied to other backups or
databases, manifests sealed with another master key. The CLI must refuse each with one
error line, write nothing outside its target, and never restore an older backup silently.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from pgbackflow.blocks import BackupEncryptionKey, LocalStorage, PostgresDatabase, S3Storage
from pgbackflow.flows.logical_backup import logical_backup
from pgbackflow.flows.physical_backup import full_backup
from pgbackflow.tasks import physical as ph
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.keys import Keyring, MasterKey, write_key_file
from pgbackflow.tasks.manifest import (
    InvalidIdError,
    ManifestAuthenticationError,
    ManifestKeyError,
    find_backup,
    logical_binding,
    seal,
)
from pgbackflow.tasks.pitr import PitrPlan, build_data_dir, plan_pitr
from pgbackflow.tasks.reports import BackupReport, PhysicalBackupReport
from pgbackflow.tasks.storage import Storage
from pgbackflow.tasks.toolsets import find_toolset
from pgbackflow.tasks.verify_physical import pick_backup
from tests.fixtures.postgres import without_libpq_env
from tests.fixtures.prefect_server import PGBACKFLOW, as_users_run_it
from tests.fixtures.s3 import S3Bucket

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.pg, pytest.mark.timeout(900)]

CLI = PGBACKFLOW


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def encryption_key() -> BackupEncryptionKey:
    return BackupEncryptionKey.generate()


@pytest.fixture(scope="module")
def master_key(encryption_key: BackupEncryptionKey) -> MasterKey:
    return encryption_key.master_key()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory, master_key: MasterKey) -> Path:
    path = tmp_path_factory.mktemp("keys") / "master.key"
    write_key_file(path, master_key)
    return path


@dataclass(frozen=True)
class Where:
    """A storage as the flows (block), the tasks (storage) and the CLI (URL) see it."""

    block: LocalStorage | S3Storage
    url: str

    @property
    def storage(self) -> Storage:
        return self.block.open()


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    if request.param == "local":
        folder = tmp_path / "backups"
        return Where(LocalStorage(folder=str(folder)), str(folder))
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    block = S3Storage(
        bucket=bucket.bucket, prefix="pg", endpoint_url=bucket.endpoint_url,
        region=bucket.region, access_key_id=bucket.access_key_id,
        secret_access_key=SecretStr(bucket.secret_access_key),
    )
    return Where(block, f"s3://{bucket.bucket}/pg")


@pytest.fixture
def local(tmp_path: Path) -> Where:
    folder = tmp_path / "backups"
    return Where(LocalStorage(folder=str(folder)), str(folder))


@pytest.fixture
def canary() -> Iterator[Path]:
    """A /tmp folder that a ``../`` id would make a restore write into: must never appear."""
    path = Path("/tmp") / f"pgbf-canary-{secrets.token_hex(4)}"
    yield path
    existed = path.exists()
    shutil.rmtree(path, ignore_errors=True)
    assert not existed, f"something was written outside the target: {path}"


def traversal(canary: Path) -> str:
    return "../../../../../../" + str(canary).lstrip("/") + "/escaped"


@dataclass
class Cli:
    """Runs the console script against the test Prefect API."""

    prefect_api: str
    key_file: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = without_libpq_env(dict(os.environ))
        env.update(PREFECT_API_URL=self.prefect_api, PGBACKFLOW_RETRY_DELAYS="0.2",
                   PGBACKFLOW_KEY_FILE=str(self.key_file), DO_NOT_TRACK="1")
        return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=300,
                              env=as_users_run_it(env), check=False)

    def json(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture
def cli(prefect_api: str, key_file: Path) -> Cli:
    return Cli(prefect_api, key_file)


def one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Assert a failed run printed exactly one ``error:`` line holding ``expected``."""
    assert result.returncode != 0, f"expected failure, got success: {result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for text in expected:
        assert text in lines[0], f"{text!r} missing from: {lines[0]}"
    return lines[0]


def read_json(storage: Storage, key: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(storage.read_bytes(key))
    return document


def write_json(storage: Storage, key: str, document: dict[str, Any]) -> None:
    storage.write_bytes(key, json.dumps(document, indent=2).encode())


# --------------------------------------------------------------------------- logical


@dataclass(frozen=True)
class Source:
    server: EphemeralCluster
    dbname: str

    def block(self, dbname: str | None = None) -> PostgresDatabase:
        return PostgresDatabase(
            host=self.server.host, port=self.server.port, database=dbname or self.dbname,
            user=self.server.superuser, password=SecretStr(self.server.password),
            sslmode="disable",
        )

    def dsn(self, dbname: str) -> str:
        s = self.server
        return (f"postgresql://{s.superuser}:{s.password}@{s.host}:{s.port}/{dbname}"
                "?sslmode=disable")

    def rows(self, dbname: str | None = None) -> int:
        with self.server.connect(dbname or self.dbname) as conn:
            row = conn.execute("SELECT count(*) FROM t").fetchone()
        assert row is not None
        return int(row[0])

    def add_rows(self, count: int) -> None:
        with self.server.connect(self.dbname) as conn:
            conn.execute(f"INSERT INTO t SELECT g FROM generate_series(1, {count}) g")

    def empty_database(self) -> str:
        name = f"target_{secrets.token_hex(4)}"
        with self.server.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def relations(self, dbname: str) -> int:
        with self.server.connect(dbname) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('r','p','v','m','S') "
                "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                "AND n.nspname !~ '^pg_toast'"
            ).fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture
def source(pg_servers: Any, pg_majors: tuple[int, ...]) -> Source:
    server: EphemeralCluster = pg_servers.get(max(pg_majors))
    name = f"hostile_{secrets.token_hex(4)}"
    with server.connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    with server.connect(name) as conn:
        conn.execute("CREATE TABLE t (id int)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 10)")
    return Source(server, name)


def backup(source: Source, where: Where, key: BackupEncryptionKey) -> BackupReport:
    report = logical_backup(source.block(), [where.block], encryption_key=key)
    assert report.status == "complete"
    return report


def logical_key(report: BackupReport) -> str:
    return f"logical/{report.db_id}/{report.backup_id}/manifest.json"


def test_traversal_ids_in_a_logical_manifest_are_refused(
    source: Source, where: Where, encryption_key: BackupEncryptionKey, master_key: MasterKey,
    cli: Cli, canary: Path,
) -> None:
    report = backup(source, where, encryption_key)
    storage, key = where.storage, logical_key(report)
    document = read_json(storage, key)
    document["backup_id"] = traversal(canary)
    document["database"]["db_id"] = traversal(canary)
    write_json(storage, key, document)
    target = source.empty_database()

    restored = cli.run("restore", "--from", where.url, "--target", source.dsn(target),
                       "--key-file", str(cli.key_file))
    one_line_error(restored, key, "failed authentication",
                   f"not written by a holder of key {master_key.key_id_hex}")
    verified = cli.run("verify", "latest", "--from", where.url, "--sandbox", "local",
                       "--key-file", str(cli.key_file))
    one_line_error(verified, key, "failed authentication")
    assert source.relations(target) == 0

    # With a valid MAC (as if a key holder had written it) the ids are still refused.
    del document["auth"]
    storage.write_bytes(key, seal(document, logical_binding(report.db_id, report.backup_id),
                                  master_key))
    resealed = cli.run("restore", "--from", where.url, "--target", source.dsn(target),
                       "--key-file", str(cli.key_file))
    one_line_error(resealed, key, "is malformed (backup_id: Value error",
                   "is not a valid id")
    assert source.relations(target) == 0
    listed = cli.json("list", "--from", where.url)
    assert [(r["auth"], r["backup_id"]) for r in listed] == [("failed", report.backup_id)]
    assert "is not a valid id" in listed[0]["problem"]


def test_rollback_to_an_older_logical_backup_is_refused(
    source: Source, where: Where, encryption_key: BackupEncryptionKey, master_key: MasterKey,
    cli: Cli,
) -> None:
    older = backup(source, where, encryption_key)
    source.add_rows(5)
    newer = backup(source, where, encryption_key)
    storage = where.storage
    genuine = storage.read_bytes(logical_key(newer))
    ring = Keyring([master_key])

    # 1. The newest manifest replaced by a copy of the older one.
    storage.write_bytes(logical_key(newer), storage.read_bytes(logical_key(older)))
    target = source.empty_database()
    restored = cli.run("restore", "latest", "--from", where.url, "--target", source.dsn(target),
                       "--key-file", str(cli.key_file))
    one_line_error(restored, logical_key(newer), "failed authentication",
                   f"falling back to the older backup {older.backup_id}")
    verified = cli.run("verify", "latest", "--from", where.url, "--sandbox", "local",
                       "--key-file", str(cli.key_file))
    one_line_error(verified, logical_key(newer), "failed authentication")
    assert source.relations(target) == 0

    # 2. The newest manifest pointed at the older dump, its checksum and counts.
    document = json.loads(genuine)
    old = read_json(storage, logical_key(older))
    document.update(dump=old["dump"], globals=old["globals"], tables=old["tables"])
    write_json(storage, logical_key(newer), document)
    with pytest.raises(ManifestAuthenticationError, match="failed authentication"):
        find_backup(storage, "latest", None, ring)

    # 3. A valid manifest copied to another backup id, or to another database.
    storage.write_bytes(logical_key(newer), genuine)
    elsewhere = f"logical/{newer.db_id}/29990101T000000Z-ffffff/manifest.json"
    other_db = f"logical/other-12345678/{newer.backup_id}/manifest.json"
    storage.write_bytes(elsewhere, genuine)
    storage.write_bytes(other_db, genuine)
    copied = cli.run("restore", "29990101T000000Z-ffffff", "--from", where.url,
                     "--target", source.dsn(target), "--key-file", str(cli.key_file))
    one_line_error(copied, elsewhere, "failed authentication")
    with pytest.raises(ManifestAuthenticationError, match=other_db):
        find_backup(storage, "latest", "other-12345678", ring)
    with pytest.raises(ManifestAuthenticationError, match="29990101T000000Z-ffffff"):
        find_backup(storage, "latest", newer.db_id, ring)
    storage.delete(elsewhere)
    storage.delete(other_db)
    assert find_backup(storage, "latest", None, ring).backup_id == newer.backup_id

    # The older backup is still there for whoever names it.
    storage.write_bytes(logical_key(newer), storage.read_bytes(logical_key(older)))
    explicit = cli.run("restore", older.backup_id, "--from", where.url,
                       "--target", source.dsn(target), "--key-file", str(cli.key_file))
    assert explicit.returncode == 0, explicit.stderr
    assert source.rows(target) == 10 and source.rows() == 15


def test_a_dump_of_another_backup_in_its_place_is_refused_before_use(
    source: Source, local: Where, encryption_key: BackupEncryptionKey, cli: Cli
) -> None:
    """Every chunk of another backup's dump (same key) authenticates, and its SHA-256 is
    known only at its end: the manifest's object id refuses it before pg_restore gets a
    byte, and a database the restore made is dropped again."""
    older = backup(source, local, encryption_key)
    source.add_rows(5)
    newer = backup(source, local, encryption_key)
    storage = local.storage
    dump_key = read_json(storage, logical_key(newer))["dump"]["key"]
    older_dump = read_json(storage, logical_key(older))["dump"]["key"]
    storage.write_bytes(dump_key, storage.read_bytes(older_dump))

    empty = source.empty_database()
    refused = cli.run("restore", newer.backup_id, "--from", local.url,
                      "--target", source.dsn(empty), "--key-file", str(cli.key_file))
    one_line_error(refused, dump_key, "another archive than the manifest names")
    assert source.relations(empty) == 0, "the other backup's tables reached the target"

    fresh = f"fresh_{secrets.token_hex(4)}"
    refused = cli.run("restore", newer.backup_id, "--from", local.url,
                      "--target", source.dsn(fresh), "--key-file", str(cli.key_file))
    one_line_error(refused, dump_key, "another archive than the manifest names")
    with source.server.connect() as conn:
        left = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (fresh,)).fetchone()
    assert left is None, f"the restore left the database {fresh} it made"

    verified = cli.run("verify", newer.backup_id, "--from", local.url, "--sandbox", "local",
                       "--key-file", str(cli.key_file))
    # (verify prints its steps on stderr: the sandbox came and went; then one error line)
    assert verified.returncode != 0 and "Traceback" not in verified.stderr, verified.stderr
    last = verified.stderr.strip().splitlines()[-1]
    assert last.startswith("error: verification failed: ") and dump_key in last, last
    assert "another archive than the manifest names" in last, last


def test_logical_manifest_under_another_master_key_is_refused(
    source: Source, local: Where, encryption_key: BackupEncryptionKey, master_key: MasterKey,
    cli: Cli,
) -> None:
    report = backup(source, local, encryption_key)
    storage, key = local.storage, logical_key(report)
    attacker = MasterKey.generate()
    document = read_json(storage, key)
    del document["auth"]
    document["tables"][0]["rows"] = 0
    storage.write_bytes(key, seal(document, logical_binding(report.db_id, report.backup_id),
                                  attacker))
    target = source.empty_database()
    refused = cli.run("restore", "--from", local.url, "--target", source.dsn(target),
                      "--key-file", str(cli.key_file))
    one_line_error(refused, key, "wrong encryption key", attacker.key_id_hex,
                   master_key.key_id_hex)
    listed = cli.json("list", "--from", local.url, "--key-file", str(cli.key_file))
    assert listed[0]["auth"] == "failed" and listed[0]["auth_key_id"] == attacker.key_id_hex
    assert source.relations(target) == 0


def test_listing_shows_unverified_without_a_key_and_verified_with_it(
    source: Source, where: Where, encryption_key: BackupEncryptionKey, cli: Cli,
) -> None:
    first = backup(source, where, encryption_key)
    second = backup(source, where, encryption_key)
    plain = cli.json("list", "--from", where.url)
    assert [(r["backup_id"], r["auth"]) for r in plain] == [
        (first.backup_id, "unverified"), (second.backup_id, "unverified")
    ]
    checked = cli.json("list", "--from", where.url, "--key-file", str(cli.key_file))
    assert [(r["backup_id"], r["auth"], r["problem"]) for r in checked] == [
        (first.backup_id, "verified", None), (second.backup_id, "verified", None)
    ]
    table = cli.run("list", "--from", where.url)
    assert table.returncode == 0 and "unverified" in table.stdout
    assert "pass --key-file to check their MACs" in table.stdout

    document = read_json(where.storage, logical_key(second))
    document["table_count"] = 99
    write_json(where.storage, logical_key(second), document)
    tampered = cli.run("list", "--from", where.url, "--key-file", str(cli.key_file))
    assert tampered.returncode == 0, tampered.stderr
    assert "verified" in tampered.stdout and "REFUSED" in tampered.stdout
    assert f"refused: manifest {where.storage.location}/{logical_key(second)} failed " \
           "authentication" in " ".join(tampered.stdout.split())


# --------------------------------------------------------------------------- physical


@pytest.fixture(scope="module")
def cluster(pg_majors: tuple[int, ...]) -> Iterator[EphemeralCluster]:
    """A cluster of its own (a physical backup takes the whole cluster)."""
    with EphemeralCluster(find_toolset(max(pg_majors)), settings={"fsync": "off"}) as server:
        with server.connect() as conn:
            conn.execute("CREATE TABLE marks AS SELECT generate_series(1, 1000) AS id")
        yield server


def cluster_block(server: EphemeralCluster) -> PostgresDatabase:
    return PostgresDatabase(host=server.host, port=server.port, database="postgres",
                            user=server.superuser, password=SecretStr(server.password),
                            sslmode="disable")


def physical_backup(server: EphemeralCluster, where: Where,
                    key: BackupEncryptionKey) -> PhysicalBackupReport:
    report = full_backup(cluster_block(server), [where.block], encryption_key=key)
    assert report.status == "complete"
    return report


def physical_key(report: PhysicalBackupReport) -> str:
    return f"physical/{report.db_id}/base/{report.backup_id}/manifest.json"


def test_traversal_ids_in_a_physical_manifest_are_refused(
    cluster: EphemeralCluster, where: Where, encryption_key: BackupEncryptionKey,
    master_key: MasterKey, cli: Cli, canary: Path, tmp_path: Path,
) -> None:
    report = physical_backup(cluster, where, encryption_key)
    storage, key = where.storage, physical_key(report)
    document = read_json(storage, key)
    for field in ("backup_id", "full_id", "parent_id"):
        document[field] = traversal(canary)
    write_json(storage, key, document)
    to_dir = tmp_path / "restored"

    pitr = cli.run("pitr", "--from", where.url, "--target", "latest", "--to-dir", str(to_dir),
                   "--key-file", str(cli.key_file))
    one_line_error(pitr, key, "failed authentication")
    verify = cli.run("verify-physical", "--from", where.url, "--key-file", str(cli.key_file))
    one_line_error(verify, key, "failed authentication")
    assert not to_dir.exists()

    del document["auth"]
    storage.write_bytes(key, seal(document, ph.physical_binding(report.db_id, report.backup_id),
                                  master_key))
    resealed = cli.run("pitr", "--from", where.url, "--target", "latest", "--to-dir",
                       str(to_dir), "--key-file", str(cli.key_file))
    one_line_error(resealed, key, "is malformed (backup_id: Value error", "is not a valid id")
    assert not to_dir.exists()
    listed = cli.json("physical-list", "--from", where.url)
    assert listed[0]["backups"] == [] and "is not a valid id" in listed[0]["refused"][0]["problem"]


def test_an_id_that_escapes_is_refused_where_the_path_is_built(
    cluster: EphemeralCluster, local: Where, encryption_key: BackupEncryptionKey,
    master_key: MasterKey, canary: Path, tmp_path: Path, pg_majors: tuple[int, ...],
) -> None:
    """Defence in depth: a manifest object that skipped validation still cannot escape."""
    report = physical_backup(cluster, local, encryption_key)
    genuine = pick_backup(local.storage, report.db_id, report.backup_id,
                          Keyring([master_key]))
    hostile = ph.PhysicalManifest.model_construct(
        **{**dict(genuine), "backup_id": traversal(canary), "mode": "incremental",
           "parent_id": genuine.backup_id}
    )
    plan = PitrPlan(report.db_id, (genuine, hostile), None, (), genuine.finished_at,
                    genuine.finished_at)
    with pytest.raises(InvalidIdError, match=r"path component '\.\./\.\./"):
        build_data_dir(local.storage, plan, Keyring([master_key]), tmp_path / "data",
                       find_toolset(max(pg_majors)))
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_rollback_and_moved_physical_manifests_are_refused(
    cluster: EphemeralCluster, local: Where, encryption_key: BackupEncryptionKey,
    master_key: MasterKey, cli: Cli,
) -> None:
    older = physical_backup(cluster, local, encryption_key)
    newer = physical_backup(cluster, local, encryption_key)
    storage, ring, db_id = local.storage, Keyring([master_key]), older.db_id
    assert plan_pitr(storage, db_id, None, ring).newest.backup_id == newer.backup_id
    genuine = storage.read_bytes(physical_key(newer))

    # The newest manifest rolled back to the older one.
    storage.write_bytes(physical_key(newer), storage.read_bytes(physical_key(older)))
    with pytest.raises(ManifestAuthenticationError) as refused:
        plan_pitr(storage, db_id, None, ring)
    assert physical_key(newer) in str(refused.value)
    assert f"falling back to the older backup {older.backup_id}" in str(refused.value)
    with pytest.raises(ManifestAuthenticationError, match=physical_key(newer)):
        pick_backup(storage, db_id, None, ring)
    with pytest.raises(ManifestAuthenticationError, match="failed authentication"):
        pick_backup(storage, db_id, newer.backup_id, ring)
    assert pick_backup(storage, db_id, older.backup_id, ring).backup_id == older.backup_id
    facts = ph.read_cluster_facts(ConnectionSettings(
        host=cluster.host, port=cluster.port, user=cluster.superuser, password=cluster.password,
        sslmode="disable"))
    if facts.major >= 17:  # older servers refuse incrementals before looking at the chain
        plan = ph.plan_backup_in(storage, facts, ring, incremental=True)
        assert plan.mode == "full" and plan.parent is None
        assert f"the newest manifest is refused: manifest {storage.location}/" \
               f"{physical_key(newer)} failed authentication" in (plan.full_reason or "")
    pitr = cli.run("pitr", "--from", local.url, "--target", "latest", "--to-dir",
                   str(Path(local.url).parent / "restored"), "--key-file", str(cli.key_file))
    one_line_error(pitr, physical_key(newer), "failed authentication", older.backup_id)

    # A valid manifest copied to another cluster id.
    storage.write_bytes(physical_key(newer), genuine)
    moved = f"physical/cluster-999/base/{newer.backup_id}/manifest.json"
    storage.write_bytes(moved, genuine)
    with pytest.raises(ManifestAuthenticationError, match=moved):
        plan_pitr(storage, "cluster-999", None, ring)

    # Sealed with someone else's master key.
    attacker = MasterKey.generate()
    document = json.loads(genuine)
    del document["auth"]
    storage.write_bytes(physical_key(newer), seal(
        document, ph.physical_binding(db_id, newer.backup_id), attacker))
    with pytest.raises(ManifestKeyError, match=attacker.key_id_hex):
        pick_backup(storage, db_id, None, ring)

    listed = cli.json("physical-list", "--from", local.url, "--db-id", db_id)
    assert [b["auth"] for b in listed[0]["backups"]] == ["unverified", "unverified"]
    checked = cli.json("physical-list", "--from", local.url, "--db-id", db_id,
                       "--key-file", str(cli.key_file))
    assert [(b["backup_id"], b["auth"]) for b in checked[0]["backups"]] == [
        (older.backup_id, "verified")
    ]
    assert [r["backup_id"] for r in checked[0]["refused"]] == [newer.backup_id]
    assert "wrong encryption key" in checked[0]["refused"][0]["problem"]
