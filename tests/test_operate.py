"""Operating pgbackflow from Prefect, end to end, as an operator does it.

A real ``prefect server start`` and a real process worker (started from an empty folder: no
checkout), a real PostgreSQL 17 whose superuser password is a canary, and the config-driven
``pgbackflow deploy``. The server's own scheduler must create the runs (with SQLAlchemy 2.1
it creates none: this is the test that notices), the worker must run them, and the backups
must be in storage. Runs are triggered with plain HTTP as a user's script would, and a failed
run is retried the way the UI's Retry button does it.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import MasterKey, write_key_file
from pgbackflow.tasks.toolsets import find_toolset
from tests.fixtures.prefect_server import BIN, PrefectServer

MAJOR = 17
POOL = "e2e-backups"
VERIFY_POOL = "e2e-verify"

pytestmark = [pytest.mark.pg, pytest.mark.slow]


@dataclass
class Site:
    """What an operator has: a database server, a storage folder, a key, a config."""

    cluster: EphemeralCluster
    canary: str
    store: Path
    key_file: Path
    config: Path
    env: dict[str, str]
    worker_dir: Path

    def write_config(self, *, extra: str = "", shop: bool = True,
                     shop_health: str = "1m", shop_enabled: bool = True) -> None:
        shop_entry = textwrap.dedent(f"""
            [databases.shop]
            enabled = {str(shop_enabled).lower()}
            server = "pg"
            database = "shop"
            storages = ["local"]
            backup = "* * * * *"
            verify = "daily at 04:00"
            verify_sandbox = "local"
            health_check = "{shop_health}"
        """) if shop else ""
        self.config.write_text(textwrap.dedent(f"""
            [prefect]
            work_pool = "{POOL}"
            verification_pool = "{VERIFY_POOL}"

            [key]
            block = "e2e-master-key"
            file = "{self.key_file}"

            [storages.local]
            url = "{self.store}"

            [servers.pg]
            host = "{self.cluster.host}"
            port = {self.cluster.port}
            user = "{self.cluster.superuser}"
            password_env = "E2E_PG_PASSWORD"
            max_concurrent_backups = 2

            [databases.everything]
            server = "pg"
            database = "all"
            exclude = ["postgres", "skip_*"]
            storages = ["local"]
            backup = "daily at 03:00"
        """) + shop_entry + extra)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("operate")
    canary = f"canary-{secrets.token_hex(8)}"
    cluster = EphemeralCluster(find_toolset(MAJOR), password=canary,
                               settings={"fsync": "off"}).start()
    try:
        for name in ("shop", "crm", "skip_me"):
            with cluster.connect() as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            with cluster.connect(name) as conn:
                conn.execute("CREATE TABLE items (id int primary key, note text)")
                conn.execute(
                    "INSERT INTO items SELECT g, 'row ' || g FROM generate_series(1, 500) g"
                )
        key_file = root / "master.key"
        write_key_file(key_file, MasterKey.generate())
        store = root / "store"
        store.mkdir()
        yield Site(cluster=cluster, canary=canary, store=store, key_file=key_file,
                   config=root / "pgbackflow.toml", env={"E2E_PG_PASSWORD": canary},
                   worker_dir=root / "worker")
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def deployed(prefect_server: PrefectServer, site: Site) -> Iterator[dict[str, Any]]:
    """The config deployed (checked dry run first), and a worker serving the backup pool."""
    site.write_config()
    registered = subprocess.run(
        [str(BIN / "prefect"), "block", "register", "-m", "pgbackflow.blocks"],
        env=prefect_server.env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr
    assert "Successfully registered 5 blocks" in registered.stdout, registered.stdout
    dry = prefect_server.run_cli("deploy", "--config", str(site.config), "--dry-run",
                                 env=site.env)
    assert "+ deployment logical-backup/logical-shop" in dry.stdout
    assert "+ deployment backup-databases/logical-everything" in dry.stdout
    assert "+ block pgbackflow-postgres-database/pg" in dry.stdout
    assert "dry run: nothing was changed" in dry.stderr
    assert "applied to the Prefect server" not in dry.stderr
    with prefect_server.http() as http:
        response = http.post("deployments/filter", json={})
        assert response.json() == [], "a dry run created deployments"

    first = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
    assert "0 to update" in first.stdout.splitlines()[-1] or "to create" in first.stdout
    assert f"applied to the Prefect server at {prefect_server.api_url}" in first.stderr
    again = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
    assert "0 to create, 0 to update, 0 to pause" in again.stdout, again.stdout

    with prefect_server.http() as http:
        deployments = {d["name"]: d for d in http.post("deployments/filter", json={}).json()}
    assert set(deployments) == {"logical-shop", "logical-everything", "verify-shop",
                                "maintenance-local", "health-shop", "health-everything"}
    prefect_server.start_worker(POOL, site.worker_dir)
    yield deployments
    prefect_server.stop_workers()
    with prefect_server.http() as http:  # the every-minute schedule stops with the module
        for deployment in deployments.values():
            http.post(f"deployments/{deployment['id']}/pause_deployment")


def _runs(server: PrefectServer, deployment_id: str) -> list[dict[str, Any]]:
    with server.http() as http:
        response = http.post("flow_runs/filter", json={
            "deployments": {"id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC",
        })
        response.raise_for_status()
        runs: list[dict[str, Any]] = response.json()
        return runs


def _run(server: PrefectServer, run_id: str) -> dict[str, Any]:
    with server.http() as http:
        response = http.get(f"flow_runs/{run_id}")
        response.raise_for_status()
        run: dict[str, Any] = response.json()
        return run


def _wait_state(server: PrefectServer, run_id: str, wanted: str, timeout: float) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        run = _run(server, run_id)
        state = run["state"]["type"]
        if state == wanted:
            return run
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and state != wanted:
            pytest.fail(f"run {run_id} ended {state} ({run['state'].get('message')}) instead of "
                        f"{wanted}", pytrace=False)
        return None

    result: dict[str, Any] = server.wait_for(f"run {run_id} to be {wanted}", check, timeout)
    return result


def _backups(server: PrefectServer, site: Site) -> list[dict[str, Any]]:
    result = server.run_cli("list", "--from", str(site.store), "--json")
    backups: list[dict[str, Any]] = json.loads(result.stdout)
    return backups


def test_schedules_fire_and_the_worker_backs_up(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    shop = deployed["logical-shop"]
    assert shop["entrypoint"] == "pgbackflow.flows.logical_backup.logical_backup"
    assert shop["pull_steps"] == [] and shop["path"] is None
    assert {"db:shop", "job:logical", "pgbackflow"} <= set(shop["tags"])

    # The server's scheduler (not this test) creates the runs of the every-minute schedule.
    scheduled = prefect_server.wait_for(
        "the scheduler to create runs of logical-shop",
        lambda: [r for r in _runs(prefect_server, shop["id"]) if r["auto_scheduled"]], 90,
    )
    assert scheduled
    completed = prefect_server.wait_for(
        "a scheduled run of logical-shop to complete",
        lambda: [r for r in _runs(prefect_server, shop["id"])
                 if r["auto_scheduled"] and r["state"]["type"] == "COMPLETED"], 180, 2,
    )
    run = completed[0]
    assert {"db:shop", "job:logical"} <= set(run["tags"])
    backups = [b for b in _backups(prefect_server, site) if b["db_id"] == "shop"]
    assert backups and backups[0]["database"] == "shop"


def test_http_trigger_backs_up_every_database(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    everything = deployed["logical-everything"]
    with prefect_server.http() as http:
        response = http.post(f"deployments/{everything['id']}/create_flow_run", json={})
        assert response.status_code == 201, response.text
        run_id = response.json()["id"]
    _wait_state(prefect_server, run_id, "COMPLETED", 240)
    ids = {b["db_id"] for b in _backups(prefect_server, site)}
    assert {"everything-shop", "everything-crm"} <= ids
    assert not {i for i in ids if "skip" in i or i == "everything-postgres"}

    # A database created after deploying is picked up by the next run, no redeploy.
    with site.cluster.connect() as conn:
        conn.execute("CREATE DATABASE late_one")
    with prefect_server.http() as http:
        run_id = http.post(f"deployments/{everything['id']}/create_flow_run", json={}).json()["id"]
    _wait_state(prefect_server, run_id, "COMPLETED", 240)
    backups = _backups(prefect_server, site)
    assert "everything-late_one" in {b["db_id"] for b in backups}
    # The table (not --json) into a pipe keeps whole ids: nothing is cut at 80 columns.
    table = prefect_server.run_cli("list", "--from", str(site.store)).stdout
    for backup in backups:
        assert backup["backup_id"] in table and backup["db_id"] in table
    # Each database is its own run, tagged with its id (so automations can select it).
    with prefect_server.http() as http:
        late = http.post("flow_runs/filter", json={
            "flow_runs": {"tags": {"all_": ["db:everything-late_one"]}}
        }).json()
    assert [r["state"]["type"] for r in late] == ["COMPLETED"]
    assert "job:logical" in late[0]["tags"]


def test_one_failing_database_does_not_stop_the_others(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    """A database whose queries all time out fails; the run backs up the rest, then fails."""
    with site.cluster.connect() as conn:
        conn.execute("CREATE DATABASE broken_db")
    try:
        with site.cluster.connect("broken_db") as conn:
            conn.execute("CREATE TABLE big AS SELECT g FROM generate_series(1, 300000) g")
            conn.execute("ALTER DATABASE broken_db SET statement_timeout = '1ms'")
        before = {b["backup_id"] for b in _backups(prefect_server, site)}
        with prefect_server.http() as http:
            run_id = http.post(
                f"deployments/{deployed['logical-everything']['id']}/create_flow_run", json={}
            ).json()["id"]
        failed = _wait_state(prefect_server, run_id, "FAILED", 240)
        message = failed["state"]["message"]
        assert "broken_db" in message and "the other backups are complete" in message, message
        # The database's own one-line error, not Prefect's "encountered an exception: X".
        assert "the server cancelled a query" in message, message
        assert "QueryCanceled" not in message, message
        assert message.count("encountered an exception") == 1, message  # the parent's only
        new = {b["db_id"] for b in _backups(prefect_server, site) if b["backup_id"] not in before}
        assert {"everything-shop", "everything-crm"} <= new
        assert "everything-broken_db" not in new
    finally:
        with site.cluster.connect() as conn:
            conn.execute("DROP DATABASE broken_db WITH (FORCE)")


def test_backups_wait_for_the_server_limit(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    """The per-server and per-database limits exist as Prefect limits, and runs obey them."""
    from prefect.concurrency.sync import concurrency

    server_limit = f"pgbackflow-server-{site.cluster.host}-{site.cluster.port}"
    with prefect_server.http() as http:
        limits = {c["name"]: c["limit"]
                  for c in http.post("v2/concurrency_limits/filter", json={}).json()}
    assert limits[server_limit] == 2
    assert limits["pgbackflow-backup-shop"] == 1
    shop = deployed["logical-shop"]

    def completed() -> set[str]:
        return {r["id"] for r in _runs(prefect_server, shop["id"])
                if r["state"]["type"] == "COMPLETED"}

    with prefect_server.settings(), concurrency(server_limit, occupy=2, strict=True):
        done_before = completed()
        with prefect_server.http() as http:
            run_id = http.post(f"deployments/{shop['id']}/create_flow_run",
                               json={}).json()["id"]
        # This run, or a scheduled one ahead of it (one run of the deployment at a time),
        # starts and then waits for the server's limit.
        prefect_server.wait_for(
            "a backup of shop to start", lambda: [
                r for r in _runs(prefect_server, shop["id"]) if r["state"]["type"] == "RUNNING"
            ], 240,
        )
        time.sleep(8)  # room for a dump of 500 rows many times over
        assert completed() == done_before, "a backup ran while its server's limit was full"
    _wait_state(prefect_server, run_id, "COMPLETED", 240)


def test_readme_rest_trigger_as_written(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    """The two curl lines of README's Operate section, run by a shell as written there."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("**8. Trigger a run from the REST API**", 1)[1]
    script = block.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "create_flow_run" in script
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=prefect_server.env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip().splitlines()[-1]
    run = _wait_state(prefect_server, run_id, "COMPLETED", 180)
    assert run["deployment_id"] == deployed["logical-shop"]["id"]


