"""``retention``: expire backups by policy, then sweep orphans."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pgbackflow.cli import render
from pgbackflow.cli.common import open_storage, user_errors_without_flows


@user_errors_without_flows
def retention_command(
    source: Annotated[str, typer.Option("--from", help="Storage to expire backups in.")],
    db_id: Annotated[
        str | None, typer.Option("--db-id", help="Only this database or cluster.")
    ] = None,
    key_file: Annotated[Path | None, typer.Option(
        "--key-file", help="Master key file (default: the default key file; never created).",
    )] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; delete nothing.")
    ] = False,
    keep_last: Annotated[
        int | None, typer.Option("--keep-last", min=1, help="Keep the newest N backups.")
    ] = None,
    keep_within: Annotated[str | None, typer.Option(
        "--keep-within", help="Keep every backup younger than this (36h, 14d, 8w).",
    )] = None,
    hourly: Annotated[int, typer.Option("--hourly", min=0, help="GFS: last N hours.")] = 0,
    daily: Annotated[int, typer.Option("--daily", min=0, help="GFS: last N days.")] = 0,
    weekly: Annotated[int, typer.Option("--weekly", min=0, help="GFS: last N weeks.")] = 0,
    monthly: Annotated[int, typer.Option("--monthly", min=0, help="GFS: last N months.")] = 0,
    yearly: Annotated[int, typer.Option("--yearly", min=0, help="GFS: last N years.")] = 0,
    grace_hours: Annotated[float | None, typer.Option(
        "--grace-hours", help="Orphans younger than this stay (default: "
        "PGBACKFLOW_SWEEP_GRACE_HOURS, else 24).",
    )] = None,
) -> None:
    """Expire backups by policy (safety rules first), then sweep orphans; prints the plan."""
    from pgbackflow.tasks.keys import Keyring, default_key_file, load_key_file
    from pgbackflow.tasks.retention import Policy, run_retention
    from pgbackflow.tasks.storage import sweep_grace

    policy = Policy.build(keep_last=keep_last, keep_within=keep_within, hourly=hourly,
                          daily=daily, weekly=weekly, monthly=monthly, yearly=yearly)
    grace = sweep_grace(grace_hours)
    keyring = Keyring([load_key_file(key_file or default_key_file())])
    storage = open_storage(source, f"--from {source}")
    _, result = run_retention(storage, keyring, lambda _db: policy, db_id=db_id,
                              dry_run=dry_run, grace=grace, show=render.plain_line)
    render.retention_outcome(result)
