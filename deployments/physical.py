"""Physical backup and continuous WAL deployments: the schedules live in Prefect.

Per cluster (``db_id``, e.g. ``cluster-7312…``, as in the backups' manifests):

* ``full-backup/full-<db_id>``: the ``full-backup`` flow on a UTC cron schedule
  (default weekly, Sundays 01:00).
* ``incremental-backup/incremental-<db_id>``: the ``incremental-backup`` flow (default hourly
  at minute 30). Incrementals need PostgreSQL 17+ with ``summarize_wal = on``; on older
  servers every run fails with a one-line ConfigError, so deploy those with
  ``incremental=None``. On 17+ a broken chain (no full yet, timeline switch, missing WAL
  summaries) makes the run take a full backup, and its report says why.
* ``wal-stream/wal-stream-<db_id>``: the ``wal-stream`` flow, see below.

All three are tagged ``db:<db_id>``, ``job:<kind>`` and ``pgbackflow`` and run on a process
work pool (created if missing) from the installed package (module entrypoints: a worker needs
``pip install pgbackflow``, no checkout). Their parameters reference saved Prefect blocks
(``{"$ref": {"block_document_id": ...}}``, resolved when a run starts, so editing a block
takes effect at the next run); storages given as URLs are stored inline (they hold no
secrets: credentials come from the worker's environment). Backup deployments run one at a
time (a run due while one runs ends Cancelled: a slow full is not joined by a pile of
waiting ones); the cluster's backup lock serialises fulls and incrementals.

Re-running a deploy function updates the deployments in place (same names) and leaves a
deployment that is already as asked untouched, so nothing is duplicated.
``deploy_physical_backups(..., incremental=None)`` deletes a previously deployed incremental
deployment of the cluster.

Why the WAL streamer restarts without losing WAL
------------------------------------------------
``wal-stream`` is one long-running flow run per cluster; its deployment has no schedule and a
concurrency limit of 1 (a second run started meanwhile ends Cancelled at once). Deploying
starts it. While it runs it emits a ``pgbackflow.wal.alive`` event every minute and with each
shipment (resource ``pgbackflow.wal-stream.<db_id>``). Two automations per cluster start the
deployment again:

* when its run ends Crashed: the flow process was killed, or its worker host was lost (runs
  send flow-run heartbeats every 30 s; the ``pgbackflow: crash unresponsive runs`` automation
  marks a run without heartbeats for 2 minutes Crashed);
* when no alive event came for ``silence_s`` (default 5 minutes): a run that failed (say,
  the database was down longer than its retries), or one that never started.

So a killed streamer is replaced within seconds, a lost host within about 2.5 minutes, and
the UI shows one run per streamer lifetime instead of a Cancelled run every minute.

Nothing is lost meanwhile because the streamer uses a physical replication slot: the
server keeps every WAL segment the streamer has not confirmed (so watch the server's disk
if a streamer stays down for long). ``pg_receivewal`` confirms what it flushed into the
spool folder, and it resumes after the newest segment it finds there. Hence:

* Same worker host: the spool folder (``spool_dir``; default
  ``/var/lib/pgbackflow/wal-spool/<db_id>`` as root, else
  ``~/.local/share/pgbackflow/wal-spool/<db_id>``, or ``$PGBACKFLOW_SPOOL_DIR/<db_id>``)
  must be on the worker's persistent disk, not a tmpfs or a throw-away container layer.
  Segments not yet shipped stay there and go out first on restart; restart is lossless.
* Another worker host (empty spool): on PostgreSQL 15+ ``pg_receivewal`` starts at the
  slot's position (from the start of that segment), so the segment in progress is streamed
  again in full. Segments the old host had flushed but not shipped yet (normally the last
  second or so; more if storage was unreachable) exist only in the old host's spool: ship
  them by running the streamer on that spool again, or take a full backup. On PostgreSQL 14
  ``pg_receivewal`` ignores the slot when its folder is empty and starts at the server's
  current WAL position: a streamer starting on another host leaves a gap that only a new
  full backup closes (``pgbackflow physical-list`` reports WAL gaps). Pin PG 14 streamers
  to one host (a work queue or pool served by that host only).

A second streamer on the same slot (say, the old host comes back during a network split)
cannot take the slot: it fails with a one-line error naming the running one.

Editing a running streamer's deployment does not restart it: cancel its run (the silence
automation starts one with the new parameters within ``silence_s``, or start it from the UI).
``pgbackflow physical-retire`` stops a cluster's streamer for good and drops its slot.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

from pgbackflow.blocks.database import PostgresDatabase
from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.blocks.storage import LocalStorage, S3Storage, storage_block_from_url
from pgbackflow.deployments.apply import (
    DeploymentSpec,
    ScheduleSpec,
    delete_deployment,
    ensure_work_pool,
    write_deployment,
)
from pgbackflow.deployments.automations import (
    DEFAULT_WAL_SILENCE_S,
    apply_automation,
    lost_run_automations,
    wal_restart_automations,
)
from pgbackflow.deployments.block_refs import saved_block
from pgbackflow.deployments.tags import db_tag, job_tag
from pgbackflow.deployments.verification import PRESETS, schedule_cron
from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.wal import DEFAULT_PARTIAL_INTERVAL_S, DEFAULT_SLOT

FULL_FLOW = "full-backup"
INCREMENTAL_FLOW = "incremental-backup"
WAL_FLOW = "wal-stream"
BACKUP_TAG = "physical-backup"
WAL_TAG = "wal-stream"

_DB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SLOT = re.compile(r"^[a-z0-9_]{1,63}$")

BlockRef = dict[str, Any]


def full_deployment_name(db_id: str) -> str:
    """Name of a cluster's full-backup deployment."""
    return f"full-{db_id}"


