"""The one writer of pgbackflow's Prefect objects: deployments, work pools, limits, automations.

Everything pgbackflow schedules is described first as small frozen specs (what should
exist), compared with what the Prefect API holds (a plan of changes, printable as a diff),
and only then applied. Applying the same specs twice changes nothing: a deployment that is
already as specified is not even rewritten (Prefect deletes and recreates the future
scheduled runs of every deployment it upserts).

Deployments use module entrypoints (``pgbackflow.flows.logical_backup.logical_backup``) and
no pull steps: a worker needs ``pip install pgbackflow``, not a checkout of this repository.
Every deployment pgbackflow manages carries the tag ``pgbackflow``, so one that is no longer
in the config can be found and paused.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

from prefect import Flow
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import (
    DeploymentScheduleCreate,
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
)
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
from prefect.client.schemas.responses import DeploymentResponse
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from prefect.client.schemas.sorting import DeploymentSort
from prefect.exceptions import ObjectNotFound
from prefect.utilities.callables import parameter_schema

from pgbackflow.deployments.automations import HEARTBEAT_JOB_VARIABLES
from pgbackflow.deployments.paging import read_all
from pgbackflow.deployments.tags import PRODUCT_TAG

#: Tag on every deployment pgbackflow manages (the one its runs carry too).
MANAGED_TAG = PRODUCT_TAG
#: Tag on the deployments `pgbackflow deploy` made from a config: the ones it pauses when
#: their database leaves the config (deployments made by other commands are left alone).
CONFIG_TAG = "pgbackflow-config"

Collision = Literal["ENQUEUE", "CANCEL_NEW"]


def entrypoint_of(flow: Flow[..., Any]) -> str:
    """The module entrypoint of a flow object (``package.module.function``)."""
    function = flow.fn
    return f"{function.__module__}.{function.__name__}"


@dataclass(frozen=True)
class ScheduleSpec:
    """A UTC schedule: a 5-field cron expression, or an interval in seconds."""

    cron: str | None = None
    interval_s: float | None = None

    def describe(self) -> str:
        """Short text for plans and descriptions."""
        if self.cron is not None:
            return f"cron '{self.cron}' UTC"
        return f"every {self.interval_s:g} s"

    def to_create(self) -> DeploymentScheduleCreate:
        """The Prefect schedule object."""
        if self.cron is not None:
            return DeploymentScheduleCreate(schedule=CronSchedule(cron=self.cron, timezone="UTC"))
        from datetime import timedelta

        assert self.interval_s is not None
        return DeploymentScheduleCreate(
            schedule=IntervalSchedule(interval=timedelta(seconds=self.interval_s), timezone="UTC")
        )

    @staticmethod
    def of(schedule: Any) -> ScheduleSpec | None:
        """The spec of a schedule read back from the API (None for other kinds)."""
        if isinstance(schedule, CronSchedule):
            return ScheduleSpec(cron=schedule.cron)
        if isinstance(schedule, IntervalSchedule):
            return ScheduleSpec(interval_s=schedule.interval.total_seconds())
        return None


@dataclass(frozen=True)
class DeploymentSpec:
    """What one deployment should be.

    Attributes:
        flow: The flow object (its name and parameter schema).
        name: Deployment name (unique per flow).
        work_pool: Process work pool whose workers run it.
        parameters: Parameters; block references only, never secrets.
        tags: Tags (``db:<id>``, ``job:<kind>``); ``pgbackflow`` is always added.
        description: Shown in the UI.
        schedule: The schedule, or None for on-demand only.
        concurrency_limit: Runs of this deployment at a time (None: unlimited).
        collision: What a run beyond the limit does: wait (ENQUEUE) or end Cancelled.
        paused: Whether the deployment (and its schedule) is paused.
        job_variables: Worker job variables (default: flow-run heartbeats on, so a run whose
            host is lost ends Crashed instead of staying Running).
    """

    flow: Flow[..., Any]
    name: str
    work_pool: str
    parameters: Mapping[str, Any]
    tags: tuple[str, ...]
    description: str
    schedule: ScheduleSpec | None = None
    concurrency_limit: int | None = 1
    collision: Collision = "ENQUEUE"
    paused: bool = False
    job_variables: Mapping[str, Any] = field(
        default_factory=lambda: dict(HEARTBEAT_JOB_VARIABLES)
    )

    @property
    def full_name(self) -> str:
        """``flow-name/deployment-name``, as Prefect names deployments."""
        return f"{self.flow.name}/{self.name}"

    @property
    def all_tags(self) -> list[str]:
        """The tags as stored (sorted, with the managed tag)."""
        return sorted({MANAGED_TAG, *self.tags})

    def differences(self, current: DeploymentResponse) -> list[str]:
        """What differs from the deployment the API holds, one short line per field."""
        wanted: dict[str, Any] = {
            "entrypoint": entrypoint_of(self.flow),
            "work pool": self.work_pool,
            "parameters": _canonical(self.parameters),
            "tags": self.all_tags,
            "description": self.description,
            "schedule": self.schedule.describe() if self.schedule else "none",
            "concurrency limit": self.concurrency_limit,
            "collision strategy": self.collision if self.concurrency_limit else None,
            "paused": self.paused,
            "pull steps": [],
            "job variables": _canonical(self.job_variables),
        }
        schedules = [ScheduleSpec.of(s.schedule) for s in current.schedules]
        limit = current.global_concurrency_limit.limit if current.global_concurrency_limit else None
        options = current.concurrency_options
        have: dict[str, Any] = {
            "entrypoint": current.entrypoint,
            "work pool": current.work_pool_name,
            "parameters": _canonical(current.parameters),
            "tags": sorted(current.tags),
            "description": current.description,
            "schedule": (
                schedules[0].describe() if len(schedules) == 1 and schedules[0] else
                "none" if not schedules else f"{len(schedules)} schedules"
            ),
            "concurrency limit": limit,
            "collision strategy": (
                options.collision_strategy.value if options and limit else None
            ),
            "paused": current.paused,
            "pull steps": list(current.pull_steps or []),
            "job variables": _canonical(current.job_variables),
        }
        changes = []
        for key, value in wanted.items():
            if have[key] != value:
                if key == "parameters":
                    changes.append(f"parameters: {_short(have[key])} → {_short(value)}")
                else:
                    changes.append(f"{key}: {have[key]!r} → {value!r}")
        return changes


@dataclass(frozen=True)
class LimitSpec:
    """A Prefect global concurrency limit (shown under Concurrency in the UI)."""

    name: str
    limit: int


@dataclass(frozen=True)
class Change:
    """One line of a plan: ``+`` create, ``~`` update, ``-`` pause, ``=`` unchanged."""

    action: Literal["+", "~", "-", "="]
    kind: str
    name: str
    details: tuple[str, ...] = ()

    def render(self) -> str:
        """The change as diff-like text (details indented below)."""
        lines = [f"{self.action} {self.kind} {self.name}"]
        lines += [f"    {detail}" for detail in self.details]
        return "\n".join(lines)


@dataclass
class PrefectPlan:
    """What a deploy will change in the Prefect API, and how to do it."""

    pools: list[str] = field(default_factory=list)
    limits: list[LimitSpec] = field(default_factory=list)
    deployments: list[DeploymentSpec] = field(default_factory=list)
    #: Managed deployments of databases in scope that the config no longer has.
    pause_tags: set[str] = field(default_factory=set)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------
# Plan


def plan_changes(plan: PrefectPlan, keep_tags: Iterable[str] = ()) -> list[Change]:
    """Compare ``plan`` with the API: what would be created, updated, paused or kept.

    Args:
        plan: The wanted state.
        keep_tags: ``db:<id>`` and ``storage:<name>`` tags still in the config (they only
            say why a deployment is paused: every config-made deployment not in the plan
            is).
    """
    changes: list[Change] = []
    with get_client(sync_client=True) as client:
        for pool in plan.pools:
            try:
                client.read_work_pool(pool)
                changes.append(Change("=", "work pool", pool))
            except ObjectNotFound:
                changes.append(Change("+", "work pool", pool, ("type: process",)))
        for limit in plan.limits:
            try:
                current = client.read_global_concurrency_limit_by_name(limit.name)
            except ObjectNotFound:
                changes.append(Change("+", "concurrency limit", limit.name,
                                      (f"limit: {limit.limit}",)))
                continue
            if current.limit != limit.limit:
                changes.append(Change("~", "concurrency limit", limit.name,
                                      (f"limit: {current.limit} → {limit.limit}",)))
            else:
                changes.append(Change("=", "concurrency limit", limit.name))
        wanted = {spec.full_name for spec in plan.deployments}
        for spec in plan.deployments:
            current_deployment = _read_deployment(client, spec.full_name)
            if current_deployment is None:
                details = [f"schedule: {spec.schedule.describe() if spec.schedule else 'none'}",
                           f"work pool: {spec.work_pool}", f"tags: {', '.join(spec.all_tags)}"]
                changes.append(Change("+", "deployment", spec.full_name, tuple(details)))
            else:
                differences = spec.differences(current_deployment)
                changes.append(Change("~" if differences else "=", "deployment", spec.full_name,
                                      tuple(differences)))
        keep = set(keep_tags)
        for stale in _managed_deployments(client):
            name = _full_name(client, stale)
            if name in wanted or stale.paused:
                continue
            changes.append(Change("-", "deployment", name, (_why_paused(stale.tags, keep),)))
    return changes


def _why_paused(tags: Iterable[str], keep: set[str]) -> str:
    """Why a config-made deployment the plan no longer has is paused: its database or
    storage left the config, or the config switched this job off (``health_check = "off"``,
    no ``incremental``, no ``verify``): either way it must not run on."""
    from pgbackflow.deployments.tags import DB_TAG_PREFIX, STORAGE_TAG_PREFIX

    scope = {t for t in tags if t.startswith((DB_TAG_PREFIX, STORAGE_TAG_PREFIX))}
    if scope & keep:
        return "paused: switched off in the config"
    what = "storage" if any(t.startswith(STORAGE_TAG_PREFIX) for t in scope) else "database"
    return f"paused: its {what} is no longer in the config"


def _read_deployment(client: SyncPrefectClient, full_name: str) -> DeploymentResponse | None:
    try:
        return client.read_deployment_by_name(full_name)
    except ObjectNotFound:
        return None


def _managed_deployments(client: SyncPrefectClient) -> list[DeploymentResponse]:
    managed = DeploymentFilter(tags=DeploymentFilterTags(all_=[CONFIG_TAG]))
    return read_all(lambda offset: client.read_deployments(
        deployment_filter=managed, sort=DeploymentSort.CREATED_DESC, offset=offset),
        key=lambda deployment: deployment.id)


_flow_names: dict[UUID, str] = {}


def _full_name(client: SyncPrefectClient, deployment: DeploymentResponse) -> str:
    if deployment.flow_id not in _flow_names:
        _flow_names[deployment.flow_id] = client.read_flow(deployment.flow_id).name
    return f"{_flow_names[deployment.flow_id]}/{deployment.name}"


# ---------------------------------------------------------------------------------------
# Apply


def apply_plan(plan: PrefectPlan, changes: Sequence[Change]) -> dict[str, UUID]:
    """Carry out ``changes`` (from :func:`plan_changes` of the same plan).

    Returns:
        Deployment ids by full name, for every deployment in the plan.
    """
    actions = {(c.kind, c.name): c.action for c in changes}
    ids: dict[str, UUID] = {}
    with get_client(sync_client=True) as client:
        for pool in plan.pools:
            if actions.get(("work pool", pool)) == "+":
                ensure_work_pool(pool, client)
        for limit in plan.limits:
            ensure_limit(limit, client)
        for spec in plan.deployments:
            if actions.get(("deployment", spec.full_name)) == "=":
                current = _read_deployment(client, spec.full_name)
                assert current is not None
                ids[spec.full_name] = current.id
            else:
                ids[spec.full_name] = write_deployment(spec, client)
        for change in changes:
            if change.action == "-" and change.kind == "deployment":
                stale = _read_deployment(client, change.name)
                if stale is not None:
                    client.pause_deployment(stale.id)
    return ids


def flow_run_command() -> str:
    """The flow-run command of the pools deploy creates: Prefect's engine, run in a warm
    daemon when one is up (pgbackflow/engine.py; ~2-3 s less per run than a fresh
    interpreter). The interpreter is deploy's own: the stack deploys from the workers'
    image; workers elsewhere need the pool's command set to their interpreter (README)."""
    return shlex.join([sys.executable, "-m", "pgbackflow.engine"])


