"""Notifications, missed-backup alerts and health alerts as Prefect automations.

Built from the deploy config's ``notify`` sections and applied by the one writer
(:func:`pgbackflow.deployments.config.deploy` through :mod:`.automations`): created, updated
and paused with their database, never duplicated. Every automation names its database or
cluster after a colon (``pgbackflow notify logical failed: shop``), as the other pgbackflow
automations do, so pausing a database pauses them too.

* **Outcomes** (per database and job, success and failure toggled separately): a failure is
  Prefect's own ``prefect.flow-run.Failed``/``Crashed`` event of a run tagged ``db:<id>`` and
  ``job:<kind>`` (also a killed run, one that failed before connecting, a CLI run); a success
  is the run's ``pgbackflow.run.succeeded`` event (flows/outcome.py), which carries the backup
  id and size. Each automation sends through every notification block the config names.
* **Missed backups**: a proactive automation per database and job waits for the success
  event; when none comes within the window (from the schedule, or set) it notifies, also
  when no run happened at all (worker down, schedule paused, scheduler broken), and again
  after every further window without a success.
* **Health**: the ``health-check`` flow emits ``pgbackflow.health.down`` once after three
  failed checks in a row and ``pgbackflow.health.up`` once when the database answers again;
  WAL problems it sees (a slot that retains too much, WAL the server wrote but nobody
  received) come as ``pgbackflow.wal.stalled``/``…retaining`` and ``…recovered`` events.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from prefect.automations import EventTrigger, Posture
from prefect.events.actions import SendNotification
from prefect.events.schemas.events import ResourceSpecification
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from pgbackflow.deployments.automations import AutomationSpec, all_automations
from pgbackflow.deployments.block_refs import saved_block
from pgbackflow.deployments.tags import db_tag, job_tag, storage_tag
from pgbackflow.flows.outcome import SUCCEEDED_EVENT
from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.units import human_duration

JobKind = Literal["logical", "full", "incremental", "wal", "verification", "maintenance",
                  "health"]
#: What each job is called in messages.
JOB_LABELS: dict[str, str] = {
    "logical": "logical backup", "full": "full backup", "incremental": "incremental backup",
    "wal": "WAL streaming", "verification": "restore verification",
    "maintenance": "retention and maintenance", "health": "health check",
}
#: Events of the health-check flow (flows/health.py).
HEALTH_DOWN_EVENT = "pgbackflow.health.down"
HEALTH_UP_EVENT = "pgbackflow.health.up"
WAL_PROBLEM_EVENT = "pgbackflow.wal.problem"
WAL_RECOVERED_EVENT = "pgbackflow.wal.recovered"
#: Prefixes of the automations this module writes (stale ones are paused by a deploy).
PREFIXES = ("pgbackflow notify ", "pgbackflow missed ", "pgbackflow health ")

MAX_WINDOW = timedelta(days=10 * 365)
"""The longest window or interval a config may give."""
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_window(text: str) -> timedelta:
    """``90m``, ``36h``, ``3d``, ``2w`` (at least 10 s: Prefect's least proactive window)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration: use e.g. 90m, 36h, 3d or 2w, or \"off\"")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds > MAX_WINDOW.total_seconds():  # (a timedelta of 10^14 days overflows)
        raise ValueError(f"{text!r} is longer than {MAX_WINDOW.days // 365} years")
    window = timedelta(seconds=seconds)
    if window < timedelta(seconds=10):
        raise ValueError(f"{text!r} is shorter than 10 s")
    return window


def _window_or_off(value: str | None) -> str | None:
    if value is not None and value != "off":
        parse_window(value)
    return value


#: ``health_check`` of a database or cluster: an interval (``1m``, ``30s``) or ``off``.
HealthInterval = Annotated[str, AfterValidator(_window_or_off)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NotifyDefaults(_Strict):
    """``[notify]``: where notifications go and which, for every database and cluster."""

    block: str | list[str] | None = None
    on_failure: bool | list[JobKind] = True
    on_success: bool | list[JobKind] = False

    @field_validator("block")
    @classmethod
    def _blocks(cls, value: str | list[str] | None) -> str | list[str] | None:
        for ref in [value] if isinstance(value, str) else value or []:
            slug, _, name = ref.removeprefix("block:").partition("/")
            if not slug or not name or "/" in name:
                raise ValueError(
                    f"{ref!r} is not a block reference: use <block-type-slug>/<block-name>, "
                    "e.g. slack-webhook/ops-alerts"
                )
        return value

    @field_validator("on_failure", "on_success", mode="before")
    @classmethod
    def _toggle(cls, value: Any) -> Any:
        allowed = ", ".join(JOB_LABELS)
        if isinstance(value, bool):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            unknown = [v for v in value if v not in JOB_LABELS]
            if not unknown:
                return value
            raise ValueError(f"unknown job {unknown[0]!r}: use true, false or a list of {allowed}")
        raise ValueError(f"{value!r} is not a toggle: use true, false or a list of {allowed}")

    def blocks(self) -> list[str]:
        """``slug/name`` of each target block."""
        value = self.block
        refs = [value] if isinstance(value, str) else list(value or [])
        return [ref.removeprefix("block:") for ref in refs]

    def wants(self, job: str, outcome: Literal["failure", "success"]) -> bool:
        """Whether this job's outcome is notified."""
        toggle = self.on_failure if outcome == "failure" else self.on_success
        return toggle if isinstance(toggle, bool) else job in toggle


class DatabaseNotify(NotifyDefaults):
    """``[databases.ID.notify]``: overrides of ``[notify]`` and the missed-backup windows."""

    missed_backup: str | None = None
    missed_verification: str | None = None
    missed_health_check: str | None = None

    _windows = field_validator("missed_backup", "missed_verification", "missed_health_check")(
        classmethod(lambda cls, v: _window_or_off(v))
    )


class ClusterNotify(NotifyDefaults):
    """``[clusters.ID.notify]``: overrides, missed-backup windows and WAL thresholds."""

    missed_full: str | None = None
    missed_incremental: str | None = None
    missed_health_check: str | None = None
    wal_stalled_minutes: float = Field(default=15, gt=0)
    slot_retained_gb: float = Field(default=50, gt=0)

    _windows = field_validator("missed_full", "missed_incremental", "missed_health_check")(
        classmethod(lambda cls, v: _window_or_off(v))
    )


def merged(defaults: NotifyDefaults | None, entry: NotifyDefaults | None) -> NotifyDefaults:
    """The entry's settings over the defaults (only the keys the entry sets)."""
    base = (defaults or NotifyDefaults()).model_dump()
    if entry is not None:
        base.update({k: v for k, v in entry.model_dump().items()
                     if k in entry.model_fields_set and k in NotifyDefaults.model_fields})
    return NotifyDefaults.model_validate(base)


def missed_window(cron: str, override: str | None) -> timedelta | None:
    """How long without a success is "missed": the override, or from the schedule.

    From the schedule: 1.5 times the longest gap between two scheduled runs over the next
    year (weekday crons have longer gaps at weekends), at least the gap plus one hour (a
    backup may take a while). ``off``: None.
    """
    if override == "off":
        return None
    if override is not None:
        return parse_window(override)
    from pgbackflow.deployments.verification import cron_runs

    runs = cron_runs(cron, datetime(2026, 1, 1, tzinfo=UTC))
    previous = next(runs)
    longest = timedelta(0)
    for _ in range(2000):
        current = next(runs)
        longest = max(longest, current - previous)
        previous = current
        if current.year > 2026:
            break
    return max(longest * 1.5, longest + timedelta(hours=1))


def missed_health_window(interval: timedelta, override: str | None) -> timedelta | None:
    """How long without a completed health check is "missed": the override, or five
    intervals and at least 5 minutes (a check of a database that is down completes too: it
    is the checks themselves that stopped). ``off``: None."""
    if override == "off":
        return None
    if override is not None:
        return parse_window(override)
    return max(interval * 5, timedelta(minutes=5))


# ---------------------------------------------------------------------------------------
# Automation specs


@dataclass(frozen=True)
class Target:
    """A notification block: its reference and its document id."""

    ref: str
    block_document_id: Any


def resolve_targets(refs: Sequence[str], where: str) -> list[Target]:
    """The document ids of the named notification blocks (each must exist and notify)."""
    targets = []
    for ref in refs:
        slug, _, name = ref.partition("/")
        document = saved_block(slug, name, f"{where}: notification",
                               "create it first (README, Notifications: CLI or UI)")
        schema = document.block_schema
        if schema is not None and "notify" not in (schema.capabilities or []):
            raise ConfigError(
                f"{where}: block {ref} cannot send notifications: use a notification "
                "block (Slack, Microsoft Teams, Discord, custom webhook, SMTP e-mail, ...)"
            )
        targets.append(Target(ref, document.id))
    return targets


def _tags(db_id: str, job: str, *, key: str = "db") -> list[ResourceSpecification]:
    """The related resources of a run carrying these tags (``key``: ``db`` or ``storage``)."""
    scope = db_tag(db_id) if key == "db" else storage_tag(db_id)
    return [ResourceSpecification({"prefect.resource.id": f"prefect.tag.{scope}"}),
            ResourceSpecification({"prefect.resource.id": f"prefect.tag.{job_tag(job)}"})]


def _send(targets: Sequence[Target], subject: str, body: str) -> tuple[SendNotification, ...]:
    return tuple(SendNotification(block_document_id=t.block_document_id, subject=subject,
                                  body=body) for t in targets)


_RUN_LINK = ('{{ flow_run.name }} {{ flow_run|ui_url or "(set PREFECT_UI_URL on the Prefect '
             'server for a link)" }}')


#: How long the run ran (Prefect's own figure, read when the message is rendered).
_DURATION_LINE = "duration: {{ flow_run.total_run_time.total_seconds()|round(1) }} s"


def failure_body(what: str, db_id: str, job: str) -> str:
    """The message of a failed (or crashed) run: its first error line and a link."""
    return "\n".join([
        f"{what}: {db_id}",
        f"job: {JOB_LABELS[job]}",
        "outcome: {{ flow_run.state.name }}",
        _DURATION_LINE,
        "size: -",
        "backup id: -",
        "error: {{ (flow_run.state.message or 'no message').strip().splitlines()[0] }}",
        f"run: {_RUN_LINK}",
    ])


def success_body(what: str, db_id: str, job: str) -> str:
    """The message of a successful run, from its ``pgbackflow.run.succeeded`` event."""
    return "\n".join([
        f"{what}: {db_id}",
        f"job: {JOB_LABELS[job]}",
        "outcome: succeeded",
        _DURATION_LINE,
        "size: {{ event.payload.size }}",
        "backup id: {{ event.payload.backup_id }}",
        "{% if event.payload.summary %}summary: {{ event.payload.summary }}\n{% endif %}"
        f"run: {_RUN_LINK}",
    ])


def outcome_automations(
    db_id: str, job: str, settings: NotifyDefaults, targets: Sequence[Target], *,
    enabled: bool = True, what: str = "database", tag_key: str = "db",
) -> list[AutomationSpec]:
    """The failure and success automations of one database (or storage) and job, as
    toggled; an untoggled outcome gets none (a deploy pauses one made before)."""
    specs = []
    label = JOB_LABELS[job]
    if settings.wants(job, "failure"):
        specs.append(AutomationSpec(
            name=f"pgbackflow notify {job} failed: {db_id}",
            description=f"Notify {', '.join(t.ref for t in targets)} when a {label} of "
                        f"{db_id} fails or crashes",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
                match_related=_tags(db_id, job, key=tag_key),
                posture=Posture.Reactive, threshold=1,
            ),
            actions=_send(targets, f"pgbackflow: {label} of {db_id} "
                                   "{{ flow_run.state.name|lower }}",
                          failure_body(what, db_id, job)),
            enabled=enabled,
        ))
    # A WAL streamer runs until stopped: its good news is a recovery (wal_automations).
    if job != "wal" and settings.wants(job, "success"):
        specs.append(AutomationSpec(
            name=f"pgbackflow notify {job} succeeded: {db_id}",
            description=f"Notify {', '.join(t.ref for t in targets)} when a {label} of "
                        f"{db_id} succeeds",
            trigger=EventTrigger(
                expect={SUCCEEDED_EVENT},
                match=ResourceSpecification({"prefect.resource.id": "pgbackflow.run.*"}),
                match_related=_tags(db_id, job, key=tag_key),
                posture=Posture.Reactive, threshold=1,
            ),
            actions=_send(targets, f"pgbackflow: {label} of {db_id} succeeded",
                          success_body(what, db_id, job)),
            enabled=enabled,
        ))
    return specs


def missed_automation(
    db_id: str, job: str, window: timedelta, targets: Sequence[Target], *,
    deployment: str, enabled: bool = True,
) -> AutomationSpec:
    """Notify when no run of this job and database succeeded within ``window``."""
    label = JOB_LABELS[job]
    span = human_duration(window.total_seconds())
    return AutomationSpec(
        name=f"pgbackflow missed {job}: {db_id}",
        description=f"Notify {', '.join(t.ref for t in targets)} when no {label} of {db_id} "
                    f"succeeded within {span}",
        trigger=EventTrigger(
            expect={SUCCEEDED_EVENT},
            match=ResourceSpecification({"prefect.resource.id": "pgbackflow.run.*"}),
            match_related=_tags(db_id, job),
            posture=Posture.Proactive, threshold=1, within=window,
        ),
        actions=_send(
            targets, f"pgbackflow: no successful {label} of {db_id} within {span}",
            "\n".join([
                f"database: {db_id}",
                f"job: {label}",
                f"outcome: missed — no {label} succeeded within {span}",
                f"deployment: {deployment}",
                "Runs may be failing, or none ran at all: check the deployment's schedule "
                "(paused?), its work pool's workers and the Prefect server's scheduler.",
            ]),
        ),
        enabled=enabled,
    )


def event_automation(
    name: str, description: str, event: str, db_id: str, targets: Sequence[Target],
    subject: str, body: str, *, enabled: bool = True,
) -> AutomationSpec:
    """Notify on every ``event`` about ``db_id`` (health and WAL events)."""
    return AutomationSpec(
        name=name, description=description,
        trigger=EventTrigger(
            expect={event},
            match=ResourceSpecification({"prefect.resource.id": f"pgbackflow.db.{db_id}"}),
            posture=Posture.Reactive, threshold=1,
        ),
        actions=_send(targets, subject, body), enabled=enabled,
    )


def _all_clear(settings: NotifyDefaults, job: str) -> bool:
    """Whether the end of a problem of ``job`` is notified: wherever the problem was (its
    failure toggle: a *down* alert without its *up* would leave someone waiting), or by
    the success toggle alone."""
    return settings.wants(job, "failure") or settings.wants(job, "success")


def health_automations(
    db_id: str, settings: NotifyDefaults, targets: Sequence[Target], *, enabled: bool = True,
) -> list[AutomationSpec]:
    """Down (failure toggle of ``health``) and up again (failure or success toggle)."""
    facts = ("database: {{ event.payload.db_id }}\n"
             "job: health check\n"
             "outcome: {{ event.payload.state }}\n"
             "since: {{ event.payload.since }}\n"
             "checks failed in a row: {{ event.payload.failures }}\n"
             "error: {{ event.payload.error or '-' }}\n"
             "last successful backup: {{ event.payload.last_backup or 'none' }}\n"
             f"run: {_RUN_LINK}")
    specs = []
    if settings.wants("health", "failure"):
        specs.append(event_automation(
            f"pgbackflow health down: {db_id}", f"Notify when {db_id} stops answering",
            HEALTH_DOWN_EVENT, db_id, targets, f"pgbackflow: {db_id} is DOWN", facts,
            enabled=enabled,
        ))
    if _all_clear(settings, "health"):
        specs.append(event_automation(
            f"pgbackflow health up: {db_id}", f"Notify when {db_id} answers again",
            HEALTH_UP_EVENT, db_id, targets, f"pgbackflow: {db_id} is up again", facts,
            enabled=enabled,
        ))
    return specs


def wal_automations(
    db_id: str, settings: NotifyDefaults, targets: Sequence[Target], *, enabled: bool = True,
) -> list[AutomationSpec]:
    """WAL problems the health check sees (stalled shipping, a slot retaining too much;
    failure toggle of ``wal``) and their recovery (failure or success toggle)."""
    facts = ("cluster: {{ event.payload.db_id }}\n"
             "job: WAL streaming\n"
             "outcome: {{ event.payload.problem }}\n"
             "slot: {{ event.payload.slot }} (active: {{ event.payload.slot_active }})\n"
             "retained WAL: {{ event.payload.retained }}\n"
             f"run: {_RUN_LINK}")
    specs = []
    if settings.wants("wal", "failure"):
        specs.append(event_automation(
            f"pgbackflow health wal problem: {db_id}",
            f"Notify when the WAL of {db_id} stalls or its slot retains too much",
            WAL_PROBLEM_EVENT, db_id, targets,
            f"pgbackflow: WAL of {db_id}: {{{{ event.payload.problem }}}}", facts,
            enabled=enabled,
        ))
    if _all_clear(settings, "wal"):
        specs.append(event_automation(
            f"pgbackflow health wal recovered: {db_id}",
            f"Notify when a WAL problem of {db_id} is over",
            WAL_RECOVERED_EVENT, db_id, targets, f"pgbackflow: WAL of {db_id} recovered",
            facts, enabled=enabled,
        ))
    return specs


def stale_automations(wanted: Iterable[str], ids: Iterable[str]) -> list[tuple[str, Any]]:
    """Enabled automations of this module for ``ids`` that the config no longer wants
    (an outcome toggled off, a window set to off): ``(name, id)`` to pause."""
    from prefect.client.orchestration import get_client

    keep, scope = set(wanted), set(ids)
    stale = []
    with get_client(sync_client=True) as client:
        for automation in all_automations(client):
            name = automation.name
            if (name.startswith(PREFIXES) and name not in keep and automation.enabled
                    and name.rpartition(": ")[2] in scope):
                stale.append((name, automation.id))
    return stale


def pause_automations(stale: Sequence[tuple[str, Any]]) -> None:
    """Pause the given automations."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for _, automation_id in stale:
            client.pause_automation(automation_id)


# ---------------------------------------------------------------------------------------
# From the deploy config


def config_automations(config: Any) -> list[AutomationSpec]:
    """Every notification, missed-backup and health automation a deploy config asks for.

    Args:
        config: The validated :class:`~pgbackflow.deployments.config.DeployConfig`.

    Raises:
        ConfigError: a named notification block is missing or cannot notify (one line).
    """
    from pgbackflow.deployments.config import parse_schedule

    defaults: NotifyDefaults | None = config.notify
    resolved: dict[tuple[str, ...], list[Target]] = {}

    def targets_of(settings: NotifyDefaults, where: str) -> list[Target]:
        refs = tuple(settings.blocks())
        if refs not in resolved:
            resolved[refs] = resolve_targets(refs, where)
        return resolved[refs]

    def entry_specs(kind: str, db_id: str, entry: Any,
                    jobs: dict[str, tuple[str, str | None, str]]) -> list[AutomationSpec]:
        """One database's or cluster's automations; ``jobs``: job → (cron, missed window
        override, deployment)."""
        settings = merged(defaults, entry.notify)
        if not settings.blocks():
            return []
        own = entry.notify is not None and "block" in entry.notify.model_fields_set
        targets = targets_of(settings, f"{kind}.{db_id}.notify.block" if own else "notify.block")
        enabled = entry.enabled
        result: list[AutomationSpec] = []
        for job, (cron, override, deployment) in jobs.items():
            result += outcome_automations(db_id, job, settings, targets, enabled=enabled)
            window = missed_window(cron, override)
            if window is not None:
                result.append(missed_automation(db_id, job, window, targets,
                                                deployment=deployment, enabled=enabled))
        streamed = getattr(entry, "wal", False)
        if streamed:
            result += outcome_automations(db_id, "wal", settings, targets, enabled=enabled)
        if entry.health_check == "off":  # nothing would send their events
            return result
        # Checks that stop completing (a missing block, no worker, a paused schedule)
        # announce no down or up: the absence of their successes is noticed instead.
        health_window = missed_health_window(parse_window(entry.health_check),
                                             entry.notify.missed_health_check if entry.notify
                                             else None)
        if health_window is not None:
            result.append(missed_automation(db_id, "health", health_window, targets,
                                            deployment=f"health-check/health-{db_id}",
                                            enabled=enabled))
        if streamed:
            result += wal_automations(db_id, settings, targets, enabled=enabled)
        return result + health_automations(db_id, settings, targets, enabled=enabled)

    specs: list[AutomationSpec] = []
    for db_id, database in config.databases.items():
        notify: DatabaseNotify = database.notify or DatabaseNotify()
        jobs = {"logical": (parse_schedule(database.backup), notify.missed_backup,
                            f"logical-backup/logical-{db_id}")}
        if database.verify is not None:
            jobs["verification"] = (parse_schedule(database.verify), notify.missed_verification,
                                    f"restore-verification/verify-{db_id}")
        specs += entry_specs("databases", db_id, database, jobs)
    for db_id, cluster in config.clusters.items():
        cluster_notify: ClusterNotify = cluster.notify or ClusterNotify()
        jobs = {"full": (parse_schedule(cluster.full), cluster_notify.missed_full,
                         f"full-backup/full-{db_id}")}
        if cluster.incremental:
            jobs["incremental"] = (parse_schedule(cluster.incremental),
                                   cluster_notify.missed_incremental,
                                   f"incremental-backup/incremental-{db_id}")
        specs += entry_specs("clusters", db_id, cluster, jobs)
    if defaults is not None and defaults.blocks():
        targets = targets_of(defaults, "notify.block")
        for name, storage in config.storages.items():
            if storage.maintenance:
                specs += outcome_automations(name, "maintenance", defaults, targets,
                                             what="storage", tag_key="storage")
    return specs


def config_scope(config: Any) -> set[str]:
    """Every id whose notification automations the config manages."""
    return {*config.databases, *config.clusters, *config.storages}


def health_specs(config: Any, server_refs: dict[str, dict[str, Any]], pool: str) -> list[Any]:
    """The ``health-check`` deployment of every database and cluster (``health_check``
    interval, default 1 min; ``"off"``: none): one run at a time, a run due while one runs
    ends Cancelled."""
    from pgbackflow.deployments.apply import DeploymentSpec, ScheduleSpec
    from pgbackflow.flows.health import health_check

    specs = []
    entries: list[tuple[str, Any, dict[str, Any]]] = []
    for db_id, database in config.databases.items():
        # database = "all": the server's maintenance database (the block's) answers.
        name = None if database.database == "all" else database.database or db_id
        entries.append((db_id, database, {"database_name": name, "backup_jobs": ["logical"]}))
    for db_id, cluster in config.clusters.items():
        notify: ClusterNotify = cluster.notify or ClusterNotify()
        jobs = ["full", "incremental"] if cluster.incremental else ["full"]
        extra: dict[str, Any] = {"backup_jobs": jobs}
        if cluster.wal:
            extra.update(slot=cluster.slot, slot_retained_gb=notify.slot_retained_gb,
                         wal_stalled_minutes=notify.wal_stalled_minutes)
        entries.append((db_id, cluster, extra))
    for db_id, entry, extra in entries:
        if entry.health_check == "off":
            continue
        schedule = ScheduleSpec(interval_s=parse_window(entry.health_check).total_seconds())
        specs.append(DeploymentSpec(
            flow=health_check, name=f"health-{db_id}", work_pool=pool,
            parameters={"database": server_refs[entry.server], "db_id": db_id, **extra},
            schedule=schedule, collision="CANCEL_NEW", paused=not entry.enabled,
            tags=(db_tag(db_id), job_tag("health"), f"server:{entry.server}"),
            description=f"Health check of {db_id} ({schedule.describe()}): down after "
                        "3 failed checks, up again, slot and WAL, age of the last backup",
        ))
    return specs
