"""Retention from Prefect and on real backups: the deploy config, the maintenance flow, and a
real chain + WAL expired and then restored to a point in time."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pgbackflow.blocks import BackupEncryptionKey, LocalStorage
from pgbackflow.deployments.config import build_plan, load_config
from pgbackflow.flows.common import artifact_key
from pgbackflow.flows.physical_backup import full_backup, incremental_backup
from pgbackflow.flows.pitr_restore import pitr_restore
from pgbackflow.tasks.catalog import read_catalog
from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.keys import Keyring, write_key_file
from pgbackflow.tasks.physical import parse_lsn
from pgbackflow.tasks.retention import (
    KeepLast,
    Policy,
    RetentionSettings,
    execute_plan,
    plan_retention,
)
from pgbackflow.tasks.rotation import rotate_storage
from pgbackflow.tasks.storage import LocalFolderStorage
from tests.test_physical import (
    cluster_or_skip,
    committed_at,
    db_block,
    mark,
    prepare_marks,
    restored_rows,
    stop_restored,
    streaming_wal,
    wait_shipped,
)
from tests.test_retention import (
    CLUSTER,
    DB,
    KEY,
    RING,
    Writer,
    write_logical,
    write_physical,
)

CONFIG = """
[key]
file = "/etc/pgbackflow/master.key"
[storages.nas]
url = "/srv/backups"
[storages.offsite]
url = "s3://bucket/prod"
maintenance = "weekly at 04:00"
[storages.scratch]
url = "/srv/scratch"
maintenance = ""
[servers.db1]
host = "db1.internal"
[databases.shop]
server = "db1"
storages = ["nas", "offsite"]
retention = { keep_last = 3, daily = 7, weekly = 4 }
[databases.db1-all]
server = "db1"
database = "all"
storages = ["nas"]
retention = { keep_within = "14d" }
[clusters.db1]
server = "db1"
storages = ["offsite"]
[clusters.db1.retention]
monthly = 3
"""


def test_deploy_config_makes_one_maintenance_deployment_per_storage(tmp_path: Path) -> None:
    path = tmp_path / "pgbackflow.toml"
    path.write_text(CONFIG)
    plan = build_plan(load_config(path))
    specs = {s.name: s for s in plan.prefect.deployments if s.flow.name == "maintenance"}
    assert set(specs) == {"maintenance-nas", "maintenance-offsite"}
    nas, offsite = specs["maintenance-nas"], specs["maintenance-offsite"]
    assert nas.parameters["policies"] == {
        "shop": {"keep_last": 3, "daily": 7, "weekly": 4}, "db1-all-*": {"keep_within": "14d"}}
    assert offsite.parameters["policies"] == {
        "shop": {"keep_last": 3, "daily": 7, "weekly": 4}, "db1": {"monthly": 3}}
    assert nas.schedule is not None and nas.schedule.cron == "30 3 * * *"
    assert offsite.schedule is not None and offsite.schedule.cron == "0 4 * * 0"
    assert nas.parameters["key_file"] == "/etc/pgbackflow/master.key"
    # The clusters stored there: their inactive replication slots are reported.
    assert offsite.parameters["clusters"] == {
        "db1": {"$pgbackflow_block": "pgbackflow-postgres-database/db1"}}
    assert "clusters" not in nas.parameters
    assert "job:maintenance" in nas.tags and "storage:nas" in nas.tags

    for bad, message in (
        ("kep_last = 3,", "databases.shop.retention.kep_last: unknown key; allowed: daily, "
                          "hourly, keep_last, keep_within, monthly, weekly, yearly"),
        ("keep_last = 0,", "databases.shop.retention.keep_last: Input should be greater than or "
                           "equal to 1"),
        ("keep_within = \"2 moons\",", "databases.shop.retention.keep_within: period '2 moons' "
                                       "is not a number with a unit: use e.g. 36h, 14d or 8w"),
    ):
        path.write_text(CONFIG.replace("keep_last = 3,", bad))
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert str(caught.value) == f"{path}: {message}"
    path.write_text(CONFIG.replace('"weekly at 04:00"', '"fortnightly"'))
    with pytest.raises(ConfigError, match=r"storages\.offsite\.maintenance: 'fortnightly' is not "
                                          "a schedule"):
        load_config(path)


@pytest.mark.usefixtures("prefect_api")
def test_maintenance_flow_prefers_verified_publishes_and_deletes(tmp_path: Path) -> None:
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from pgbackflow.flows.maintenance import maintenance

    storage = LocalFolderStorage(tmp_path / "store")
    writer = Writer(storage)
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=3)
    morning, noon, evening = (write_logical(writer, day + timedelta(hours=h), h)
                              for h in (6, 12, 18))
    newest = write_logical(writer, day + timedelta(days=2), 30)

    @flow
    def verifications() -> None:  # what restore-verification publishes
        create_markdown_artifact("ok", key=f"verification-{DB}",
                                 description=f"Successful: verification of {noon}")
        create_markdown_artifact("bad", key=f"verification-{DB}",
                                 description=f"Failed: verification of {evening}")

    verifications()
    key_file = tmp_path / "master.key"
    write_key_file(key_file, KEY)

    state = maintenance(storage=LocalStorage(folder=str(storage.folder)),
                        policies={DB: RetentionSettings(daily=2)}, key_file=str(key_file),
                        return_state=True)
    summary = state.result()
    run_id = state.state_details.flow_run_id
    left = [b.backup_id for b in read_catalog(storage, RING).databases[0].backups]
    assert left == [noon, newest]
    assert sorted(summary["deleted_backups"]) == sorted(f"{DB}/{b}" for b in (morning, evening))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=[f"backups-tables-{DB}", artifact_key("retention", storage.location)])))
    # The session's Prefect server is shared: other tests publish "backups-tables-shop" too.
    artifacts = [a for a in artifacts if a.flow_run_id == run_id]
    table = next(a for a in artifacts if a.key == f"backups-tables-{DB}")
    assert "newest verified of day" in str(table.data) and noon in str(table.data)
    plan = next(a for a in artifacts if a.key == artifact_key("retention", storage.location))
    assert f"DELETE logical     {morning}" in str(plan.data)


@pytest.mark.usefixtures("prefect_api")
def test_maintenance_flow_counts_physical_verifications(tmp_path: Path) -> None:
    """verify-physical's "passed" summaries count as verified: in a GFS day of three fulls
    the verified one stays, and the cluster's backups table says it is verified."""
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from pgbackflow.flows.maintenance import maintenance

    storage = LocalFolderStorage(tmp_path / "store")
    writer = Writer(storage)
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=3)
    morning, noon, evening = (write_physical(writer, day + timedelta(hours=h), h, 10 * h,
                                             None, None) for h in (6, 12, 18))
    newest = write_physical(writer, day + timedelta(days=2), 30, 400, None, None)

    @flow
    def verifications() -> None:  # what verify-physical publishes (flows/physical_verification)
        create_markdown_artifact("ok", key=artifact_key("physical-verification", CLUSTER),
                                 description=f"passed: verification of {noon}")
        create_markdown_artifact("bad", key=artifact_key("physical-verification", CLUSTER),
                                 description=f"failed: verification of {evening}")

    verifications()
    key_file = tmp_path / "master.key"
    write_key_file(key_file, KEY)
    state = maintenance(storage=LocalStorage(folder=str(storage.folder)),
                        policies={CLUSTER: RetentionSettings(daily=2)}, key_file=str(key_file),
                        return_state=True)
    summary = state.result()
    run_id = state.state_details.flow_run_id
    left = [b.backup_id for b in read_catalog(storage, RING).databases[0].backups]
    assert left == [noon, newest]
    assert sorted(summary["deleted_backups"]) == sorted(
        f"{CLUSTER}/{b}" for b in (morning, evening))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=[artifact_key("backups-tables", CLUSTER)])))
    (table,) = [a for a in artifacts if a.flow_run_id == run_id]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert isinstance(rows, list)
    by_id = {r["backup_id"]: r for r in rows}
    assert set(by_id) == {noon, newest}
    assert by_id[noon]["verified"] == "yes" and by_id[newest]["verified"] == ""
    assert "newest verified of day" in by_id[noon]["kept_because"]


