"""Retention: which backups, WAL and orphans go, why, and deleting them safely.

Policies are rules; each rule is one small frozen class that says which backups it keeps and
why (:class:`KeepLast`, :class:`KeepWithin`, :class:`KeepGFS`). A backup is kept if any rule
keeps it. Then the safety rules, which no policy overrides, add to what is kept:

- the newest complete backup of each database is kept: its manifest authenticated, none of
  its objects missing, and for an incremental an unbroken chain of such backups to its full
  (:func:`incomplete`); the rules count only complete backups too (see :func:`decide`);
- nothing that finished less than :data:`MIN_AGE` (1 hour) ago is deleted;
- a finish time is the backup host's clock; one later than the storage's receipt of the
  manifest counts as that receipt (:func:`counted_finish`: a clock that ran ahead must not
  keep a backup "the newest" for ever);
- every full and incremental a kept incremental builds on is kept;
- WAL: every segment from the start LSN of the oldest kept physical backup on is kept
  (each kept backup's window runs from its start LSN to the next kept backup, and for the
  newest one to the newest WAL, so together they cover everything from the oldest kept
  backup's start); a cluster without a kept physical backup keeps all its WAL (a streamer
  whose first backup has not come yet: its window is open), and so does one with a refused
  manifest (its window cannot be known); history files always stay, and so does WAL
  uploaded less than 1 hour ago.

"Verified preferred": in a GFS bucket (an hour, day, week, month or year) the backup kept is
the newest one whose restore verification succeeded, and only when none did the newest one.
Reason: GFS keeps one backup to stand for a whole period, and a backup that is proven to
restore stands for it better than one a few hours newer that is not; the newest backup of
the database is kept by the safety rule anyway, so nothing recent is lost. ``KeepLast`` and
``KeepWithin`` are about recency and ignore verification.

Without any rule nothing is deleted (orphans are still swept). :func:`execute_plan` deletes
in batches: a sealed journal naming the batch's backups, then their manifests, then their
objects, then the journal; incrementals before the backups they build on. A run killed at
any point leaves every listed backup complete, and the next run finishes the journalled
deletions at once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pgbackflow.tasks.catalog import (
    Backup,
    DatabaseCatalog,
    Orphan,
    StorageCatalog,
    WalFile,
    WalRun,
    seal_journal,
)
from pgbackflow.tasks.errors import ConfigError, ObjectNotFoundError, PgBackflowError
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.physical import parse_lsn
from pgbackflow.tasks.process import BOOT_TAG, pid_alive
from pgbackflow.tasks.storage import Storage

MIN_AGE = timedelta(hours=1)
"""Nothing younger than this is deleted, whatever the policy."""
BATCH = 500
"""Backups deleted per journal (and per batch of manifest deletions)."""
CLOCK_TOLERANCE = timedelta(minutes=5)
"""How far a manifest's finish time may be after the storage received it (clocks differ
a little between hosts) before retention counts the receipt instead (`counted_finish`)."""

logger = logging.getLogger("pgbackflow.retention")


# ---------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class Candidate:
    """What a rule sees of a backup.

    Attributes:
        backup_id: Its id.
        finished_at: When it finished.
        verified: A restore verification of it succeeded.
    """

    backup_id: str
    finished_at: datetime
    verified: bool = False


class Rule(ABC):
    """One retention rule: which backups it keeps, and why."""

    @abstractmethod
    def keep(self, backups: Sequence[Candidate], now: datetime) -> dict[str, str]:
        """``{backup_id: reason}`` of the backups this rule keeps (``backups`` newest first)."""

    @abstractmethod
    def describe(self) -> str:
        """The rule as text."""


@dataclass(frozen=True)
class KeepLast(Rule):
    """Keep the newest ``count`` backups."""

    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"keep-last {self.count} is not a count >= 1")

    def keep(self, backups: Sequence[Candidate], now: datetime) -> dict[str, str]:
        """The newest ``count``."""
        return {b.backup_id: f"one of the last {self.count} (#{i + 1})"
                for i, b in enumerate(backups[: self.count])}

    def describe(self) -> str:
        """``last N``."""
        return f"last {self.count}"


@dataclass(frozen=True)
class KeepWithin(Rule):
    """Keep every backup younger than ``period``."""

    period: timedelta

    def keep(self, backups: Sequence[Candidate], now: datetime) -> dict[str, str]:
        """Those that finished after ``now - period``."""
        cutoff = now - self.period
        return {b.backup_id: f"younger than {format_period(self.period)}"
                for b in backups if b.finished_at > cutoff}

    def describe(self) -> str:
        """``within P``."""
        return f"within {format_period(self.period)}"


def _hour(moment: datetime) -> tuple[int, ...]:
    return (moment.year, moment.month, moment.day, moment.hour)


def _day(moment: datetime) -> tuple[int, ...]:
    return (moment.year, moment.month, moment.day)


def _week(moment: datetime) -> tuple[int, ...]:
    iso = moment.isocalendar()
    return (iso.year, iso.week)


def _month(moment: datetime) -> tuple[int, ...]:
    return (moment.year, moment.month)


def _year(moment: datetime) -> tuple[int, ...]:
    return (moment.year,)


def _bucket_label(unit: str, bucket: tuple[int, ...]) -> str:
    if unit == "hour":
        return f"{bucket[0]:04d}-{bucket[1]:02d}-{bucket[2]:02d} {bucket[3]:02d}h"
    if unit == "day":
        return f"{bucket[0]:04d}-{bucket[1]:02d}-{bucket[2]:02d}"
    if unit == "week":
        return f"{bucket[0]:04d}-W{bucket[1]:02d}"
    if unit == "month":
        return f"{bucket[0]:04d}-{bucket[1]:02d}"
    return f"{bucket[0]:04d}"


@dataclass(frozen=True)
class KeepGFS(Rule):
    """Grandfather-father-son: the newest backup of each of the last H hours, D days, W
    weeks (ISO), M months and Y years, in UTC.

    "The last N days" are the N most recent days *that have a backup* (as restic and borg
    count them), so a pause in backups never expires older ones by itself. In each period
    the newest verified backup is kept, else the newest.
    """

    hours: int = 0
    days: int = 0
    weeks: int = 0
    months: int = 0
    years: int = 0

    UNITS: ClassVar[tuple[tuple[str, str, Callable[[datetime], tuple[int, ...]]], ...]] = (
        ("hours", "hour", _hour), ("days", "day", _day), ("weeks", "week", _week),
        ("months", "month", _month), ("years", "year", _year),
    )

    def __post_init__(self) -> None:
        for name, _, _ in self.UNITS:
            if getattr(self, name) < 0:
                raise ConfigError(f"GFS {name} = {getattr(self, name)} is not a count >= 0")

    def keep(self, backups: Sequence[Candidate], now: datetime) -> dict[str, str]:
        """The representative of each of the last buckets of every unit."""
        kept: dict[str, list[str]] = {}
        for name, unit, bucket_of in self.UNITS:
            wanted = int(getattr(self, name))
            if not wanted:
                continue
            buckets: dict[tuple[int, ...], list[Candidate]] = {}
            for backup in backups:  # newest first: buckets in order, newest first
                bucket = bucket_of(backup.finished_at.astimezone(UTC))
                if bucket not in buckets:
                    if len(buckets) == wanted:
                        break
                    buckets[bucket] = []
                buckets[bucket].append(backup)
            for bucket, members in buckets.items():
                verified = [b for b in members if b.verified]
                chosen = (verified or members)[0]
                label = "newest verified" if verified else "newest"
                kept.setdefault(chosen.backup_id, []).append(
                    f"{label} of {unit} {_bucket_label(unit, bucket)} (GFS {wanted} {name})"
                )
        return {backup_id: "; ".join(reasons) for backup_id, reasons in kept.items()}

    def describe(self) -> str:
        """``GFS 24h 7d 4w 12m 2y``."""
        parts = [f"{getattr(self, n)}{n[0]}" for n, _, _ in self.UNITS if getattr(self, n)]
        return "GFS " + " ".join(parts)


MAX_PERIOD = timedelta(days=36525)
"""The longest period a rule may keep for (100 years; a timedelta overflows far above)."""
_PERIOD = re.compile(r"^\s*(\d+)\s*([hdw])\s*$")
_UNIT = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


def parse_period(text: str) -> timedelta:
    """``36h``, ``14d``, ``8w`` → timedelta.

    Raises:
        ConfigError: anything else.
    """
    match = _PERIOD.match(text)
    if not match or int(match.group(1)) < 1:
        raise ConfigError(
            f"period {text!r} is not a number with a unit: use e.g. 36h, 14d or 8w"
        )
    count, unit = int(match.group(1)), _UNIT[match.group(2)]
    if count > MAX_PERIOD // unit:  # (compared before multiplying: that can overflow)
        raise ConfigError(f"period {text!r} is longer than 100 years: use e.g. 36h, 14d or 8w")
    return count * unit


def format_period(period: timedelta) -> str:
    """The shortest exact form: ``8w``, ``14d``, ``36h``."""
    hours = int(period.total_seconds() // 3600)
    if hours % (24 * 7) == 0:
        return f"{hours // (24 * 7)}w"
    if hours % 24 == 0:
        return f"{hours // 24}d"
    return f"{hours}h"


@dataclass(frozen=True)
class Policy:
    """The rules of one database; a backup is kept if any rule keeps it."""

    rules: tuple[Rule, ...] = ()

    @classmethod
    def build(
        cls,
        *,
        keep_last: int | None = None,
        keep_within: str | None = None,
        hourly: int = 0,
        daily: int = 0,
        weekly: int = 0,
        monthly: int = 0,
        yearly: int = 0,
    ) -> Policy:
        """A policy from settings (CLI flags, the deploy config)."""
        rules: list[Rule] = []
        if keep_last is not None:
            rules.append(KeepLast(keep_last))
        if keep_within:
            rules.append(KeepWithin(parse_period(keep_within)))
        gfs = KeepGFS(hourly, daily, weekly, monthly, yearly)
        if any((hourly, daily, weekly, monthly, yearly)):
            rules.append(gfs)
        return cls(tuple(rules))

    def describe(self) -> str:
        """The rules, or "no policy"."""
        return ", ".join(r.describe() for r in self.rules) or "no policy: everything kept"


class RetentionSettings(BaseModel):
    """A policy as written in the deploy config and in flow parameters (docs/CONFIG.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_last: int | None = Field(default=None, ge=1, description="Keep the newest N.")
    keep_within: str | None = Field(
        default=None, description="Keep every backup younger than this: 36h, 14d, 8w."
    )
    hourly: int = Field(default=0, ge=0, description="GFS: the newest of each of N hours.")
    daily: int = Field(default=0, ge=0, description="GFS: days.")
    weekly: int = Field(default=0, ge=0, description="GFS: ISO weeks.")
    monthly: int = Field(default=0, ge=0, description="GFS: months.")
    yearly: int = Field(default=0, ge=0, description="GFS: years.")

    @field_validator("keep_within")
    @classmethod
    def _period(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_period(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    def policy(self) -> Policy:
        """The rules."""
        return Policy.build(**self.model_dump())


def policy_lookup(settings: Mapping[str, RetentionSettings | Mapping[str, Any]],
                  ) -> Callable[[str], Policy]:
    """``db_id → Policy`` from settings keyed by database id or by a pattern such as
    ``db1-all-*`` (the databases a ``database = "all"`` entry backs up); none: no policy."""
    policies = {
        key: (value if isinstance(value, RetentionSettings)
              else RetentionSettings.model_validate(value)).policy()
        for key, value in settings.items()
    }

    def lookup(db_id: str) -> Policy:
        if db_id in policies:
            return policies[db_id]
        for pattern, policy in policies.items():
            if fnmatchcase(db_id, pattern):
                return policy
        return Policy()

    return lookup


# ---------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class BackupDecision:
    """Keep or delete one backup, and why.

    Attributes:
        backup: The backup.
        keep: Whether it stays.
        reasons: Why it stays (every rule that keeps it), or why it goes.
    """

    backup: Backup
    keep: bool
    reasons: tuple[str, ...]

    @property
    def why(self) -> str:
        """The reasons as one text."""
        return "; ".join(self.reasons)


@dataclass(frozen=True)
class DatabasePlan:
    """The plan for one database or cluster.

    Attributes:
        catalog: What is stored.
        policy: Its rules.
        decisions: One per usable backup, oldest first.
        wal_runs_delete: Complete WAL segments that go, as runs (:class:`WalRun`).
        wal_note: Why the WAL that stays stays.
        orphans_delete: Orphans that go (past the grace period, or an unfinished deletion).
        orphans_waiting: Orphans still inside the grace period.
        journals: Deletion journals of earlier runs (removed once their backups are gone).
        wal_files_delete: Partial WAL segments that go.
    """

    catalog: DatabaseCatalog
    policy: Policy
    decisions: tuple[BackupDecision, ...]
    wal_runs_delete: tuple[WalRun, ...] = ()
    wal_note: str = ""
    orphans_delete: tuple[Orphan, ...] = ()
    orphans_waiting: tuple[Orphan, ...] = ()
    journals: tuple[str, ...] = ()
    wal_files_delete: tuple[WalFile, ...] = ()

    @property
    def wal_delete(self) -> tuple[WalFile, ...]:
        """The WAL objects that go, one :class:`WalFile` each (built on each call)."""
        return tuple(f for run in self.wal_runs_delete for f in run.files()) + tuple(
            self.wal_files_delete)

    @property
    def wal_delete_count(self) -> int:
        """WAL objects that go."""
        return sum(run.count for run in self.wal_runs_delete) + len(self.wal_files_delete)

    @property
    def wal_delete_size(self) -> int:
        """Stored bytes of the WAL that goes."""
        return (sum(run.size for run in self.wal_runs_delete)
                + sum(f.size for f in self.wal_files_delete))

    @property
    def deleted(self) -> list[BackupDecision]:
        """Decisions to delete."""
        return [d for d in self.decisions if not d.keep]

    @property
    def kept(self) -> list[BackupDecision]:
        """Decisions to keep."""
        return [d for d in self.decisions if d.keep]

    @functools.cached_property  # the render and the totals read it (a sum over backups)
    def bytes_freed(self) -> int:
        """Stored bytes this plan frees."""
        return (sum(d.backup.stored_size for d in self.deleted)
                + self.wal_delete_size
                + sum(o.size for o in self.orphans_delete))

    def kept_reasons(self) -> dict[str, str]:
        """``{backup_id: kept because ...}``."""
        return {d.backup.backup_id: d.why for d in self.kept}


@dataclass(frozen=True)
class RetentionPlan:
    """What a retention run will delete and keep in one storage.

    Attributes:
        location: The storage.
        now: The moment the plan was made for.
        grace: Orphans younger than this stay.
        databases: One plan per database/cluster.
        orphans_delete: Objects outside any database folder, past the grace period.
        orphans_waiting: The same, inside the grace period.
        temporaries: Killed writers' temporaries past the grace period.
    """

    location: str
    now: datetime
    grace: timedelta
    databases: tuple[DatabasePlan, ...]
    orphans_delete: tuple[Orphan, ...] = ()
    orphans_waiting: tuple[Orphan, ...] = ()
    temporaries: tuple[str, ...] = ()

    @functools.cached_property
    def bytes_freed(self) -> int:
        """Stored bytes the plan frees (temporaries not counted)."""
        return (sum(d.bytes_freed for d in self.databases)
                + sum(o.size for o in self.orphans_delete))

    def render(self) -> str:
        """The plan for people: per database what goes and why, what stays and by which rule."""
        lines = [f"retention plan for {self.location} at {self.now:%Y-%m-%d %H:%M:%S} UTC "
                 f"(orphan grace {self.grace.total_seconds() / 3600:g} h)"]
        for plan in self.databases:
            entry = plan.catalog
            lines.append(f"{entry.kind} {entry.db_id}: policy {plan.policy.describe()}; "
                         f"{len(plan.kept)} backups kept, {len(plan.deleted)} deleted, "
                         f"{_size(plan.bytes_freed)} freed")
            for decision in reversed(plan.decisions):
                backup = decision.backup
                verb = "keep  " if decision.keep else "DELETE"
                lines.append(f"  {verb} {backup.mode:<11} {backup.backup_id} "
                             f"{backup.finished_at:%Y-%m-%d %H:%M} {_size(backup.stored_size)}"
                             f": {'kept because ' if decision.keep else ''}{decision.why}")
            for folder in entry.refused:
                lines.append(f"  leave  refused     {folder.backup_id or folder.key}: "
                             f"{folder.problem}")
            if entry.kind == "physical":
                lines.append(f"  WAL: {plan.wal_delete_count} of {entry.wal_count} objects "
                             f"deleted ({_size(plan.wal_delete_size)}); {plan.wal_note}")
            for orphan in plan.orphans_delete:
                lines.append(f"  DELETE orphan {orphan.key} ({_size(orphan.size)}): "
                             f"{orphan.reason}")
            for orphan in plan.orphans_waiting:
                lines.append(f"  wait   orphan {orphan.key}: {orphan.reason}; younger than "
                             "the grace period")
        for orphan in self.orphans_delete:
            lines.append(f"DELETE orphan {orphan.key} ({_size(orphan.size)}): {orphan.reason}")
        for orphan in self.orphans_waiting:
            lines.append(f"wait   orphan {orphan.key}: {orphan.reason}; younger than the "
                         "grace period")
        for line in self.temporaries:
            lines.append(f"DELETE temporary {line}")
        lines.append(f"total: {_size(self.bytes_freed)} freed")
        return "\n".join(lines)

    def rows(self) -> list[dict[str, Any]]:
        """One row per backup, WAL summary and orphan (a table artifact)."""
        rows: list[dict[str, Any]] = []
        for plan in self.databases:
            for decision in reversed(plan.decisions):
                rows.append({"db_id": plan.catalog.db_id, "item": decision.backup.backup_id,
                             "kind": decision.backup.mode,
                             "action": "keep" if decision.keep else "delete",
                             "bytes": decision.backup.stored_size, "why": decision.why})
            if plan.catalog.kind == "physical":
                rows.append({"db_id": plan.catalog.db_id, "item": "WAL", "kind": "wal",
                             "action": f"delete {plan.wal_delete_count}",
                             "bytes": plan.wal_delete_size,
                             "why": plan.wal_note})
            for orphan in plan.orphans_delete:
                rows.append({"db_id": plan.catalog.db_id, "item": orphan.key, "kind": "orphan",
                             "action": "delete", "bytes": orphan.size, "why": orphan.reason})
        return rows


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def incomplete(entry: DatabaseCatalog) -> dict[str, str]:
    """``{backup_id: why it cannot restore}`` of the backups of ``entry`` that are not
    complete: a manifest not authenticated, objects missing, or (an incremental) a chain to
    its full that is broken or runs through such a backup."""
    problems: dict[str, str] = {}
    for backup in entry.backups:
        if backup.status != "verified":
            problems[backup.backup_id] = f"its manifest is {backup.status}, not authenticated"
        elif backup.missing:
            names = ", ".join(key.rsplit("/", 1)[-1] for key in backup.missing[:3])
            more = f" +{len(backup.missing) - 3}" if len(backup.missing) > 3 else ""
            problems[backup.backup_id] = (f"{len(backup.missing)} of its objects are missing "
                                          f"({names}{more})")
    chains = entry.broken_chains()
    for backup in entry.backups:
        if backup.backup_id in problems:
            continue
        if backup.backup_id in chains:
            problems[backup.backup_id] = f"its chain is broken: {chains[backup.backup_id]}"
            continue
        bad = next((a for a in entry.ancestors(backup) if a.backup_id in problems), None)
        if bad is not None:
            problems[backup.backup_id] = f"it builds on {bad.backup_id}, which is incomplete"
    return problems


def counted_finish(backup: Backup) -> tuple[datetime, str | None]:
    """When ``backup`` finished as the rules and the safety rules count it, and a note
    when that is not its manifest's ``finished_at``.

    The finish time comes from the clock of the host that made the backup. A backup never
    finishes after the storage received its manifest: when its finish time is later than
    that (by more than `CLOCK_TOLERANCE`), that host's clock ran ahead, and the receipt
    counts for the rules. Otherwise the backup would stay "the newest" for as long as its
    stamp lies in the future, and keep-last or GFS would delete the backups really made
    after it. (A clock that ran behind cannot be told from a storage copied later, so it is
    not corrected: such a backup counts as older than it is. Key rotation rewrites
    manifests, so after one the receipt is the rotation's time.) The one-hour safety rule
    keeps judging by the manifest's own time, which is on the same kind of clock as
    ``now``: a stamp in the future keeps its backup until that time has passed.
    """
    stored = next((o.modified for o in backup.objects if o.key == backup.manifest_key), None)
    if stored is None or backup.finished_at <= stored + CLOCK_TOLERANCE:
        return backup.finished_at, None
    return stored, (f"its manifest says it finished {backup.finished_at:%Y-%m-%d %H:%M} UTC, "
                    f"after the storage received it at {stored:%Y-%m-%d %H:%M} UTC: the "
                    "backup host's clock ran ahead, so it counts as finished then")


def decide(
    entry: DatabaseCatalog,
    policy: Policy,
    now: datetime,
    verified: Iterable[str] = (),
    min_age: timedelta = MIN_AGE,
) -> tuple[BackupDecision, ...]:
    """Keep or delete each usable backup of one database: the rules, then the safety rules.

    Only complete backups (:func:`incomplete`) are candidates of the rules and of the
    newest-backup safety rule. An incomplete backup cannot be restored, so it neither takes
    one of keep-last's N places nor stands for a GFS period nor counts as "the newest": were
    it counted, one lost object of the newest dump made keep-last 1 keep that broken backup
    and delete every complete one. An incomplete backup stays only while a safety rule holds
    it (younger than ``min_age``, or a kept incremental builds on it); otherwise it goes, its
    plan line saying what is missing. Without a policy nothing goes, incomplete or not.
    """
    verified_ids = set(verified)
    broken = incomplete(entry)
    counted = {b.backup_id: counted_finish(b) for b in entry.backups}
    newest_first = sorted(entry.backups, key=lambda b: (counted[b.backup_id][0], b.backup_id),
                          reverse=True)
    complete_first = [b for b in newest_first if b.backup_id not in broken]
    candidates = [Candidate(b.backup_id, counted[b.backup_id][0], b.backup_id in verified_ids)
                  for b in complete_first]
    reasons: dict[str, list[str]] = {b.backup_id: [] for b in entry.backups}
    if not policy.rules:
        for backup in entry.backups:
            reasons[backup.backup_id].append("no retention policy for this database")
    for rule in policy.rules:
        for backup_id, why in rule.keep(candidates, now).items():
            reasons[backup_id].append(why)
    if complete_first:
        reasons[complete_first[0].backup_id].append(
            "it is the newest complete backup of the database (safety)")
    else:
        # Nothing restorable: a backup that looks incomplete may be one caught mid-change
        # (listed before its objects were replaced) or damage to look into; none goes.
        for backup in entry.backups:
            reasons[backup.backup_id].append(
                "the database has no complete backup: nothing of it goes (safety)")
    # A refused manifest's folder is left alone; so is everything that builds on it (the
    # refusal may as well mean another key, and one damaged object must not take a chain).
    refused_ids = {r.backup_id for r in entry.refused if r.backup_id}
    for backup in entry.backups:
        blocked = next((parent for parent in _parent_ids(entry, backup)
                        if parent in refused_ids), None)
        if blocked is not None:
            reasons[backup.backup_id].append(
                f"it builds on {blocked}, whose manifest is refused and left alone (safety)")
    for backup in entry.backups:
        # The manifest's own time, on the clock of the host that made it, as ``now`` is:
        # the storage's clock may differ from both (a backup host ahead of it by more than
        # an hour would otherwise make every new backup "older than an hour" at once).
        if backup.finished_at > now - min_age:
            reasons[backup.backup_id].append(
                f"younger than {format_period(min_age)} (safety)")
    # Chains: every backup a kept incremental builds on stays (newest first, so a parent
    # kept only for a child passes it on to its own parent).
    for backup in newest_first:
        if reasons[backup.backup_id]:
            for parent in entry.ancestors(backup):
                if not any("builds on it" in r for r in reasons[parent.backup_id]):
                    reasons[parent.backup_id].append(
                        f"kept incremental {backup.backup_id} builds on it (safety)")
    decisions = []
    unkept = f"no rule keeps it ({policy.describe()})"  # once: 14,000 backups took 0.4 s
    for backup in entry.backups:
        kept = reasons[backup.backup_id]
        clock = counted[backup.backup_id][1]
        noted = (clock,) if clock else ()
        if kept:
            decisions.append(BackupDecision(backup, True, (*kept, *noted)))
        elif backup.backup_id in broken:
            decisions.append(BackupDecision(backup, False, (
                f"incomplete, it cannot be restored: {broken[backup.backup_id]} (rules count "
                "only complete backups)", *noted)))
        else:
            decisions.append(BackupDecision(backup, False, (unkept, *noted)))
    return tuple(decisions)


def _parent_ids(entry: DatabaseCatalog, backup: Backup) -> Iterable[str]:
    """The parent ids up the chain as far as the catalog knows them (a loop ends it)."""
    by_id = entry.by_id()
    seen = {backup.backup_id}
    parent_id = backup.parent_id
    while parent_id is not None and parent_id not in seen:
        yield parent_id
        seen.add(parent_id)
        parent = by_id.get(parent_id)
        parent_id = parent.parent_id if parent is not None else None


def wal_to_delete(
    entry: DatabaseCatalog, kept: Sequence[Backup], now: datetime,
    min_age: timedelta = MIN_AGE,
) -> tuple[tuple[WalRun, ...], tuple[WalFile, ...], str]:
    """The WAL outside every kept backup's recovery window (complete segments as runs,
    partial ones), and why the rest stays."""
    if not entry.wal_count:
        return (), (), "none stored"
    if entry.refused:
        return (), (), (f"all kept: {len(entry.refused)} manifest(s) of this cluster are "
                        "refused, so their recovery windows are unknown")
    physical = [b for b in kept if b.kind == "physical"]
    broken = incomplete(entry)
    if not any(b.backup_id not in broken for b in physical):
        # (Kept incomplete ones bound nothing: no restore can start from them.)
        return (), (), ("all kept: no complete physical backup is kept, the WAL streamer's "
                        "window is open")
    oldest = min(physical, key=lambda p: parse_lsn(p.start_lsn))
    first = parse_lsn(oldest.start_lsn) // entry.segment_size
    # A timeline newer than every kept backup's (the cluster after a point-in-time restore
    # back in time, which keeps its system identifier, so its folder) is the live one: its
    # WAL is the window of the backups to come, one running now included, whatever its
    # segment numbers (they start at the fork, which may lie before the cut-off).
    newest_kept = max(b.timeline for b in physical)
    young = now - min_age
    runs = tuple(part for run in entry.wal_runs if run.timeline <= newest_kept
                 for part in run.select(first, young))
    files = tuple(
        w for w in entry.wal_files
        if w.kind != "history" and w.number is not None and w.number < first
        and w.timeline <= newest_kept and w.modified <= young
    )
    newer = (f"; all WAL of timelines after {newest_kept}, the newest a kept backup is on"
             if any(r.timeline > newest_kept for r in entry.wal_runs)
             or any(w.timeline > newest_kept for w in entry.wal_files) else "")
    return runs, files, (f"kept from the start of backup {oldest.backup_id} ({oldest.start_lsn}, "
                    "the oldest kept) to the newest WAL; history files and WAL younger than "
                    f"{format_period(min_age)} always{newer}")


def plan_retention(
    catalog: StorageCatalog,
    policies: Mapping[str, Policy] | Callable[[str], Policy],
    *,
    now: datetime | None = None,
    grace: timedelta,
    verified: Mapping[str, Iterable[str]] | None = None,
    min_age: timedelta = MIN_AGE,
) -> RetentionPlan:
    """The retention plan for a catalog.

    Args:
        catalog: What the storage holds.
        policies: The policy of each database id (missing: no policy, everything kept).
        now: The moment to plan for (default: the catalog's listing time).
        grace: Orphans younger than this stay.
        verified: ``{db_id: backup ids whose restore verification succeeded}``.
        min_age: Nothing younger is deleted (tests only shorten nothing: keep 1 h).
    """
    if not catalog.authenticated:
        raise ValueError("retention needs a catalog whose manifests were authenticated")
    moment = now or catalog.read_at
    cutoff = moment - grace

    def policy_of(db_id: str) -> Policy:
        if callable(policies):
            return policies(db_id)
        return policies.get(db_id, Policy())

    plans = []
    for entry in catalog.databases:
        decisions = decide(entry, policy_of(entry.db_id), moment,
                           (verified or {}).get(entry.db_id, ()), min_age)
        kept = [d.backup for d in decisions if d.keep]
        runs, files, note = wal_to_delete(entry, kept, moment, min_age)
        go = tuple(o for o in entry.orphans
                   if o.unfinished_deletion or o.last_activity <= cutoff)
        wait = tuple(o for o in entry.orphans if o not in go)
        journals = tuple(j.key for j in entry.journals)
        plans.append(DatabasePlan(entry, policy_of(entry.db_id), decisions,
                                  wal_runs_delete=runs, wal_note=note, orphans_delete=go,
                                  orphans_waiting=wait, journals=journals,
                                  wal_files_delete=files))
    go = tuple(o for o in catalog.orphans if o.last_activity <= cutoff)
    wait = tuple(o for o in catalog.orphans if o.last_activity > cutoff)
    return RetentionPlan(catalog.location, moment, grace, tuple(plans), go, wait,
                         catalog.temporaries)


# ---------------------------------------------------------------------------------------
# One deleting run per storage


LOCK_KEY = "retention.lock"
"""The lock object at the storage's root: who deletes there now, until when."""
LOCK_LEASE = timedelta(minutes=10)
"""A lock not refreshed for this long is stale (its run was killed, or its host died)."""
LOCK_REFRESH_S = 60.0


class RetentionBusyError(PgBackflowError):
    """Another retention run holds the storage's lock."""


class RetentionLock:
    """Only one run that deletes (``pgbackflow retention`` or a ``maintenance`` run) per
    storage at a time, on any host: two plans made from the same catalog with different
    policies could each keep what the other deletes.

    The lock is an object created only if absent (local: ``link``; S3: a conditional PUT),
    naming its owner (host, boot, pid, what runs) and a lease that a thread renews every
    minute. A lock is stale, and taken over, once its lease ran out (a killed run, a dead
    host) or at once when its owner ran on this machine in this boot and its pid is gone.
    Before each batch of deletions the holder checks it still holds it (:meth:`check`).
    """

    def __init__(self, storage: Storage, owner: str, lease: timedelta = LOCK_LEASE) -> None:
        self.storage = storage
        self.owner = owner
        self.lease = lease
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    def _body(self) -> bytes:
        now = datetime.now(UTC)
        return json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "boot": BOOT_TAG,
            "pid": os.getpid(), "token": self.token, "renewed_at": now.isoformat(),
            "expires_at": (now + self.lease).isoformat(),
        }).encode()

    def _read(self) -> dict[str, Any] | None:
        """The current lock (``{}`` when unreadable), or None when there is none."""
        try:
            raw = self.storage.read_bytes(LOCK_KEY)
        except ObjectNotFoundError:
            return None
        try:
            body = json.loads(raw[:65536])
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _stale(self, body: dict[str, Any]) -> bool:
        """Lapsed: its owner ran on this machine and its process is gone, or its lease ran
        out by the storage's clock.

        The lease runs from the storage's write time of the lock (`StoredObject.modified`,
        which every renewal moves), for as long as the lock says (``expires_at`` minus
        ``renewed_at``, both on its holder's clock, so their difference is sound whatever
        that clock says) but never longer than this run's own lease: a forged lock "valid
        for decades" blocks no longer than a real one. The storage's clock decides, so
        neither a taker whose clock runs ahead nor a holder whose clock runs behind ends a
        live lock; a lock that looks lapsed by this host's clock is checked by the
        storage's (`Storage.clock`, a probe object)."""
        pid = body.get("pid")
        if body.get("boot") == BOOT_TAG and isinstance(pid, int) and not pid_alive(pid):
            return True
        try:
            written = self.storage.stat(LOCK_KEY).modified
        except ObjectNotFoundError:
            return True
        lease = self.lease
        try:
            declared = (datetime.fromisoformat(str(body["expires_at"]))
                        - datetime.fromisoformat(str(body["renewed_at"])))
            lease = min(lease, max(declared, timedelta(0)))
        except (KeyError, TypeError, ValueError):
            pass  # unreadable: this run's lease
        if written + lease >= datetime.now(UTC):
            return False
        return written + lease < self.storage.clock()

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RetentionBusyError` naming its holder."""
        in_the_way = 0  # could not create it, yet there is no lock object to read
        for _ in range(3):
            if self.storage.create_new(LOCK_KEY, self._body()):
                # An S3-compatible server that ignores If-None-Match overwrites instead:
                # whoever's token is there now holds it (the other one stops at check()).
                body = self._read()
                if body is None or body.get("token") != self.token:
                    continue
                self._thread = threading.Thread(target=self._renew, daemon=True,
                                                name="pgbackflow-retention-lock")
                self._thread.start()
                return
            body = self._read()
            if body is None:
                in_the_way += 1
                continue  # released meanwhile
            if not self._stale(body):
                raise RetentionBusyError(
                    f"storage {self.storage.location} is busy: another retention run holds "
                    f"its lock {LOCK_KEY} ({str(body.get('owner', '?'))[:80]} on host "
                    f"{str(body.get('host', '?'))[:64]}, pid {body.get('pid', '?')}, renewed "
                    f"{str(body.get('renewed_at', '?'))[:32]}): wait for it to finish (a killed "
                    f"run's lock lapses at {str(body.get('expires_at', '?'))[:32]})")
            logger.warning("removing the stale retention lock of %s (%s on host %s, pid %s)",
                           self.storage.location, str(body.get("owner", "?"))[:80],
                           str(body.get("host", "?"))[:64], body.get("pid", "?"))
            self.storage.delete(LOCK_KEY)
        if in_the_way == 3:
            raise RetentionBusyError(
                f"storage {self.storage.location}: could not take the retention lock "
                f"{LOCK_KEY}: something that is not a lock object has that name (in a local "
                "folder: not a regular file): remove it, then rerun")
        raise RetentionBusyError(
            f"storage {self.storage.location}: could not take the retention lock {LOCK_KEY} "
            "(other runs keep taking it): rerun later")

    def _renew(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            try:
                body = self._read()
                if body is None or body.get("token") != self.token:
                    self._lost = "another run took it over (this run's lease had lapsed)"
                    return
                self.storage.write_bytes(LOCK_KEY, self._body())
            except Exception as exc:  # a storage hiccup: the next renewal tries again
                logger.warning("renewing the retention lock of %s failed: %s",
                               self.storage.location, exc)

    def check(self) -> None:
        """Raise :class:`RetentionBusyError` unless this run still holds the lock."""
        if self._lost is None:
            body = self._read()
            if body is None or body.get("token") != self.token:
                self._lost = "it is gone or another run holds it"
        if self._lost is not None:
            raise RetentionBusyError(
                f"storage {self.storage.location}: this run lost the retention lock "
                f"({self._lost}); it stopped deleting: rerun it")

    def release(self) -> None:
        """Stop renewing and remove the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        body = self._read()
        if body is not None and body.get("token") == self.token:
            self.storage.delete(LOCK_KEY)

    def __enter__(self) -> RetentionLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------
# Carrying it out


@dataclass
class RetentionResult:
    """What a retention run deleted.

    Attributes:
        deleted_backups: ``db_id/backup_id`` of the backups deleted.
        deleted_objects: Every object key deleted (manifests, data, WAL, orphans).
        bytes_freed: Stored bytes deleted.
        temporaries: Temporaries swept (one line each).
    """

    deleted_backups: list[str] = field(default_factory=list)
    deleted_objects: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    temporaries: list[str] = field(default_factory=list)


def execute_plan(
    storage: Storage,
    plan: RetentionPlan,
    master_key: MasterKey,
    log: Callable[[str], None] = logger.info,
    lock: RetentionLock | None = None,
) -> RetentionResult:
    """Delete what ``plan`` says, in an order that survives being killed at any point.

    Per batch of backups: a sealed journal naming them, their manifests (they are no longer
    listed), their objects, the journal. Incrementals go before the backups they build on.
    Then WAL, orphans (unfinished deletions of earlier runs among them), those runs'
    journals, temporaries. Every deleted object is logged (one line each).

    Args:
        storage: The storage the plan was made for.
        plan: From :func:`plan_retention`.
        master_key: Seals the deletion markers.
        log: Called with one line per deleted object.
        lock: The storage's retention lock this run holds: checked before every deletion.
    """
    result = RetentionResult()

    def drop(keys: Sequence[str], sizes: Mapping[str, int], why: str | Mapping[str, str]) -> None:
        if not keys:
            return
        if lock is not None:
            lock.check()
        storage.delete_many(keys)
        for key in keys:
            reason = why if isinstance(why, str) else why.get(key, "orphan")
            log(f"deleted {storage.location}/{key} ({reason})")
            result.deleted_objects.append(key)
            result.bytes_freed += sizes.get(key, 0)

    run_id = f"{plan.now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    for db_plan in plan.databases:
        entry = db_plan.catalog
        # Newest first: an incremental goes before its parent, so a kill in between never
        # leaves a listed incremental whose parent is gone.
        doomed = sorted(db_plan.deleted, key=lambda d: d.backup.order(), reverse=True)
        for number, start in enumerate(range(0, len(doomed), BATCH)):
            batch = doomed[start : start + BATCH]
            journal, data = seal_journal(entry.kind, entry.db_id, f"{run_id}-{number}",
                                         [d.backup.backup_id for d in batch], master_key)
            if lock is not None:
                lock.check()
            storage.write_bytes(journal, data)
            sizes = {o.key: o.size for d in batch for o in d.backup.objects}
            drop([d.backup.manifest_key for d in batch], sizes,
                 {d.backup.manifest_key: f"manifest of backup {d.backup.backup_id}: {d.why}"
                  for d in batch})
            objects = {o.key: f"backup {d.backup.backup_id}" for d in batch
                       for o in d.backup.objects if o.key != d.backup.manifest_key}
            drop(list(objects), sizes, objects)
            drop([journal], {}, "deletion journal: its batch is gone")
            result.deleted_backups += [f"{entry.db_id}/{d.backup.backup_id}" for d in batch]
        for run in db_plan.wal_runs_delete:  # a run at a time: keys are computed, not kept
            drop(list(run.keys()), dict(zip(run.keys(), run.sizes, strict=True)),
                 "WAL before the oldest kept backup")
        drop([w.key for w in db_plan.wal_files_delete],
             {w.key: w.size for w in db_plan.wal_files_delete},
             "WAL before the oldest kept backup")
        drop([o.key for o in db_plan.orphans_delete],
             {o.key: o.size for o in db_plan.orphans_delete},
             {o.key: f"orphan: {o.reason}" for o in db_plan.orphans_delete})
        # Journals of earlier runs last: a kill before leaves them for the next run.
        drop(list(db_plan.journals), {}, "deletion journal of an earlier run: its work is done")
    drop([o.key for o in plan.orphans_delete], {o.key: o.size for o in plan.orphans_delete},
         {o.key: f"orphan: {o.reason}" for o in plan.orphans_delete})
    for line in storage.sweep_stale_writes(plan.grace):
        log(f"removed the leftover of an interrupted write: {line}")
        result.temporaries.append(line)
    return result


__all__ = [
    "MIN_AGE",
    "BackupDecision",
    "Candidate",
    "DatabasePlan",
    "KeepGFS",
    "KeepLast",
    "KeepWithin",
    "Policy",
    "RetentionBusyError",
    "RetentionLock",
    "RetentionPlan",
    "RetentionResult",
    "RetentionSettings",
    "Rule",
    "decide",
    "execute_plan",
    "format_period",
    "incomplete",
    "parse_period",
    "plan_retention",
    "policy_lookup",
    "run_retention",
    "wal_to_delete",
]


def run_retention(
    storage: Storage,
    keyring: Keyring,
    policies: Mapping[str, Policy] | Callable[[str], Policy],
    *,
    db_id: str | None = None,
    dry_run: bool = False,
    grace: timedelta,
    verified: Mapping[str, Iterable[str]] | None = None,
    show: Callable[[str], None] = logger.info,
) -> tuple[RetentionPlan, RetentionResult | None]:
    """Read the catalog, plan, show the plan and (unless ``dry_run``) carry it out.

    Args:
        storage: The storage.
        keyring: Manifests are authenticated with it; its current key seals the deletion
            markers.
        policies: Policy per database id.
        db_id: Only this database or cluster.
        dry_run: Plan and show only.
        grace: Orphans and temporaries younger than this stay.
        verified: Backups whose restore verification succeeded, per database.
        show: Called with the plan, then one line per deleted object.
    """
    from pgbackflow.tasks.catalog import read_catalog

    storage.check_exists()
    if dry_run:
        catalog = _named(read_catalog(storage, keyring, db_id=db_id, grace=grace), db_id)
        plan = plan_retention(catalog, policies, grace=grace, verified=verified)
        show(plan.render())
        return plan, None
    with RetentionLock(storage, "pgbackflow retention") as lock:
        catalog = _named(read_catalog(storage, keyring, db_id=db_id, grace=grace), db_id)
        plan = plan_retention(catalog, policies, grace=grace, verified=verified)
        show(plan.render())
        return plan, execute_plan(storage, plan, keyring.current, show, lock)


def _named(catalog: StorageCatalog, db_id: str | None) -> StorageCatalog:
    """The catalog, when the database or cluster asked for has a folder in it: a mistyped
    id would otherwise plan nothing and say "0 B freed", as if all were in order."""
    if db_id is not None and not catalog.databases:
        raise ObjectNotFoundError(
            f"--db-id {db_id}: no backups of that id in {catalog.location}: `pgbackflow list` "
            "and `pgbackflow physical-list` show the ids stored there"
        )
    return catalog