def incremental_deployment_name(db_id: str) -> str:
    """Name of a cluster's incremental-backup deployment."""
    return f"incremental-{db_id}"


def wal_deployment_name(db_id: str) -> str:
    """Name of a cluster's wal-stream deployment."""
    return f"wal-stream-{db_id}"


def physical_schedule(spec: str, at: str, what: str) -> str:
    """A UTC cron expression from a preset name (at the UTC time ``at``) or a 5-field cron.

    Args:
        spec: hourly, daily, weekly, monthly, or a cron expression such as ``0 1 * * 0``.
        at: HH:MM for presets (hourly uses only the minute).
        what: Which schedule, for error messages ("full", "incremental").
    """
    if spec in PRESETS:
        return schedule_cron(spec, at)
    if len(spec.split()) != 5:
        raise ConfigError(
            f"{what} schedule {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor "
            "a 5-field UTC cron expression such as '0 1 * * 0' (Sundays 01:00)"
        )
    try:
        return schedule_cron(None, cron=spec)
    except ConfigError as exc:
        raise ConfigError(f"{what} schedule: {exc}") from None


def physical_backup_specs(
    parameters: dict[str, Any],
    *,
    db_id: str,
    pool: str,
    full_cron: str,
    incremental_cron: str | None,
    tags: Sequence[str] = (),
) -> list[DeploymentSpec]:
    """The full (and incremental) backup deployments of a cluster, as specs.

    Args:
        parameters: Flow parameters (block references, from :func:`backup_parameters`).
        db_id: The cluster, for deployment names and tags.
        pool: Process work pool of the backup workers.
        full_cron: UTC cron of the fulls.
        incremental_cron: UTC cron of the incrementals, or None for none.
        tags: More tags (e.g. ``server:<name>``).
    """
    from pgbackflow.flows.physical_backup import full_backup, incremental_backup

    specs = [DeploymentSpec(
        flow=full_backup, name=full_deployment_name(db_id), work_pool=pool,
        parameters=parameters, schedule=ScheduleSpec(cron=full_cron), collision="CANCEL_NEW",
        tags=(BACKUP_TAG, db_tag(db_id), job_tag("full"), *tags),
        description=f"Full physical backup of {db_id} (cron '{full_cron}' UTC)",
    )]
    if incremental_cron is not None:
        specs.append(DeploymentSpec(
            flow=incremental_backup, name=incremental_deployment_name(db_id), work_pool=pool,
            parameters=parameters, schedule=ScheduleSpec(cron=incremental_cron),
            collision="CANCEL_NEW",
            tags=(BACKUP_TAG, db_tag(db_id), job_tag("incremental"), *tags),
            description=(f"Incremental physical backup of {db_id} (cron '{incremental_cron}' "
                         "UTC; PostgreSQL 17+, a full when the chain is broken)"),
        ))
    return specs