@pytest.mark.usefixtures("prefect_api")
def test_every_verification_counts_past_one_page_of_artifacts() -> None:
    """More verification summaries than one API page (200): every successful one counts,
    logical and physical, and failed ones do not."""
    import secrets

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    from pgbackflow.flows.maintenance import verified_backups

    tag = secrets.token_hex(4)  # the session's server is shared: ids of this test only
    shop, cluster = f"pages-{tag}", f"pages-cluster-{tag}"
    logical_ok = {f"20261101T{i:06d}Z-{tag}" for i in range(230)}
    physical_ok = {f"20261102T{i:06d}Z-{tag}" for i in range(3)}
    published = (
        [(artifact_key("verification", shop), f"Successful: verification of {b}")
         for b in sorted(logical_ok)]
        + [(artifact_key("verification", shop), f"Failed: verification of bad-{i}")
           for i in range(5)]
        + [(artifact_key("physical-verification", cluster), f"passed: verification of {b}")
           for b in sorted(physical_ok)]
        + [(artifact_key("physical-verification", cluster), "failed: verification of bad-p")]
    )
    started = time.monotonic()
    with get_client(sync_client=True) as client:
        for key, description in published:
            client.create_artifact(ArtifactCreate(key=key, type="markdown", data="-",
                                                  description=description))
    found = verified_backups([shop, cluster, f"nothing-{tag}"])
    assert len(found.get(shop, ())) == len(logical_ok) and found[shop] == logical_ok
    assert found.get(cluster) == physical_ok
    assert set(found) == {shop, cluster}
    assert time.monotonic() - started < 60


