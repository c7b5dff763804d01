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

All three are tagged ``db:<db_id>`` (plus ``physical-backup`` or ``wal-stream``) and run on
a process work pool (created if missing) from this repository's folder, which must exist at
the same path on the worker hosts. Their parameters reference saved Prefect blocks
(``{"$ref": {"block_document_id": ...}}``, resolved when a run starts, so editing a block
takes effect at the next run); storages given as URLs are stored inline (they hold no
secrets: credentials come from the worker's environment). Each deployment has a concurrency
limit of 1 that cancels new runs while one runs: a slow backup that waits for the cluster's
backup lock is not joined by a pile of further waiting ones.

Re-running a deploy function updates the deployments in place (same names); Prefect then
replaces their schedules and deletes their future scheduled runs, so nothing is duplicated.
``deploy_physical_backups(..., incremental=None)`` deletes a previously deployed incremental
deployment of the cluster.

Why the WAL streamer restarts without losing WAL
------------------------------------------------
``wal-stream`` runs until cancelled. Its deployment has an interval schedule (default every
60 s) and a concurrency limit of 1 with collision strategy CANCEL_NEW: while a streamer runs,
each new scheduled run is cancelled at once (visible as Cancelled runs in the UI); once it is
gone, the next tick starts a new one. So exactly one streamer runs, and one that crashed is
replaced within an interval:

* the flow process dies or fails (server restart, retries exhausted): its run ends Crashed
  or Failed, which frees the slot at once;
* the worker host dies: the run's concurrency lease is no longer renewed and the server
  revokes it when it expires (5 minutes in Prefect 3.8); the run itself stays "Running" in
  the UI until marked otherwise.

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

Editing a running streamer's deployment does not restart it: cancel its run and the next
tick starts one with the new parameters.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from contextlib import redirect_stdout
from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect import Flow
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron, Interval, Schedule

from pgbackflow.blocks.database import PostgresDatabase
from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.blocks.storage import LocalStorage, S3Storage, storage_block_from_url
from pgbackflow.deployments.verification import (
    PRESETS,
    REPO_ROOT,
    db_tag,
    ensure_work_pool,
    schedule_cron,
)
from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.wal import DEFAULT_PARTIAL_INTERVAL_S, DEFAULT_SLOT

FULL_FLOW = "full-backup"
INCREMENTAL_FLOW = "incremental-backup"
WAL_FLOW = "wal-stream"
FULL_ENTRYPOINT = "pgbackflow.flows.physical:full_backup"
INCREMENTAL_ENTRYPOINT = "pgbackflow.flows.physical:incremental_backup"
WAL_ENTRYPOINT = "pgbackflow.flows.physical:wal_stream"
BACKUP_TAG = "physical-backup"
WAL_TAG = "wal-stream"
DEFAULT_WAL_INTERVAL_S = 60.0

_DB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SLOT = re.compile(r"^[a-z0-9_]{1,63}$")
_ONE_AT_A_TIME = ConcurrencyLimitConfig(
    limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
)

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
    from pgbackflow.flows.physical import full_backup, incremental_backup

    _check_db_id(db_id)
    full_cron = physical_schedule(full, full_at, "full")
    incremental_cron = (
        physical_schedule(incremental, incremental_at, "incremental") if incremental else None
    )
    if lock_timeout_s is not None and lock_timeout_s <= 0:
        raise ConfigError(f"lock timeout {lock_timeout_s} s is invalid: use seconds > 0")
    parameters = _common_parameters(database, storages, key_file, encryption_key_block)
    if lock_timeout_s is not None:
        parameters["lock_timeout_s"] = lock_timeout_s
    ensure_work_pool(pool)
    ids = [_deploy(
        full_backup, FULL_ENTRYPOINT, full_deployment_name(db_id), pool, parameters,
        schedule=Cron(full_cron, timezone="UTC"), tags=[BACKUP_TAG, db_tag(db_id)],
        description=f"Full physical backup of {db_id} (cron '{full_cron}' UTC)",
    )]
    if incremental_cron is None:
        _delete_deployment(INCREMENTAL_FLOW, incremental_deployment_name(db_id))
    else:
        ids.append(_deploy(
            incremental_backup, INCREMENTAL_ENTRYPOINT, incremental_deployment_name(db_id), pool,
            parameters, schedule=Cron(incremental_cron, timezone="UTC"),
            tags=[BACKUP_TAG, db_tag(db_id)],
            description=(f"Incremental physical backup of {db_id} (cron '{incremental_cron}' "
                         "UTC; PostgreSQL 17+, a full when the chain is broken)"),
        ))
    return ids


def deploy_wal_stream(
    database: str | PostgresDatabase,
    storages: Sequence[str | LocalStorage | S3Storage],
    *,
    db_id: str,
    pool: str,
    interval_s: float = DEFAULT_WAL_INTERVAL_S,
    slot: str = DEFAULT_SLOT,
    spool_dir: str | None = None,
    partial_interval_s: float = DEFAULT_PARTIAL_INTERVAL_S,
    key_file: str | None = None,
    encryption_key_block: str | None = None,
) -> UUID:
    """Create or update a cluster's WAL streamer deployment: one runs, a dead one is replaced.

    Args:
        database: A saved PostgresDatabase block (name, ``block:<slug>/<name>`` or object).
        storages: Where WAL goes (as for :func:`deploy_physical_backups`).
        db_id: The cluster, for the deployment name and tags.
        pool: Process work pool of the streaming workers (created if missing).
        interval_s: Seconds between ticks that start a streamer if none runs.
        slot: Physical replication slot (created by the flow if missing).
        spool_dir: Absolute path of pg_receivewal's folder on the worker host (persistent
            disk); None for the flow's default.
        partial_interval_s: Seconds between uploads of the segment in progress (the RPO).
        key_file: Master key file path on the worker hosts.
        encryption_key_block: Name of a saved BackupEncryptionKey block (instead).

    Raises:
        ConfigError: a bad interval, slot, spool folder, block reference or key choice.
    """
    from pgbackflow.flows.physical import wal_stream

    _check_db_id(db_id)
    if not interval_s > 0:
        raise ConfigError(f"WAL stream interval {interval_s} s is invalid: use seconds > 0")
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
    parameters = _common_parameters(database, storages, key_file, encryption_key_block)
    parameters.update(slot=slot, partial_interval_s=partial_interval_s, max_runtime_s=None)
    if spool_dir is not None:
        parameters["spool_dir"] = spool_dir
    ensure_work_pool(pool)
    return _deploy(
        wal_stream, WAL_ENTRYPOINT, wal_deployment_name(db_id), pool, parameters,
        schedule=Interval(timedelta(seconds=interval_s), timezone="UTC"),
        tags=[WAL_TAG, db_tag(db_id)],
        description=(f"Continuous WAL of {db_id} on slot {slot!r}: started every "
                     f"{interval_s:g} s unless one runs"),
    )


# ---------------------------------------------------------------------------------------
# Parameters


def _check_db_id(db_id: str) -> None:
    if not _DB_ID.match(db_id):
        raise ConfigError(
            f"db_id {db_id!r} is invalid: use letters, digits, '.', '_' and '-' "
            "(e.g. cluster-7312345678901234567, see pgbackflow physical-list)"
        )


def _common_parameters(
    database: str | PostgresDatabase,
    storages: Sequence[str | LocalStorage | S3Storage],
    key_file: str | None,
    encryption_key_block: str | None,
) -> dict[str, Any]:
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
    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(
                name, block_type_slug=slug, include_secrets=False
            )
        except ObjectNotFound:
            raise ConfigError(
                f"{what} block {slug}/{name} does not exist: create it in the Prefect UI or "
                "with Block.save()"
            ) from None
    return {"$ref": {"block_document_id": str(document.id)}}


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
# Deployments


def _deploy(
    flow: Flow[..., Any],
    entrypoint: str,
    name: str,
    pool: str,
    parameters: dict[str, Any],
    *,
    schedule: Schedule,
    tags: list[str],
    description: str,
) -> UUID:
    source = flow.from_source(source=str(REPO_ROOT), entrypoint=entrypoint)
    # Prefect prints a table of what it deployed on stdout; callers print their own summary.
    with redirect_stdout(io.StringIO()):
        deployment_id = source.deploy(  # type: ignore[union-attr]  # sync in a sync context
            name=name,
            work_pool_name=pool,
            parameters=parameters,
            schedules=[schedule],
            concurrency_limit=_ONE_AT_A_TIME,
            tags=tags,
            description=description,
            print_next_steps=False,
            ignore_warnings=True,  # the "process pools need a worker" hint: intended here
        )
    return UUID(str(deployment_id))


def _delete_deployment(flow_name: str, name: str) -> bool:
    """Delete a deployment if it exists; returns whether it did."""
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(f"{flow_name}/{name}")
        except ObjectNotFound:
            return False
        client.delete_deployment(deployment.id)
    return True
