"""Physical backup and WAL stream deployments on a real Prefect API (no workers run)."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from pydantic import SecretStr

from pgbackflow.blocks import BackupEncryptionKey, LocalStorage, PostgresDatabase, S3Storage
from pgbackflow.deployments.automations import FLOW_NAMES
from pgbackflow.deployments.physical import (
    deploy_physical_backups,
    deploy_wal_stream,
    full_deployment_name,
    incremental_deployment_name,
    physical_schedule,
    wal_deployment_name,
)
from pgbackflow.tasks.errors import ConfigError

LOCAL_SLUG = "pgbackflow-local-storage"


def test_schedule_presets_and_cron() -> None:
    assert physical_schedule("weekly", "01:00", "full") == "0 1 * * 0"
    assert physical_schedule("hourly", "00:30", "incremental") == "30 * * * *"
    assert physical_schedule("15 */6 * * *", "01:00", "incremental") == "15 */6 * * *"
    for bad in ("every sunday", "0 1 * * SUN", "yearly"):
        with pytest.raises(ConfigError, match=r"^full schedule") as excinfo:
            physical_schedule(bad, "01:00", "full")
        assert "\n" not in str(excinfo.value)


def test_bad_cron_is_refused_before_anything_is_deployed() -> None:
    with pytest.raises(ConfigError, match=r"^incremental schedule: cron '0 \* \* \* MON'"):
        deploy_physical_backups("db", ["/tmp/x"], db_id="cluster-1", pool="p",
                                incremental="0 * * * MON", key_file="/k")
    # (a config's schedule names no CLI option: "time", not "--at")
    with pytest.raises(ConfigError, match=r"^[^-]*time '25:00' is not a UTC time of day"):
        deploy_physical_backups("db", ["/tmp/x"], db_id="cluster-1", pool="p",
                                full_at="25:00", key_file="/k")
    with pytest.raises(ConfigError, match="db_id 'a/b' is invalid"):
        deploy_physical_backups("db", ["/tmp/x"], db_id="a/b", pool="p", key_file="/k")
    with pytest.raises(ConfigError, match="silence window 60 s is invalid"):
        deploy_wal_stream("db", ["/tmp/x"], db_id="cluster-1", pool="p", silence_s=60,
                          key_file="/k")
    with pytest.raises(ConfigError, match="replication slot name 'Bad-Slot' is invalid"):
        deploy_wal_stream("db", ["/tmp/x"], db_id="cluster-1", pool="p", slot="Bad-Slot",
                          key_file="/k")
    with pytest.raises(ConfigError, match="spool folder 'spool' is not an absolute path"):
        deploy_wal_stream("db", ["/tmp/x"], db_id="cluster-1", pool="p", spool_dir="spool",
                          key_file="/k")


@dataclass
class SavedBlocks:
    database: PostgresDatabase
    database_name: str
    storage: LocalStorage
    storage_name: str
    key: BackupEncryptionKey
    key_name: str

    @staticmethod
    def block_id(block: Any) -> str:
        return str(block._block_document_id)


@pytest.fixture
def saved(prefect_api: str, tmp_path: Path) -> SavedBlocks:
    suffix = secrets.token_hex(3)
    database = PostgresDatabase(host="db.example", port=5433, user="backup",
                                password=SecretStr("canary-pw"))
    storage = LocalStorage(folder=str(tmp_path / "store"))
    key = BackupEncryptionKey.generate()
    names = (f"db-{suffix}", f"store-{suffix}", f"key-{suffix}")
    for block, name in zip((database, storage, key), names, strict=True):
        block.save(name)
    return SavedBlocks(database, names[0], storage, names[1], key, names[2])


def read(deployment_id: UUID) -> tuple[Any, str]:
    """The deployment and its flow's name."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        return deployment, client.read_flow(deployment.flow_id).name


def deployments_named(name: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        return client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name]))
        )


def assert_one_at_a_time(deployment: Any) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    assert deployment.global_concurrency_limit is not None
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options is not None
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW


