"""Verification deployments, triggers and notifications.

* A deployment per database runs the ``restore-verification`` flow on a work pool served by
  verification agents, on a UTC cron schedule (presets or custom) and/or on demand.
* After a successful backup, a verification of exactly that backup is queued; verifications
  queued for an older backup of the same database that still wait (not running) are
  cancelled first, so only the newest waits. Running ones finish, and the deployment's own
  scheduled runs (which verify the newest backup when they start) are never touched.
* Success and failure notifications are the deploy config's ``[notify]``
  (:mod:`.notifications`), as for every other job.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments import run_deployment
from prefect.states import Cancelled
from pydantic import ValidationError

from pgbackflow.deployments.apply import DeploymentSpec, ScheduleSpec, ensure_work_pool
from pgbackflow.deployments.tags import db_tag, job_tag
from pgbackflow.tasks.errors import ConfigError

FLOW_NAME = "restore-verification"
#: Tag of verification runs queued for one backup (by a backup's --verify-after).
AFTER_BACKUP_TAG = "after-backup"

PRESETS = {"hourly", "daily", "weekly", "monthly"}
_CRON_FIELD = re.compile(r"^[\d*/,\-]+$")


def deployment_name(db_id: str) -> str:
    """Name of a database's verification deployment."""
    return f"verify-{db_id}"


def schedule_cron(preset: str | None, at: str = "03:00", cron: str | None = None) -> str:
    """A UTC cron expression from a preset (with a time of day) or a custom expression.

    Presets: hourly (at minute MM of ``at``), daily, weekly (Sundays), monthly (the 1st).
    """
    if cron:
        fields = cron.split()
        if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
            raise ConfigError(
                f"cron {cron!r} is not a 5-field cron expression: e.g. '0 4 * * 0' "
                "(Sundays 04:00 UTC)"
            )
        try:  # values out of range ("61 25 * * *"), steps of 0: what the API would refuse
            CronSchedule(cron=cron, timezone="UTC")
        except ValidationError:
            raise ConfigError(
                f"cron {cron!r} has a value out of range: minute 0-59, hour 0-23, day 1-31, "
                "month 1-12, weekday 0-6; e.g. '0 4 * * 0' (Sundays 04:00 UTC)"
            ) from None
        _check_fires(cron)
        return cron
    if preset not in PRESETS:
        raise ConfigError(f"schedule preset {preset!r} is unknown: use {', '.join(sorted(PRESETS))}"
                          " or --cron")
    match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", at)
    if not match:
        raise ConfigError(f"time {at!r} is not a UTC time of day: use HH:MM, e.g. 03:30")
    hour, minute = int(match.group(1)), int(match.group(2))
    return {
        "hourly": f"{minute} * * * *",
        "daily": f"{minute} {hour} * * *",
        "weekly": f"{minute} {hour} * * 0",
        "monthly": f"{minute} {hour} 1 * *",
    }[preset]


def cron_runs(cron: str, start: datetime) -> Iterator[datetime]:
    """The times a UTC ``cron`` fires after ``start``, as Prefect's scheduler computes them
    (its own croniter, ``day_or`` as CronSchedule sets it). Empty when it never fires.

    Its croniter is a private module of Prefect (pinned below 3.9 in pyproject): another
    cron library disagrees with it on ranges that wrap (``6-0``, ``11-2``) and on a day
    and weekday together, and it is what decides whether a schedule makes runs.
    """
    from prefect._vendor.croniter.croniter import CroniterBadDateError, croniter

    runs = croniter(cron, start, day_or=True)  # type: ignore[no-untyped-call]
    while True:
        try:
            yield runs.get_next(datetime)  # type: ignore[no-untyped-call]
        except CroniterBadDateError:
            return


def _check_fires(cron: str) -> None:
    """Refuse a cron whose days never come (``0 0 30 2 *``, ``0 0 31 4,6 *``): Prefect
    accepts it, and its schedule then never makes a run. 29 February is accepted (leap
    years)."""
    if next(cron_runs(cron, datetime(2026, 1, 1, tzinfo=UTC)), None) is None:
        raise ConfigError(
            f"cron {cron!r} never fires: no month it names has the day it names (e.g. "
            "February has no 30th); use a day every month has, or a weekday"
        )


def verification_parameters(
    db_id: str,
    storage: str | dict[str, Any],
    *,
    sandbox: str = "docker",
    image_template: str = "postgres:{major}",
    key_file: str | None = None,
    encryption_key_block: str | None = None,
) -> dict[str, Any]:
    """The verification flow's parameters (a storage URL, block reference or inline block)."""
    if sandbox not in ("docker", "local"):
        raise ConfigError(f"verification sandbox {sandbox!r} is unknown: use docker or local")
    parameters: dict[str, Any] = {
        "storage": storage, "db_id": db_id, "sandbox": sandbox, "image_template": image_template,
    }
    if key_file:
        parameters["key_file"] = key_file
    if encryption_key_block:
        parameters["encryption_key_block"] = encryption_key_block
    return parameters


