"""The maintenance deployment end to end, as an operator runs it.

A real ``prefect server start``, ``pgbackflow deploy`` from a config, a real process worker
started from an empty folder, a run triggered over plain HTTP: it must delete exactly what
the config's policy says (and the orphans past the grace period), keep the rest, and publish
its plan and the "backups of <db>" table. Dropping a storage from the config pauses its
maintenance deployment.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pgbackflow.flows.common import artifact_key
from pgbackflow.tasks.catalog import read_catalog
from pgbackflow.tasks.keys import write_key_file
from pgbackflow.tasks.storage import LocalFolderStorage
from tests.fixtures.prefect_server import BIN, PrefectServer
from tests.test_retention import DB, KEY, RING, Writer, logical_id, write_logical

POOL = "e2e-maintenance"

pytestmark = [pytest.mark.slow]


def _config(path: Path, key_file: Path, store: Path, spare: Path | None) -> None:
    spare_section = textwrap.dedent(f"""
        [storages.spare]
        url = "{spare}"
        maintenance = "0 4 1 1 *"
    """) if spare else ""
    path.write_text(textwrap.dedent(f"""
        [prefect]
        work_pool = "{POOL}"

        [key]
        file = "{key_file}"

        [storages.store]
        url = "{store}"
        maintenance = "0 4 1 1 *"

        [servers.pg]
        host = "127.0.0.1"
        port = 1

        [databases.{DB}]
        server = "pg"
        database = "{DB}"
        storages = ["store"]
        enabled = false
        retention = {{ keep_last = 2 }}
    """) + spare_section)


def _deployments(server: PrefectServer) -> dict[str, dict[str, Any]]:
    with server.http() as http:
        return {d["name"]: d for d in http.post("deployments/filter", json={}).json()}


def test_maintenance_deployment_deletes_what_the_policy_says(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    store, spare = tmp_path / "store", tmp_path / "spare"
    spare.mkdir()
    storage = LocalFolderStorage(store)
    writer = Writer(storage)
    now = datetime.now(UTC)
    ids = [write_logical(writer, now - timedelta(days=6 - i), i) for i in range(5)]
    orphan = f"logical/{DB}/{logical_id(now - timedelta(days=3), 99)}/dump.pgbf"
    writer.put(orphan, b"a killed backup's dump", now - timedelta(hours=30))
    key_file, config = tmp_path / "master.key", tmp_path / "pgbackflow.toml"
    write_key_file(key_file, KEY)
    _config(config, key_file, store, spare)

    registered = subprocess.run(
        [str(BIN / "prefect"), "block", "register", "-m", "pgbackflow.blocks"],
        env=prefect_server.env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr
    applied = prefect_server.run_cli("deploy", "--config", str(config))
    assert "+ deployment maintenance/maintenance-store" in applied.stdout, applied.stdout
    assert "+ deployment maintenance/maintenance-spare" in applied.stdout, applied.stdout
    deployed = _deployments(prefect_server)
    maintenance = deployed["maintenance-store"]
    assert maintenance["parameters"]["policies"] == {DB: {"keep_last": 2}}
    assert deployed[f"logical-{DB}"]["paused"] is True  # enabled = false: never runs here

    prefect_server.start_worker(POOL, tmp_path / "worker")
    try:
        with prefect_server.http() as http:
            run_id = http.post(f"deployments/{maintenance['id']}/create_flow_run",
                               json={}).json()["id"]

        def finished() -> dict[str, Any] | None:
            with prefect_server.http() as http:
                run: dict[str, Any] = http.get(f"flow_runs/{run_id}").json()
            state = run["state"]["type"]
            if state in ("FAILED", "CRASHED", "CANCELLED"):
                pytest.fail(f"maintenance run ended {state}: {run['state'].get('message')}",
                            pytrace=False)
            return run if state == "COMPLETED" else None

        prefect_server.wait_for("the maintenance run to complete", finished, timeout=300)

        def run_logs() -> list[dict[str, Any]] | None:
            # The run's process sends its last log batch as it exits, after the run is
            # Completed: the worker (whose process group it is in) must not be stopped before.
            with prefect_server.http() as http:
                found: list[dict[str, Any]] = http.post("logs/filter", json={
                    "logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}).json()
            lines = [e["message"] for e in found]
            orphan_line = any(m.startswith(f"deleted {storage.location}/{orphan} ") for m in lines)
            backup_lines = [m for m in lines
                            if m.startswith(f"deleted {storage.location}/logical/{DB}/")]
            return found if orphan_line and len(backup_lines) >= 3 * 3 + 1 + 1 else None

        logs = prefect_server.wait_for("the maintenance run's deletion log lines", run_logs,
                                       timeout=120)
    finally:
        prefect_server.stop_workers()

    left = [b.backup_id for b in read_catalog(storage, RING).databases[0].backups]
    assert left == ids[-2:]
    keys = {o.key for o in storage.list("")}
    assert orphan not in keys
    assert not any(i in k for i in ids[:3] for k in keys), "objects of deleted backups remain"
    assert not storage.exists("retention.lock")

    with prefect_server.http() as http:
        artifacts = http.post("artifacts/filter", json={"artifacts": {"flow_run_id": {
            "any_": [run_id]}}}).json()

    by_key = {a["key"]: a for a in artifacts if a.get("key")}
    plan = by_key[artifact_key("retention", storage.location)]
    for deleted in ids[:3]:
        assert f"DELETE logical     {deleted}" in str(plan["data"])
    assert "## Inactive replication slots" in str(plan["data"])
    table = by_key[f"backups-tables-{DB}"]
    assert table["description"] == f"backups of {DB}"
    assert [row["backup_id"] for row in _rows(table)] == [ids[-1], ids[-2]]
    assert "one of the last 2" in _rows(table)[1]["kept_because"]
    messages = [entry["message"] for entry in logs]
    assert any(m.startswith(f"deleted {storage.location}/{orphan} (orphan:")
               for m in messages), messages
    deleted = [m for m in messages if m.startswith(f"deleted {storage.location}/logical/{DB}/")]
    # 3 objects per deleted backup, the orphan, and the batch's deletion journal.
    assert len(deleted) == 3 * 3 + 1 + 1, deleted
    assert sum("(deletion journal: its batch is gone)" in m for m in deleted) == 1

    # The spare storage leaves the config: its maintenance is paused, the other one is not.
    _config(config, key_file, store, None)
    again = prefect_server.run_cli("deploy", "--config", str(config))
    assert "- deployment maintenance/maintenance-spare" in again.stdout, again.stdout
    assert "paused: its storage is no longer in the config" in again.stdout
    after = _deployments(prefect_server)
    assert after["maintenance-spare"]["paused"] is True
    assert after["maintenance-store"]["paused"] is False


def _rows(artifact: dict[str, Any]) -> list[dict[str, Any]]:
    data = artifact["data"]
    rows: list[dict[str, Any]] = json.loads(data) if isinstance(data, str) else data
    return rows
