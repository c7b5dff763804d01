"""Prefect automations pgbackflow relies on, created and updated idempotently by name.

* ``pgbackflow: crash unresponsive runs``: a run of a pgbackflow flow whose flow-run
  heartbeats stop (worker host lost, process frozen, CLI killed) is marked Crashed after
  :data:`ZOMBIE_AFTER_S`, as in Prefect's "detect zombie flows" recipe. Deployments run with
  heartbeats every :data:`HEARTBEAT_S` (their job variables set it), CLI runs against a
  server too, so a killed run never stays Running.
* ``pgbackflow: crash runs lost at start``: the heartbeat automation only watches a run once
  the server has *received* a heartbeat of it (its trigger starts ``after`` one). A run whose
  host is lost between its Running state and its first heartbeat reaching the server (the
  engine sends it ~0.2 s after Running, over a websocket it opens then) would stay Running
  for ever (a WAL streamer would hold its deployment's only slot); this one starts watching
  at the Running state and marks the run Crashed when no heartbeat follows within
  :data:`ZOMBIE_AFTER_S` (a run already ended is refused the change).
* Both watch runs of :data:`FLOW_NAMES` only (other flows keep Prefect's default heartbeat).
* ``pgbackflow wal-stream crash when silent: <db_id>``: independent of heartbeats, a streamer
  run whose ``pgbackflow.wal.alive`` events (every :data:`WAL_ALIVE_S`) stop for the silence
  window is marked Crashed too. A backstop: if the heartbeat automation's state change is
  lost (the SQLite-backed server answers "database is locked" at times, and Prefect does not
  retry a failed action), the frozen run would otherwise keep the deployment's only slot.
  On a run already ended its state change is refused (no second restart).
* ``pgbackflow wal-stream restart ...: <db_id>`` (three per cluster): the WAL streamer is one
  long-running flow run; when it ends Crashed (at once) or Failed (after a minute), or when
  no streamer sent an alive event for the silence window (none started), the deployment is
  started again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from prefect.automations import Automation, EventTrigger, Posture
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ActionTypes, ChangeFlowRunState, RunDeployment
from prefect.events.schemas.events import ResourceSpecification

from pgbackflow.deployments.paging import read_all

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.schemas.automations import Automation as ServerAutomation

#: Seconds between flow-run heartbeats of deployment runs (Prefect needs at least 30).
HEARTBEAT_S = 30
#: A deployment run without a heartbeat for this long is marked Crashed.
ZOMBIE_AFTER_S = 120
ZOMBIE_AUTOMATION = "pgbackflow: crash unresponsive runs"
#: Event a WAL streamer emits every WAL_ALIVE_S while it runs, and with every shipment.
WAL_ALIVE_EVENT = "pgbackflow.wal.alive"
WAL_ALIVE_S = 60.0
#: Without an alive event for this long, the WAL streamer is started again.
DEFAULT_WAL_SILENCE_S = 300.0

#: Job variables of every deployment: heartbeats on, so lost runs end Crashed.
HEARTBEAT_JOB_VARIABLES: dict[str, Any] = {
    "env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
}


def wal_resource_id(db_id: str) -> str:
    """The event resource of a cluster's WAL streamer."""
    return f"pgbackflow.wal-stream.{db_id}"


@dataclass(frozen=True)
class AutomationSpec:
    """What one automation should be (matched to the API by its unique name)."""

    name: str
    description: str
    trigger: EventTrigger
    actions: tuple[ActionTypes, ...]
    enabled: bool = True

    def build(self) -> Automation:
        """The Prefect automation object."""
        return Automation(
            name=self.name, description=self.description, enabled=self.enabled,
            trigger=self.trigger, actions=list(self.actions),
        )

    def fingerprint(self) -> str:
        """Comparable text of what the automation does."""
        return _fingerprint(self.build())


def _fingerprint(automation: Any) -> str:
    document = automation.model_dump(
        mode="json", include={"description", "enabled", "trigger", "actions"}
    )
    document["trigger"].pop("id", None)
    # Sets (a trigger's events and for_each) dump in each process's hash order: sort them.
    for field in ("expect", "after", "for_each"):
        if isinstance(document["trigger"].get(field), list):
            document["trigger"][field] = sorted(document["trigger"][field])
    return json.dumps(document, sort_keys=True)