def wal_stream_spec(
    parameters: dict[str, Any], *, db_id: str, pool: str, slot: str, tags: Sequence[str] = ()
) -> DeploymentSpec:
    """The WAL streamer deployment of a cluster: no schedule, one run at a time."""
    from pgbackflow.flows.wal_stream import wal_stream

    return DeploymentSpec(
        flow=wal_stream, name=wal_deployment_name(db_id), work_pool=pool,
        parameters=parameters, schedule=None, concurrency_limit=1, collision="CANCEL_NEW",
        tags=(WAL_TAG, db_tag(db_id), job_tag("wal"), *tags),
        description=(f"Continuous WAL of {db_id} on slot {slot!r}: one long-running run, "
                     "started again by automations when it crashes or goes silent"),
    )


def deploy_physical_backups(
    database: str | PostgresDatabase,
    storages: Sequence[str | LocalStorage | S3Storage],
    *,
    db_id: str,
    pool: str,
    full: str = "weekly",
    full_at: str = "01:00",
    incremental: str | None = "hourly",
    incremental_at: str = "00:30",
    key_file: str | None = None,
    encryption_key_block: str | None = None,
    lock_timeout_s: float | None = None,
) -> list[UUID]:
    """Create or update a cluster's full and incremental backup deployments.

    Args:
        database: A saved PostgresDatabase block: its name, ``block:<slug>/<name>``, or the
            loaded block (the role needs REPLICATION).
        storages: Where the backups go: ``block:<slug>/<name>`` of saved storage blocks,
            storage URLs (``/path``, ``file://``, ``s3://bucket/prefix``; paths are on the
            worker hosts), or block objects.
        db_id: The cluster, for deployment names and tags (``cluster-<system identifier>``).
        pool: Process work pool the backup workers serve (created if missing).
        full: Preset or UTC cron of the full backups (default weekly).
        full_at: UTC time of day for the full preset (default Sundays 01:00).
        incremental: Preset or UTC cron of the incrementals (PostgreSQL 17+), or None for
            none (an existing incremental deployment of the cluster is deleted).
        incremental_at: UTC time for the incremental preset (hourly: its minute, :30).
        key_file: Master key file path on the worker hosts.
        encryption_key_block: Name of a saved BackupEncryptionKey block (instead).
        lock_timeout_s: How long a backup waits for another one of the cluster (flow default
            when None).

    Returns:
        The deployment ids: full, then incremental when deployed.

    Raises:
        ConfigError: a bad schedule, db_id, block reference or key choice (one line).
    """
    _check_db_id(db_id)
    full_cron = physical_schedule(full, full_at, "full")
    incremental_cron = (
        physical_schedule(incremental, incremental_at, "incremental") if incremental else None
    )
    if lock_timeout_s is not None and lock_timeout_s <= 0:
        raise ConfigError(f"lock timeout {lock_timeout_s} s is invalid: use seconds > 0")
    parameters = backup_parameters(database, storages, key_file, encryption_key_block)
    if lock_timeout_s is not None:
        parameters["lock_timeout_s"] = lock_timeout_s
    ensure_work_pool(pool)
    specs = physical_backup_specs(parameters, db_id=db_id, pool=pool, full_cron=full_cron,
                                  incremental_cron=incremental_cron)
    if incremental_cron is None:
        delete_deployment(f"{INCREMENTAL_FLOW}/{incremental_deployment_name(db_id)}")
    return [write_deployment(spec) for spec in specs]


