"""Verification deployments, triggers and notifications.

* A deployment per database runs the ``restore-verification`` flow on a work pool served by
  verification agents, on a UTC cron schedule (presets or custom) and/or on demand.
* After a successful backup, a verification of exactly that backup is queued; still-pending
  (scheduled, not running) verifications of the same database are cancelled first, so only
  the newest waits. Running ones finish.
* Success and failure notifications are Prefect automations with a webhook notification
  block, toggled separately per database (failure on by default).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect.automations import Automation, EventTrigger, Posture
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.events.actions import SendNotification
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled

from pgbackflow.tasks.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
FLOW_NAME = "restore-verification"
ENTRYPOINT = "pgbackflow.flows.verification:restore_verification"

PRESETS = {"hourly", "daily", "weekly", "monthly"}
_CRON_FIELD = re.compile(r"^[\d*/,\-]+$")


def db_tag(db_id: str) -> str:
    """The tag that marks a run as belonging to one database."""
    return f"db:{db_id}"


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
        return cron
    if preset not in PRESETS:
        raise ConfigError(f"schedule preset {preset!r} is unknown: use {', '.join(sorted(PRESETS))}"
                          " or --cron")
    match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", at)
    if not match:
        raise ConfigError(f"--at {at!r} is not a UTC time of day: use HH:MM")
    hour, minute = int(match.group(1)), int(match.group(2))
    return {
        "hourly": f"{minute} * * * *",
        "daily": f"{minute} {hour} * * *",
        "weekly": f"{minute} {hour} * * 0",
        "monthly": f"{minute} {hour} 1 * *",
    }[preset]


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
    from pgbackflow.flows.verification import restore_verification

    parameters: dict[str, Any] = {
        "storage": storage, "db_id": db_id, "sandbox": sandbox, "image_template": image_template,
    }
    if key_file:
        parameters["key_file"] = key_file
    if encryption_key_block:
        parameters["encryption_key_block"] = encryption_key_block
    ensure_work_pool(pool)
    source = restore_verification.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    deployment_id = source.deploy(  # type: ignore[union-attr]  # sync in a sync context
        name=deployment_name(db_id),
        work_pool_name=pool,
        parameters=parameters,
        cron=cron,
        tags=["verification", db_tag(db_id)],
        description=f"Restore verification of {db_id}",
        print_next_steps=False,
    )
    return UUID(str(deployment_id))


def ensure_work_pool(pool: str) -> None:
    """Create the agents' (process) work pool unless it exists."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))


def cancel_pending_verifications(db_id: str) -> list[UUID]:
    """Cancel this database's verifications that wait (scheduled or pending), not running ones."""
    cancelled = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=["verification", db_tag(db_id)]),
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
                run.id, Cancelled(message="a fresher backup of this database is waiting"),
                force=True,
            )
            cancelled.append(run.id)
    return cancelled


def queue_verification(db_id: str, backup_id: str) -> UUID:
    """After a backup: cancel older waiting verifications, then queue one of ``backup_id``."""
    cancel_pending_verifications(db_id)
    run = run_deployment(
        f"{FLOW_NAME}/{deployment_name(db_id)}",
        parameters={"backup_id": backup_id},
        timeout=0,
        tags=["verification", db_tag(db_id), "after-backup"],
    )
    return run.id  # type: ignore[union-attr]  # sync in a sync context


def configure_notifications(
    db_id: str, webhook_block: str, *, on_failure: bool = True, on_success: bool = False
) -> list[UUID]:
    """(Re)create this database's verification notification automations.

    Args:
        db_id: The database.
        webhook_block: Name of a saved CustomWebhookNotificationBlock.
        on_failure: Notify when a verification fails (default on).
        on_success: Notify when a verification succeeds.
    """
    block = cast(CustomWebhookNotificationBlock, CustomWebhookNotificationBlock.load(webhook_block))
    # Prefect has no public accessor for a loaded block's document id.
    block_id = block._block_document_id
    if block_id is None:
        raise ConfigError(f"notification block {webhook_block!r} is not saved")
    wanted = {"Failed": on_failure, "Completed": on_success}
    created = []
    for state, enabled in wanted.items():
        name = f"pgbackflow verification {state.lower()}: {db_id}"
        _delete_automations(name)
        if not enabled:
            continue
        automation = cast(Automation, Automation(
            name=name,
            description=f"Notify when a restore verification of {db_id} ends {state}",
            trigger=EventTrigger(
                expect={f"prefect.flow-run.{state}"},
                match_related={"prefect.resource.id": f"prefect.tag.{db_tag(db_id)}"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=[SendNotification(
                block_document_id=block_id,
                subject=f"pgbackflow: verification of {db_id} {state.lower()}",
                body=(f"Restore verification of {db_id}: {{{{ flow_run.name }}}} ended "
                      f"{state}. {{{{ flow_run.state.message }}}}"),
            )],
        ).create())
        assert automation.id is not None
        created.append(automation.id)
    return created


def _delete_automations(name: str) -> None:
    with get_client(sync_client=True) as client:
        for automation in client.read_automations_by_name(name):
            client.delete_automation(automation.id)