#: pgbackflow's flows. The lost-run automations watch runs of these only: other flows on the
#: same server send heartbeats at Prefect's default (every 180 s, longer than ZOMBIE_AFTER_S)
#: and must not be marked Crashed. Matched by the flow the events relate (heartbeats and
#: state changes name it), which also covers CLI runs and subflows (they carry no tags yet
#: when their first events are sent). tests/test_physical_deployments.py checks the list.
FLOW_NAMES = (
    "backup-databases", "full-backup", "health-check", "incremental-backup", "logical-backup",
    "logical-restore", "maintenance", "physical-verification", "pitr-restore",
    "restore-verification", "wal-stream",
)
_OF_OUR_FLOWS = ResourceSpecification(
    {"prefect.resource.role": "flow", "prefect.resource.name": list(FLOW_NAMES)}
)

#: What ends the wait for a run's next heartbeat: a heartbeat or a final state.
_HEARTBEAT_OR_FINAL = frozenset({
    "prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed",
})


def _crash_unless_heartbeat(
    name: str, description: str, after: str, expect: set[str], message: str
) -> AutomationSpec:
    """Mark a pgbackflow run Crashed when ``expect`` does not follow ``after`` in time."""
    return AutomationSpec(
        name=name,
        description=description,
        trigger=EventTrigger(
            after={after},
            expect=expect,
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=_OF_OUR_FLOWS,
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=ZOMBIE_AFTER_S),
        ),
        actions=(ChangeFlowRunState(state=StateType.CRASHED, message=message),),
    )


def zombie_automation() -> AutomationSpec:
    """Mark pgbackflow runs whose heartbeats stopped as Crashed."""
    return _crash_unless_heartbeat(
        ZOMBIE_AUTOMATION,
        f"Marks a flow run Crashed when its heartbeats stop for {ZOMBIE_AFTER_S} s "
        "(worker host lost or process frozen), so it does not stay Running",
        after="prefect.flow-run.heartbeat", expect=set(_HEARTBEAT_OR_FINAL),
        message=f"no heartbeat for {ZOMBIE_AFTER_S} s: the worker or its host was lost",
    )


LOST_AT_START_AUTOMATION = "pgbackflow: crash runs lost at start"


def lost_at_start_automation() -> AutomationSpec:
    """Mark pgbackflow runs whose first heartbeat never arrived as Crashed."""
    # Only the heartbeat ends the wait: a run that ends before its first heartbeat is
    # refused the state change (final states are kept). Not expecting final states spares a
    # bucket write per final state event: on SQLite a write that meets "database is locked"
    # makes the server evaluate the whole event again, and reactive automations already
    # evaluated for it fire a second time.
    return _crash_unless_heartbeat(
        LOST_AT_START_AUTOMATION,
        f"Marks a pgbackflow run Crashed when no heartbeat follows its Running state within "
        f"{ZOMBIE_AFTER_S} s: its host was lost before the first heartbeat arrived",
        after="prefect.flow-run.Running", expect={"prefect.flow-run.heartbeat"},
        message=f"no heartbeat within {ZOMBIE_AFTER_S} s of Running: the worker or its host "
                "was lost",
    )


def lost_run_automations() -> list[AutomationSpec]:
    """The automations that end the runs of lost hosts Crashed (every deploy makes them)."""
    return [zombie_automation(), lost_at_start_automation()]


#: A streamer run that failed (its retries used up) is started again after this long.
WAL_RESTART_AFTER_FAILURE_S = 60.0


