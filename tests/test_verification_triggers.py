"""Verification deployments end to end: after-backup trigger, pending cancellation, the agent
running the queued verification, and success/failure notifications at a local webhook."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from pydantic import SecretStr

from pgbackflow.blocks import BackupEncryptionKey, LocalStorage, PostgresDatabase
from pgbackflow.deployments.automations import apply_automation
from pgbackflow.deployments.notifications import (
    NotifyDefaults,
    outcome_automations,
    resolve_targets,
)
from pgbackflow.deployments.verification import (
    deploy_verification,
    deployment_name,
    queue_verification,
    schedule_cron,
)
from pgbackflow.flows.logical_backup import logical_backup
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.keys import write_key_file
from tests.fixtures.postgres import make_database

CLI = str(Path(sys.executable).with_name("pgbackflow"))


def test_schedule_presets_and_cron() -> None:
    assert schedule_cron("hourly", "03:15") == "15 * * * *"
    assert schedule_cron("daily", "04:30") == "30 4 * * *"
    assert schedule_cron("weekly", "04:00") == "0 4 * * 0"
    assert schedule_cron("monthly", "00:05") == "5 0 1 * *"
    assert schedule_cron(None, cron="0 4 * * 0") == "0 4 * * 0"
    with pytest.raises(ConfigError, match="5-field cron"):
        schedule_cron(None, cron="every sunday")
    # Days that never come: Prefect accepts them, and the schedule never makes a run
    # (its croniter finds no date even for a weekday added to an impossible day).
    for never in ("0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 30,31 2 *", "0 0 30 2 1"):
        with pytest.raises(ConfigError, match="never fires"):
            schedule_cron(None, cron=never)
    # Leap years; ranges that wrap (another cron library refused them, Prefect runs them).
    for fires in ("0 0 29 2 *", "0 0 * * 6-0", "0 0 * 11-2 *", "0 0 25-5 * *"):
        assert schedule_cron(None, cron=fires) == fires
    with pytest.raises(ConfigError, match="preset 'yearly' is unknown"):
        schedule_cron("yearly")
    with pytest.raises(ConfigError, match="not a UTC time of day"):
        schedule_cron("daily", "25:00")


class Receiver:
    """A local webhook endpoint that records what it is sent."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, text: str, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.received:
                if text in json.dumps(message):
                    return message
            time.sleep(0.3)
        raise AssertionError(f"no notification containing {text!r}; got {self.received}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.server.shutdown()


def flow_run_state(run_id: UUID) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def wait_final(run_id: UUID, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = flow_run_state(run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not finished: {flow_run_state(run_id).state}")


def test_after_backup_trigger_queue_agent_and_notifications(
    pg_servers: Any, tmp_path: Path, prefect_api: str, receiver: Receiver
) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        DeploymentFilter,
        DeploymentFilterName,
    )

    from pgbackflow.flows.common import artifact_key

    server: EphemeralCluster = pg_servers.get(17)
    source = make_database(server, "trig",
                           "CREATE TABLE t AS SELECT generate_series(1, 5000) AS id")
    key = BackupEncryptionKey.generate()
    key_file = tmp_path / "k.key"
    write_key_file(key_file, key.master_key())
    folder = tmp_path / "backups"
    storage = LocalStorage(folder=str(folder))
    database = PostgresDatabase(host=server.host, port=server.port, database=source,
                                user=server.superuser, password=SecretStr(server.password),
                                sslmode="disable")
    first = logical_backup(database, [storage], key_file=str(key_file))
    db_id = first.db_id
    pool = f"verify-{secrets.token_hex(3)}"
    deployment_id = deploy_verification(db_id, str(folder), pool, cron=schedule_cron("weekly"),
                                        sandbox="local", key_file=str(key_file))
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 0"]  # type: ignore[union-attr]
    assert {"verification", f"db:{db_id}"} <= set(deployment.tags)

    # The CLI redeploys it as it stands, silent; a storage with no backup of the id, or one
    # this host cannot read, gets a warning (the agents' host may see another folder).
    def schedule(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLI, "schedule-verification", "--pool", pool, "--sandbox", "local", "--key-file",
             str(key_file), *args], env={**os.environ, "PREFECT_API_URL": prefect_api},
            capture_output=True, text=True, timeout=300, check=False)

    same = schedule("--db-id", db_id, "--from", str(folder), "--preset", "weekly")
    assert same.returncode == 0 and same.stderr == "", same.stderr
    with get_client(sync_client=True) as client:
        assert client.read_deployment(deployment_id).parameters == deployment.parameters
    for args, warning in [
        (["--db-id", "no-backups-here", "--from", str(folder)],
         f"warning: --from {folder} holds no logical backup of no-backups-here (seen from this "
         "host)"),
        (["--db-id", "nowhere", "--from", str(tmp_path / "gone")],
         f"warning: --from {tmp_path / 'gone'} cannot be read from this host"),
    ]:
        warned = schedule(*args)
        assert warned.returncode == 0, warned.stderr
        assert warned.stderr.startswith(warning) and warned.stderr.count("\n") == 1, \
            warned.stderr

    hook = CustomWebhookNotificationBlock(
        name="test-hook", url=receiver.url,
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    )
    hook_name = f"hook-{secrets.token_hex(3)}"
    hook.save(hook_name, overwrite=True)
    # The automations a deploy config's [notify] makes (block, on_failure, on_success).
    settings = NotifyDefaults(block=f"custom-webhook/{hook_name}", on_success=True)
    specs = outcome_automations(db_id, "verification", settings,
                                resolve_targets(settings.blocks(), "notify.block"))
    assert len({apply_automation(spec) for spec in specs}) == 2

    # Two verifications wait (no agent yet); a fresher backup cancels both and queues its own.
    waiting = [queue_verification(db_id, first.backup_id) for _ in range(2)]
    assert flow_run_state(waiting[0]).state.is_cancelled()  # cancelled by the second
    second = logical_backup(database, [storage], key_file=str(key_file), verify_after_backup=True)
    assert all(flow_run_state(run).state.is_cancelled() for run in waiting)
    with get_client(sync_client=True) as client:
        # Not the weekly schedule's upcoming runs, which the server's scheduler adds.
        queued = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[deployment_name(db_id)])))
            if r.state is not None and not r.state.is_final() and not r.auto_scheduled]
    assert len(queued) == 1
    assert queued[0].parameters["backup_id"] == second.backup_id
    assert "after-backup" in queued[0].tags
    assert second.verification == f"queued (flow run {queued[0].id})"  # what the CLI prints

    # A backup to a storage the deployment does not read queues nothing (its run could not
    # find the backup) and says so; the waiting verification stays.
    elsewhere = tmp_path / "elsewhere"
    third = logical_backup(database, [LocalStorage(folder=str(elsewhere))],
                           key_file=str(key_file), verify_after_backup=True)
    assert third.verification == (
        f"not queued: verification deployment {deployment_name(db_id)} reads {folder}, "
        f"where backup {third.backup_id} was not stored ({elsewhere}): back up to that "
        "storage too, or point the deployment at this one with pgbackflow "
        "schedule-verification --from"), third.verification
    assert not flow_run_state(queued[0].id).state.is_final()
    # A database with no verification deployment: said, not silent.
    other = PostgresDatabase(host=server.host, port=server.port, database="postgres",
                             user=server.superuser, password=SecretStr(server.password),
                             sslmode="disable")
    lone = logical_backup(other, [LocalStorage(folder=str(elsewhere))], key_file=str(key_file),
                          verify_after_backup=True)
    assert lone.verification is not None
    assert lone.verification.startswith("not queued: no verification deployment")

    # An agent picks it up and proves the backup; the success notification arrives.
    agent = subprocess.Popen(
        [CLI, "agent", "--pool", pool, "--max-cpu", "1", "--max-ram-mb", "1024"],
        env={**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        done = wait_final(queued[0].id)
        assert done.state.is_completed(), done.state
        receiver.wait_for(f"restore verification of {db_id} succeeded")
        with get_client(sync_client=True) as client:
            summaries = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[artifact_key("verification", db_id)])))
        assert any("Successful" in str(a.data) and second.backup_id in str(a.data)
                   for a in summaries)

        # Damage the newest dump: the next verification fails and says so at the webhook.
        dump = next((folder / "logical" / db_id / second.backup_id).glob("dump.pgbf"))
        dump.write_bytes(dump.read_bytes()[:-7])
        failing = wait_final(queue_verification(db_id, second.backup_id))
        assert failing.state.is_failed(), failing.state
        message = receiver.wait_for(f"restore verification of {db_id} failed")
        assert "truncated" in json.dumps(message) or "failed" in json.dumps(message)
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(timeout=60)
