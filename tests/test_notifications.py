"""Notifications and missed-backup alerts, end to end, as an operator sets them up.

A real ``prefect server start``, a real process worker, a real PostgreSQL 17, and two real
receivers on loopback: an HTTP server behind a Prefect ``CustomWebhookNotificationBlock``
(its token kept in the block's secrets) and an SMTP server (aiosmtpd) behind pgbackflow's
``SmtpEmail`` block, which the Prefect *server* loads to send (the ``prefect.collections``
entry point). The deploy config names both blocks; ``pgbackflow deploy`` makes the
automations; runs are started over plain HTTP as a user's script would.
"""

from __future__ import annotations

import json
import re
import secrets
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pgbackflow.deployments.notifications import PREFIXES
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import MasterKey, write_key_file
from pgbackflow.tasks.toolsets import find_toolset
from tests.fixtures.deploy_config import config_head
from tests.fixtures.notify import Inbox, Message, Receivers, running_receivers, save_blocks
from tests.fixtures.prefect_server import PrefectServer, postgres_backed_prefect_server
from tests.test_bad_inputs import CONFIG

MAJOR = 17
POOL = "ntf-backups"
#: A notification must arrive this soon after its run ended (the issue's bar).
DELIVERY_S = 5.0
#: The Prefect server's PREFECT_UI_URL (README): the base of every message's run link.
UI_URL = "https://prefect.example.com"

pytestmark = [pytest.mark.pg, pytest.mark.slow]


@dataclass
class Site:
    cluster: EphemeralCluster
    store: Path
    key_file: Path
    config: Path
    env: dict[str, str]
    worker_dir: Path
    receivers: Receivers
    #: The folder of the storage ntf-tidy, whose maintenance runs on a schedule.
    tidy: Path

    @property
    def inbox(self) -> Inbox:
        return self.receivers.inbox

    def write_config(self, *, shop_success: bool = True, missed_alerts: bool = False,
                     disabled: tuple[str, ...] = (), dropped: tuple[str, ...] = (),
                     tidy: bool = True, unchecked_health: str = "1h") -> None:
        """The module's config; ``missed_alerts``: 20 s missed windows for ntf-idle and
        ntf-phys (only while their test runs: every 20 s they fire again, and the Prefect
        server runs actions one at a time, so they would delay the timed deliveries);
        ``disabled``: these databases get ``enabled = false``; ``dropped``: these databases
        are left out; ``tidy = False``: the ntf-tidy storage (its maintenance) is left out;
        ``unchecked_health``: ntf-unchecked's ``health_check``."""
        success = '["logical"]' if shop_success else "false"
        idle = ('missed_backup = "20s", missed_verification = "20s"' if missed_alerts
                else 'missed_backup = "2h"')
        phys = 'missed_full = "20s"' if missed_alerts else 'missed_full = "off"'
        # By default 5 intervals: 5 h, never while the module runs.
        unchecked = 'missed_health_check = "20s"' if missed_alerts else ""
        tidy_section = (f'[storages.ntf-tidy]\n            url = "{self.tidy}"\n'
                        '            maintenance = "daily at 03:30"\n' if tidy else "")
        text = config_head(POOL, self.key_file, self.store, self.cluster,
                           "NTF_PG_PASSWORD") + textwrap.dedent(f"""
            {tidy_section}
            [notify]
            block = ["custom-webhook/ntf-hook", "pgbackflow-smtp-email/ntf-mail"]
            on_failure = true
            on_success = ["logical", "maintenance"]

            [databases.ntf-shop]
            server = "pg"
            database = "shop"
            storages = ["local"]
            health_check = "off"
            backup = "daily at 02:00"
            notify = {{ on_success = {success} }}

            [databases.ntf-broken]
            server = "pg"
            database = "no_such_database"
            storages = ["local"]
            health_check = "off"
            backup = "daily at 02:00"

            [databases.ntf-quiet]
            server = "pg"
            database = "no_such_database"
            storages = ["local"]
            health_check = "off"
            backup = "daily at 02:00"
            notify = {{ on_failure = false, on_success = false, missed_backup = "off" }}

            [databases.ntf-idle]
            server = "pg"
            database = "shop"
            storages = ["local"]
            health_check = "off"
            backup = "hourly at :17"
            verify = "weekly"
            verify_sandbox = "local"
            notify = {{ {idle} }}

            [clusters.ntf-phys]
            server = "pg"
            storages = ["local"]
            full = "weekly"
            incremental = ""
            wal = false
            health_check = "off"
            notify = {{ {phys} }}

            # Health checks hourly (the test pauses them): alerted when none completes.
            [databases.ntf-unchecked]
            server = "pg"
            database = "shop"
            storages = ["local"]
            backup = "daily at 02:00"
            health_check = "{unchecked_health}"
            [databases.ntf-unchecked.notify]
            on_failure = ["logical"]
            on_success = false
            missed_backup = "off"
            {unchecked}

            [databases.ntf-retry-on]
            server = "pg"
            database = "shop"
            storages = ["local"]
            health_check = "off"
            backup = "daily at 02:00"

            [databases.ntf-retry-off]
            server = "pg"
            database = "shop"
            storages = ["local"]
            health_check = "off"
            backup = "daily at 02:00"
            notify = {{ on_success = false }}

            # The same server with a password that was rotated since (the config's is old).
            [servers.pg-rotated]
            host = "{self.cluster.host}"
            port = {self.cluster.port}
            user = "{self.cluster.superuser}"
            password_env = "NTF_OLD_PG_PASSWORD"

            [clusters.ntf-rotated]
            server = "pg-rotated"
            storages = ["local"]
            full = "weekly"
            incremental = ""
            wal = false
            health_check = "off"
            notify = {{ missed_full = "off" }}
        """)
        for db_id in disabled:
            text = text.replace(f"[databases.{db_id}]\n", f"[databases.{db_id}]\nenabled = false\n")
        for db_id in dropped:
            text = re.sub(rf"\[databases\.{db_id}\]\n(.+\n)*", "", text)
        self.config.write_text(text)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """This module's own server, on PostgreSQL: notifications must arrive within seconds,
    and a loaded SQLite-backed server delays or drops the events they react to. Its
    PREFECT_UI_URL is the UI's public address, as README says to set it."""
    with postgres_backed_prefect_server(tmp_path_factory.mktemp("notify-prefect-home"),
                                        {"PREFECT_UI_URL": UI_URL}) as server:
        yield server


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("notify")
    password = f"canary-pw-{secrets.token_hex(6)}"
    cluster = EphemeralCluster(find_toolset(MAJOR), password=password,
                               settings={"fsync": "off"}).start()
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE DATABASE shop")
        with cluster.connect("shop") as conn:
            conn.execute("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 500) g")
        key_file = root / "master.key"
        write_key_file(key_file, MasterKey.generate())
        store = root / "store"
        store.mkdir()
        (root / "tidy").mkdir()
        with running_receivers() as receivers:
            yield Site(cluster=cluster, store=store, key_file=key_file,
                       config=root / "pgbackflow.toml",
                       env={"NTF_PG_PASSWORD": password,
                            "NTF_OLD_PG_PASSWORD": f"old-{secrets.token_hex(6)}"},
                       worker_dir=root / "worker", receivers=receivers, tidy=root / "tidy")
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def deployed(prefect_server: PrefectServer, site: Site) -> Iterator[dict[str, Any]]:
    """Blocks made as README shows, the config deployed, a worker serving the pool."""
    with prefect_server.settings():
        save_blocks(site.receivers, "ntf-hook", "ntf-mail")
    site.write_config()
    first = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
    assert "+ automation pgbackflow notify logical failed: ntf-shop" in first.stdout
    for job in ("logical", "verification"):
        assert f"+ automation pgbackflow missed {job}: ntf-idle" in first.stdout, first.stdout
    assert "ntf-quiet" not in "\n".join(
        line for line in first.stdout.splitlines() if "automation" in line), first.stdout
    again = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
    assert "0 to create, 0 to update, 0 to pause" in again.stdout, again.stdout
    assert not [line for line in again.stdout.splitlines() if line.startswith(("+", "~", "-"))]
    with prefect_server.http() as http:
        deployments = {d["name"]: d for d in http.post("deployments/filter", json={
            "deployments": {"tags": {"all_": ["pgbackflow-config"]}}}).json()
            if d["name"].startswith(("logical-ntf-", "verify-ntf-", "full-ntf-",
                                     "maintenance-ntf-", "health-ntf-"))}
        automations = http.post("automations/filter", json={}).json()
    # The webhook's token and the password live in blocks only.
    dumped = json.dumps([deployments, automations, first.stdout, first.stderr])
    assert site.receivers.token not in dumped and site.env["NTF_PG_PASSWORD"] not in dumped
    prefect_server.start_worker(POOL, site.worker_dir, name="ntf-worker")
    yield deployments
    prefect_server.stop_workers()