def wal_stream_parameters(
    base: dict[str, Any], *, slot: str, spool_dir: str | None, partial_interval_s: float
) -> dict[str, Any]:
    """The streamer's flow parameters on top of the block references; validated."""
    if not partial_interval_s > 0:
        raise ConfigError(
            f"partial upload interval {partial_interval_s} s is invalid: use seconds > 0"
        )
    if not _SLOT.match(slot):
        raise ConfigError(
            f"replication slot name {slot!r} is invalid: use lowercase letters, digits and '_'"
            " (at most 63)"
        )
    if spool_dir is not None and not spool_dir.startswith("/"):
        raise ConfigError(
            f"spool folder {spool_dir!r} is not an absolute path: give its path on the worker "
            "hosts' persistent disk"
        )
    parameters = dict(base)
    parameters.update(slot=slot, partial_interval_s=partial_interval_s, max_runtime_s=None)
    if spool_dir is not None:
        parameters["spool_dir"] = spool_dir
    return parameters


def deploy_wal_stream(
    database: str | PostgresDatabase,
    storages: Sequence[str | LocalStorage | S3Storage],
    *,
    db_id: str,
    pool: str,
    silence_s: float = DEFAULT_WAL_SILENCE_S,
    slot: str = DEFAULT_SLOT,
    spool_dir: str | None = None,
    partial_interval_s: float = DEFAULT_PARTIAL_INTERVAL_S,
    key_file: str | None = None,
    encryption_key_block: str | None = None,
    start: bool = True,
) -> UUID:
    """Create or update a cluster's WAL streamer deployment and its restart automations.

    Args:
        database: A saved PostgresDatabase block (name, ``block:<slug>/<name>`` or object).
        storages: Where WAL goes (as for :func:`deploy_physical_backups`).
        db_id: The cluster, for the deployment name and tags.
        pool: Process work pool of the streaming workers (created if missing).
        silence_s: Start the streamer again after this long without an alive event.
        slot: Physical replication slot (created by the flow if missing).
        spool_dir: Absolute path of pg_receivewal's folder on the worker host (persistent
            disk); None for the flow's default.
        partial_interval_s: Seconds between uploads of the segment in progress (the RPO).
        key_file: Master key file path on the worker hosts.
        encryption_key_block: Name of a saved BackupEncryptionKey block (instead).
        start: Start a streamer run now unless one is running or waiting.

    Raises:
        ConfigError: a bad window, slot, spool folder, block reference or key choice.
    """
    _check_db_id(db_id)
    if not silence_s >= 120:
        raise ConfigError(
            f"WAL silence window {silence_s:g} s is invalid: use at least 120 s (the streamer "
            "sends an alive event every 60 s)"
        )
    # The streamer's own settings are checked before any block is looked up.
    streaming = wal_stream_parameters(
        {}, slot=slot, spool_dir=spool_dir, partial_interval_s=partial_interval_s
    )
    parameters = {**backup_parameters(database, storages, key_file, encryption_key_block),
                  **streaming}
    ensure_work_pool(pool)
    deployment_id = write_deployment(wal_stream_spec(parameters, db_id=db_id, pool=pool, slot=slot))
    for automation in [*lost_run_automations(),
                       *wal_restart_automations(db_id, deployment_id, silence_s)]:
        apply_automation(automation)
    if start:
        start_streamer(deployment_id)
    return deployment_id


def start_streamer(deployment_id: UUID) -> UUID | None:
    """Start a run of the WAL deployment unless one is running or waiting; its id if started."""
    with get_client(sync_client=True) as client:
        active = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED]
            ))),
            limit=1,
        )
        if active:
            return None
        return client.create_flow_run_from_deployment(deployment_id).id


# ---------------------------------------------------------------------------------------
# Parameters


def _check_db_id(db_id: str) -> None:
    if not _DB_ID.match(db_id):
        raise ConfigError(
            f"db_id {db_id!r} is invalid: use letters, digits, '.', '_' and '-' "
            "(e.g. cluster-7312345678901234567, see pgbackflow physical-list)"
        )


