"""``pgbackflow demo``: a whole backup → restore → compare cycle on a throwaway server.

Starts PostgreSQL 18 from the bundled toolset, loads the sample shop, backs it up encrypted
into a local folder through the real flows, restores it into a fresh database, compares
every table's rows, then stops and removes the server.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from pgbackflow.blocks.database import PostgresDatabase
from pgbackflow.blocks.storage import LocalStorage
from pgbackflow.flows.logical_backup import logical_backup
from pgbackflow.flows.logical_restore import logical_restore
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import MasterKey, write_key_file
from pgbackflow.tasks.reports import BackupReport, RestoreSummary
from pgbackflow.tasks.sample_data import load_demo_database
from pgbackflow.tasks.toolsets import find_toolset

DEMO_MAJOR = 18
SOURCE_DB = "demo_shop"
RESTORED_DB = "demo_shop_restored"


@dataclass(frozen=True)
class DemoResult:
    """What the demo did.

    Attributes:
        backup: The backup report.
        restore: The restore summary.
        folder: Where the encrypted backup was kept (None: it was in a removed temp dir).
        timings: Seconds per step.
    """

    backup: BackupReport
    restore: RestoreSummary
    folder: Path | None
    timings: dict[str, float]

    @property
    def matches(self) -> bool:
        """Whether every table came back with the rows it had in the backup."""
        return self.restore.tables == self.backup.tables and not self.restore.count_differences


def run_demo(
    folder: Path | None = None, *, scale: float = 1.0, say: Callable[[str], None] = print
) -> DemoResult:
    """Run the demo; ``folder`` keeps the backup (a temp dir otherwise, removed after).

    Args:
        folder: Where to keep the encrypted backup and its key file.
        scale: Size of the sample database (1.0: a few 100k rows).
        say: Receives one line per step.
    """
    timings: dict[str, float] = {}
    started = time.monotonic()

    def step(name: str) -> None:
        now = time.monotonic()
        timings[name] = round(now - started - sum(timings.values()), 2)

    with tempfile.TemporaryDirectory(prefix="pgbackflow-demo-") as scratch:
        where = folder or Path(scratch)
        where.mkdir(parents=True, exist_ok=True)
        key_file = where / "demo-master.key"
        if not key_file.exists():
            write_key_file(key_file, MasterKey.generate())
        storage = LocalStorage(folder=str(where / "backups"))

        toolset = find_toolset(DEMO_MAJOR)
        say(f"starting a throwaway PostgreSQL {toolset.version} ...")
        with EphemeralCluster(toolset) as server:
            step("server started")

            def database(name: str) -> PostgresDatabase:
                return PostgresDatabase(
                    host=server.host, port=server.port, database=name, user=server.superuser,
                    password=SecretStr(server.password), sslmode="disable",
                )

            with server.connect() as conn:
                conn.execute(f"CREATE DATABASE {SOURCE_DB}")
                conn.execute(f"CREATE DATABASE {RESTORED_DB}")
            say("loading the sample shop database (schemas, FKs, jsonb, partitions) ...")
            with server.connect(SOURCE_DB) as conn:
                load_demo_database(conn, scale=scale)
            step("sample loaded")

            say(f"backing up {SOURCE_DB}, encrypted, into {storage.folder} ...")
            backup = logical_backup(database(SOURCE_DB), [storage], key_file=str(key_file))
            step("backup")
            say(f"restoring backup {backup.backup_id} into {RESTORED_DB} ...")
            restore = logical_restore(storage, database(RESTORED_DB), key_file=str(key_file))
            step("restore")
        step("server removed")
        return DemoResult(backup, restore, folder, timings)
