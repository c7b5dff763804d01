"""What a finished job tells Prefect's automations: one ``pgbackflow.run.succeeded`` event.

Failures need nothing from the run: Prefect itself emits ``prefect.flow-run.Failed`` and
``…Crashed`` (also for a killed process), and the notification automations read the run's
state message and duration from the API. A success carries what only the run knows — the
backup id and the size — so every pgbackflow flow has :func:`announce_success` as its
``on_completion`` hook. It sends at once, asking the API nothing: the message's duration is
the run's own ``total_run_time``, which the automation reads when it renders (an API request
here would delay every success notification by its latency). The event relates the run, its
flow, deployment and tags (Prefect adds them from the run context), which is what the
automations match (``db:<id>``, ``job:<kind>``); the missed-backup automations wait for the
same event.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import Flow
from prefect.client.schemas.objects import FlowRun, State

from pgbackflow.tasks.units import human_size

#: The event every successful pgbackflow run emits when it ends Completed.
SUCCEEDED_EVENT = "pgbackflow.run.succeeded"

logger = logging.getLogger("pgbackflow.flows")


def outcome_facts(result: Any) -> dict[str, Any]:
    """Backup id, size and a one-line summary of a flow's return value (any pgbackflow report)."""
    if isinstance(result, list):  # backup-databases: one report per database
        sizes = [_size_of(item) for item in result]
        return {
            "backup_id": ", ".join(str(getattr(item, "backup_id", "")) for item in result) or "-",
            "size_bytes": sum(s for s in sizes if s is not None),
            "summary": f"{len(result)} databases backed up",
        }
    if isinstance(result, dict) and "db_id" in result and "state" in result:  # health check
        return {"backup_id": "-", "size_bytes": None,
                "summary": f"{result['db_id']} is {result['state']}"}
    if isinstance(result, dict):  # maintenance: deleted_backups lists "db_id/backup_id"
        if result.get("dry_run"):
            planned = result.get("planned_bytes_freed")
            return {"backup_id": "-", "size_bytes": planned,
                    "summary": f"dry run: {human_size(planned)} would be freed"}
        freed = result.get("bytes_freed")
        return {"backup_id": "-", "size_bytes": freed,
                "summary": f"{len(result.get('deleted_backups') or [])} backups expired, "
                           f"{human_size(freed)} freed"}
    summary = getattr(result, "summary_line", None)
    return {
        "backup_id": str(getattr(result, "backup_id", None) or "-"),
        "size_bytes": _size_of(result),
        "summary": summary() if callable(summary) else "",
    }


def _size_of(result: Any) -> int | None:
    sizes = getattr(result, "sizes", None)
    if sizes is not None and hasattr(sizes, "stored"):
        return int(sizes.stored)  # logical backup: bytes stored per storage
    for name in ("stored_size", "source_size"):
        value = getattr(result, name, None)
        if isinstance(value, int):
            return value
    return None


def announce_success(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:
    """``on_completion`` hook: emit :data:`SUCCEEDED_EVENT` with the job's facts.

    Never fails the run: a notification is not worth a backup.
    """
    from prefect.events import emit_event

    try:
        facts = outcome_facts(state.result(raise_on_failure=False))
        emit_event(
            event=SUCCEEDED_EVENT,
            resource={"prefect.resource.id": f"pgbackflow.run.{flow_run.id}",
                      "prefect.resource.name": flow_run.name or str(flow_run.id),
                      "pgbackflow.flow": flow.name},
            payload={**facts, "size": human_size(facts["size_bytes"])},
        )
    except Exception as exc:
        logger.warning("success event of %s not sent: %s", flow_run.name, exc)