@pytest.mark.pg
@pytest.mark.usefixtures("prefect_api")
def test_real_chain_expired_then_point_in_time_restore(
    pg_majors: tuple[int, ...], work_dir: Path
) -> None:
    """full1 → a → full2 → b → (target) → c → incremental → d; keep-last 1 keeps the
    incremental and full2 (its parent), deletes full1 and the WAL before full2; after a key
    rotation a PITR to the target with only the new key still restores a and b."""
    key = BackupEncryptionKey.generate()
    storage = LocalStorage(folder=str(work_dir / "store"))
    with cluster_or_skip(17, pg_majors) as server:
        prepare_marks(server)
        with streaming_wal(server, storage, key, work_dir / "spool"):
            first = full_backup(db_block(server), [storage], encryption_key=key)
            mark(server, "a")
            second = full_backup(db_block(server), [storage], encryption_key=key)
            mark(server, "b")
            time.sleep(1.0)
            target = committed_at(server, "SELECT 1")
            time.sleep(1.0)
            mark(server, "c")
            third = incremental_backup(db_block(server), [storage], encryption_key=key)
            mark(server, "d")
            wait_shipped(server, storage)
        assert third.parent_id == second.backup_id

        backend = storage.open()
        keyring = Keyring([key.master_key()])
        catalog = read_catalog(backend, keyring)
        later = datetime.now(UTC) + timedelta(hours=2)  # past the 1-hour safety age
        plan = plan_retention(catalog, lambda _db: Policy((KeepLast(1),)), now=later,
                              grace=timedelta(hours=24))
        (cluster_plan,) = plan.databases
        assert [d.backup.backup_id for d in cluster_plan.deleted] == [first.backup_id]
        kept = {d.backup.backup_id: d.why for d in cluster_plan.kept}
        assert "builds on it" in kept[second.backup_id]
        second_start = parse_lsn(second.start_lsn) // (16 * 1024 * 1024)
        assert cluster_plan.wal_delete
        assert all((w.number or 0) < second_start for w in cluster_plan.wal_delete)
        execute_plan(backend, plan, key.master_key())

        after = read_catalog(backend, keyring)
        assert [b.backup_id for b in after.databases[0].backups] == [second.backup_id,
                                                                     third.backup_id]
        # Then the key is rotated (backups and WAL): the restore needs only the new key.
        new_key = BackupEncryptionKey.generate()
        rotation = rotate_storage(backend, keyring, new_key.master_key())
        assert rotation.backups == 2 and not rotation.left
        assert rotation.rotated == 4 + len(after.databases[0].wal)
        restored = work_dir / "restored"
        report = pitr_restore(storage, str(restored), target_time=target.isoformat(),
                              start=True, encryption_key=new_key)
        try:
            assert report.chain == [f"full {second.backup_id}"]
            assert restored_rows(report.port or 0, server) == ["a", "b"]
        finally:
            stop_restored(restored, server)


