"""The ``health-check`` flow: is the database there, and are its backups current?

One run per database every minute (a deployment per database and cluster, made by
``pgbackflow deploy``): probe the server, look up the last successful backup and
verification in the Prefect API, update the database's remembered state (a Prefect Variable),
announce a transition (down after three failed checks in a row, up again, a WAL problem, its
end) as one event each, and publish the "fleet status" table of every database.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import suppress
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType, Variable
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger

from pgbackflow.blocks.database import PostgresDatabase, checked_db_id
from pgbackflow.deployments.paging import read_all
from pgbackflow.deployments.tags import db_tag, job_tag
from pgbackflow.flows.common import tag_run
from pgbackflow.flows.outcome import announce_success
from pgbackflow.tasks.errors import PgBackflowError
from pgbackflow.tasks.health import (
    DOWN_AFTER,
    HealthState,
    Probe,
    Transition,
    WalLimits,
    fleet_rows,
    next_state,
    probe,
)

#: Prefix of the Prefect Variables that hold each database's health state.
VARIABLE_PREFIX = "pgbackflow_health_"
#: Key of the fleet status table artifact.
FLEET_ARTIFACT = "fleet-status"


def variable_name(db_id: str) -> str:
    """The Variable of one database (lowercase letters, digits, ``_``; unique per id)."""
    clean = re.sub(r"[^a-z0-9_]", "_", db_id.lower())
    if clean != db_id:
        clean += "_" + hashlib.sha256(db_id.encode()).hexdigest()[:8]
    return VARIABLE_PREFIX + clean


def _health_variables(client: SyncPrefectClient) -> list[Variable]:
    """Every health Variable (all pages: a fleet may have more than one page of them)."""
    # By hand: the client's read_variables takes no offset and no filter.
    def page(offset: int) -> list[Variable]:
        response = client.request("POST", "/variables/filter", json={
            "variables": {"name": {"like_": VARIABLE_PREFIX}}, "offset": offset})
        return Variable.model_validate_list(response.json())

    return [v for v in read_all(page, key=lambda variable: variable.name)
            if v.name.startswith(VARIABLE_PREFIX)]


def load_states() -> list[HealthState]:
    """The remembered state of every database with a health check."""
    with get_client(sync_client=True) as client:
        variables = _health_variables(client)
    return [HealthState.from_json(v.value, str(v.value.get("db_id")))
            for v in variables if isinstance(v.value, dict) and v.value.get("db_id")]


def _unchecked(client: SyncPrefectClient, keep: set[str]) -> list[Variable]:
    wanted = {variable_name(db_id) for db_id in keep}
    return [v for v in _health_variables(client) if v.name not in wanted]


def _owner(variable: Variable) -> str:
    value = variable.value
    db_id = value.get("db_id") if isinstance(value, dict) else None
    return str(db_id) if db_id else variable.name.removeprefix(VARIABLE_PREFIX)


def unchecked_states(keep: set[str]) -> list[str]:
    """The databases whose remembered state :func:`forget_states` would delete."""
    with get_client(sync_client=True) as client:
        return sorted(_owner(v) for v in _unchecked(client, keep))


def forget_states(keep: set[str]) -> list[str]:
    """Delete the remembered state of every database not in ``keep`` (the ids whose health
    check the config runs): a database no longer checked (removed, disabled, its check
    switched off, or left by an older pgbackflow) must not stay in ``pgbackflow status``
    with an ever older check; checked again, it starts afresh. The databases forgotten.

    Until a pass finds nothing to delete: checks that delete their own state meanwhile
    shift the pages, which can hide a state from one pass.
    """
    forgotten: set[str] = set()
    with get_client(sync_client=True) as client:
        for _ in range(5):
            stale = _unchecked(client, keep)
            for variable in stale:
                with suppress(ObjectNotFound):
                    client.delete_variable_by_name(variable.name)
                forgotten.add(_owner(variable))
            if not stale:
                break
    return sorted(forgotten)


def _load_state(db_id: str) -> HealthState:
    with get_client(sync_client=True) as client:
        variable = client.read_variable_by_name(variable_name(db_id))
    return HealthState.from_json(variable.value if variable else None, db_id)


def _save_state(state: HealthState) -> None:
    """Remember this check, unless deploy paused this run's deployment meanwhile.

    Deploy pauses a health check's deployment, then deletes the states of databases it no
    longer checks. Saving first and reading the pause second means no interleaving keeps a
    state: a run that read "not paused" saved before the pause, so before deploy's delete.
    """
    from prefect.runtime import deployment
    from prefect.variables import Variable as Variables

    name = variable_name(state.db_id)
    Variables.set(name, state.to_json(), overwrite=True)
    if deployment.id is None:  # a check run by hand: deploy's next sweep decides
        return
    with get_client(sync_client=True) as client:
        try:
            paused = client.read_deployment(UUID(deployment.id)).paused
        except ObjectNotFound:
            paused = True
        except Exception as exc:  # the check itself went through: do not fail it for this
            get_run_logger().warning("could not read whether this check was paused (%s); "
                                     "the next deploy forgets its state if it was", exc)
            return
        if paused:
            with suppress(ObjectNotFound):
                client.delete_variable_by_name(name)


def last_success(db_id: str, jobs: list[str]) -> str | None:
    """End time (ISO) of the newest Completed run of these jobs of this database."""
    newest: datetime | None = None
    with get_client(sync_client=True) as client:
        for job in jobs:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[db_tag(db_id), job_tag(job)]),
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.COMPLETED])),
                ),
                sort=FlowRunSort.END_TIME_DESC, limit=1,
            )
            if runs and runs[0].end_time and (newest is None or runs[0].end_time > newest):
                newest = runs[0].end_time
    return newest.isoformat() if newest else None


@task(name="probe-database", cache_policy=NONE)
def probe_task(database: PostgresDatabase, database_name: str | None, slot: str | None) -> Probe:
    """Connect, ``select 1``, version, replication slot (through its SSH tunnel, if any)."""
    if database_name:
        database = database.model_copy(update={"database": database_name})
    try:
        with database.connection_settings() as settings:
            return probe(settings, slot)
    except PgBackflowError as exc:  # the tunnel did not open: a failed check, not a crash
        return Probe(False, datetime.now(UTC), error=str(exc).splitlines()[0])


@task(name="read-last-successes", cache_policy=NONE)
def last_successes_task(db_id: str, backup_jobs: list[str]) -> tuple[str | None, str | None]:
    """The last successful backup and verification (from the Prefect API)."""
    return last_success(db_id, backup_jobs), last_success(db_id, ["verification"])


@task(name="update-health-state", cache_policy=NONE)
def update_state_task(
    db_id: str, check: Probe, last_backup: str | None, last_verification: str | None,
    down_after: int, wal: WalLimits | None,
) -> tuple[HealthState, list[Transition]]:
    """Remember this check; the transitions to announce."""
    state, transitions = next_state(_load_state(db_id), check, down_after=down_after, wal=wal)
    state = replace(state, last_backup=last_backup, last_verification=last_verification)
    _save_state(state)
    return state, transitions


def announce(state: HealthState, transitions: list[Transition]) -> None:
    """One event per transition (the health and WAL notification automations react)."""
    from prefect.events import emit_event

    from pgbackflow.deployments.notifications import (
        HEALTH_DOWN_EVENT,
        HEALTH_UP_EVENT,
        WAL_PROBLEM_EVENT,
        WAL_RECOVERED_EVENT,
    )

    events = {"down": HEALTH_DOWN_EVENT, "up": HEALTH_UP_EVENT,
              "wal-problem": WAL_PROBLEM_EVENT, "wal-recovered": WAL_RECOVERED_EVENT}
    slot = state.slot or {}
    retained = slot.get("retained_bytes")
    (row,) = fleet_rows([state])
    for transition in transitions:
        get_run_logger().warning("%s: %s", state.db_id, transition)
        emit_event(
            event=events[transition],
            resource={"prefect.resource.id": f"pgbackflow.db.{state.db_id}",
                      "prefect.resource.name": state.db_id},
            payload={"db_id": state.db_id, "state": state.state, "since": state.since,
                     "failures": state.failures, "error": state.error,
                     "last_backup": row["last backup"], "problem": state.wal_problem or
                     "recovered", "slot": slot.get("name"), "slot_active": slot.get("active"),
                     "retained": "-" if retained is None else f"{retained / 1e6:.1f} MB"},
        )


def publish_fleet_status() -> list[dict[str, Any]]:
    """The "fleet status" table: every database's state, one row each."""
    rows = fleet_rows(load_states())
    create_table_artifact(rows, key=FLEET_ARTIFACT,
                          description="pgbackflow fleet status: every database's health")
    return rows


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"health-{flow_run.parameters.get('db_id', 'database')}"