def _start(server: PrefectServer, deployment: dict[str, Any]) -> str:
    with server.http() as http:
        response = http.post(f"deployments/{deployment['id']}/create_flow_run", json={})
        assert response.status_code == 201, response.text
        run_id: str = response.json()["id"]
        return run_id


def _wait_end(server: PrefectServer, run_id: str, timeout: float = 180) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        with server.http() as http:
            run: dict[str, Any] = http.get(f"flow_runs/{run_id}").json()
        return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED",
                                               "CANCELLED") else None

    run: dict[str, Any] = server.wait_for(f"run {run_id} to end", ended, timeout, 0.5)
    return run


def _ended_at(run: dict[str, Any]) -> float:
    return datetime.fromisoformat(run["end_time"]).timestamp()


def _wait_messages(server: PrefectServer, what: str, check: Callable[[], list[Message]],
                   timeout: float) -> list[Message]:
    found: list[Message] = server.wait_for(what, check, timeout, 0.2)
    return found


def _delivery_timeline(server: PrefectServer, run: dict[str, Any], message: Message) -> str:
    """Where the time between the run's end and the message went: the run's final event
    (Prefect's, or pgbackflow's success event), its automation's actions triggered and
    executed (Prefect's events), the arrival; seconds after the run's end."""
    ended = _ended_at(run)
    fields = message.fields()
    db_id = fields.get("database") or fields["storage"]
    since = datetime.fromtimestamp(ended - 1).astimezone().isoformat()

    def stored() -> list[dict[str, Any]] | None:
        """The events, once the run's end is among them (the server stores events in
        batches, seconds after they happened)."""
        with server.http() as http:
            page = http.post("events/filter", json={"filter": {
                "occurred": {"since": since},
                "event": {"prefix": ["prefect.flow-run.", "pgbackflow.run.",
                                     "prefect.automation.action."]},
                "order": "ASC"}, "limit": 50})
        assert page.status_code == 200, page.text
        events: list[dict[str, Any]] = page.json()["events"]
        final = f"prefect.flow-run.{run['state']['name']}"
        return events if any(e["event"] == final and run["id"] in e["resource"][
            "prefect.resource.id"] for e in events) else None

    events: list[dict[str, Any]] = server.wait_for(f"the end of run {run['id']} among the "
                                                   "stored events", stored, 30, 0.5)
    steps = []
    for event in events:
        resources = [event["resource"], *event.get("related", [])]
        ours = any(run["id"] in r["prefect.resource.id"] for r in resources) or (
            event["event"].startswith("prefect.automation.")
            and event["resource"].get("prefect.resource.name", "").endswith(f": {db_id}"))
        if ours and event["event"] not in ("prefect.flow-run.Running",
                                           "prefect.flow-run.Pending"):
            at = datetime.fromisoformat(event["occurred"]).timestamp()
            step = f"{at - ended:+.2f} s {event['event']}"
            if event["event"].startswith("pgbackflow."):  # sent by the flow's process
                received = datetime.fromisoformat(event["received"]).timestamp()
                step += f" (received {received - ended:+.2f} s)"
            steps.append(step)
    steps.append(f"{message.at - ended:+.2f} s arrived over {message.via}")
    return "; ".join(steps)