def test_backup_deployments_carry_schedules_and_block_references(
    saved: SavedBlocks, tmp_path: Path
) -> None:
    from pgbackflow.flows.physical_backup import full_backup, incremental_backup

    db_id = f"cluster-{secrets.randbelow(10**18)}"
    pool = f"physical-{secrets.token_hex(3)}"
    url_storage = str(tmp_path / "second")
    ids = deploy_physical_backups(
        saved.database_name, [f"block:{LOCAL_SLUG}/{saved.storage_name}", url_storage],
        db_id=db_id, pool=pool, encryption_key_block=saved.key_name,
    )
    assert len(ids) == 2
    (full, full_flow), (incremental, incremental_flow) = read(ids[0]), read(ids[1])
    assert (full_flow, full.name) == ("full-backup", full_deployment_name(db_id))
    assert (incremental_flow, incremental.name) == (
        "incremental-backup", incremental_deployment_name(db_id)
    )
    assert full.name == f"full-{db_id}" and incremental.name == f"incremental-{db_id}"
    for deployment, cron, job in ((full, "0 1 * * 0", "full"),
                                  (incremental, "30 * * * *", "incremental")):
        assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [
            (cron, "UTC")
        ]
        assert set(deployment.tags) == {"physical-backup", f"db:{db_id}", f"job:{job}",
                                        "pgbackflow"}
        # Module entrypoints and no pull steps: workers need the package, not a checkout.
        assert deployment.entrypoint == f"pgbackflow.flows.physical_backup.{job}_backup"
        assert deployment.pull_steps == [] and deployment.path is None
        assert deployment.work_pool_name == pool
        assert_one_at_a_time(deployment)
        assert deployment.parameters == {
            "database": {"$ref": {"block_document_id": saved.block_id(saved.database)}},
            "storages": [
                {"$ref": {"block_document_id": saved.block_id(saved.storage)}},
                {"folder": url_storage, "block_type_slug": LOCAL_SLUG},
            ],
            "encryption_key": {"$ref": {"block_document_id": saved.block_id(saved.key)}},
        }
    assert "canary-pw" not in str(full.parameters)

    # What a worker does with the parameters before the flow runs: real blocks.
    for flow, deployment in ((full_backup, full), (incremental_backup, incremental)):
        resolved = flow.validate_parameters(deployment.parameters)
        assert resolved["database"].settings().password == "canary-pw"
        assert [type(s) for s in resolved["storages"]] == [LocalStorage, LocalStorage]
        assert resolved["storages"][1].folder == url_storage
        assert resolved["encryption_key"].master_key() == saved.key.master_key()

    # Again with other schedules and a key file: the same two deployments, updated.
    again = deploy_physical_backups(
        saved.database, [saved.storage], db_id=db_id, pool=pool, full="0 2 * * 6",
        incremental="daily", incremental_at="04:15", key_file="/etc/pgbackflow/master.key",
        lock_timeout_s=600,
    )
    assert again == ids
    (full, _), (incremental, _) = read(ids[0]), read(ids[1])
    assert [s.schedule.cron for s in full.schedules] == ["0 2 * * 6"]
    assert [s.schedule.cron for s in incremental.schedules] == ["15 4 * * *"]
    assert full.parameters["key_file"] == "/etc/pgbackflow/master.key"
    assert "encryption_key" not in full.parameters
    assert full.parameters["lock_timeout_s"] == 600
    assert len(deployments_named(full_deployment_name(db_id))) == 1
    assert len(deployments_named(incremental_deployment_name(db_id))) == 1

    # Without incrementals (PostgreSQL < 17) the incremental deployment goes away.
    only_full = deploy_physical_backups(saved.database_name, [saved.storage], db_id=db_id,
                                        pool=pool, incremental=None, key_file="/k/master.key")
    assert only_full == ids[:1]
    assert deployments_named(incremental_deployment_name(db_id)) == []
    assert len(deployments_named(full_deployment_name(db_id))) == 1