# The success event: the "missed health check" automation waits for it (a check that
# cannot run at all, a paused schedule or no worker is noticed as no success).
@flow(name="health-check", flow_run_name=_run_name, log_prints=False,
      on_completion=[announce_success])
def health_check(
    database: PostgresDatabase,
    db_id: str,
    database_name: str | None = None,
    backup_jobs: list[str] | None = None,
    slot: str | None = None,
    slot_retained_gb: float = 50.0,
    wal_stalled_minutes: float = 15.0,
    down_after: int = DOWN_AFTER,
) -> dict[str, Any]:
    """Check one database (or cluster) and publish the fleet status.

    Args:
        database: The server's block.
        db_id: The database's id (its tags, its state).
        database_name: Connect to this database of the server (default: the block's).
        backup_jobs: Jobs whose last success counts as "last backup" (``logical``, ``full``,
            ``incremental``).
        slot: The replication slot of a streamed cluster (its state and retained WAL).
        slot_retained_gb: A slot retaining more is a WAL problem.
        wal_stalled_minutes: WAL the server wrote but the slot did not confirm for this
            long is a WAL problem.
        down_after: Failed checks in a row before the database counts as down.
    """
    checked_db_id(db_id)
    tag_run("health", db_id)
    check = probe_task(database, database_name, slot)
    last_backup, last_verification = last_successes_task(db_id, backup_jobs or ["logical"])
    wal = WalLimits(int(slot_retained_gb * 1e9), wal_stalled_minutes * 60) if slot else None
    state, transitions = update_state_task(db_id, check, last_backup, last_verification,
                                           down_after, wal)
    announce(state, transitions)
    publish_fleet_status()
    return state.to_json()