def _quiesce(server: PrefectServer, deployment_id: str) -> None:
    """Pause a deployment, cancel its waiting runs and let running ones end: the next run
    of it is the test's own."""
    with server.http() as http:
        http.post(f"deployments/{deployment_id}/pause_deployment").raise_for_status()
        for run in _runs(server, deployment_id):
            if run["state"]["type"] in ("SCHEDULED", "PENDING"):
                http.post(f"flow_runs/{run['id']}/set_state", json={
                    "state": {"type": "CANCELLED", "message": "test: quiet deployment"},
                    "force": True,
                }).raise_for_status()
    server.wait_for("the deployment's runs to end", lambda: not [
        r for r in _runs(server, deployment_id) if r["state"]["type"] in ("RUNNING", "PENDING")
    ], 240, 2)


def test_failed_run_retried_like_the_ui_button(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    shop = deployed["logical-shop"]
    _quiesce(prefect_server, shop["id"])
    before = {b["backup_id"] for b in _backups(prefect_server, site) if b["db_id"] == "shop"}
    site.cluster.halt()
    try:
        with prefect_server.http() as http:
            run_id = http.post(f"deployments/{shop['id']}/create_flow_run", json={}).json()["id"]
        failed = _wait_state(prefect_server, run_id, "FAILED", 180)
        assert "db:shop" in failed["tags"], "a run that never connected must still be tagged"
    finally:
        site.cluster.resume()
    with prefect_server.http() as http:
        # What the UI's Retry button sends.
        response = http.post(f"flow_runs/{run_id}/set_state", json={
            "state": {"type": "SCHEDULED", "name": "AwaitingRetry",
                      "message": "Retry from the UI"},
        })
        assert response.status_code in (200, 201), response.text
        assert response.json()["status"] == "ACCEPT", response.json()
    _wait_state(prefect_server, run_id, "COMPLETED", 180)
    with prefect_server.http() as http:
        http.post(f"deployments/{shop['id']}/resume_deployment").raise_for_status()
    after = {b["backup_id"] for b in _backups(prefect_server, site) if b["db_id"] == "shop"}
    assert len(after - before) == 1
    leftovers = [p for p in site.store.rglob("*") if ".pgbackflow-incomplete" in str(p)
                 and p.is_file()]
    assert leftovers == []


def test_secrets_stay_in_blocks(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    prefect_server.wait_for(
        "at least one finished backup run",
        lambda: [r for d in deployed.values() for r in _runs(prefect_server, d["id"])
                 if r["state"]["type"] in ("COMPLETED", "FAILED")], 240, 2,
    )
    key_text = key_secret(site.key_file)
    with prefect_server.http() as http:
        responses = [
            http.post("deployments/filter", json={}).text,
            http.post("flow_runs/filter", json={}).text,
            http.post("block_documents/filter", json={}).text,
            http.post("artifacts/filter", json={}).text,
            http.post("logs/filter", json={}).text,
            http.post("events/filter", json={}).text,
            *(http.get(f"deployments/{d['id']}").text for d in deployed.values()),
        ]
        blocks = http.post("block_documents/filter", json={}).json()
        responses += [http.get(f"block_documents/{b['id']}").text for b in blocks]
    for text in responses:
        assert site.canary not in text
        assert key_text not in text
    # The secret is in the block (what a worker resolves), so runs can connect at all.
    with prefect_server.http() as http:
        block = next(b for b in blocks if b["name"] == "pg")
        full = http.get(f"block_documents/{block['id']}", params={"include_secrets": True})
        assert site.canary in full.text


def key_secret(path: Path) -> str:
    """The secret part of a key file."""
    return path.read_text().strip().rsplit(":", 1)[-1]


def test_fresher_backup_cancels_only_older_after_backup_verifications(
    prefect_server: PrefectServer, deployed: dict[str, Any]
) -> None:
    from pgbackflow.deployments.verification import queue_verification

    verify = deployed["verify-shop"]
    scheduled = prefect_server.wait_for(
        "the scheduler to create the daily 04:00 verification runs",
        lambda: [r for r in _runs(prefect_server, verify["id"]) if r["auto_scheduled"]], 90,
    )
    with prefect_server.settings():
        older = queue_verification("shop", "20260101T000000Z-older")
        newer = queue_verification("shop", "20260101T010000Z-newer")
    states = {r["id"]: r["state"]["type"] for r in _runs(prefect_server, verify["id"])}
    assert states[str(older)] == "CANCELLED"
    assert states[str(newer)] == "SCHEDULED"
    for run in scheduled:
        assert states[run["id"]] == "SCHEDULED", "a scheduled verification was cancelled"
    with prefect_server.http() as http:  # its backup id is made up: do not let it run
        http.post(f"flow_runs/{newer}/set_state", json={
            "state": {"type": "CANCELLED"}, "force": True,
        }).raise_for_status()


def test_deployed_verification_runs_on_a_worker(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    verify = deployed["verify-shop"]
    prefect_server.start_worker(VERIFY_POOL, site.worker_dir / "verify", name="verify-worker")
    with prefect_server.http() as http:
        run_id = http.post(f"deployments/{verify['id']}/create_flow_run", json={}).json()["id"]
    run = _wait_state(prefect_server, run_id, "COMPLETED", 240)
    assert {"db:shop", "job:verification"} <= set(run["tags"])
    with prefect_server.http() as http:
        artifacts = http.post("artifacts/filter", json={
            "artifacts": {"key": {"any_": ["verification-shop"]}}
        }).json()
    assert artifacts and "Successful" in artifacts[0]["data"]


def _status_databases(server: PrefectServer) -> set[str]:
    return {row["database"] for row in json.loads(server.run_cli("status", "--json").stdout)}


def _paused(server: PrefectServer, deployed: dict[str, Any], *names: str) -> dict[str, bool]:
    with server.http() as http:
        return {name: http.get(f"deployments/{deployed[name]['id']}").json()["paused"]
                for name in names}


def _checked(server: PrefectServer, deployed: dict[str, Any], db_id: str) -> None:
    """Wait until a health check of ``db_id`` has run (one is started now; the schedule's
    own, every minute, counts too): ``pgbackflow status`` lists it."""
    with server.http() as http:
        http.post(f"deployments/{deployed[f'health-{db_id}']['id']}/create_flow_run", json={})
    server.wait_for(f"pgbackflow status to list {db_id}",
                    lambda: db_id in _status_databases(server), 120, 2)


def test_removed_database_is_paused_not_deleted(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    _checked(prefect_server, deployed, "shop")
    site.write_config(shop=False)
    try:
        dry = prefect_server.run_cli("deploy", "--config", str(site.config), "--dry-run",
                                     env=site.env)
        assert "- deployment logical-backup/logical-shop" in dry.stdout
        assert "- deployment restore-verification/verify-shop" in dry.stdout
        assert "- deployment health-check/health-shop" in dry.stdout
        applied = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
        assert "3 to pause" in applied.stdout, applied.stdout
        assert _paused(prefect_server, deployed, "logical-shop", "logical-everything") == {
            "logical-shop": True, "logical-everything": False}
        # No longer checked, no longer in the fleet status (not a stale row forever).
        assert "shop" not in _status_databases(prefect_server)
    finally:
        site.write_config()
        prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)


def test_a_job_switched_off_in_the_config_is_paused(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    """``health_check = "off"`` on a database still in the config: its health check stops
    (paused, not left running beside a config that says off) and leaves ``status``."""
    _checked(prefect_server, deployed, "shop")
    site.write_config(shop_health="off")
    try:
        applied = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
        assert "- deployment health-check/health-shop" in applied.stdout, applied.stdout
        assert "paused: switched off in the config" in applied.stdout, applied.stdout
        assert "1 to pause" in applied.stdout, applied.stdout
        assert _paused(prefect_server, deployed, "health-shop", "logical-shop") == {
            "health-shop": True, "logical-shop": False}
        assert "shop" not in _status_databases(prefect_server)
    finally:
        site.write_config()
        again = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
    # Switched on again: resumed by the next deploy.
    assert "~ deployment health-check/health-shop" in again.stdout, again.stdout
    assert _paused(prefect_server, deployed, "health-shop") == {"health-shop": False}


def test_a_disabled_database_leaves_status(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    """``enabled = false``: every job of the database is paused and its last health state
    goes (``status`` showed it with an ever older check); enabled again, it is resumed.
    A check that runs on after the pause (it was running when deploy paused it) does not
    bring the state back, and a state no health check owns (left by an older pgbackflow)
    goes at the deploy too."""
    from pgbackflow.flows.health import variable_name

    def _final_state(run_id: str) -> str | None:
        state: str = _run(prefect_server, run_id)["state"]["type"]
        return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    _checked(prefect_server, deployed, "shop")
    with prefect_server.http() as http:
        http.post("variables/", json={"name": variable_name("left-over"), "value": {
            "db_id": "left-over", "state": "up"}}).raise_for_status()
    assert {"shop", "left-over"} <= _status_databases(prefect_server)
    site.write_config(shop_enabled=False)
    try:
        dry = prefect_server.run_cli("deploy", "--config", str(site.config), "--dry-run",
                                     env=site.env).stdout
        forgotten = ["- health state left-over: no health check of it runs, it leaves "
                     "`pgbackflow status`", "- health state shop: no health check of it runs, "
                     "it leaves `pgbackflow status`"]
        assert dry.splitlines()[-2:] == forgotten, dry
        assert {"shop", "left-over"} <= _status_databases(prefect_server)  # a dry run
        applied = prefect_server.run_cli("deploy", "--config", str(site.config),
                                         env=site.env).stdout
        assert applied.splitlines()[-2:] == forgotten, applied
        assert _paused(prefect_server, deployed, "health-shop", "logical-shop",
                       "logical-everything") == {
            "health-shop": True, "logical-shop": True, "logical-everything": False}
        assert not {"shop", "left-over"} & _status_databases(prefect_server)
        # A run of the paused check (as one already running at the deploy would go on).
        for _attempt in range(3):
            with prefect_server.http() as http:
                run_id = http.post(f"deployments/{deployed['health-shop']['id']}/"
                                   "create_flow_run", json={}).json()["id"]
            state = prefect_server.wait_for(
                "the paused health check's run to end", partial(_final_state, run_id), 120, 1)
            if state != "CANCELLED":  # one already running (one at a time): again
                break
        assert state == "COMPLETED", _run(prefect_server, run_id)["state"]
        assert "shop" not in _status_databases(prefect_server)
    finally:
        site.write_config()
        prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
    assert _paused(prefect_server, deployed, "health-shop", "logical-shop") == {
        "health-shop": False, "logical-shop": False}


def test_deploy_config_errors_are_one_line(prefect_server: PrefectServer, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    cases = {
        '[key]\nblock = "k"\n[storages.s]\nurl = "/x"\n[servers.pg]\nhost = "h"\n'
        '[databases.shop]\nserver = "pg"\nstorages = ["s"]\nbakup = "daily"\n':
            "databases.shop.bakup: unknown key; allowed:",
        '[key]\nblock = "k"\n[storages.s]\nurl = "/x"\n[servers.pg]\nhost = "h"\n'
        '[databases.shop]\nserver = "pg"\nstorages = ["s"]\nbackup = "dayly at 02:00"\n':
            "databases.shop.backup: 'dayly at 02:00' is not a schedule",
        '[key]\nblock = "k"\n[storages.s]\nurl = "/x"\n[servers.pg]\nhost = "h"\n'
        '[databases.shop]\nserver = "db9"\nstorages = ["s"]\n':
            "databases.shop.server: no server 'db9' in [servers]",
        '[key]\nblock = "k"\n[storages.s]\nurl = "/x"\n[servers.PG]\nhost = "h"\n':
            "servers.PG",
        '[key]\nblock = "k"\n[storages.s]\nurl = "ftp://x"\n[servers.pg]\nhost = "h"\n':
            "storages.s: url 'ftp://x' is not",
        'key = [': "not valid TOML",
    }
    head = '[key]\nblock = "k"\n[storages.s]\nurl = "/x"\n'
    server = '[servers.pg]\nhost = "h"\n'
    shop = '[databases.shop]\nserver = "pg"\nstorages = ["s"]\n'
    cluster = '[clusters.c1]\nserver = "pg"\nstorages = ["s"]\n'
    # Found by an adversarial review: accepted before, and each changed or leaked something.
    # A DSN pasted into host: its password went into the block, a limit's name and stdout.
    secret = "DsnHostPw333"
    cases |= {
        head + f'[servers.pg]\nhost = "postgresql://backup:{secret}@db.example/shop"\n':
            "servers.pg.host: is not a host name, an IP address or a socket folder",
        # A 100,000-character host changed the block, then failed on the limit's name.
        head + '[servers.pg]\nhost = "' + "h" * 100_000 + '"\n':
            "servers.pg.host: is not a host name",
        head + '[servers.pg]\nhost = "db1"\n[servers.pg.ssh]\nhost = "a b"\nuser = "u"\n'
        'private_key_env = "K"\nhost_key = "ssh-ed25519 AAAA"\n':
            "servers.pg.ssh.host: is not a host name, an IP address (",
        '[key]\nblock = "k"\n[storages.s]\nurl = "s3://b/p"\nendpoint_url = '
        f'"https://user:{secret}@s3.example.com"\n' + server:
            "storages.s: endpoint_url holds credentials",
        '[key]\nblock = "k"\n[storages.s]\nurl = "/x"\n[storages.t]\nurl = "file:///x/./"\n'
        + server: "storages.s and storages.t are the same place",
        head + '[servers.pg]\nhost = "h"\nport = true\n': "servers.pg.port:",
        head + server + cluster + "partial_interval_s = inf\n":
            "clusters.c1.partial_interval_s:",
        head + server + shop + '[databases.Shop]\nserver = "pg"\nstorages = ["s"]\n':
            "'shop' and 'Shop' differ only in case",
        head + server + shop + 'health_check = "99999999999999d"\n':
            "longer than 10 years",
        head + server + shop + 'retention = { keep_within = "999999999999999w" }\n':
            "longer than 100 years",
        head + server + '[databases."sh\\nop"]\nserver = "pg"\nstorages = ["s"]\n':
            "databases.'sh\\nop'",
    }
    for text, message in cases.items():
        config.write_text(text)
        result = prefect_server.run_cli("deploy", "--config", str(config), "--dry-run",
                                        check=False)
        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert str(config) in lines[0] and message in lines[0], lines[0]
        assert secret not in result.stdout + result.stderr
    # A block the config references (not describes) must exist: one line, nothing changed.
    config.write_text('[key]\nfile = "/k"\n[storages.s]\nurl = "/x"\n'
                      '[servers.pg]\nblock = "nope"\n')
    result = prefect_server.run_cli("deploy", "--config", str(config), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: block pgbackflow-postgres-database/nope named in the config does not exist: "
        "create it in the Prefect UI, or describe it in the config instead"
    )


def test_a_dry_run_deploy_changes_nothing_on_a_fresh_server(tmp_path: Path) -> None:
    """On a server nothing ever ran on, `deploy --dry-run` creates nothing at all (it used
    to create the "crash unresponsive runs" automation on its way, as flow commands do)."""
    from tests.fixtures.prefect_server import running_prefect_server

    key_file = tmp_path / "master.key"
    write_key_file(key_file, MasterKey.generate())
    config = tmp_path / "pgbackflow.toml"
    config.write_text(textwrap.dedent(f"""
        [key]
        file = "{key_file}"
        [storages.local]
        url = "{tmp_path / 'store'}"
        [servers.db1]
        host = "db1.internal"
        [databases.shop]
        server = "db1"
        storages = ["local"]
    """))
    with running_prefect_server(tmp_path / "fresh") as fresh:
        dry = fresh.run_cli("deploy", "--config", str(config), "--dry-run")
        assert "+ automation" in dry.stdout and "dry run: nothing was changed" in dry.stderr
        with fresh.http() as http:
            assert http.post("automations/filter", json={}).json() == []
            assert http.post("deployments/filter", json={}).json() == []
            assert http.post("work_pools/filter", json={}).json() == []
            ours = [b for b in http.post("block_documents/filter", json={}).json()
                    if str(b.get("name", "")).startswith(("db1", "local", "shop"))]
            assert ours == []


def test_cli_backup_runs_are_tagged_before_connecting(
    prefect_server: PrefectServer, site: Site
) -> None:
    wrong = (f"postgresql://{site.cluster.superuser}:wrong@{site.cluster.host}:"
             f"{site.cluster.port}/shop")
    result = prefect_server.run_cli("backup", "--db", wrong, "--to", str(site.store),
                                    "--key-file", str(site.key_file), "--db-id", "shop-cli",
                                    check=False)
    assert result.returncode == 1
    assert "password authentication failed" in result.stderr
    with prefect_server.http() as http:
        runs = http.post("flow_runs/filter", json={
            "flow_runs": {"tags": {"all_": ["db:shop-cli"]}}
        }).json()
    assert [r["state"]["type"] for r in runs] == ["FAILED"]
    assert "job:logical" in runs[0]["tags"]
