"""Before a backup: check local folders and sweep what killed writers left
(`prepare_backup_storages`, `sweep_grace`)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from pgbackflow.tasks.errors import ConfigError, StorageError
from pgbackflow.tasks.storage.base import Storage
from pgbackflow.tasks.storage.local import LocalFolderStorage

SWEEP_GRACE_ENV = "PGBACKFLOW_SWEEP_GRACE_HOURS"
"""Hours after which an idle temporary or incomplete upload counts as left behind."""
DEFAULT_SWEEP_GRACE = timedelta(hours=24)


@dataclass(frozen=True)
class SweepReport:
    """What `prepare_backup_storages` did.

    Attributes:
        created: Storage folders that did not exist and were created.
        removed: One line per leftover removed (temporary file or incomplete upload).
        problems: Storages whose sweep failed (the backup goes on; its writes will tell).
    """

    created: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    def messages(self) -> list[tuple[int, str]]:
        """(logging level, line) for the run's log; nothing when there was nothing to do."""
        return [
            *((logging.INFO, f"storage folder {folder} did not exist: created it")
              for folder in self.created),
            *((logging.INFO, f"removed the leftover of an interrupted write: {leftover}")
              for leftover in self.removed),
            *((logging.WARNING, problem) for problem in self.problems),
        ]


def sweep_grace(hours: float | None = None) -> timedelta:
    """The sweep's grace period: ``hours``, else ``PGBACKFLOW_SWEEP_GRACE_HOURS``, else 24 h.

    Raises:
        ConfigError: Not a number, or negative.
    """
    if hours is None:
        text = os.environ.get(SWEEP_GRACE_ENV, "").strip()
        if not text:
            return DEFAULT_SWEEP_GRACE
        try:
            hours = float(text)
        except ValueError:
            hours = math.nan
        where = f"{SWEEP_GRACE_ENV}={text!r}"
    else:
        where = f"sweep grace {hours!r} h"
    if not math.isfinite(hours) or hours < 0:
        raise ConfigError(
            f"{where} is not a number of hours >= 0: use e.g. 24 (longer than your longest "
            "backup; the default)"
        )
    return timedelta(hours=hours)


def prepare_backup_storages(
    storages: Sequence[Storage], *, grace: timedelta | None = None
) -> SweepReport:
    """Before a backup: check local folders, then sweep what killed writers left.

    A local folder that is missing is created when its parent exists; a missing parent is
    refused (a mistyped path), before anything is written anywhere.

    Args:
        storages: The backup's destinations.
        grace: Idle time after which a leftover goes (default: `sweep_grace`).

    Raises:
        ConfigError: A folder and its parent are missing, or the grace period is invalid.
    """
    grace = sweep_grace() if grace is None else grace
    local = [s for s in storages if isinstance(s, LocalFolderStorage)]
    for storage in local:
        storage.check_root()
    created = tuple(s.location for s in local if s.create_root())
    removed: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    for target in storages:
        try:
            removed += target.sweep_stale_writes(grace)
        except StorageError as exc:
            problems += (f"sweeping leftovers in {target.location} failed: {exc}",)
    return SweepReport(created, removed, problems)