def verification_spec(
    db_id: str,
    parameters: dict[str, Any],
    pool: str,
    *,
    cron: str | None,
    tags: tuple[str, ...] = (),
) -> DeploymentSpec:
    """The verification deployment of one database, as a spec."""
    from pgbackflow.flows.verification import restore_verification

    return DeploymentSpec(
        flow=restore_verification, name=deployment_name(db_id), work_pool=pool,
        parameters=parameters, schedule=ScheduleSpec(cron=cron) if cron else None,
        tags=("verification", db_tag(db_id), job_tag("verification"), *tags),
        description=f"Restore verification of {db_id}", concurrency_limit=None,
    )


def deploy_verification(
    db_id: str,
    storage: str,
    pool: str,
    *,
    cron: str | None = None,
    sandbox: str = "docker",
    image_template: str = "postgres:{major}",
    key_file: str | None = None,
    encryption_key_block: str | None = None,
) -> UUID:
    """Create or update the verification deployment of one database.

    Args:
        db_id: The database (as in the backups' manifests).
        storage: Where its backups are: a URL or ``block:slug/name`` (resolved by the agent).
        pool: Work pool the verification agents serve.
        cron: UTC schedule, or None for on-demand and after-backup runs only.
        sandbox: "docker" or "local".
        image_template: Docker image template.
        key_file: Master key file path on the agent hosts.
        encryption_key_block: Name of a BackupEncryptionKey block (instead of a key file).
    """
    from pgbackflow.deployments.apply import write_deployment

    parameters = verification_parameters(
        db_id, storage, sandbox=sandbox, image_template=image_template, key_file=key_file,
        encryption_key_block=encryption_key_block,
    )
    ensure_work_pool(pool)
    return write_deployment(verification_spec(db_id, parameters, pool, cron=cron))


def cancel_pending_verifications(db_id: str) -> list[UUID]:
    """Cancel this database's after-backup verifications that still wait (not running ones).

    Only runs queued for one (older) backup: the deployment's scheduled runs verify the
    newest backup when they start, so they stay.
    """
    cancelled = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[AFTER_BACKUP_TAG, db_tag(db_id)]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.SCHEDULED, StateType.PENDING]
                )),
            ),
            deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[deployment_name(db_id)])
            ),
        )
        for run in runs:
            client.set_flow_run_state(
                run.id,
                Cancelled(message="a fresher backup of this database is waiting to be verified"),
                force=True,
            )
            cancelled.append(run.id)
    return cancelled


def deployment_storage(db_id: str) -> str | None:
    """Where the verification deployment of ``db_id`` reads backups: its storage's location,
    when the deployment names it by URL or block reference (None for an inline block).

    Raises:
        ObjectNotFound: There is no such deployment.
    """
    from pgbackflow.blocks.storage import storage_block_from_url

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{deployment_name(db_id)}")
    storage = (deployment.parameters or {}).get("storage")
    return storage_block_from_url(storage).open().location if isinstance(storage, str) \
        else None


def queue_verification(db_id: str, backup_id: str,
                       stored_in: Sequence[str] | None = None) -> UUID:
    """After a backup: cancel older waiting verifications, then queue one of ``backup_id``.

    Args:
        db_id: The database.
        backup_id: The backup to verify.
        stored_in: The storages (locations) the backup is in: the deployment must read one
            of them, or its run would fail to find the backup.

    Raises:
        ObjectNotFound: There is no verification deployment of ``db_id``.
        ConfigError: The deployment reads a storage the backup is not in.
    """
    if stored_in is not None:
        reads = deployment_storage(db_id)
        if reads is not None and reads not in stored_in:
            raise ConfigError(
                f"verification deployment {deployment_name(db_id)} reads {reads}, where "
                f"backup {backup_id} was not stored ({', '.join(stored_in)}): back up to "
                "that storage too, or point the deployment at this one with "
                "pgbackflow schedule-verification --from"
            )
    cancel_pending_verifications(db_id)
    run = run_deployment(
        f"{FLOW_NAME}/{deployment_name(db_id)}",
        parameters={"backup_id": backup_id},
        timeout=0,
        tags=["verification", db_tag(db_id), job_tag("verification"), AFTER_BACKUP_TAG],
    )
    return run.id  # type: ignore[union-attr]  # sync in a sync context