def backup_parameters(
    database: str | PostgresDatabase,
    storages: Sequence[str | LocalStorage | S3Storage],
    key_file: str | None,
    encryption_key_block: str | None,
) -> dict[str, Any]:
    """Block references (database, storages, key) every backup deployment passes its flow."""
    if key_file and encryption_key_block:
        raise ConfigError("give the master key as a key file or as a key block, not both")
    if not key_file and not encryption_key_block:
        raise ConfigError(
            "scheduled backups need a master key every worker shares: give a key file path "
            "(on the worker hosts) or a BackupEncryptionKey block name"
        )
    if not storages:
        raise ConfigError("no storage given: name at least one storage")
    parameters: dict[str, Any] = {
        "database": _saved_block_ref(PostgresDatabase, database, "database"),
        "storages": [_storage_parameter(s) for s in storages],
    }
    if encryption_key_block:
        parameters["encryption_key"] = _saved_block_ref(
            BackupEncryptionKey, encryption_key_block, "encryption key"
        )
    if key_file:
        if not key_file.startswith("/"):
            raise ConfigError(
                f"key file {key_file!r} is not an absolute path: give its path on the worker hosts"
            )
        parameters["key_file"] = key_file
    return parameters


def _saved_block_ref(kind: type[Block], block: str | Block, what: str) -> BlockRef:
    """``{"$ref": {"block_document_id": ...}}`` of a saved block of type ``kind``."""
    slug = kind.get_block_type_slug()
    if isinstance(block, Block):
        if not isinstance(block, kind):
            raise ConfigError(f"{what}: a {type(block).__name__} block is not a {kind.__name__}")
        if block._block_document_id is None:
            raise ConfigError(
                f"{what}: the {kind.__name__} block is not saved: save it (Block.save) so the "
                "deployment can reference it without copying secrets"
            )
        return {"$ref": {"block_document_id": str(block._block_document_id)}}
    name = block.removeprefix("block:")
    if "/" in name:
        given_slug, _, name = name.partition("/")
        if given_slug != slug:
            raise ConfigError(
                f"{what} block:{given_slug}/{name} is not a {kind.__name__} block: use "
                f"block:{slug}/NAME or just NAME"
            )
    if not name:
        raise ConfigError(f"{what} block name is empty: use block:{slug}/NAME or NAME")
    return {"$ref": {"block_document_id": str(saved_block(slug, name, what).id)}}


def _storage_parameter(storage: str | LocalStorage | S3Storage) -> BlockRef:
    """A saved storage block's reference, or an unsaved storage inline (no secrets)."""
    if isinstance(storage, str):
        if storage.strip().startswith("block:"):
            reference = storage.strip().removeprefix("block:")
            slug, _, name = reference.partition("/")
            kinds: dict[str, type[Block]] = {
                LocalStorage.get_block_type_slug(): LocalStorage,
                S3Storage.get_block_type_slug(): S3Storage,
            }
            if slug not in kinds or not name:
                raise ConfigError(
                    f"storage block:{reference} is not a storage block reference: use "
                    f"block:{LocalStorage.get_block_type_slug()}/NAME or "
                    f"block:{S3Storage.get_block_type_slug()}/NAME"
                )
            return _saved_block_ref(kinds[slug], name, "storage")
        storage = storage_block_from_url(storage)
    if storage._block_document_id is not None:
        return _saved_block_ref(type(storage), storage, "storage")
    if isinstance(storage, S3Storage) and storage.secret_access_key is not None:
        raise ConfigError(
            f"storage s3://{storage.bucket}/{storage.prefix} holds a secret key: save it as an "
            "S3Storage block and reference it (block:pgbackflow-s3-storage/NAME)"
        )
    inline: dict[str, Any] = storage.model_dump(mode="json", exclude_none=True)
    return inline


# ---------------------------------------------------------------------------------------
# Retirement