def wal_restart_automations(
    db_id: str, deployment_id: UUID, silence_s: float, *, enabled: bool = True
) -> list[AutomationSpec]:
    """Start the WAL streamer again when its run crashes, fails, or goes silent.

    A crash (killed process, lost host) restarts at once. A failure (say, the server was down
    longer than the run's retries) restarts after WAL_RESTART_AFTER_FAILURE_S, so a streamer
    that cannot work (wrong password) makes one Failed run every few minutes, not a storm.
    Silence (no alive event for a whole ``silence_s`` window: never started, stuck) is the
    backstop; a run started while one streams ends Cancelled at once (limit 1). A lost host
    is noticed by heartbeats (:func:`lost_run_automations`, also for the first second of a
    run), and by the silence of its alive events.
    """

    def restart(after_s: float = 0.0) -> RunDeployment:
        return RunDeployment(source="selected", deployment_id=deployment_id, parameters=None,
                             schedule_after=timedelta(seconds=after_s))

    of_deployment = ResourceSpecification(
        {"prefect.resource.id": f"prefect.deployment.{deployment_id}"}
    )

    def on_state(state: str) -> EventTrigger:
        return EventTrigger(
            expect={f"prefect.flow-run.{state}"},
            match_related=of_deployment,
            posture=Posture.Reactive,
            threshold=1,
        )

    return [
        AutomationSpec(
            name=f"pgbackflow wal-stream crash when silent: {db_id}",
            description=(f"Marks the WAL streamer run of {db_id} Crashed when it sent no "
                         f"{WAL_ALIVE_EVENT} event for {silence_s:g} s (its host was lost, or "
                         "it is stuck), so the restart on crash replaces it"),
            trigger=EventTrigger(
                # Each alive event starts a new wait for the next one (as heartbeats do for
                # the heartbeat automation); the run is the one the last alive event names.
                after={WAL_ALIVE_EVENT},
                expect={WAL_ALIVE_EVENT},
                match=ResourceSpecification({"prefect.resource.id": wal_resource_id("*")}),
                match_related=of_deployment,
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=silence_s),
            ),
            actions=(ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no {WAL_ALIVE_EVENT} event for {silence_s:g} s: the streamer or its "
                        "host was lost",
            ),),
            enabled=enabled,
        ),
        AutomationSpec(
            name=f"pgbackflow wal-stream restart on crash: {db_id}",
            description=f"Starts the WAL streamer of {db_id} again when its run ends Crashed",
            trigger=on_state("Crashed"), actions=(restart(),), enabled=enabled,
        ),
        AutomationSpec(
            name=f"pgbackflow wal-stream restart after failure: {db_id}",
            description=(f"Starts the WAL streamer of {db_id} again "
                         f"{WAL_RESTART_AFTER_FAILURE_S:g} s after its run ends Failed"),
            trigger=on_state("Failed"), actions=(restart(WAL_RESTART_AFTER_FAILURE_S),),
            enabled=enabled,
        ),
        AutomationSpec(
            name=f"pgbackflow wal-stream restart when silent: {db_id}",
            description=(f"Starts the WAL streamer of {db_id} again when it sent no "
                         f"{WAL_ALIVE_EVENT} event for {silence_s:g} s"),
            trigger=EventTrigger(
                expect={WAL_ALIVE_EVENT},
                # By the deployment its run belongs to (Prefect relates an event sent in a
                # run to the run, its flow and deployment): the event's own resource names
                # the cluster by its system identifier, ``db_id`` may be the config's name.
                match=ResourceSpecification({"prefect.resource.id": wal_resource_id("*")}),
                match_related=of_deployment,
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=silence_s),
            ),
            actions=(restart(),),
            enabled=enabled,
        ),
    ]


def automation_changes(specs: list[AutomationSpec]) -> list[tuple[str, AutomationSpec]]:
    """``(action, spec)`` per automation: ``+`` create, ``~`` replace, ``=`` as specified."""
    result = []
    with get_client(sync_client=True) as client:
        for spec in specs:
            existing = client.read_automations_by_name(spec.name)
            if not existing:
                result.append(("+", spec))
            elif len(existing) == 1 and _fingerprint(existing[0]) == spec.fingerprint():
                result.append(("=", spec))
            else:
                result.append(("~", spec))
    return result


def apply_automation(spec: AutomationSpec) -> UUID:
    """Create the automation, replacing any of the same name that differs."""
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(spec.name)
        if len(existing) == 1 and _fingerprint(existing[0]) == spec.fingerprint():
            return existing[0].id
        for old in existing:
            client.delete_automation(old.id)
    created = cast(Automation, spec.build().create())  # sync in a sync context
    assert created.id is not None
    return created.id


def all_automations(client: SyncPrefectClient) -> list[ServerAutomation]:
    """Every automation on the server (all pages, newest first, each once)."""
    from prefect.client.schemas.sorting import AutomationSort

    return read_all(lambda offset: client.read_automations(
        sort=AutomationSort.CREATED_DESC, offset=offset), key=lambda automation: automation.id)


def disable_automations_of(db_id: str, job: str | None = None) -> list[str]:
    """Pause every pgbackflow automation of one database, cluster or storage (with ``job``:
    only those of that job kind, e.g. a storage's ``maintenance``); their names."""
    paused = []
    with get_client(sync_client=True) as client:
        for automation in all_automations(client):
            name = automation.name
            if (name.startswith("pgbackflow") and name.endswith(f": {db_id}")
                    and (job is None or f" {job} " in name) and automation.enabled):
                client.pause_automation(automation.id)
                paused.append(name)
    return paused