def test_a_deployment_of_a_moved_flow_gets_the_new_entrypoint(saved: SavedBlocks) -> None:
    """Deployments made before the flows moved (``pgbackflow.flows.physical``) name a module
    that no longer exists: the next deploy shows and writes the new entrypoint."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    from pgbackflow.deployments.apply import PrefectPlan, apply_plan, plan_changes
    from pgbackflow.deployments.physical import backup_parameters, physical_backup_specs

    db_id = f"cluster-{secrets.randbelow(10**18)}"
    pool = f"physical-{secrets.token_hex(3)}"
    parameters = backup_parameters(saved.database_name, [saved.storage], None, saved.key_name)
    plan = PrefectPlan(pools=[pool], deployments=physical_backup_specs(
        parameters, db_id=db_id, pool=pool, full_cron="0 1 * * 0", incremental_cron=None,
    ))
    (full_id,) = apply_plan(plan, plan_changes(plan)).values()
    old = "pgbackflow.flows.physical.full_backup"
    with get_client(sync_client=True) as client:
        client.update_deployment(full_id, DeploymentUpdate(entrypoint=old))
    assert read(full_id)[0].entrypoint == old

    new = "pgbackflow.flows.physical_backup.full_backup"
    (change,) = [c for c in plan_changes(plan) if c.kind == "deployment"]
    assert (change.action, change.details) == ("~", (f"entrypoint: {old!r} → {new!r}",))
    assert apply_plan(plan, [change]) == {f"full-backup/{full_deployment_name(db_id)}": full_id}
    assert read(full_id)[0].entrypoint == new
    assert [c.action for c in plan_changes(plan) if c.kind == "deployment"] == ["="]


def test_block_and_key_mistakes_are_one_line_config_errors(saved: SavedBlocks) -> None:
    storages = [saved.storage]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"database": "nope"}, "database block pgbackflow-postgres-database/nope does not exist"),
        ({"database": f"block:{LOCAL_SLUG}/{saved.database_name}"},
         "is not a PostgresDatabase block"),
        ({"database": PostgresDatabase(host="h")}, "PostgresDatabase block is not saved"),
        ({"storages": [f"block:{LOCAL_SLUG}/nope"]}, f"storage block {LOCAL_SLUG}/nope does not"),
        ({"storages": ["block:other/x"]}, "is not a storage block reference"),
        ({"storages": [S3Storage(bucket="b", access_key_id="a",
                                 secret_access_key=SecretStr("s"))]}, "holds a secret key"),
        ({"storages": []}, "no storage given"),
        ({"key_file": None}, "need a master key every worker shares"),
        ({"encryption_key_block": saved.key_name}, "not both"),
        ({"key_file": "master.key"}, "not an absolute path"),
    ]
    for override, message in cases:
        arguments: dict[str, Any] = {
            "database": saved.database_name, "storages": storages, "key_file": "/k/master.key",
            **override,
        }
        with pytest.raises(ConfigError, match=message) as excinfo:
            deploy_physical_backups(db_id="cluster-9", pool="unused", **arguments)
        assert "\n" not in str(excinfo.value)
    assert deployments_named(full_deployment_name("cluster-9")) == []


@pytest.fixture
def wal_deployment(saved: SavedBlocks) -> Iterator[tuple[UUID, str]]:
    db_id = f"cluster-{secrets.randbelow(10**18)}"
    pool = f"wal-{secrets.token_hex(3)}"
    deployment_id = deploy_wal_stream(
        saved.database_name, [f"block:{LOCAL_SLUG}/{saved.storage_name}"], db_id=db_id,
        pool=pool, spool_dir="/var/lib/pgbackflow/wal-spool/x", key_file="/k/master.key",
        start=False,
    )
    yield deployment_id, db_id


def test_wal_stream_deployment_keeps_exactly_one_streamer(
    saved: SavedBlocks, wal_deployment: tuple[UUID, str]
) -> None:
    from pgbackflow.flows.wal_stream import wal_stream

    deployment_id, db_id = wal_deployment
    deployment, flow_name = read(deployment_id)
    assert (flow_name, deployment.name) == ("wal-stream", wal_deployment_name(db_id))
    assert deployment.name == f"wal-stream-{db_id}"
    # One long-running run, restarted by automations: no schedule (no Cancelled-run stream).
    assert deployment.schedules == []
    assert set(deployment.tags) == {"wal-stream", f"db:{db_id}", "job:wal", "pgbackflow"}
    assert deployment.job_variables == {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}}
    assert_one_at_a_time(deployment)
    assert deployment.parameters == {
        "database": {"$ref": {"block_document_id": saved.block_id(saved.database)}},
        "storages": [{"$ref": {"block_document_id": saved.block_id(saved.storage)}}],
        "key_file": "/k/master.key",
        "slot": "pgbackflow",
        "partial_interval_s": 30.0,
        "max_runtime_s": None,
        "spool_dir": "/var/lib/pgbackflow/wal-spool/x",
    }
    resolved = wal_stream.validate_parameters(deployment.parameters)
    assert resolved["database"].host == "db.example" and resolved["max_runtime_s"] is None

    again = deploy_wal_stream(saved.database, [saved.storage], db_id=db_id,
                              pool=deployment.work_pool_name, silence_s=600, slot="other_slot",
                              encryption_key_block=saved.key_name, start=False)
    assert again == deployment_id
    deployment, _ = read(deployment_id)
    assert deployment.schedules == []
    assert deployment.parameters["slot"] == "other_slot"
    assert "spool_dir" not in deployment.parameters and "key_file" not in deployment.parameters
    assert_one_at_a_time(deployment)
    assert len(deployments_named(wal_deployment_name(db_id))) == 1
    assert_restart_automations(db_id, deployment_id, silence_s=600)


def assert_restart_automations(db_id: str, deployment_id: UUID, *, silence_s: float) -> None:
    """Exactly one of each restart automation (re-deploying replaces, never duplicates)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        automations = [a for a in client.read_automations() if a.name.endswith(f": {db_id}")]
        zombie = client.read_automations_by_name("pgbackflow: crash unresponsive runs")
        lost_at_start = client.read_automations_by_name("pgbackflow: crash runs lost at start")
    assert len(zombie) == 1 and len(lost_at_start) == 1
    assert lost_at_start[0].trigger.after == {"prefect.flow-run.Running"}
    for automation in (zombie[0], lost_at_start[0]):  # pgbackflow's runs only
        assert automation.trigger.match_related.model_dump() == {
            "prefect.resource.role": "flow", "prefect.resource.name": list(FLOW_NAMES)}
    by_name = {a.name.split(":")[0]: a for a in automations}
    assert len(automations) == 4 and set(by_name) == {
        "pgbackflow wal-stream restart on crash", "pgbackflow wal-stream restart after failure",
        "pgbackflow wal-stream restart when silent", "pgbackflow wal-stream crash when silent",
    }
    for automation in automations:
        (action,) = automation.actions
        if automation.name.startswith("pgbackflow wal-stream crash"):
            assert action.type == "change-flow-run-state" and action.state == "CRASHED"
        else:
            assert action.type == "run-deployment" and action.deployment_id == deployment_id
    silent = by_name["pgbackflow wal-stream restart when silent"].trigger
    assert silent.within == timedelta(seconds=silence_s)
    assert by_name["pgbackflow wal-stream restart after failure"].actions[0].schedule_after == (
        timedelta(seconds=60)
    )