@dataclass(frozen=True)
class Retirement:
    """What retiring a cluster stops and drops.

    Attributes:
        db_id: The cluster.
        deployments: Full names and ids of its deployments (full, incremental, WAL).
        database: The server the WAL streamer connects to (from its deployment), if any.
        slot: The streamer's replication slot, if a streamer is deployed.
    """

    db_id: str
    deployments: tuple[tuple[str, UUID], ...]
    database: PostgresDatabase | None
    slot: str | None

    def describe(self) -> str:
        """What will happen, for the confirmation prompt."""
        lines = [f"retiring cluster {self.db_id}:"]
        lines += [f"  pause deployment {name} and cancel its waiting or running runs"
                  for name, _ in self.deployments]
        lines.append(f"  pause the automations of {self.db_id}")
        if self.database is not None and self.slot is not None:
            lines.append(f"  drop replication slot {self.slot!r} on "
                         f"{self.database.host}:{self.database.port} (its WAL is released)")
        lines.append("  stored backups and WAL are kept")
        return "\n".join(lines)


def retirement_plan(db_id: str) -> Retirement:
    """Read what a cluster's deployments are (nothing changes yet).

    Raises:
        ConfigError: no deployment of this cluster exists.
    """
    from prefect.client.schemas.filters import DeploymentFilterTags

    _check_db_id(db_id)
    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[db_tag(db_id)]))
        )
        deployments = []
        database: PostgresDatabase | None = None
        slot: str | None = None
        for deployment in found:
            flow_name = client.read_flow(deployment.flow_id).name
            if flow_name not in (FULL_FLOW, INCREMENTAL_FLOW, WAL_FLOW):
                continue
            deployments.append((f"{flow_name}/{deployment.name}", deployment.id))
            if flow_name == WAL_FLOW:
                slot = str(deployment.parameters.get("slot", DEFAULT_SLOT))
                reference = deployment.parameters.get("database", {}).get("$ref", {})
                document = client.read_block_document(
                    UUID(str(reference.get("block_document_id"))), include_secrets=True
                )
                block = Block._from_block_document(document)
                assert isinstance(block, PostgresDatabase)
                database = block
    if not deployments:
        raise ConfigError(
            f"cluster {db_id} has no physical deployments: nothing to retire (see the "
            "deployments tagged db:<id> in the Prefect UI)"
        )
    return Retirement(db_id, tuple(sorted(deployments)), database, slot)


def retire_cluster(plan: Retirement, *, slot_wait_s: float = 60.0) -> list[str]:
    """Pause the cluster's deployments and automations, stop its runs, drop its slot.

    Returns:
        One line per thing done.
    """
    import time

    from prefect.states import Cancelled, Cancelling

    from pgbackflow.deployments.automations import disable_automations_of
    from pgbackflow.tasks.database import connect

    done = []
    with get_client(sync_client=True) as client:
        for name, deployment_id in plan.deployments:
            client.pause_deployment(deployment_id)
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[
                        StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED,
                        StateType.PAUSED,
                    ])
                )),
            )
            for run in runs:
                running = run.state is not None and run.state.type == StateType.RUNNING
                # A running flow is stopped by its worker (Cancelling); others just end.
                client.set_flow_run_state(
                    run.id, Cancelling(message="cluster retired") if running
                    else Cancelled(message="cluster retired"), force=True,
                )
            done.append(f"paused {name}" + (f", cancelled {len(runs)} runs" if runs else ""))
    done += [f"paused automation {n}" for n in disable_automations_of(plan.db_id)]
    if plan.database is None or plan.slot is None:
        return done
    deadline = time.monotonic() + slot_wait_s
    with plan.database.connection_settings() as settings, connect(settings) as conn:
        while True:
            row = conn.execute(
                "SELECT active_pid, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)"
                " FROM pg_replication_slots WHERE slot_name = %s", (plan.slot,),
            ).fetchone()
            if row is None:
                done.append(f"replication slot {plan.slot!r} does not exist (already dropped)")
                return done
            active_pid, retained = row
            if active_pid is None:
                break
            if time.monotonic() > deadline:
                # The streamer did not stop (its worker is gone or hung): end its session.
                conn.execute("SELECT pg_terminate_backend(%s)", (active_pid,))
                done.append(f"ended the streaming session (pid {active_pid}) still on the slot")
            time.sleep(1)
        conn.execute("SELECT pg_drop_replication_slot(%s)", (plan.slot,))
    done.append(f"dropped replication slot {plan.slot!r} on {settings.display}; "
                f"{float(retained or 0) / 1e6:.1f} MB of WAL it held are released")
    return done
