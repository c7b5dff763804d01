"""Whole collections from a Prefect server that answers in pages.

A filter request returns at most the server's ``PREFECT_SERVER_API_DEFAULT_LIMIT`` items
(200 by default). Here a real ``prefect server start`` answers 3 at a time, so a fleet of a
few databases already spans pages: what deploy pauses, the automations it pauses, and the
health states ``status`` lists and deploy forgets must all be complete.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.prefect_server import PrefectServer, running_prefect_server

PAGE = 3


@pytest.fixture(scope="module")
def paged_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    with running_prefect_server(tmp_path_factory.mktemp("paged"),
                                server_env={"PREFECT_SERVER_API_DEFAULT_LIMIT": str(PAGE)}
                                ) as server, server.settings():
        yield server


def test_the_server_really_answers_in_pages(paged_server: PrefectServer) -> None:
    """The premise of this module: a plain read returns one page only."""
    with paged_server.http() as http:
        for i in range(PAGE + 2):
            http.post("variables/", json={"name": f"premise_{i}", "value": i}).raise_for_status()
        assert len(http.post("variables/filter", json={}).json()) == PAGE


def test_status_lists_and_deploy_forgets_health_states_on_every_page(
    paged_server: PrefectServer,
) -> None:
    from pgbackflow.flows.health import forget_states, load_states, variable_name

    ids = [f"db{i}" for i in range(2 * PAGE + 1)]
    with paged_server.http() as http:
        for db_id in ids:
            http.post("variables/", json={"name": variable_name(db_id), "value": {
                "db_id": db_id, "state": "up"}}).raise_for_status()
        http.post("variables/", json={"name": "someone_elses", "value": 1}).raise_for_status()
    assert sorted(state.db_id for state in load_states()) == ids

    forgotten = forget_states(keep={"db1", "db5"})
    assert forgotten == [i for i in ids if i not in ("db1", "db5")]
    assert sorted(state.db_id for state in load_states()) == ["db1", "db5"]
    with paged_server.http() as http:
        names = {v["name"] for offset in range(0, 30, PAGE)
                 for v in http.post("variables/filter", json={"offset": offset}).json()}
    assert "someone_elses" in names  # not a health state: not touched


def test_deploy_sees_every_managed_deployment_and_automation(
    paged_server: PrefectServer,
) -> None:
    from prefect.automations import Automation, EventTrigger, Posture
    from prefect.client.orchestration import get_client
    from prefect.events.actions import DoNothing

    from pgbackflow.deployments.apply import CONFIG_TAG, PrefectPlan, plan_changes
    from pgbackflow.deployments.automations import disable_automations_of

    count = 2 * PAGE + 1
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("logical-backup")
        for i in range(count):
            client.create_deployment(flow_id, f"logical-old{i}", tags=[CONFIG_TAG, f"db:old{i}"])
    # The config no longer names any of them: every one is to be paused, not the first page.
    changes = plan_changes(PrefectPlan(), keep_tags=set())
    assert sorted(c.name for c in changes if c.action == "-") == sorted(
        f"logical-backup/logical-old{i}" for i in range(count))

    for i in range(count):
        Automation(name=f"pgbackflow failure notify {i}: shop",
                   trigger=EventTrigger(expect={"pgbackflow.test"}, posture=Posture.Reactive,
                                        threshold=1),
                   actions=[DoNothing()]).create()
    paused = disable_automations_of("shop")
    assert len(paused) == count, paused
    with paged_server.http() as http:
        enabled = [a["name"] for offset in range(0, 30, PAGE)
                   for a in http.post("automations/filter", json={"offset": offset}).json()
                   if a["enabled"]]
    assert enabled == []


def test_retention_sees_every_verification_of_a_backup(paged_server: PrefectServer) -> None:
    """``prefer_verified`` retention reads every version of the verification summaries: each
    verification run adds one, so a database verified hourly has more than a page of them."""
    from pgbackflow.flows.common import artifact_key
    from pgbackflow.flows.maintenance import verified_backups

    backups = [f"20261201T{hour:02d}0000Z-shop" for hour in range(2 * PAGE + 1)]
    with paged_server.http() as http:
        for backup_id in backups:
            http.post("artifacts/", json={
                "key": artifact_key("verification", "shop"), "type": "markdown",
                "description": f"Successful: verification of {backup_id}",
                "data": "verified"}).raise_for_status()
        http.post("artifacts/", json={
            "key": artifact_key("verification", "shop"), "type": "markdown",
            "description": "Failed: verification of 20261202T000000Z-shop",
            "data": "failed"}).raise_for_status()
    assert verified_backups(["shop"]) == {"shop": set(backups)}