def test_a_second_streamer_is_cancelled_while_one_runs(wal_deployment: tuple[UUID, str]) -> None:
    """What a worker does with the next tick's run while a streamer runs, by state changes."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed, Pending, Running

    deployment_id, _ = wal_deployment
    with get_client(sync_client=True) as client:

        def move(run_id: UUID, state: Any) -> StateType | None:
            client.set_flow_run_state(run_id, state)
            run_state = client.read_flow_run(run_id).state
            return None if run_state is None else run_state.type

        first = client.create_flow_run_from_deployment(deployment_id)
        second = client.create_flow_run_from_deployment(deployment_id)
        assert move(first.id, Pending()) == StateType.PENDING
        assert move(first.id, Running()) == StateType.RUNNING
        assert move(second.id, Pending()) == StateType.CANCELLED
        # The streamer crashes: the slot comes free and the next tick's run may start.
        assert move(first.id, Crashed(message="worker lost")) == StateType.CRASHED
        third = client.create_flow_run_from_deployment(deployment_id)
        assert move(third.id, Pending()) == StateType.PENDING
        client.set_flow_run_state(third.id, Crashed(message="test done"), force=True)


def test_automation_fingerprints_do_not_depend_on_hash_order() -> None:
    """A trigger's event sets dump in each process's hash order; deploy compares fingerprints
    made in two processes (the one that created the automation, the one deploying now), so
    an unchanged automation must not look changed ("~ automation ..." on a second deploy)."""
    script = ("from pgbackflow.deployments.automations import zombie_automation;"
              "print(zombie_automation().fingerprint())")
    prints = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=True, env={"PYTHONHASHSEED": str(seed)}).stdout
        for seed in range(6)
    }
    assert len(prints) == 1, prints


def test_the_lost_run_automations_know_every_flow() -> None:
    """They watch runs of FLOW_NAMES only: a flow missing there would stay Running when lost."""
    import importlib
    import pkgutil

    from prefect import Flow

    import pgbackflow.flows

    names = set()
    for module in pkgutil.iter_modules(pgbackflow.flows.__path__):
        loaded = importlib.import_module(f"pgbackflow.flows.{module.name}")
        names |= {value.name for value in vars(loaded).values() if isinstance(value, Flow)}
    assert names == set(FLOW_NAMES)


def test_wal_switched_off_pauses_its_streamer_and_says_what_goes_on(tmp_path: Path) -> None:
    """A streamed cluster's ``wal = false`` at the next deploy (the cluster stays): the
    streamer's deployment and its restart automations are paused (a restart would start it
    again), its backups are not, and deploy says that a running streamer goes on and the
    slot keeps WAL until ``physical-retire``. Then the cluster leaves the config: all of
    its deployments are paused. A real ``prefect server start`` and the CLI."""
    from pgbackflow.tasks.cluster import EphemeralCluster
    from pgbackflow.tasks.keys import MasterKey, write_key_file
    from pgbackflow.tasks.toolsets import find_toolset
    from tests.fixtures.deploy_config import config_head
    from tests.fixtures.prefect_server import running_prefect_server

    cluster = EphemeralCluster(find_toolset(17), settings={"fsync": "off"}).start()
    try:
        write_key_file(tmp_path / "master.key", MasterKey.generate())
        (tmp_path / "store").mkdir()
        head = config_head("sw-pool", tmp_path / "master.key", tmp_path / "store", cluster,
                           "SW_PG_PASSWORD")
        config, env = tmp_path / "pgbackflow.toml", {"SW_PG_PASSWORD": cluster.password}

        def deploy(wal: str | None) -> str:
            config.write_text(head + (f'[clusters.sw]\nserver = "pg"\nstorages = ["local"]\n'
                                      f'full = "weekly"\nincremental = ""\nwal = {wal}\n'
                                      f'spool_dir = "{tmp_path / "spool"}"\n'
                                      'health_check = "off"\n' if wal else
                                      '[databases.other]\nserver = "pg"\n'
                                      'storages = ["local"]\nhealth_check = "off"\n'))
            return server.run_cli("deploy", "--config", str(config), env=env).stdout

        def states() -> tuple[dict[str, bool], dict[str, bool]]:
            with server.http() as http:
                deployments = {d["name"]: d["paused"]
                               for d in http.post("deployments/filter", json={}).json()}
                automations = {a["name"].split(":")[0]: a["enabled"]
                               for a in http.post("automations/filter", json={}).json()
                               if a["name"].endswith(": sw")}
            return deployments, automations

        with running_prefect_server(tmp_path / "prefect") as server:
            assert "started WAL streamer sw" in deploy("true")
            deployments, automations = states()
            assert deployments == {"full-sw": False, "wal-stream-sw": False}
            assert len(automations) == 4 and all(automations.values()), automations

            out = deploy("false")
            assert "- deployment wal-stream/wal-stream-sw" in out, out
            assert "paused: switched off in the config" in out
            assert ("paused WAL streaming of sw: a streamer still running goes on, and the "
                    "replication slot keeps WAL on the server; `pgbackflow physical-retire "
                    "--db-id sw` stops it and drops the slot") in out, out
            deployments, automations = states()
            assert deployments == {"full-sw": False, "wal-stream-sw": True}
            assert len(automations) == 4 and not any(automations.values()), automations

            out = deploy(None)  # the cluster leaves the config
            assert "- deployment full-backup/full-sw" in out, out
            assert "paused: its database is no longer in the config" in out
            assert states()[0] == {"full-sw": True, "wal-stream-sw": True,
                                   "logical-other": False}
    finally:
        cluster.stop()


def test_what_pausing_a_deployment_pauses_is_read_from_its_tags() -> None:
    """Deploy decides from a paused deployment's tags (not its name) whose automations it
    pauses (what deploy then prints about the streamer:
    test_wal_switched_off_pauses_its_streamer_and_says_what_goes_on)."""
    from pgbackflow.deployments.config import _owners_of
    from pgbackflow.deployments.tags import db_tag, job_tag, storage_tag

    in_config = {db_tag("kept")}
    wal = [db_tag("kept"), job_tag("wal")]
    assert _owners_of(wal, in_config) == [("kept", "wal-stream")]
    assert _owners_of([db_tag("gone"), job_tag("wal")], in_config) == [("gone", None)]
    # A job switched off on a database still in the config: its notifications are paused
    # as stale automations, nothing here.
    assert _owners_of([db_tag("kept"), job_tag("full")], in_config) == []
    assert _owners_of([db_tag("gone"), job_tag("logical")], in_config) == [("gone", None)]
    assert _owners_of([job_tag("maintenance"), storage_tag("s3")], in_config) == [
        ("s3", "maintenance")]