def test_failure_reaches_webhook_and_smtp_within_5_s(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    run = _wait_end(prefect_server, _start(prefect_server, deployed["logical-ntf-broken"]))
    assert run["state"]["type"] == "FAILED", run["state"]
    ended = _ended_at(run)
    for via in ("webhook", "smtp"):
        (message,) = _wait_messages(
            prefect_server, f"the failure of ntf-broken over {via}",
            lambda via=via: site.inbox.about("logical backup of ntf-broken", via), 30)
        timeline = _delivery_timeline(prefect_server, run, message)
        print(f"\nfailure over {via}: {timeline}")
        assert message.at - ended <= DELIVERY_S, timeline
        assert message.subject == "pgbackflow: logical backup of ntf-broken failed"
        lines = message.fields()
        assert lines["database"] == "ntf-broken"
        assert lines["job"] == "logical backup"
        assert lines["outcome"] == "Failed"
        assert re.fullmatch(r"\d+(\.\d+)? s", lines["duration"]), lines["duration"]
        assert "no_such_database" in lines["error"] and "\n" not in lines["error"]
        assert lines["run"] == f"{run['name']} {UI_URL}/runs/flow-run/{run['id']}"
    assert not site.inbox.about("ntf-broken succeeded")


def test_success_says_backup_id_and_size(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    run = _wait_end(prefect_server, _start(prefect_server, deployed["logical-ntf-shop"]))
    assert run["state"]["type"] == "COMPLETED", run["state"]
    ended = _ended_at(run)
    listed = json.loads(prefect_server.run_cli("list", "--from", str(site.store), "--json",
                                               "--db-id", "ntf-shop").stdout)
    backup_id = listed[0]["backup_id"]
    for via in ("webhook", "smtp"):
        messages = _wait_messages(
            prefect_server, f"the success of ntf-shop over {via}",
            lambda via=via: site.inbox.about(backup_id, via), 30)
        (message,) = messages
        timeline = _delivery_timeline(prefect_server, run, message)
        print(f"\nsuccess over {via}: {timeline}")
        assert message.at - ended <= DELIVERY_S, timeline
        assert message.subject == "pgbackflow: logical backup of ntf-shop succeeded"
        lines = message.fields()
        assert lines["outcome"] == "succeeded" and lines["backup id"] == backup_id
        assert re.fullmatch(r"\d+(\.\d)? (B|kB|MB)", lines["size"]), lines["size"]
        assert re.fullmatch(r"\d+\.\d s", lines["duration"]), lines["duration"]
        assert lines["run"] == f"{run['name']} {UI_URL}/runs/flow-run/{run['id']}"
    assert not site.inbox.about("ntf-shop failed")


def _retry_like_the_ui(server: PrefectServer, run_id: str) -> None:
    """What the UI's Retry button sends for a failed run: the same run, scheduled again."""
    with server.http() as http:
        response = http.post(f"flow_runs/{run_id}/set_state", json={
            "state": {"type": "SCHEDULED", "name": "AwaitingRetry",
                      "message": "Retry from the UI"}})
        assert response.status_code in (200, 201), response.text
        assert response.json()["status"] == "ACCEPT", response.json()


def _success_event_received(server: PrefectServer, run_id: str) -> float:
    """When the server received the run's success event (what a success automation reacts
    to), waiting for it."""
    def received() -> float | None:
        with server.http() as http:
            page = http.post("events/filter", json={"filter": {
                "event": {"name": ["pgbackflow.run.succeeded"]},
                "resource": {"id": [f"pgbackflow.run.{run_id}"]}}, "limit": 5})
        assert page.status_code == 200, page.text
        events = page.json()["events"]
        assert len(events) <= 1, events
        return datetime.fromisoformat(events[0]["received"]).timestamp() if events else None

    at: float = server.wait_for(f"the success event of run {run_id}", received, 30, 0.5)
    return at


def test_retried_run_notifies_success_only_if_toggled(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    """A backup fails while its server is down; once it is back, the operator retries the
    same run from the UI. Both databases notify the failure; the retried run's success is
    notified once where successes are toggled on (ntf-retry-on), not at all where they are
    off (ntf-retry-off), and the retry sends no second failure."""
    dbs = ("ntf-retry-on", "ntf-retry-off")
    site.cluster.halt()
    try:
        runs = {db: _start(prefect_server, deployed[f"logical-{db}"]) for db in dbs}
        for db, run_id in runs.items():
            failed = _wait_end(prefect_server, run_id)
            assert failed["state"]["type"] == "FAILED", (db, failed["state"])
        for db in dbs:
            for via in ("webhook", "smtp"):
                (message,) = _wait_messages(
                    prefect_server, f"the failure of {db} over {via}",
                    lambda db=db, via=via: site.inbox.about(f"logical backup of {db} failed",
                                                            via), 30)
                assert str(site.cluster.port) in message.fields()["error"], message.body
    finally:
        site.cluster.resume()
    for run_id in runs.values():
        _retry_like_the_ui(prefect_server, run_id)
    ended = {}
    for db, run_id in runs.items():
        run = _wait_end(prefect_server, run_id)
        assert run["state"]["type"] == "COMPLETED", (db, run["state"])
        ended[db] = _ended_at(run)
    listed = json.loads(prefect_server.run_cli("list", "--from", str(site.store), "--json",
                                               "--db-id", "ntf-retry-on").stdout)
    (backup,) = listed  # the retried run made the database's one backup
    for via in ("webhook", "smtp"):
        (message,) = _wait_messages(
            prefect_server, f"the success of the retried ntf-retry-on run over {via}",
            lambda via=via: site.inbox.about("logical backup of ntf-retry-on succeeded", via),
            30)
        print(f"\nretried run's success over {via}: "
              f"{message.at - ended['ntf-retry-on']:+.2f} s after its end")
        assert message.at - ended["ntf-retry-on"] <= DELIVERY_S
        assert message.fields()["backup id"] == backup["backup_id"]
        assert message.fields()["run"].endswith(f"/runs/flow-run/{runs['ntf-retry-on']}")
    # Nothing more may come: every notification is due within DELIVERY_S of its trigger
    # (the retried success above met it on this server), so twice that after the server
    # got the last success event, and after the last run ended, is ample.
    quiet_from = max(*ended.values(), *(_success_event_received(prefect_server, r)
                                        for r in runs.values()))
    time.sleep(max(0.0, quiet_from + 2 * DELIVERY_S - time.time()))
    for via in ("webhook", "smtp"):
        assert len(site.inbox.about("logical backup of ntf-retry-on succeeded", via)) == 1
        assert not site.inbox.about("ntf-retry-off succeeded", via)
        for db in dbs:
            assert len(site.inbox.about(f"logical backup of {db} failed", via)) == 1, db


def test_same_run_failing_again_after_a_retry_notifies_again(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    """A failed run retried at once, its cause not fixed (ntf-broken's database does not
    exist): the same run's second failure fires the automation again, and each message
    tells its failure even when rendered after the run was scheduled again (Prefect
    renders ``flow_run.state`` from the triggering event's state labels)."""
    before = len(site.inbox.about("logical backup of ntf-broken failed", "webhook"))
    run_id = _start(prefect_server, deployed["logical-ntf-broken"])

    def failed() -> bool:
        with prefect_server.http() as http:
            state = http.get(f"flow_runs/{run_id}").json()["state"]
        return bool(state["type"] == "FAILED")

    prefect_server.wait_for(f"run {run_id} to fail", failed, 180, 0.1)
    _retry_like_the_ui(prefect_server, run_id)
    run = _wait_end(prefect_server, run_id)
    assert run["state"]["type"] == "FAILED" and run["run_count"] == 2, run
    for via in ("webhook", "smtp"):
        messages = _wait_messages(
            prefect_server, f"both failures of run {run_id} over {via}",
            lambda via=via: [m for m in site.inbox.about(run_id, via)
                             if "logical backup of ntf-broken" in m.subject]
            if len(site.inbox.about(run_id, via)) >= 2 else [], 30)
        assert len(messages) == 2, [m.body for m in messages]
        for message in messages:
            assert message.subject == "pgbackflow: logical backup of ntf-broken failed", (
                message.subject)
            lines = message.fields()
            assert lines["outcome"] == "Failed", message.body
            assert "no_such_database" in lines["error"], message.body
    assert len(site.inbox.about("logical backup of ntf-broken failed", "webhook")) == before + 2


def test_failed_full_backup_reaches_webhook(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    """A physical job fails (the config still has the cluster's old password): the full
    backup's failure arrives with its facts, in time."""
    run = _wait_end(prefect_server, _start(prefect_server, deployed["full-ntf-rotated"]))
    assert run["state"]["type"] == "FAILED", run["state"]
    (message,) = _wait_messages(
        prefect_server, "the failure of the full backup of ntf-rotated over the webhook",
        lambda: site.inbox.about("full backup of ntf-rotated", "webhook"), 30)
    timeline = _delivery_timeline(prefect_server, run, message)
    print(f"\nfull backup failure over the webhook: {timeline}")
    assert message.at - _ended_at(run) <= DELIVERY_S, timeline
    assert message.subject == "pgbackflow: full backup of ntf-rotated failed"
    lines = message.fields()
    assert (lines["database"], lines["job"], lines["outcome"]) == (
        "ntf-rotated", "full backup", "Failed")
    assert "password" in lines["error"] and "\n" not in lines["error"], lines["error"]
    assert site.env["NTF_OLD_PG_PASSWORD"] not in message.body
    assert lines["run"] == f"{run['name']} {UI_URL}/runs/flow-run/{run['id']}"


@pytest.mark.parametrize(("block", "message"), [
    ("custom-webhook/ntf-nope",
     "notify.block: notification block custom-webhook/ntf-nope does not exist: create it "
     "first (README, Notifications: CLI or UI)"),
    ("pgbackflow-postgres-database/pg",
     "notify.block: block pgbackflow-postgres-database/pg cannot send notifications: use a "
     "notification block (Slack, Microsoft Teams, Discord, custom webhook, SMTP e-mail, ...)"),
])
def test_unusable_notification_block_is_one_line(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any], tmp_path: Path,
    block: str, message: str,
) -> None:
    """A config naming a notification block that is missing, or is no notification block
    (the module's database block): the deploy stops with one line before changing anything."""
    config = tmp_path / "pgbackflow.toml"
    config.write_text(site.config.read_text().replace(
        '"custom-webhook/ntf-hook", "pgbackflow-smtp-email/ntf-mail"', f'"{block}"'))
    assert block in config.read_text()
    result = prefect_server.run_cli("deploy", "--config", str(config), check=False,
                                    env=site.env)
    assert result.returncode == 1, result
    assert result.stderr.strip() == f"error: {message}"


@pytest.fixture(scope="module")
def missed_alerts(prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]) -> None:
    """20 s missed windows for a logical backup, a verification, a full backup and a
    health check, for the tests that wait for their alerts (the next deploy of the module's
    config, without them, pauses the full backup's and the health check's and sets the
    others back)."""
    site.write_config(missed_alerts=True)
    result = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
    for change in ("~ automation pgbackflow missed logical: ntf-idle",
                   "~ automation pgbackflow missed verification: ntf-idle",
                   "+ automation pgbackflow missed full: ntf-phys",
                   "~ automation pgbackflow missed health: ntf-unchecked"):
        assert change in result.stdout, result.stdout


@pytest.mark.usefixtures("missed_alerts")
@pytest.mark.parametrize(("deployment", "subject", "window"), [
    ("logical-ntf-idle", "no successful logical backup of ntf-idle", "20.0 s"),
    ("verify-ntf-idle", "no successful restore verification of ntf-idle", "20.0 s"),
    ("full-ntf-phys", "no successful full backup of ntf-phys", "20.0 s"),
    # Health checks that do not complete (paused here; a missing block or no worker alike)
    # announce neither down nor up: their absence is noticed.
    ("health-ntf-unchecked", "no successful health check of ntf-unchecked", "20.0 s"),
])
def test_paused_schedule_alerts_missed_job(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any], deployment: str,
    subject: str, window: str,
) -> None:
    """A job that never runs (its schedule paused, as an operator might forget it): the
    proactive automation notices the absence of successes within its 20 s window. The
    windows started together (the fixture's deploy), so these share one wait."""
    with prefect_server.http() as http:
        response = http.post(f"deployments/{deployed[deployment]['id']}/pause_deployment")
        assert response.status_code < 300, response.text
    flow = {"logical": "logical-backup", "verify": "restore-verification",
            "full": "full-backup", "health": "health-check"}[deployment.split("-")[0]]
    for via in ("webhook", "smtp"):
        messages = _wait_messages(
            prefect_server, f"the alert {subject!r} over {via}",
            lambda via=via: site.inbox.about(subject, via), 60)
        assert f"deployment: {flow}/{deployment}" in messages[0].body
        assert messages[0].subject == f"pgbackflow: {subject} within {window}"
    # Databases that back up as scheduled (or whose alert is off) get none.
    assert not site.inbox.about("no successful logical backup of ntf-shop")
    assert not site.inbox.about("no successful restore verification of ntf-shop")
    assert not site.inbox.about("ntf-quiet")


def test_toggled_off_outcomes_send_nothing(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    # ntf-quiet has failures off: its failed run notifies nobody.
    run = _wait_end(prefect_server, _start(prefect_server, deployed["logical-ntf-quiet"]))
    assert run["state"]["type"] == "FAILED"
    # Successes of ntf-shop switched off: the deploy pauses that automation.
    site.write_config(shop_success=False)
    result = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
    assert "- automation pgbackflow notify logical succeeded: ntf-shop" in result.stdout
    before = len(site.inbox.about("ntf-shop succeeded"))
    shop = _wait_end(prefect_server, _start(prefect_server, deployed["logical-ntf-shop"]))
    assert shop["state"]["type"] == "COMPLETED"
    time.sleep(DELIVERY_S + 3)
    assert not site.inbox.about("ntf-quiet")
    assert len(site.inbox.about("ntf-shop succeeded")) == before
    again = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
    assert "0 to create, 0 to update, 0 to pause" in again.stdout, again.stdout


def test_storage_maintenance_success_says_what_it_freed(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    """Retention runs per storage (one maintenance run expires the backups of every database
    stored there), so its toggles are [notify]'s and its message names the storage: its
    success event (a dict result, the storage's tag) reaches both receivers. Its delay is
    printed, not held to DELIVERY_S: the path from the event to the receivers is the one the
    logical backups' tests time, and one more timed delivery would only add a load-bound
    failure."""
    run = _wait_end(prefect_server, _start(prefect_server, deployed["maintenance-ntf-tidy"]))
    assert run["state"]["type"] == "COMPLETED", run["state"]
    for via in ("webhook", "smtp"):
        (message,) = _wait_messages(
            prefect_server, f"the success of the maintenance of ntf-tidy over {via}",
            lambda via=via: site.inbox.about("maintenance of ntf-tidy", via), 30)
        timeline = _delivery_timeline(prefect_server, run, message)
        print(f"\nmaintenance success over {via}: {timeline}")
        assert message.subject == "pgbackflow: retention and maintenance of ntf-tidy succeeded"
        lines = message.fields()
        assert (lines["storage"], lines["job"], lines["outcome"]) == (
            "ntf-tidy", "retention and maintenance", "succeeded")
        assert (lines["size"], lines["summary"]) == ("0 B", "0 backups expired, 0 B freed")
        assert re.fullmatch(r"\d+\.\d s", lines["duration"]), lines["duration"]
        assert lines["run"] == f"{run['name']} {UI_URL}/runs/flow-run/{run['id']}"


def test_maintenance_facts_count_the_expired_backups() -> None:
    """The success message's figures of a maintenance run that deleted backups, and of a
    dry run (which deletes nothing)."""
    from pgbackflow.flows.outcome import outcome_facts

    assert outcome_facts({"dry_run": False, "planned_bytes_freed": 3_000_000,
                          "deleted_backups": ["db1/b1", "db1/b2"], "bytes_freed": 2_500_000}) == {
        "backup_id": "-", "size_bytes": 2_500_000,
        "summary": "2 backups expired, 2.5 MB freed"}
    assert outcome_facts({"dry_run": True, "planned_bytes_freed": 3_000_000}) == {
        "backup_id": "-", "size_bytes": 3_000_000, "summary": "dry run: 3.0 MB would be freed"}


def _automations_of(server: PrefectServer, db_id: str) -> dict[str, bool]:
    """``{name: enabled}`` of the automations that name ``db_id``."""
    with server.http() as http:
        automations = http.post("automations/filter", json={}).json()
    return {a["name"]: a["enabled"] for a in automations if a["name"].endswith(f": {db_id}")}


def test_disabled_or_removed_database_or_storage_pauses_its_notifications(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    """``enabled = false`` pauses a database's notification and missed-backup automations
    with its deployment, and so does leaving it out of the config (a storage left out: its
    maintenance deployment and notifications); back in the config, they run again (re-made
    as a first deploy makes them, which the ``deployed`` fixture shows a second deploy
    leaves unchanged)."""
    names = ("pgbackflow notify logical failed: {}", "pgbackflow notify logical succeeded: {}",
             "pgbackflow missed logical: {}")
    tidy = ("pgbackflow notify maintenance failed: ntf-tidy",
            "pgbackflow notify maintenance succeeded: ntf-tidy")
    for db_id in ("ntf-retry-on", "ntf-retry-off"):
        assert set(_automations_of(prefect_server, db_id).values()) == {True}, db_id
    assert _automations_of(prefect_server, "ntf-tidy") == dict.fromkeys(tidy, True)
    site.write_config(shop_success=False, disabled=("ntf-retry-on",), dropped=("ntf-retry-off",),
                      tidy=False)
    try:
        result = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
        # A storage left out: its maintenance deployment and its notifications are paused.
        for name in tidy:
            assert f"paused automation {name}" in result.stdout, result.stdout
        assert _automations_of(prefect_server, "ntf-tidy") == dict.fromkeys(tidy, False)
        with prefect_server.http() as http:
            maintenance = http.get(f"deployments/{deployed['maintenance-ntf-tidy']['id']}")
        assert maintenance.json()["paused"] is True
        for name in names:
            assert f"~ automation {name.format('ntf-retry-on')}" in result.stdout, result.stdout
        for name in names[::2]:  # its successes are toggled off
            assert f"paused automation {name.format('ntf-retry-off')}" in result.stdout, (
                result.stdout)
        for db_id in ("ntf-retry-on", "ntf-retry-off"):
            assert set(_automations_of(prefect_server, db_id).values()) == {False}, db_id
            with prefect_server.http() as http:
                deployment = http.get(f"deployments/{deployed[f'logical-{db_id}']['id']}")
            assert deployment.json()["paused"] is True, db_id
    finally:
        site.write_config(shop_success=False)
        back = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
    for name in names:
        assert f"~ automation {name.format('ntf-retry-on')}" in back.stdout, back.stdout
    for name in names[::2]:
        assert f"~ automation {name.format('ntf-retry-off')}" in back.stdout, back.stdout
    assert _automations_of(prefect_server, "ntf-retry-on") == dict.fromkeys(
        (name.format("ntf-retry-on") for name in names), True)
    assert _automations_of(prefect_server, "ntf-retry-off") == {
        names[0].format("ntf-retry-off"): True, names[2].format("ntf-retry-off"): True}
    assert _automations_of(prefect_server, "ntf-tidy") == dict.fromkeys(tidy, True)


def test_health_check_switched_off_pauses_only_its_own_automations(
    prefect_server: PrefectServer, site: Site, deployed: dict[str, Any]
) -> None:
    """``health_check = "off"`` on a database still in the config: its health check is
    paused and so is its missed-health alert; its backup's notifications stay on. On again:
    both back."""
    both = {"pgbackflow notify logical failed: ntf-unchecked": True,
            "pgbackflow missed health: ntf-unchecked": True}
    assert _automations_of(prefect_server, "ntf-unchecked") == both
    site.write_config(unchecked_health="off")
    try:
        result = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
        assert "- deployment health-check/health-ntf-unchecked" in result.stdout, result.stdout
        assert "paused: switched off in the config" in result.stdout
        assert _automations_of(prefect_server, "ntf-unchecked") == {
            **both, "pgbackflow missed health: ntf-unchecked": False}
        with prefect_server.http() as http:
            check = http.get(f"deployments/{deployed['health-ntf-unchecked']['id']}").json()
        assert check["paused"] is True
    finally:
        site.write_config()
        back = prefect_server.run_cli("deploy", "--config", str(site.config), env=site.env)
    assert "~ automation pgbackflow missed health: ntf-unchecked" in back.stdout, back.stdout
    assert _automations_of(prefect_server, "ntf-unchecked") == both


def test_every_job_kind_has_its_toggles_on_the_runs_of_its_deployment(
    prefect_server: PrefectServer, deployed: dict[str, Any], site: Site, tmp_path: Path
) -> None:
    """The automations a config makes for every job kind (logical, verification, full,
    incremental, WAL streaming, retention, health), read from the deploy plan: a failure
    and a success automation each (WAL streaming: its failure; its good news is a WAL
    recovery; health: down and up), whose tags are the tags of the deployment that runs
    that job, so each selects that job's runs; a missed alert for each scheduled backup and
    verification; a list toggle picks jobs; ``enabled = false`` makes them all paused.
    Delivery itself is proven end to end for logical, full, verification
    (test_verification_triggers), maintenance, health and WAL problems (test_health): the
    same code for every job."""
    from pgbackflow.deployments.config import build_plan, load_config
    from pgbackflow.deployments.physical import wal_deployment_name

    config = tmp_path / "pgbackflow.toml"
    config.write_text(config_head(POOL, site.key_file, site.store, site.cluster,
                                  "NTF_PG_PASSWORD") + textwrap.dedent(f"""
        [storages.kinds]
        url = "{tmp_path / 'kinds'}"
        [notify]
        block = "custom-webhook/ntf-hook"
        on_failure = true
        on_success = ["logical", "verification", "full", "incremental", "maintenance"]
        [databases.kinds-db]
        server = "pg"
        storages = ["local"]
        backup = "daily at 02:00"
        verify = "weekly"
        [clusters.kinds-cl]
        server = "pg"
        storages = ["local"]
        full = "weekly"
        incremental = "hourly at :30"
        [clusters.kinds-off]
        server = "pg"
        storages = ["local"]
        wal = false
        enabled = false
        [clusters.kinds-off.notify]
        on_failure = ["full", "incremental"]
        on_success = false
        missed_incremental = "off"
    """))
    with prefect_server.settings():
        plan = build_plan(load_config(config))
    automations = {a.name: a for a in plan.automations if a.name.startswith(PREFIXES)}
    deployments = {f"{d.flow.name}/{d.name}": d for d in plan.prefect.deployments}

    def tags(automation: Any) -> set[str]:
        return {r.root["prefect.resource.id"].removeprefix("prefect.tag.")
                for r in automation.trigger.match_related}

    runs_of = {("logical", "kinds-db"): "logical-backup/logical-kinds-db",
               ("verification", "kinds-db"): "restore-verification/verify-kinds-db",
               ("full", "kinds-cl"): "full-backup/full-kinds-cl",
               ("incremental", "kinds-cl"): "incremental-backup/incremental-kinds-cl",
               ("wal", "kinds-cl"): f"wal-stream/{wal_deployment_name('kinds-cl')}",
               ("maintenance", "kinds"): "maintenance/maintenance-kinds"}
    for (job, owner), deployment in runs_of.items():
        outcomes = ["failed"] if job == "wal" else ["failed", "succeeded"]
        for outcome in outcomes:
            automation = automations.pop(f"pgbackflow notify {job} {outcome}: {owner}")
            assert automation.enabled and tags(automation) <= set(
                deployments[deployment].tags), (job, outcome)
        if job not in ("wal", "maintenance"):
            missed = automations.pop(f"pgbackflow missed {job}: {owner}")
            assert missed.enabled and tags(missed) <= set(deployments[deployment].tags), job
            assert f"deployment: {deployment}" in missed.actions[0].body, job
    # Health and WAL problems, and their ends (those go wherever the problems go).
    for name in ("health down: kinds-db", "health up: kinds-db", "health down: kinds-cl",
                 "health up: kinds-cl", "health wal problem: kinds-cl",
                 "health wal recovered: kinds-cl"):
        assert automations.pop(f"pgbackflow {name}").enabled, name
    for owner in ("kinds-db", "kinds-cl"):  # their health checks: every minute by default
        check = deployments[f"health-check/health-{owner}"]
        assert check.schedule is not None and check.schedule.interval_s == 60, check.schedule
        assert {f"db:{owner}", "job:health"} <= set(check.tags) and not check.paused
        # Checks that stop completing: missed after 5 intervals, at least 5 minutes.
        missed = automations.pop(f"pgbackflow missed health: {owner}")
        assert missed.enabled and tags(missed) <= set(check.tags), owner
        assert missed.trigger.within == timedelta(minutes=5), missed.trigger
        assert f"deployment: health-check/health-{owner}" in missed.actions[0].body
    # The disabled cluster: what its toggles pick, every one paused.
    off = {name: a for name, a in automations.items() if name.endswith(": kinds-off")}
    assert {name: a.enabled for name, a in off.items()} == {
        "pgbackflow notify full failed: kinds-off": False,
        "pgbackflow notify incremental failed: kinds-off": False,
        "pgbackflow missed full: kinds-off": False,
        "pgbackflow missed health: kinds-off": False,
    }
    assert all(d.paused for name, d in deployments.items() if name.endswith("-kinds-off"))
    assert not [name for name in automations if "kinds" in name and name not in off]


@pytest.mark.parametrize(("entry", "message"), [
    ('notify = { on_failure = ["logicl"] }',
     "databases.shop.notify.on_failure: unknown job 'logicl': use true, false or a list of "
     "logical, full, incremental, wal, verification, maintenance, health"),
    ('notify = { block = "slack" }',
     "databases.shop.notify.block: 'slack' is not a block reference: use "
     "<block-type-slug>/<block-name>, e.g. slack-webhook/ops-alerts"),
    ('notify = { missed_backup = "soon" }',
     "databases.shop.notify.missed_backup: 'soon' is not a duration: use e.g. 90m, 36h, 3d "
     "or 2w, or \"off\""),
    ('notify = { missed_full = "1d" }',
     "databases.shop.notify.missed_full: unknown key; allowed: block, missed_backup, "
     "missed_health_check, missed_verification, on_failure, on_success"),
    ('notify = { missed_health_check = "5s" }',
     "databases.shop.notify.missed_health_check: '5s' is shorter than 10 s"),
    ('health_check = "5s"', "databases.shop.health_check: '5s' is shorter than 10 s"),
])
def test_notify_config_mistakes_are_one_line(tmp_path: Path, entry: str, message: str) -> None:
    from pgbackflow.deployments.config import load_config
    from pgbackflow.tasks.errors import ConfigError

    path = tmp_path / "pgbackflow.toml"
    path.write_text(CONFIG + entry + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: {message}"


def test_missed_window_follows_the_schedule() -> None:
    from datetime import timedelta

    from pgbackflow.deployments.notifications import missed_window

    assert missed_window("0 2 * * *", None) == timedelta(hours=36)
    assert missed_window("30 * * * *", None) == timedelta(hours=2)
    assert missed_window("0 1 * * 0", None) == timedelta(days=10, hours=12)
    assert missed_window("0 1 * * 1-5", None) == timedelta(days=4, hours=12)  # weekend gap
    assert missed_window("0 1 * * *", "90m") == timedelta(minutes=90)
    assert missed_window("0 1 * * *", "off") is None


def test_missed_health_window_follows_the_interval() -> None:
    from datetime import timedelta

    from pgbackflow.deployments.notifications import missed_health_window

    assert missed_health_window(timedelta(minutes=1), None) == timedelta(minutes=5)
    assert missed_health_window(timedelta(seconds=10), None) == timedelta(minutes=5)
    assert missed_health_window(timedelta(minutes=10), None) == timedelta(minutes=50)
    assert missed_health_window(timedelta(minutes=1), "20s") == timedelta(seconds=20)
    assert missed_health_window(timedelta(minutes=1), "off") is None


def test_a_health_check_result_is_a_success_event_summary() -> None:
    """The health check's on_completion hook sends the success event the missed-health
    automation waits for: its result (the state it remembers) gives a summary, no size."""
    from pgbackflow.flows.health import health_check
    from pgbackflow.flows.outcome import announce_success, outcome_facts
    from pgbackflow.tasks.health import HealthState

    assert announce_success in health_check.on_completion_hooks
    assert outcome_facts(HealthState("shop", "down").to_json()) == {
        "backup_id": "-", "size_bytes": None, "summary": "shop is down"}


def test_notify_command_points_to_the_deploy_config() -> None:
    """``pgbackflow notify`` (verification-only automations beside the config's) is gone:
    an old script gets one line saying where notifications are set now."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "from pgbackflow.cli import main; main()", "notify", "--db-id",
         "shop", "--webhook-block", "ops-hook", "--on-success"],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: pgbackflow notify is gone: set notifications in the deploy config's [notify] "
        "section (block, on_failure, on_success; README, Notifications) and run pgbackflow "
        "deploy")
    assert done.stdout == ""


#: Made-up secrets in the shapes the README's recipes need (the Teams block parses its URL).
_RECIPE_ENV = {
    "SLACK_URL": "https://hooks.slack.com/services/T000/B000/canary",
    "TEAMS_URL": "https://prod-00.westeurope.logic.azure.com:443/workflows/0a1b2c3d/triggers/"
                 "manual/paths/invoke?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun"
                 "&sv=1.0&sig=canary",
    "DISCORD_WEBHOOK_ID": "1234567890", "DISCORD_TOKEN": "canary", "OPSGENIE_KEY": "canary",
    "PAGERDUTY_KEY": "canary", "PAGERDUTY_ROUTING_KEY": "canary", "HOOK_TOKEN": "canary",
    "SMTP_PASSWORD": "canary",
}


def test_readme_block_recipes_make_blocks_a_config_can_name(
    prefect_server: PrefectServer,
) -> None:
    """README's CLI recipes for the common notification blocks, run as printed: each makes
    the block its comment names, and each is one deploy accepts as a notification target."""
    import os
    import subprocess
    import sys

    from pgbackflow.deployments.notifications import resolve_targets

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("**Creating the blocks.**"):readme.index("From the UI:")]
    script = section[section.index("```bash\n") + len("```bash\n"):section.rindex("```")]
    refs = re.findall(r"# ([a-z-]+/[a-z-]+)$", script, re.MULTILINE)
    assert sorted(slug.partition("/")[0] for slug in refs) == [
        "custom-webhook", "discord-webhook", "ms-teams-webhook", "opsgenie-webhook",
        "pager-duty-webhook", "pgbackflow-smtp-email", "slack-webhook"]
    venv_bin = Path(sys.executable).parent  # `python` is this environment's, as activated
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**prefect_server.env, **_RECIPE_ENV,
             "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    with prefect_server.settings():
        targets = resolve_targets(refs, "notify.block")
    assert [t.ref for t in targets] == refs
