"""Logical backups of every database of a server: the runbook, as a Prefect flow.

1. Discover the databases: every non-template database the role may connect to, minus the
   exclude patterns. Done at each run, so a database created later is backed up without
   redeploying.
2. Back up each one as its own ``logical-backup`` run (its own backup id, manifest, tags
   ``db:<id>``), one after the other; the per-database and per-server concurrency limits hold
   across every worker.
3. Fail, naming each database that failed, if any did; the others are kept.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Sequence
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger

from pgbackflow.blocks.database import PostgresDatabase, checked_db_id
from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.flows.common import RETRY_DELAYS, StorageBlock, retry_if_transient, tag_run
from pgbackflow.flows.logical_backup import logical_backup
from pgbackflow.flows.outcome import announce_success
from pgbackflow.tasks.database import ConnectionSettings, connect
from pgbackflow.tasks.errors import PgBackflowError
from pgbackflow.tasks.reports import BackupReport


def failure_reason(state: State[Any]) -> str:
    """One line for a failed subflow: our error's own message, else Prefect's state message."""
    try:
        outcome = state.result(raise_on_failure=False)
    except Exception as exc:  # the result may be unavailable (a crash): the message says why
        outcome = exc
    if isinstance(outcome, PgBackflowError):
        text = str(outcome)
    else:
        text = state.message or state.name or "failed"
    return (text.strip().splitlines() or ["failed"])[0]


class DatabasesFailedError(PgBackflowError):
    """Some databases of a server-wide backup failed (the others were backed up)."""


def database_id(prefix: str, name: str) -> str:
    """The id of one discovered database: ``<prefix>-<name>``, made path- and tag-safe.

    A name that had to be changed (characters outside ``[A-Za-z0-9._-]``, over-long) gets
    8 hex digits of its hash, so two names never share an id.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:60]
    if safe != name or not safe:
        safe = f"{safe or 'db'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return checked_db_id(f"{prefix}-{safe}")


def select_databases(names: Sequence[str], exclude: Sequence[str]) -> list[str]:
    """``names`` minus those matching any shell-style exclude pattern, sorted."""
    return sorted(n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude))


@task(name="discover-databases", retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_if_transient, cache_policy=NONE)
def discover_databases(settings: ConnectionSettings, exclude: list[str]) -> list[str]:
    """Non-template databases that allow connections and that the role may connect to."""
    with connect(settings) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE NOT datistemplate AND datallowconn"
            " AND has_database_privilege(datname, 'CONNECT')"
        ).fetchall()
    chosen = select_databases([str(r[0]) for r in rows], exclude)
    get_run_logger().info("databases to back up on %s: %s", settings.display,
                          ", ".join(chosen) or "none")
    return chosen


@flow(name="backup-databases", log_prints=False, on_completion=[announce_success])
def backup_databases(
    server: PostgresDatabase,
    storages: list[StorageBlock],
    id_prefix: str,
    exclude: list[str] | None = None,
    encryption_key: BackupEncryptionKey | None = None,
    key_file: str | None = None,
    verify_after_backup: bool = False,
) -> list[BackupReport]:
    """Back up every database of a server, each as its own logical backup.

    Args:
        server: The server (its block's database is where discovery connects).
        storages: Where the backups go.
        id_prefix: Ids of the databases are ``<id_prefix>-<name>``.
        exclude: Shell-style patterns of database names to skip (``tmp_*``).
        encryption_key: Master key block; else ``key_file``; else the default key file.
        key_file: Path of a master key file.
        verify_after_backup: Queue a verification of each backup.

    Raises:
        DatabasesFailedError: naming each database whose backup failed.
    """
    checked_db_id(id_prefix, "id prefix")
    tag_run("logical", id_prefix)
    with server.connection_settings() as settings:  # through its SSH tunnel, if any
        names = discover_databases(settings, list(exclude or []))
    reports: list[BackupReport] = []
    failures: list[str] = []
    for name in names:
        state: State[BackupReport] = logical_backup.with_options(
            flow_run_name=f"backup-{name}"
        )(
            database=server, storages=storages, encryption_key=encryption_key,
            key_file=key_file, verify_after_backup=verify_after_backup, database_name=name,
            db_id=database_id(id_prefix, name), return_state=True,
        )
        if state.is_completed():
            reports.append(state.result())
        else:
            failures.append(f"{name} ({failure_reason(state)})")
    if failures:
        raise DatabasesFailedError(
            f"backups of {len(failures)} of {len(names)} databases on {server.host}:"
            f"{server.port} failed: {'; '.join(failures)}; the other backups are complete"
        )
    return reports