@pytest.mark.pg
@pytest.mark.usefixtures("prefect_api")
def test_maintenance_reports_inactive_replication_slots(tmp_path: Path) -> None:
    """An inactive slot on a deployed cluster is reported with the WAL it keeps on the server
    (published and in the result); an unreachable cluster is a warning, not a failure."""
    from pgbackflow.flows.maintenance import maintenance
    from pgbackflow.tasks.cluster import EphemeralCluster, free_port
    from pgbackflow.tasks.toolsets import find_toolset

    server = EphemeralCluster(find_toolset(17), settings={"fsync": "off"}).start()
    try:
        with server.connect() as conn:
            conn.execute("SELECT pg_create_physical_replication_slot('left_behind', true)")
            conn.execute("CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad "
                         "FROM generate_series(1, 100000) g")
            conn.execute("SELECT pg_switch_wal()")
            expected = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
                "FROM pg_replication_slots WHERE slot_name = 'left_behind'").fetchone()
        assert expected is not None and expected[0] > 16 * 1024 * 1024
        key_file = tmp_path / "master.key"
        write_key_file(key_file, KEY)
        (tmp_path / "store").mkdir()
        gone = db_block(server).model_copy(update={"port": free_port()})
        summary = maintenance(storage=LocalStorage(folder=str(tmp_path / "store")),
                              key_file=str(key_file), dry_run=True,
                              clusters={"c17": db_block(server), "gone": gone})
    finally:
        server.stop()
    (slot,) = summary["inactive_slots"]
    assert slot["db_id"] == "c17" and slot["slot"] == "left_behind"
    assert slot["type"] == "physical"
    assert expected[0] <= slot["retained_bytes"] < expected[0] + 16 * 1024 * 1024


@pytest.mark.pg
@pytest.mark.usefixtures("prefect_api")
def test_each_backup_refreshes_its_backups_table(tmp_path: Path) -> None:
    """The "backups of <db>" table is published after every logical and physical backup
    (not only by retention runs): the newest backup first, what exists in the storage."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from pgbackflow.flows.logical_backup import logical_backup
    from pgbackflow.tasks.cluster import EphemeralCluster
    from pgbackflow.tasks.toolsets import find_toolset

    key = BackupEncryptionKey.generate()
    storage = LocalStorage(folder=str(tmp_path / "store"))
    server = EphemeralCluster(find_toolset(17), settings={"fsync": "off"}).start()
    try:
        first = logical_backup(db_block(server), [storage], encryption_key=key)
        second = logical_backup(db_block(server), [storage], encryption_key=key)
        full = full_backup(db_block(server), [storage], encryption_key=key)
    finally:
        server.stop()

    def table(db_id: str) -> list[dict[str, Any]]:
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"backups-tables-{db_id}"])))
        newest = max(found, key=lambda a: a.created or datetime.min.replace(tzinfo=UTC))
        assert newest.description == f"backups of {db_id}"
        data = newest.data
        rows = json.loads(data) if isinstance(data, str) else data
        assert isinstance(rows, list)
        return rows

    logical_rows = table(first.db_id)
    assert [r["backup_id"] for r in logical_rows] == [second.backup_id, first.backup_id]
    assert {r["kind"] for r in logical_rows} == {"logical"}
    assert all(r["stored_bytes"] > 0 and r["kept_because"] == "" for r in logical_rows)
    physical_rows = table(full.db_id)
    assert [(r["backup_id"], r["kind"]) for r in physical_rows] == [(full.backup_id, "full")]