def ensure_work_pool(pool: str, client: SyncPrefectClient | None = None) -> None:
    """Create a process work pool unless it exists (an operator's pool is left as it is)."""
    from prefect.workers.process import ProcessWorker

    with _client(client) as api:
        try:
            api.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            template["variables"]["properties"]["command"]["default"] = flow_run_command()
            api.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                base_job_template=template))


def ensure_limit(limit: LimitSpec, client: SyncPrefectClient | None = None) -> None:
    """Create or update a global concurrency limit."""
    from prefect.exceptions import ObjectAlreadyExists

    with _client(client) as api:
        try:
            current = api.read_global_concurrency_limit_by_name(limit.name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # created by a run at the same moment
                api.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=limit.name, limit=limit.limit)
                )
            return
        if current.limit != limit.limit:
            api.update_global_concurrency_limit(
                limit.name, GlobalConcurrencyLimitUpdate(limit=limit.limit)
            )


def write_deployment(spec: DeploymentSpec, client: SyncPrefectClient | None = None) -> UUID:
    """Create or update (upsert by name) one deployment as specified."""
    with _client(client) as api:
        flow_id = api.create_flow_from_name(spec.flow.name)
        options = (
            ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy(spec.collision))
            if spec.concurrency_limit else None
        )
        return api.create_deployment(
            flow_id=flow_id,
            name=spec.name,
            entrypoint=entrypoint_of(spec.flow),
            work_pool_name=spec.work_pool,
            parameters=dict(spec.parameters),
            parameter_openapi_schema=parameter_schema(spec.flow).model_dump(exclude_unset=True),
            tags=spec.all_tags,
            description=spec.description,
            schedules=[spec.schedule.to_create()] if spec.schedule else [],
            concurrency_limit=spec.concurrency_limit,
            concurrency_options=options,
            paused=spec.paused,
            pull_steps=[],
            path=None,
            enforce_parameter_schema=False,
            job_variables=dict(_job_variables(spec)),
        )


def _job_variables(spec: DeploymentSpec) -> Mapping[str, Any]:
    """The spec's job variables (a copy Prefect may not mutate)."""
    copy: dict[str, Any] = json.loads(json.dumps(spec.job_variables))
    return copy


def delete_deployment(full_name: str) -> bool:
    """Delete a deployment if it exists; returns whether it did."""
    with get_client(sync_client=True) as client:
        current = _read_deployment(client, full_name)
        if current is None:
            return False
        client.delete_deployment(current.id)
    return True


class _client:
    """The given client, or a new one for the block (closed after it)."""

    def __init__(self, client: SyncPrefectClient | None) -> None:
        self._given = client
        self._own: Any = None

    def __enter__(self) -> SyncPrefectClient:
        if self._given is not None:
            return self._given
        self._own = get_client(sync_client=True)
        client: SyncPrefectClient = self._own.__enter__()
        return client

    def __exit__(self, *exc: object) -> None:
        if self._own is not None:
            self._own.__exit__(*exc)
