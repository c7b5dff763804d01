"""Retention on real storages (a local folder and moto S3) with real authenticated manifests.

The synthetic catalogs hold small fake objects (no dumps are needed to plan), but every
manifest is sealed with the master key exactly as a backup seals it, so the catalog reads
and authenticates them as the product does. Expected results are computed here, by code
independent of tasks/retention.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pgbackflow.tasks.catalog import load_manifest, read_catalog, seal_journal
from pgbackflow.tasks.errors import StorageError
from pgbackflow.tasks.keys import Keyring, MasterKey, write_key_file
from pgbackflow.tasks.manifest import (
    MAC_SCHEME,
    DatabaseInfo,
    LogicalManifest,
    ManifestBinding,
    StoredObjectInfo,
    TableRows,
    backup_prefix,
    logical_binding,
    manifest_mac,
)
from pgbackflow.tasks.physical import PhysicalManifest, physical_binding
from pgbackflow.tasks.retention import (
    LOCK_KEY,
    MIN_AGE,
    KeepGFS,
    KeepLast,
    Policy,
    RetentionBusyError,
    RetentionLock,
    execute_plan,
    plan_retention,
    run_retention,
)
from pgbackflow.tasks.storage import (
    INCOMPLETE_DIR,
    LocalFolderStorage,
    S3ObjectStorage,
    Storage,
)
from pgbackflow.tasks.wal import segment_name, wal_object_key
from tests.fixtures.prefect_server import PGBACKFLOW, as_users_run_it
from tests.fixtures.s3 import S3Bucket

KEY = MasterKey.generate()
RING = Keyring([KEY])
DB = "shop"
CLUSTER = "cluster-7312"
SEG = 16 * 1024 * 1024
GRACE = timedelta(hours=24)
#: Through a warm daemon (``run_cli``), but where a test kills the command: then in a
#: process of its own (PGBACKFLOW_DAEMON=off, conftest), unbuffered to read its progress.
CLI = [str(PGBACKFLOW)]


def format_lsn(position: int) -> str:
    """Integer position → ``'16/B374D848'`` (the form manifests store)."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


# ---------------------------------------------------------------------------------------
# Writing synthetic backups cheaply


class Writer:
    """Puts objects into a storage; local objects get their mtime set (their age)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.folders: set[str] = set()

    def put(self, key: str, data: bytes, modified: datetime) -> None:
        if isinstance(self.storage, LocalFolderStorage):
            path = f"{self.storage.folder}/{key}"
            folder = path.rsplit("/", 1)[0]
            if folder not in self.folders:
                os.makedirs(folder, exist_ok=True)
                self.folders.add(folder)
            with open(path, "wb") as out:
                out.write(data)
            stamp = modified.timestamp()
            os.utime(path, (stamp, stamp))
        else:
            self.storage.write_bytes(key, data)


def sealed(body: dict[str, Any], binding: ManifestBinding) -> bytes:
    """What :func:`seal` stores, as compact JSON (the MAC covers the parsed value only;
    pretty-printing 19,000 manifests would be most of the test's time)."""
    auth = {"scheme": MAC_SCHEME, "key_id": KEY.key_id_hex,
            "mac": manifest_mac(KEY, binding, body)}
    return json.dumps({**body, "auth": auth}).encode()


def _object(writer: Writer, key: str, modified: datetime) -> StoredObjectInfo:
    data = secrets.token_bytes(16)
    writer.put(key, data, modified)
    return StoredObjectInfo(key=key, raw_size=len(data), stored_size=len(data),
                            sha256=hashlib.sha256(data).hexdigest())


def logical_id(moment: datetime, serial: int) -> str:
    return f"{moment:%Y%m%dT%H%M%SZ}-{serial % 0xFFFFFF:06x}"


def write_logical(writer: Writer, moment: datetime, serial: int, db_id: str = DB,
                  stored: datetime | None = None) -> str:
    """A logical backup that finished at ``moment`` by its host's clock, its manifest
    stored at ``stored`` (default: then too)."""
    backup_id = logical_id(moment, serial)
    prefix = backup_prefix(db_id, backup_id)
    manifest = LogicalManifest(
        backup_id=backup_id,
        database=DatabaseInfo(db_id=db_id, name=db_id, host="db1", port=5432,
                              system_identifier="7312", database_oid=16384),
        server_version="17.6", server_version_num=170006, pg_dump_version="17.6",
        compression="pg_dump zstd:5", started_at=moment - timedelta(minutes=1),
        finished_at=moment, dump=_object(writer, prefix + "dump.pgbf", moment),
        globals=_object(writer, prefix + "globals.pgbf", moment), key_id=KEY.key_id_hex,
        snapshot="00000003-00000002-1",
        tables=(TableRows(schema_name="public", table="t", key="public.t", rows=1),),
        schema_count=1, table_count=1, database_size=8192, tool_version="pgbackflow test",
    )
    binding = logical_binding(db_id, backup_id)
    writer.put(binding.storage_key,
               sealed(manifest.model_dump(mode="json", by_alias=True), binding),
               stored or moment)
    return backup_id


def write_physical(writer: Writer, moment: datetime, serial: int, segment: int,
                   parent: str | None, full: str | None, timeline: int = 1) -> str:
    backup_id = logical_id(moment, serial)
    prefix = f"physical/{CLUSTER}/base/{backup_id}/"
    manifest = PhysicalManifest(
        backup_id=backup_id, db_id=CLUSTER, mode="incremental" if parent else "full",
        parent_id=parent, full_id=full or backup_id, system_identifier="7312",
        timeline=timeline,
        start_lsn=format_lsn(segment * SEG + 0x28), end_lsn=format_lsn(segment * SEG + 0x100),
        wal_segment_size=SEG, source="u@h:5432", server_version="17.6",
        server_version_num=170006, pg_basebackup_version="17.6",
        started_at=moment - timedelta(minutes=1), finished_at=moment,
        base=_object(writer, prefix + "base.tar.pgbf", moment),
        backup_manifest=_object(writer, prefix + "backup_manifest.pgbf", moment),
        key_id=KEY.key_id_hex, cluster_size=1, tool_version="pgbackflow test",
    )
    binding = physical_binding(CLUSTER, backup_id)
    writer.put(binding.storage_key, sealed(manifest.model_dump(mode="json"), binding), moment)
    return backup_id


@dataclass
class Synthetic:
    """What was written: ids with times, chains, WAL."""

    now: datetime
    logical: dict[str, datetime] = field(default_factory=dict)
    physical: dict[str, datetime] = field(default_factory=dict)
    parents: dict[str, str] = field(default_factory=dict)
    start_segment: dict[str, int] = field(default_factory=dict)
    wal: dict[str, tuple[int | None, datetime]] = field(default_factory=dict)


def build(storage: Storage, now: datetime, logical_hours: int, physical_days: int) -> Synthetic:
    """Hourly logical backups (at :05) and daily physical ones (weekly fulls on Sundays,
    incrementals on the other days) ending just before ``now``, with two WAL segments per
    day, a history file and a superseded partial segment."""
    writer = Writer(storage)
    data = Synthetic(now)
    newest_hour = now.replace(minute=5, second=0, microsecond=0)
    if newest_hour > now - timedelta(minutes=5):
        newest_hour -= timedelta(hours=1)
    for i in range(logical_hours):
        moment = newest_hour - timedelta(hours=logical_hours - 1 - i)
        data.logical[write_logical(writer, moment, i)] = moment
    first_day = (now - timedelta(days=physical_days - 1)).replace(
        hour=1, minute=30, second=0, microsecond=0)
    previous: str | None = None
    full: str | None = None
    for day in range(physical_days):
        moment = first_day + timedelta(days=day)
        if moment > now - timedelta(minutes=30):
            break
        segment = 2 * day + 1
        is_full = moment.weekday() == 6 or previous is None
        backup_id = write_physical(writer, moment, 100000 + day, segment,
                                   None if is_full else previous, None if is_full else full)
        if is_full:
            full = backup_id
        else:
            assert previous is not None
            data.parents[backup_id] = previous
        data.physical[backup_id] = moment
        data.start_segment[backup_id] = segment
        previous = backup_id
        for offset, number in ((0, segment), (12, segment + 1)):
            uploaded = min(moment + timedelta(hours=offset), now - timedelta(minutes=2))
            name = segment_name(1, number, SEG)
            key = wal_object_key(CLUSTER, name)
            writer.put(key, secrets.token_bytes(8), uploaded)
            data.wal[key] = (number, uploaded)
    history = wal_object_key(CLUSTER, "00000002.history")
    writer.put(history, b"1\t0/3000000\tbefore\n", first_day)
    data.wal[history] = (None, first_day)
    newest = max(n for n, _ in data.wal.values() if n is not None)
    partial = wal_object_key(CLUSTER, segment_name(1, newest, SEG) + ".partial")
    writer.put(partial, b"x", first_day)
    return data


# ---------------------------------------------------------------------------------------
# The expected plan, computed independently


def newest_per_period(times: dict[str, datetime], count: int,
                      period: Callable[[datetime], str]) -> set[str]:
    """For the ``count`` most recent periods that hold a backup, the newest backup."""
    groups: dict[str, list[tuple[datetime, str]]] = {}
    for backup_id, moment in times.items():
        groups.setdefault(period(moment), []).append((moment, backup_id))
    recent = sorted(groups, key=lambda p: max(groups[p])[0], reverse=True)[:count]
    return {max(groups[p])[1] for p in recent}


PERIODS: dict[str, Callable[[datetime], str]] = {
    "hours": lambda m: m.strftime("%Y-%m-%d %H"),
    "days": lambda m: m.strftime("%Y-%m-%d"),
    "weeks": lambda m: (m - timedelta(days=m.weekday())).strftime("%Y-%m-%d"),
    "months": lambda m: m.strftime("%Y-%m"),
    "years": lambda m: m.strftime("%Y"),
}


def expected_kept(times: dict[str, datetime], now: datetime, parents: dict[str, str],
                  **counts: int) -> set[str]:
    kept: set[str] = set()
    for name, count in counts.items():
        if count:
            kept |= newest_per_period(times, count, PERIODS[name])
    kept.add(max(times, key=lambda b: times[b]))  # newest
    kept |= {b for b, m in times.items() if m > now - timedelta(hours=1)}  # young
    pending = list(kept)
    while pending:  # chains
        parent = parents.get(pending.pop())
        if parent is not None and parent not in kept:
            kept.add(parent)
            pending.append(parent)
    return kept


LOGICAL_POLICY = {"hours": 24, "days": 7, "weeks": 4, "months": 12, "years": 2}
PHYSICAL_POLICY = {"days": 3, "weeks": 3, "months": 2}


@pytest.fixture
def storage(either_storage: Storage) -> Storage:
    return either_storage


def test_gfs_plan_on_two_years_keeps_exactly_the_expected_set(tmp_path: Path) -> None:
    """Two years of hourly logical backups and of weekly fulls + daily incrementals + WAL."""
    storage = LocalFolderStorage(tmp_path / "store")
    now = datetime(2026, 11, 29, 12, 20, tzinfo=UTC)
    data = build(storage, now, logical_hours=2 * 365 * 24, physical_days=2 * 365)
    # Deleting ~17,000 backups is not what this test is about: the S3 test below and the
    # others carry plans out.
    check_plan_and_execution(storage, data, execute=False)


def test_gfs_plan_on_s3(s3_bucket: S3Bucket, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on S3 (a shorter history: moto stores every object over HTTP)."""
    monkeypatch.setenv("PGBACKFLOW_CACHE_DIR", str(tmp_path / "cache"))
    storage = S3ObjectStorage(s3_bucket.bucket, "pg", endpoint_url=s3_bucket.endpoint_url,
                              region=s3_bucket.region)
    data = build(storage, datetime.now(UTC), logical_hours=4 * 24, physical_days=75)
    check_plan_and_execution(storage, data, real_clock=True)


def check_plan_and_execution(storage: Storage, data: Synthetic, real_clock: bool = False,
                             execute: bool = True) -> None:
    catalog = read_catalog(storage, RING, grace=GRACE)
    policies = {DB: Policy((KeepGFS(**LOGICAL_POLICY),)),
                CLUSTER: Policy((KeepGFS(**PHYSICAL_POLICY),))}
    # On S3 an object's age is its real upload time: plan two hours after it.
    now = datetime.now(UTC) + timedelta(hours=2) if real_clock else data.now
    plan = plan_retention(catalog, policies, now=now, grace=GRACE)
    by_db = {p.catalog.db_id: p for p in plan.databases}

    want_logical = expected_kept(data.logical, now, {}, **LOGICAL_POLICY)
    want_physical = expected_kept(data.physical, now, data.parents, **PHYSICAL_POLICY)
    assert {d.backup.backup_id for d in by_db[DB].kept} == want_logical
    assert {d.backup.backup_id for d in by_db[CLUSTER].kept} == want_physical
    assert len(by_db[DB].deleted) == len(data.logical) - len(want_logical) > 0
    # Every kept backup says why; chain parents name the incremental that needs them.
    assert all(d.why for d in by_db[CLUSTER].kept)
    chain_kept = [d for d in by_db[CLUSTER].kept if "builds on it" in d.why]
    assert chain_kept, "the policy keeps incrementals whose fulls no rule keeps"

    oldest_start = min(data.start_segment[b] for b in want_physical)
    uploaded = {o.key: o.modified for o in storage.list(f"physical/{CLUSTER}/wal/")}
    want_wal_gone = {k for k, (number, _) in data.wal.items()
                     if number is not None and number < oldest_start
                     and uploaded[k] <= now - MIN_AGE}
    assert {w.key for w in by_db[CLUSTER].wal_delete} == want_wal_gone
    assert want_wal_gone
    assert plan.bytes_freed > 0 and "kept because" in plan.render()
    if not execute:
        return

    lines: list[str] = []
    result = execute_plan(storage, plan, KEY, lines.append)
    assert len(lines) == len(result.deleted_objects) and all("deleted" in x for x in lines)

    after = read_catalog(storage, RING)
    shop = after.database(DB, "logical")
    cluster = after.database(CLUSTER, "physical")
    assert shop is not None and cluster is not None
    assert {b.backup_id for b in shop.backups} == want_logical
    assert {b.backup_id for b in cluster.backups} == want_physical
    assert not any(b.missing for b in (*shop.backups, *cluster.backups))
    # The superseded partial segment is an orphan: it goes once older than the grace period.
    newest = max(n for n, _ in data.wal.values() if n is not None)
    partial = wal_object_key(CLUSTER, segment_name(1, newest, SEG) + ".partial")
    partial_stays = uploaded[partial] > now - GRACE
    assert not shop.orphans and not cluster.journals
    assert [o.key for o in cluster.orphans] == ([partial] if partial_stays else [])
    assert {w.key for w in cluster.wal} == set(data.wal) - want_wal_gone
    # The kept chain is still complete, and WAL from the oldest kept backup has no gaps.
    assert not cluster.broken_chains()
    assert not cluster.wal_gaps
    # Nothing is left to do.
    again = plan_retention(after, policies, now=now, grace=GRACE)
    assert again.bytes_freed == 0


def test_safety_rules_beat_every_policy(storage: Storage) -> None:
    """keep-last 1 on a chain: the incremental's parents, young backups and the newest stay;
    WAL from the oldest kept start stays; history files stay."""
    # Planned two hours ahead: WAL uploaded now to S3 is then old enough to go. (The
    # young backup is young now: a finish time after its manifest reached the storage
    # counts as that receipt, see test_a_backup_stamped_in_the_future_...)
    real_now = datetime.now(UTC)
    now = real_now + timedelta(hours=2)
    writer = Writer(storage)
    times = [now - timedelta(days=3), now - timedelta(days=2), now - timedelta(days=1),
             real_now - timedelta(minutes=20)]
    ids: list[str] = []
    for i, moment in enumerate(times[:3]):
        ids.append(write_physical(writer, moment, i, 10 * (i + 1),
                                  ids[-1] if i == 2 else None, ids[-1] if i == 2 else None))
    young_logical = write_logical(writer, times[3], 7)
    old_logical = write_logical(writer, times[0], 8)
    for number in range(5, 40):
        writer.put(wal_object_key(CLUSTER, segment_name(1, number, SEG)), b"w", times[0])
    catalog = read_catalog(storage, RING)
    plan = plan_retention(catalog, lambda _db: Policy((KeepLast(1),)), now=now, grace=GRACE)
    by_db = {p.catalog.db_id: p for p in plan.databases}
    physical = {d.backup.backup_id: d for d in by_db[CLUSTER].decisions}
    # ids[2] is an incremental on ids[1] (a full): keep-last 1 keeps ids[2], chain keeps ids[1].
    assert physical[ids[2]].keep and physical[ids[1]].keep and not physical[ids[0]].keep
    assert "builds on it" in physical[ids[1]].why
    logical = {d.backup.backup_id: d for d in by_db[DB].decisions}
    assert logical[young_logical].keep and not logical[old_logical].keep
    young_plan = plan_retention(catalog, lambda _db: Policy((KeepLast(1),)), now=real_now,
                                grace=GRACE)
    young = {d.backup.backup_id: d for p in young_plan.databases for d in p.decisions}
    assert "younger than" in young[young_logical].why
    assert {w.number for w in by_db[CLUSTER].wal_delete} == set(range(5, 20))

    execute_plan(storage, plan, KEY)
    after = read_catalog(storage, RING)
    cluster = after.database(CLUSTER)
    assert cluster is not None
    assert [b.backup_id for b in cluster.backups] == ids[1:]
    assert min(w.number or 0 for w in cluster.wal) == 20


def test_newest_backup_rule_protects_the_newest_complete_one(tmp_path: Path) -> None:
    """keep-last 1 with the newest dump's object lost: the newest *complete* backup stays
    (not the broken newest while all complete ones go), and the broken one does not take
    keep-last's place."""
    storage = LocalFolderStorage(tmp_path / "store")
    writer = Writer(storage)
    now = datetime(2026, 11, 29, 20, 0, tzinfo=UTC)
    ids = [write_logical(writer, now - timedelta(hours=20 - h), h) for h in range(10)]
    storage.delete(f"logical/{DB}/{ids[-1]}/dump.pgbf")
    catalog = read_catalog(storage, RING)
    plan = plan_retention(catalog, {DB: Policy((KeepLast(1),))}, now=now, grace=GRACE)
    decisions = {d.backup.backup_id: d for d in plan.databases[0].decisions}
    assert {b for b, d in decisions.items() if d.keep} == {ids[-2]}
    assert "newest complete backup" in decisions[ids[-2]].why
    assert "one of the last 1" in decisions[ids[-2]].why
    assert "dump.pgbf" in decisions[ids[-1]].why and "incomplete" in decisions[ids[-1]].why
    execute_plan(storage, plan, KEY)
    entry = read_catalog(storage, RING).database(DB)
    assert entry is not None
    assert [(b.backup_id, b.missing) for b in entry.backups] == [(ids[-2], ())]


def chain_of_three(storage: Storage, now: datetime) -> tuple[str, str, str]:
    """A full (3 days old, segment 10) <- incremental (2 days, 20) <- incremental (1 day,
    30), and WAL segments 5-39 four days old."""
    writer = Writer(storage)
    full = write_physical(writer, now - timedelta(days=3), 1, 10, None, None)
    first = write_physical(writer, now - timedelta(days=2), 2, 20, full, full)
    second = write_physical(writer, now - timedelta(days=1), 3, 30, first, full)
    for number in range(5, 40):
        writer.put(wal_object_key(CLUSTER, segment_name(1, number, SEG)), b"w",
                   now - timedelta(days=4))
    return full, first, second


def test_the_wal_of_a_timeline_newer_than_every_kept_backup_stays(tmp_path: Path) -> None:
    """The cluster restored back in time: timeline 2 forks off at segment 5, before the
    kept backup's start (segment 9, timeline 1), and has no backup yet. Its WAL is the live
    cluster's (a full running on it needs it); one cut-off for all timelines deleted it."""
    storage = LocalFolderStorage(tmp_path / "store")
    writer = Writer(storage)
    now = datetime(2026, 11, 29, 20, 0, tzinfo=UTC)
    for serial, start in enumerate((3, 6, 9)):
        write_physical(writer, now - timedelta(days=3 - serial), serial, start, None, None)
    old = now - timedelta(days=4)
    for number in range(2, 13):
        writer.put(wal_object_key(CLUSTER, segment_name(1, number, SEG)), b"w", old)
    for number in range(5, 9):
        writer.put(wal_object_key(CLUSTER, segment_name(2, number, SEG)), b"w", old)
    plan = plan_retention(read_catalog(storage, RING), {CLUSTER: Policy((KeepLast(1),))},
                          now=now, grace=GRACE)
    (cluster,) = plan.databases
    deleted = {(w.timeline, w.number) for w in cluster.wal_delete}
    assert deleted == {(1, n) for n in range(2, 9)}
    assert "all WAL of timelines after 1" in cluster.wal_note
    execute_plan(storage, plan, KEY)
    left = {o.key for o in storage.list(f"physical/{CLUSTER}/wal/")}
    assert {wal_object_key(CLUSTER, segment_name(2, n, SEG)) for n in range(5, 9)} <= left


def test_incrementals_on_a_refused_full_are_left_alone(tmp_path: Path) -> None:
    """The full's manifest overwritten (one PUT, no key needed): its folder is left alone,
    and so is every incremental on it, though they verify (they went as "broken chain", so
    damaging one small object took the whole chain); the WAL stays too."""
    storage = LocalFolderStorage(tmp_path / "store")
    now = datetime(2026, 11, 29, 20, 0, tzinfo=UTC)
    full, first, second = chain_of_three(storage, now)
    storage.write_bytes(f"physical/{CLUSTER}/base/{full}/manifest.json", b"{}")
    before = sorted(o.key for o in storage.list(""))
    plan = plan_retention(read_catalog(storage, RING), {CLUSTER: Policy((KeepLast(1),))},
                          now=now, grace=GRACE)
    (cluster,) = plan.databases
    decisions = {d.backup.backup_id: d for d in cluster.decisions}
    assert set(decisions) == {first, second}
    assert all(d.keep for d in decisions.values()), [d.why for d in decisions.values()]
    assert f"builds on {full}, whose manifest is refused" in decisions[first].why
    assert f"builds on {full}, whose manifest is refused" in decisions[second].why
    execute_plan(storage, plan, KEY)
    assert sorted(o.key for o in storage.list("")) == before


@pytest.mark.parametrize("damage", ["parent gone", "parent object gone"])
def test_newest_backup_rule_skips_an_incremental_with_a_broken_chain(
    tmp_path: Path, damage: str
) -> None:
    """Full <- incremental <- incremental, the middle one lost (or one of its objects):
    keep-last 1 keeps the full, the newest restorable backup, and the WAL from its start;
    the old rule kept the newest incremental, which cannot restore, and deleted the full."""
    storage = LocalFolderStorage(tmp_path / "store")
    now = datetime(2026, 11, 29, 20, 0, tzinfo=UTC)
    full, middle, newest = chain_of_three(storage, now)
    folder = f"physical/{CLUSTER}/base/{middle}/"
    for obj in storage.list(folder):
        if damage == "parent gone" or obj.key.endswith("base.tar.pgbf"):
            storage.delete(obj.key)
    catalog = read_catalog(storage, RING)
    plan = plan_retention(catalog, {CLUSTER: Policy((KeepLast(1),))}, now=now, grace=GRACE)
    cluster = plan.databases[0]
    decisions = {d.backup.backup_id: d for d in cluster.decisions}
    assert {b for b, d in decisions.items() if d.keep} == {full}
    assert "newest complete backup" in decisions[full].why
    assert "incomplete" in decisions[newest].why
    assert middle in decisions[newest].why
    assert {w.number for w in cluster.wal_delete} == set(range(5, 10))


def test_keep_within_combined_rules_and_a_dry_run_of_one_database(
    tmp_path: Path, key_file: Path
) -> None:
    """keep-within alone; keep-last + GFS together (a backup kept if any rule keeps it, with
    every reason); then ``pgbackflow retention --db-id shop --dry-run`` plans that database
    only and deletes nothing."""
    storage = LocalFolderStorage(tmp_path / "store")
    writer = Writer(storage)
    now = datetime.now(UTC).replace(microsecond=0)
    times = {}
    for i in range(60):  # every 6 hours for 15 days, the newest 2 hours ago
        moment = now - timedelta(hours=2 + 6 * i)
        times[write_logical(writer, moment, i)] = moment
    others = [write_logical(writer, now - timedelta(days=10 + i), 100 + i, db_id="other")
              for i in range(3)]
    catalog = read_catalog(storage, RING)

    def kept(policy: Policy) -> dict[str, str]:
        plan = plan_retention(catalog, {DB: policy}, now=now, grace=GRACE)
        (shop,) = [p for p in plan.databases if p.catalog.db_id == DB]
        return {d.backup.backup_id: d.why for d in shop.kept}

    within = kept(Policy.build(keep_within="3d"))
    assert set(within) == {b for b, m in times.items() if m > now - timedelta(days=3)}
    assert len(within) == 12 and all("younger than 3d" in why for why in within.values())

    newest_first = sorted(times, key=lambda b: times[b], reverse=True)
    want = (set(newest_first[:2]) | newest_per_period(times, 3, PERIODS["days"])
            | newest_per_period(times, 2, PERIODS["weeks"]))
    combined = kept(Policy.build(keep_last=2, daily=3, weekly=2))
    assert set(combined) == want and len(want) < len(times)
    newest = combined[newest_first[0]]
    assert "one of the last 2 (#1)" in newest and "GFS 3 days" in newest
    assert "GFS 2 weeks" in newest and "newest complete backup" in newest

    before = sorted(o.key for o in storage.list(""))
    dry = run_cli("--from", str(storage.folder), "--db-id", DB, "--dry-run", "--keep-last", "2",
                  "--daily", "3", "--weekly", "2", key_file=key_file)
    assert dry.returncode == 0, dry.stderr
    assert f"logical {DB}: policy last 2, GFS 3d 2w; {len(want)} backups kept, " \
           f"{len(times) - len(want)} deleted" in dry.stdout
    shown = {line.split()[2] for line in dry.stdout.splitlines()
             if line.startswith("  DELETE logical")}
    assert shown == set(times) - want
    assert "other" not in dry.stdout and not any(b in dry.stdout for b in others)
    assert "dry run: nothing was deleted" in dry.stderr
    assert sorted(o.key for o in storage.list("")) == before
    # A mistyped id is an error, not an empty plan that reads as "all in order".
    for dry_run in (["--dry-run"], []):
        typo = run_cli("--from", str(storage.folder), "--db-id", f"{DB}x", *dry_run,
                       "--keep-last", "2", key_file=key_file)
        assert typo.returncode == 1, (typo.stdout, typo.stderr)
        assert f"--db-id {DB}x: no backups of that id in" in typo.stderr, typo.stderr
        assert len(typo.stderr.strip().splitlines()) == 1 and "Traceback" not in typo.stderr
    assert sorted(o.key for o in storage.list("")) == before


def test_a_cluster_without_a_kept_physical_backup_keeps_its_wal(tmp_path: Path) -> None:
    """A streamer's WAL before any backup (its window is open), and a cluster whose only
    backup is incomplete (it stays, but bounds no WAL: no restore starts from it): all WAL
    stays."""
    now = datetime(2026, 11, 29, 20, 0, tzinfo=UTC)
    for case in ("no backup yet", "only an incomplete backup"):
        storage = LocalFolderStorage(tmp_path / case.replace(" ", "-"))
        writer = Writer(storage)
        for number in range(1, 30):
            writer.put(wal_object_key(CLUSTER, segment_name(1, number, SEG)), b"w",
                       now - timedelta(days=5))
        if case == "only an incomplete backup":
            broken = write_physical(writer, now - timedelta(days=2), 1, 20, None, None)
            storage.delete(f"physical/{CLUSTER}/base/{broken}/base.tar.pgbf")
        plan = plan_retention(read_catalog(storage, RING),
                              {CLUSTER: Policy((KeepLast(1),))}, now=now, grace=GRACE)
        (cluster,) = plan.databases
        # Nothing restorable: an incomplete backup stays (it may be caught mid-change, or
        # be damage to look into); it bounds no WAL either.
        assert [d.backup.backup_id for d in cluster.kept] == (
            [broken] if case == "only an incomplete backup" else []), case
        assert not cluster.deleted, case
        if case == "only an incomplete backup":
            assert "no complete backup" in cluster.kept[0].why
        assert cluster.wal_delete_count == 0 and not cluster.wal_delete, case
        assert "no complete physical backup is kept" in cluster.wal_note
        execute_plan(storage, plan, KEY)
        assert len(storage.list(f"physical/{CLUSTER}/wal/")) == 29, case


def test_s3_deletes_go_in_batches_of_at_most_1000_keys(s3_bucket: S3Bucket,
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """1,100 WAL segments before the only backup's start: DeleteObjects requests of at most
    1000 keys each, and every one of them is gone."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("PGBACKFLOW_CACHE_DIR", str(tmp_path / "cache"))
    storage = S3ObjectStorage(s3_bucket.bucket, "pg", endpoint_url=s3_bucket.endpoint_url,
                              region=s3_bucket.region)
    writer = Writer(storage)
    write_physical(writer, datetime.now(UTC) - timedelta(days=1), 1, 1101, None, None)
    keys = [wal_object_key(CLUSTER, segment_name(1, n, SEG)) for n in range(1, 1106)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: storage.write_bytes(key, b"w"), keys))
    batches: list[int] = []

    def count(params: dict[str, Any], **_: Any) -> None:
        batches.append(len(params["Delete"]["Objects"]))

    storage.client.meta.events.register("provide-client-params.s3.DeleteObjects", count)
    catalog = read_catalog(storage, RING)
    plan = plan_retention(catalog, {CLUSTER: Policy((KeepLast(1),))},
                          now=datetime.now(UTC) + timedelta(hours=2), grace=GRACE)
    assert plan.databases[0].wal_delete_count == 1100
    execute_plan(storage, plan, KEY)
    assert sum(batches) == 1100 and max(batches) <= 1000 and len(batches) >= 2
    left = sorted(o.key for o in storage.list(f"physical/{CLUSTER}/wal/"))
    assert left == keys[1100:]


def test_verified_backup_is_preferred_in_a_gfs_bucket(tmp_path: Path) -> None:
    storage = LocalFolderStorage(tmp_path / "store")
    writer = Writer(storage)
    now = datetime(2026, 11, 29, 20, 0, tzinfo=UTC)
    day = datetime(2026, 11, 20, tzinfo=UTC)
    ids = [write_logical(writer, day + timedelta(hours=h), h) for h in (3, 9, 15)]
    newest = write_logical(writer, now - timedelta(hours=3), 99)
    catalog = read_catalog(storage, RING)
    policy = {DB: Policy.build(daily=2)}
    plain = plan_retention(catalog, policy, now=now, grace=GRACE)
    assert {d.backup.backup_id for d in plain.databases[0].kept} == {ids[2], newest}
    preferred = plan_retention(catalog, policy, now=now, grace=GRACE,
                               verified={DB: {ids[1]}})
    kept = {d.backup.backup_id: d.why for d in preferred.databases[0].kept}
    assert set(kept) == {ids[1], newest}
    assert "newest verified of day 2026-11-20" in kept[ids[1]]


def test_refused_manifests_are_left_alone_and_hold_the_wal(storage: Storage) -> None:
    """A tampered manifest is neither kept as a backup nor deleted; its cluster's WAL stays."""
    now = datetime.now(UTC)
    writer = Writer(storage)
    old = write_logical(writer, now - timedelta(days=40), 1)
    write_logical(writer, now - timedelta(days=2), 2)
    full = write_physical(writer, now - timedelta(days=30), 3, 4, None, None)
    write_physical(writer, now - timedelta(days=2), 4, 40, None, None)
    writer.put(wal_object_key(CLUSTER, segment_name(1, 2, SEG)), b"w", now - timedelta(days=31))
    for kind, key in (("logical", f"logical/{DB}/{old}/manifest.json"),
                      ("physical", f"physical/{CLUSTER}/base/{full}/manifest.json")):
        document = json.loads(storage.read_bytes(key))
        document["tool_version"] = f"tampered {kind}"
        writer.put(key, json.dumps(document).encode(), now - timedelta(days=40))
    before = {o.key for o in storage.list("")}
    catalog = read_catalog(storage, RING, grace=GRACE)
    plan = plan_retention(catalog, lambda _db: Policy((KeepLast(1),)), grace=GRACE)
    assert all(not p.deleted for p in plan.databases)
    cluster_plan = next(p for p in plan.databases if p.catalog.db_id == CLUSTER)
    assert not cluster_plan.wal_delete and "refused" in cluster_plan.wal_note
    assert "leave  refused" in plan.render()
    execute_plan(storage, plan, KEY)
    assert {o.key for o in storage.list("")} == before


# ---------------------------------------------------------------------------------------
# Orphans and interrupted runs


def run_cli(*args: str, key_file: Path, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "retention", *args, "--key-file", str(key_file)],
                          capture_output=True, text=True, timeout=120,
                          env=as_users_run_it({**os.environ, **(env or {})}), check=False)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    write_key_file(path, KEY)
    return path


def _age(storage: LocalFolderStorage, key: str, age: timedelta) -> None:
    stamp = (datetime.now(UTC) - age).timestamp()
    os.utime(storage.folder.joinpath(*key.split("/")), (stamp, stamp))


def test_orphans_are_swept_after_the_grace_period_and_not_before(
    tmp_path: Path, key_file: Path
) -> None:
    storage = LocalFolderStorage(tmp_path / "store")
    writer = Writer(storage)
    now = datetime.now(UTC)
    kept = write_logical(writer, now - timedelta(days=3), 1)
    # A killed backup: objects but no manifest; one fresh (may still be running), one old.
    fresh = f"logical/{DB}/{logical_id(now, 2)}/dump.pgbf"
    stale = f"logical/{DB}/{logical_id(now - timedelta(days=2), 3)}/dump.pgbf"
    foreign = f"physical/{CLUSTER}/wal/not-a-segment"
    for key, age in ((fresh, timedelta(hours=2)), (stale, timedelta(hours=30)),
                     (foreign, timedelta(hours=30))):
        writer.put(key, b"partial dump", now - age)
    temp_dir = storage.folder / INCOMPLETE_DIR
    temp_dir.mkdir()
    old_temp, new_temp = temp_dir / "left-by-a-dead-writer", temp_dir / "another"
    for path, age in ((old_temp, timedelta(hours=30)), (new_temp, timedelta(hours=2))):
        path.write_bytes(b"x" * 600)
        stamp = (now - age).timestamp()
        os.utime(path, (stamp, stamp))

    dry = run_cli("--from", str(storage.folder), "--dry-run", key_file=key_file)
    assert dry.returncode == 0, dry.stderr
    assert f"DELETE orphan {stale}" in dry.stdout and f"wait   orphan {fresh}" in dry.stdout
    assert "DELETE temporary" in dry.stdout and old_temp.exists()

    done = run_cli("--from", str(storage.folder), key_file=key_file)
    assert done.returncode == 0, done.stderr
    keys = {o.key for o in storage.list("")}
    assert fresh in keys and stale not in keys and foreign not in keys
    assert f"deleted {storage.location}/{stale} (orphan: backup folder" in done.stdout
    assert not old_temp.exists() and new_temp.exists()
    assert f"logical/{DB}/{kept}/manifest.json" in keys  # no policy: backups stay

    _age(storage, fresh, timedelta(hours=25))
    later = run_cli("--from", str(storage.folder), key_file=key_file)
    assert later.returncode == 0, later.stderr
    assert fresh not in {o.key for o in storage.list("")}


def test_a_backup_folder_still_written_to_keeps_its_older_objects(
    tmp_path: Path, key_file: Path
) -> None:
    """A physical backup with tablespaces uploads one tar after the other: its first tar
    may be older than the grace period while the backup still runs. The folder's objects
    age together, from the last write into the folder or a write still in progress."""
    storage = LocalFolderStorage(tmp_path / "store")
    writer = Writer(storage)
    now = datetime.now(UTC)
    folder = f"physical/{CLUSTER}/base/{logical_id(now - timedelta(days=2), 9)}"
    base = f"{folder}/base.tar.pgbf"
    writer.put(base, b"the data directory", now - timedelta(hours=30))

    # A tablespace's tar still being written by a live process: nothing of the folder goes.
    upload = storage.open_write(f"{folder}/tablespace-16390.tar.pgbf")
    try:
        upload.write(b"x" * 1000)
        upload.flush()
        live = run_cli("--from", str(storage.folder), key_file=key_file)
        assert live.returncode == 0, live.stderr
        assert f"wait   orphan {base}" in live.stdout and storage.exists(base)
    finally:
        upload.abort()

    # Written 2 h ago, the last tar keeps the older one too.
    last = f"{folder}/tablespace-16391.tar.pgbf"
    writer.put(last, b"a tablespace", now - timedelta(hours=2))
    dry = run_cli("--from", str(storage.folder), "--dry-run", key_file=key_file)
    assert dry.returncode == 0, dry.stderr
    assert f"wait   orphan {base}" in dry.stdout and f"wait   orphan {last}" in dry.stdout

    # A write from another machine (its liveness unknown here) counts by its last write.
    _age(storage, last, timedelta(hours=25))
    other = storage.open_write(f"{folder}/tablespace-16392.tar.pgbf")
    other.write(b"y" * 10)
    other.flush()
    [temporary] = (storage.folder / INCOMPLETE_DIR).iterdir()
    elsewhere = temporary.with_name("0" * 12 + temporary.name[12:])
    temporary.rename(elsewhere)
    other.abort()
    _age_path(elsewhere, timedelta(hours=2))
    remote = run_cli("--from", str(storage.folder), key_file=key_file)
    assert remote.returncode == 0, remote.stderr
    assert f"wait   orphan {base}" in remote.stdout and storage.exists(last)

    _age_path(elsewhere, timedelta(hours=26))
    gone = run_cli("--from", str(storage.folder), key_file=key_file)
    assert gone.returncode == 0, gone.stderr
    assert not storage.exists(base) and not storage.exists(last), gone.stdout
    assert not elsewhere.exists()


def test_only_retention_asks_for_writes_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing uploads in progress needs S3 permissions a restore role may lack: restore,
    verification and list (catalogs without a grace period) never ask; retention does."""
    storage = LocalFolderStorage(tmp_path / "store")
    writer = Writer(storage)
    now = datetime.now(UTC)
    kept = write_logical(writer, now - timedelta(days=1), 1)
    writer.put(f"logical/{DB}/{logical_id(now, 2)}/dump.pgbf", b"partial", now)

    def denied(self: Storage, prefixes: Any) -> Any:
        raise StorageError("S3 denied access while trying to list incomplete uploads")

    monkeypatch.setattr(LocalFolderStorage, "write_activity", denied)
    catalog = read_catalog(storage, RING)
    assert [b.backup_id for b in catalog.databases[0].backups] == [kept]
    with pytest.raises(StorageError, match="denied access"):
        read_catalog(storage, RING, grace=GRACE)


def _age_path(path: Path, age: timedelta) -> None:
    stamp = (datetime.now(UTC) - age).timestamp()
    os.utime(path, (stamp, stamp))


def test_orphans_on_s3_age_with_their_folder_and_its_uploads(s3_bucket: S3Bucket) -> None:
    storage = S3ObjectStorage(s3_bucket.bucket, "pg", endpoint_url=s3_bucket.endpoint_url,
                              region=s3_bucket.region)
    folder = f"physical/{CLUSTER}/base/{logical_id(datetime.now(UTC), 6)}"
    base = f"{folder}/base.tar.pgbf"
    storage.write_bytes(base, b"the data directory")
    grace = timedelta(seconds=5)  # the part must still be younger when retention looks
    time.sleep(5.2)
    # A tablespace's tar uploading: its parts are the folder's activity.
    upload = storage.open_write(f"{folder}/tablespace-16390.tar.pgbf", size_hint=64 * 2**20)
    try:
        upload.write(b"x" * (8 * 2**20))
        upload.flush()
        client = s3_bucket.client()
        for _ in range(100):  # the first part goes up on the writer's own thread
            uploads = client.list_multipart_uploads(Bucket=s3_bucket.bucket).get("Uploads", [])
            if uploads and client.list_parts(Bucket=s3_bucket.bucket, Key=uploads[0]["Key"],
                                             UploadId=uploads[0]["UploadId"]).get("Parts"):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the writer uploaded no part")
        shown: list[str] = []
        run_retention(storage, RING, {}, grace=grace, show=shown.append)
        assert storage.exists(base), shown
        assert any(f"wait   orphan {base}" in line for line in shown), shown
    finally:
        upload.abort()
    time.sleep(5.2)
    shown = []
    run_retention(storage, RING, {}, grace=grace, show=shown.append)
    assert not storage.exists(base), shown


def test_a_backup_stamped_in_the_future_does_not_stay_the_newest(tmp_path: Path) -> None:
    """A host whose clock ran 30 days ahead stamped its backup a month into the future.
    Counted by that stamp it would be "the newest" for a month, and keep-last 1 would
    delete every backup really made after it. It counts as finished when the storage
    received its manifest, and the plan says so."""
    storage = LocalFolderStorage(tmp_path / "store")
    writer = Writer(storage)
    now = datetime.now(UTC)
    old = write_logical(writer, now - timedelta(days=3), 1)
    ahead = write_logical(writer, now + timedelta(days=30), 2,
                          stored=now - timedelta(hours=26))
    newest = write_logical(writer, now - timedelta(hours=2), 3)
    plan = plan_retention(read_catalog(storage, RING), {DB: Policy((KeepLast(1),))},
                          now=now, grace=GRACE)
    decisions = {d.backup.backup_id: d for d in plan.databases[0].decisions}
    assert "one of the last 1" in decisions[newest].why, plan.render()
    assert not decisions[old].keep
    # The one-hour safety rule still reads the stamp (on the same kind of clock as "now"):
    # the stamped backup stays until its time has passed, a note saying why.
    assert decisions[ahead].keep and "younger than" in decisions[ahead].why
    assert "the backup host's clock ran ahead" in decisions[ahead].why
    assert "clock" not in decisions[old].why and "clock" not in decisions[newest].why

    # A few minutes ahead is ordinary drift between hosts: the manifest's stamp counts.
    storage2 = LocalFolderStorage(tmp_path / "store2")
    writer2 = Writer(storage2)
    drift = write_logical(writer2, now - timedelta(hours=3) + timedelta(minutes=4), 4,
                          stored=now - timedelta(hours=3))
    other = write_logical(writer2, now - timedelta(hours=3) + timedelta(minutes=2), 5)
    plan2 = plan_retention(read_catalog(storage2, RING), {DB: Policy((KeepLast(1),))},
                           now=now, grace=GRACE)
    kept2 = [d.backup.backup_id for d in plan2.databases[0].decisions if d.keep]
    assert kept2 == [drift] and other != drift

    # A storage whose clock is 2 h behind the hosts' (which agree): a backup finished 10
    # minutes ago is stored "2 h 10 min ago". It is still younger than the hour.
    storage3 = LocalFolderStorage(tmp_path / "store3")
    writer3 = Writer(storage3)
    write_logical(writer3, now - timedelta(days=1), 6)
    recent = write_logical(writer3, now - timedelta(minutes=10), 7,
                           stored=now - timedelta(hours=2, minutes=10))
    newer = write_logical(writer3, now - timedelta(minutes=5), 8,
                          stored=now - timedelta(hours=2, minutes=5))
    plan3 = plan_retention(read_catalog(storage3, RING), {DB: Policy((KeepLast(1),))},
                           now=now, grace=GRACE)
    decisions3 = {d.backup.backup_id: d for d in plan3.databases[0].decisions}
    assert decisions3[recent].keep and "younger than" in decisions3[recent].why
    assert "one of the last 1" in decisions3[newer].why


def test_orphans_on_s3_wait_for_the_grace_period(s3_bucket: S3Bucket) -> None:
    storage = S3ObjectStorage(s3_bucket.bucket, "pg", endpoint_url=s3_bucket.endpoint_url,
                              region=s3_bucket.region)
    orphan = f"logical/{DB}/{logical_id(datetime.now(UTC), 5)}/dump.pgbf"
    storage.write_bytes(orphan, b"partial")
    grace = timedelta(seconds=3)
    shown: list[str] = []
    run_retention(storage, RING, {}, grace=grace, show=shown.append)
    assert storage.exists(orphan) and "wait   orphan" in shown[0]
    time.sleep(3.2)
    run_retention(storage, RING, {}, grace=grace, show=shown.append)
    assert not storage.exists(orphan)
    assert shown[-1] == (f"deleted {storage.location}/{orphan} (orphan: backup folder "
                         f"{orphan.split('/')[2]} has no manifest (a backup that failed, was "
                         "killed, or is still running))")


def test_unfinished_deletion_is_completed_at_once(storage: Storage) -> None:
    """A journalled backup whose manifest is gone: its objects go whatever their age."""
    writer = Writer(storage)
    now = datetime.now(UTC)
    backup_id = write_logical(writer, now - timedelta(hours=2), 1)
    kept = write_logical(writer, now - timedelta(hours=1, minutes=30), 2)
    journal, data = seal_journal("logical", DB, "run-1", [backup_id, kept], KEY)
    storage.write_bytes(journal, data)
    storage.delete(f"logical/{DB}/{backup_id}/manifest.json")
    catalog = read_catalog(storage, RING)
    plan = plan_retention(catalog, {}, grace=GRACE)
    assert {o.key for o in plan.databases[0].orphans_delete} == {
        f"logical/{DB}/{backup_id}/{name}" for name in ("dump.pgbf", "globals.pgbf")}
    assert plan.databases[0].journals == (journal,)
    execute_plan(storage, plan, KEY)
    assert not storage.list(f"logical/{DB}/{backup_id}/") and not storage.exists(journal)
    # The journal named a backup whose manifest is still there: it stays listed and whole.
    assert [b.backup_id for b in read_catalog(storage, RING).databases[0].backups] == [kept]
    # A forged journal (not sealed with the key) gives no such power: it is an orphan.
    other = logical_id(now, 3)
    writer.put(f"logical/{DB}/{other}/dump.pgbf", b"running", now)
    forged = f"logical/{DB}/deleting-run-2.json"
    writer.put(forged, json.dumps({"backup_ids": [other], "auth": {}}).encode(), now)
    plan = plan_retention(read_catalog(storage, RING), {}, grace=GRACE)
    assert not plan.databases[0].orphans_delete and not plan.databases[0].journals
    assert {o.key for o in plan.databases[0].orphans_waiting} == {
        forged, f"logical/{DB}/{other}/dump.pgbf"}


def listed_backups_are_complete(storage: LocalFolderStorage) -> int:
    """Every backup the catalog lists has every object, with the manifest's SHA-256."""
    catalog = read_catalog(storage, RING)
    entry = catalog.database(DB)
    assert entry is not None
    for backup in entry.backups:
        assert not backup.missing
        manifest = load_manifest(storage, RING, backup)
        assert isinstance(manifest, LogicalManifest)
        for info in (manifest.dump, manifest.globals):
            assert hashlib.sha256(storage.read_bytes(info.key)).hexdigest() == info.sha256
    return len(entry.backups)


def test_kill_9_mid_run_leaves_listed_backups_complete_and_a_rerun_finishes(
    tmp_path: Path, key_file: Path
) -> None:
    storage = LocalFolderStorage(tmp_path / "store")
    writer = Writer(storage)
    now = datetime.now(UTC)
    count = 600
    ids = [write_logical(writer, now - timedelta(hours=2 + count - i), i) for i in range(count)]
    child = subprocess.Popen(
        [*CLI, "retention", "--from", str(storage.folder), "--keep-last", "5",
         "--key-file", str(key_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert child.stdout is not None
    seen = 0
    for line in child.stdout:
        if line.startswith("deleted "):
            seen += 1
            if seen == 5:
                child.kill()
                break
    child.wait(30)
    assert child.returncode == -9, "the run finished before it could be killed"
    remaining = listed_backups_are_complete(storage)
    assert 5 < remaining < count

    rerun = run_cli("--from", str(storage.folder), "--keep-last", "5", key_file=key_file)
    assert rerun.returncode == 0, rerun.stderr
    assert listed_backups_are_complete(storage) == 5
    assert {o.key.split("/")[2] for o in storage.list(f"logical/{DB}/")} == set(ids[-5:])


def test_cli_errors_are_one_line(tmp_path: Path, key_file: Path) -> None:
    missing = run_cli("--from", str(tmp_path / "nowhere"), key_file=key_file)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "store").mkdir()
    bad = run_cli("--from", str(tmp_path / "store"), "--keep-within", "3 fortnights",
                  key_file=key_file)
    assert bad.returncode == 1 and "36h, 14d or 8w" in bad.stderr
    assert bad.stderr.count("\n") == 1


def test_manifest_cache_of_a_remote_storage_trusts_nothing(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached manifests save round trips; a changed manifest is fetched again (and refused
    when it fails its MAC); entries of deleted manifests go."""
    monkeypatch.setenv("PGBACKFLOW_CACHE_DIR", str(tmp_path / "cache"))
    storage = S3ObjectStorage(s3_bucket.bucket, "pg", endpoint_url=s3_bucket.endpoint_url,
                              region=s3_bucket.region)
    writer = Writer(storage)
    now = datetime.now(UTC)
    ids = [write_logical(writer, now - timedelta(hours=h), h) for h in (1, 2, 3)]
    first = read_catalog(storage, RING)
    assert len(first.databases[0].backups) == 3
    entries = list((tmp_path / "cache" / "manifests").glob("*/*"))
    assert len(entries) == 3

    fetched: list[str] = []
    original = S3ObjectStorage.read_bytes

    def counting(self: S3ObjectStorage, key: str) -> bytes:
        fetched.append(key)
        return original(self, key)

    monkeypatch.setattr(S3ObjectStorage, "read_bytes", counting)
    assert len(read_catalog(storage, RING).databases[0].backups) == 3
    assert fetched == []  # every manifest came from the cache

    tampered = f"logical/{DB}/{ids[0]}/manifest.json"
    document = json.loads(storage.read_bytes(tampered))
    document["tool_version"] = "tampered, and longer than before"
    storage.write_bytes(tampered, json.dumps(document).encode())
    storage.delete(f"logical/{DB}/{ids[1]}/manifest.json")
    fetched.clear()
    entry = read_catalog(storage, RING).databases[0]
    assert fetched == [tampered]
    assert [b.backup_id for b in entry.backups] == [ids[2]]
    assert [r.backup_id for r in entry.refused] == [ids[0]]
    assert "failed authentication" in entry.refused[0].problem
    assert len(list((tmp_path / "cache" / "manifests").glob("*/*"))) == 2


# ---------------------------------------------------------------------------------------
# One deleting run per storage


def _cli_target(storage: Storage, bucket: S3Bucket | None) -> tuple[str, dict[str, str]]:
    """``--from`` and the environment a user's shell would have for ``storage``."""
    if bucket is None:
        assert isinstance(storage, LocalFolderStorage)
        return str(storage.folder), {}
    return f"s3://{bucket.bucket}/pg", {
        "AWS_ENDPOINT_URL": bucket.endpoint_url, "AWS_DEFAULT_REGION": bucket.region,
        "AWS_ACCESS_KEY_ID": bucket.access_key_id,
        "AWS_SECRET_ACCESS_KEY": bucket.secret_access_key}


HOLD_LOCK = """
import sys, time
from pgbackflow.tasks.retention import RetentionLock
from pgbackflow.tasks.storage import LocalFolderStorage, S3ObjectStorage
if sys.argv[1].startswith("s3://"):
    bucket, _, prefix = sys.argv[1][5:].partition("/")
    storage = S3ObjectStorage(bucket, prefix, endpoint_url=sys.argv[2], region="us-east-1")
else:
    storage = LocalFolderStorage(sys.argv[1])
RetentionLock(storage, "a maintenance run").acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_host_whose_clock_runs_ahead_does_not_take_over_a_live_lock(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By its own clock, 15 minutes ahead, a live lock (renewed a moment ago, lease 10
    minutes) looks lapsed; by the storage's clock, which stamps the renewals, it is not."""
    import pgbackflow.tasks.retention as retention

    holder = RetentionLock(storage, "maintenance run elsewhere")
    holder.acquire()
    try:
        class Ahead(datetime):
            @classmethod
            def now(cls, tz: Any = None) -> Any:
                return datetime.now(tz) + timedelta(minutes=15)

        monkeypatch.setattr(retention, "datetime", Ahead)
        with pytest.raises(RetentionBusyError, match="is busy: another retention run"):
            RetentionLock(storage, "a run on a host ahead").acquire()
        holder.check()  # still the holder's
    finally:
        holder.release()
    assert not storage.exists(LOCK_KEY)

    def foreign(renewed: datetime, lease: timedelta) -> None:
        storage.write_bytes(LOCK_KEY, json.dumps({
            "owner": "maintenance run elsewhere", "host": "db-backup-2", "boot": "otherboot",
            "pid": 1, "token": "0123", "renewed_at": renewed.isoformat(),
            "expires_at": (renewed + lease).isoformat()}).encode())

    # A live lock of a holder whose clock runs 15 minutes behind: its 10-minute lease
    # "expired" 5 minutes ago by every clock but its own; the storage renewed it just now.
    monkeypatch.undo()
    behind = datetime.now(UTC) - timedelta(minutes=15)
    foreign(behind, timedelta(minutes=10))
    with pytest.raises(RetentionBusyError, match="on host db-backup-2"):
        RetentionLock(storage, "a run with the right time").acquire()
    # A lock whose (1-second) lease lapsed by the storage's clock is taken over.
    foreign(behind, timedelta(seconds=1))
    time.sleep(2.1)  # S3 upload times have a one-second resolution
    taker = RetentionLock(storage, "a run with the right time")
    taker.acquire()
    taker.release()
    assert not storage.exists(LOCK_KEY)


def test_one_deleting_run_per_storage(
    storage: Storage, key_file: Path, request: pytest.FixtureRequest
) -> None:
    """A retention run while another holds the storage's lock (another process, as a
    maintenance run on a worker would) is one line and deletes nothing; the lock of a
    killed holder on this machine is taken over at once, another host's once its lease
    lapsed; a run that lost its lock stops before its next deletion."""
    bucket = request.getfixturevalue("s3_bucket") if isinstance(storage, S3ObjectStorage) \
        else None
    source, env = _cli_target(storage, bucket)
    writer = Writer(storage)
    now = datetime.now(UTC)
    ids = [write_logical(writer, now - timedelta(days=5 - i), i) for i in range(4)]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, source, bucket.endpoint_url if bucket else ""],
        stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        busy = run_cli("--from", source, "--keep-last", "1", key_file=key_file, env=env)
        assert busy.returncode == 1, busy.stdout
        assert busy.stderr.count("\n") == 1 and "Traceback" not in busy.stderr
        assert busy.stderr.startswith(f"error: storage {storage.location} is busy: another "
                                      "retention run holds its lock retention.lock (a "
                                      "maintenance run on host "), busy.stderr
        assert f"pid {holder.pid}" in busy.stderr and "lapses at" in busy.stderr
        assert len(read_catalog(storage, RING).databases[0].backups) == 4
        # A dry run deletes nothing and needs no lock.
        assert run_cli("--from", source, "--keep-last", "1", "--dry-run", key_file=key_file,
                       env=env).returncode == 0
    finally:
        holder.kill()
        holder.wait(30)
    # The holder was killed: its lock names a pid of this boot that is gone.
    assert storage.exists(LOCK_KEY)
    taken = run_cli("--from", source, "--keep-last", "1", key_file=key_file, env=env)
    assert taken.returncode == 0, taken.stderr
    assert [b.backup_id for b in read_catalog(storage, RING).databases[0].backups] == ids[-1:]
    assert not storage.exists(LOCK_KEY), "a finished run leaves its lock behind"

    # Another host's lock: busy while its lease runs, taken over once it lapsed (its
    # lease, as long as the lock says, runs from the storage's write time).
    def foreign(expires: datetime, lease: timedelta = timedelta(minutes=10)) -> None:
        storage.write_bytes(LOCK_KEY, json.dumps({
            "owner": "maintenance run elsewhere", "host": "db-backup-2", "boot": "otherboot",
            "pid": 1, "token": "0123", "renewed_at": (expires - lease).isoformat(),
            "expires_at": expires.isoformat()}).encode())

    foreign(datetime.now(UTC) + timedelta(minutes=5))
    busy = run_cli("--from", source, key_file=key_file, env=env)
    assert busy.returncode == 1 and "on host db-backup-2, pid 1" in busy.stderr, busy.stderr
    foreign(datetime.now(UTC), timedelta(seconds=1))
    time.sleep(2.1)  # S3 upload times have a one-second resolution
    lapsed = run_cli("--from", source, key_file=key_file, env=env)
    assert lapsed.returncode == 0, lapsed.stderr
    assert not storage.exists(LOCK_KEY)
    # A forged lock "valid" for decades lapses by the storage's write time plus the lease.
    foreign(datetime(2099, 1, 1, tzinfo=UTC))
    with pytest.raises(RetentionBusyError, match="on host db-backup-2"):
        RetentionLock(storage, "this test").acquire()
    time.sleep(2.5)  # S3 upload times have a one-second resolution
    short = RetentionLock(storage, "this test", lease=timedelta(seconds=1))
    short.acquire()
    short.release()
    assert not storage.exists(LOCK_KEY)

    # A holder whose lock was taken over stops before it deletes anything more.
    more = [write_logical(writer, now - timedelta(days=3, hours=i), 10 + i) for i in range(2)]
    lock = RetentionLock(storage, "this test")
    lock.acquire()
    try:
        plan = plan_retention(read_catalog(storage, RING), {DB: Policy((KeepLast(1),))},
                              grace=GRACE)
        assert {d.backup.backup_id for d in plan.databases[0].deleted} == set(more)
        foreign(datetime.now(UTC) + timedelta(minutes=5))
        with pytest.raises(RetentionBusyError, match="this run lost the retention lock"):
            execute_plan(storage, plan, KEY, lock=lock)
    finally:
        lock.release()
    assert storage.exists(LOCK_KEY), "released a lock that was not its own"
    assert len(read_catalog(storage, RING).databases[0].backups) == 3


# ---------------------------------------------------------------------------------------
# WAL gaps across a timeline switch


def test_catalog_wal_gaps_follow_the_timeline_switch(storage: Storage, key_file: Path,
                                                     request: pytest.FixtureRequest) -> None:
    """A full on timeline 1, a switch to timeline 2 at segment 5 (the authenticated history
    file says so): a hole on timeline 2 is a gap, timeline 1's abandoned segments after the
    switch are not needed, and physical-list (a view of the catalog) says the same."""
    from pgbackflow.tasks.pipeline import store_bytes

    writer = Writer(storage)
    moment = datetime.now(UTC) - timedelta(hours=3)
    write_physical(writer, moment, 1, 2, None, None)
    for timeline, number in ((1, 2), (1, 3), (1, 4), (1, 6), (2, 5), (2, 7), (2, 8)):
        writer.put(wal_object_key(CLUSTER, segment_name(timeline, number, SEG)), b"w", moment)
    store_bytes(b"1\t0/5000000\tno recovery target specified\n", [storage],
                wal_object_key(CLUSTER, "00000002.history"), KEY)
    tl2_gap = "000000020000000000000006 (LSN 0/6000000 to 0/7000000)"
    entry = read_catalog(storage, RING).database(CLUSTER, "physical")
    assert entry is not None and entry.wal_gaps == (tl2_gap,)

    storage.delete(wal_object_key(CLUSTER, segment_name(1, 3, SEG)))
    tl1_gap = "000000010000000000000003 (LSN 0/3000000 to 0/4000000)"
    entry = read_catalog(storage, RING).database(CLUSTER, "physical")
    assert entry is not None and entry.wal_gaps == (tl1_gap, tl2_gap)

    bucket = request.getfixturevalue("s3_bucket") if isinstance(storage, S3ObjectStorage) \
        else None
    source, env = _cli_target(storage, bucket)
    listed = subprocess.run([*CLI, "physical-list", "--from", source, "--key-file",
                             str(key_file), "--json"], capture_output=True, text=True,
                            timeout=120, env=as_users_run_it({**os.environ, **env}),
                            check=False)
    assert listed.returncode == 0, listed.stderr
    (document,) = json.loads(listed.stdout)
    assert document["wal_gaps"] == [tl1_gap, tl2_gap]
    assert [b["auth"] for b in document["backups"]] == ["verified"]


# ---------------------------------------------------------------------------------------
# WAL as runs of segments


def test_catalog_keeps_wal_as_runs_and_retention_deletes_exactly_the_old_part(
        tmp_path: Path) -> None:
    """Segments 250..270 (across a log id: 0xFF → 0x100) with a hole at 260 make two runs;
    a partial of a stored segment is an orphan, one past the end stays a file; the plan
    deletes the segments before the oldest kept backup's start that are older than an
    hour, exactly, including inside a run of mixed ages, and the keys it deletes are the
    stored ones."""
    storage = LocalFolderStorage(tmp_path / "store")
    writer = Writer(storage)
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    write_physical(writer, now - timedelta(days=2), 1, 255, None, None)
    uploaded: dict[str, datetime] = {}
    for number in [n for n in range(250, 271) if n != 260]:
        young = number in (252, 253)  # re-uploaded recently: inside the run, must stay
        moment = now - (timedelta(minutes=10) if young else timedelta(days=3))
        key = wal_object_key(CLUSTER, segment_name(1, number, SEG))
        writer.put(key, b"w" * number, moment)
        uploaded[key] = moment
    superseded = wal_object_key(CLUSTER, segment_name(1, 251, SEG) + ".partial")
    newest = wal_object_key(CLUSTER, segment_name(1, 271, SEG) + ".partial")
    writer.put(superseded, b"p", now - timedelta(days=3))
    writer.put(newest, b"p", now - timedelta(days=3))

    entry = read_catalog(storage, RING).database(CLUSTER, "physical")
    assert entry is not None
    assert [(r.timeline, r.first, r.last) for r in entry.wal_runs] == [(1, 250, 259),
                                                                       (1, 261, 270)]
    assert [w.key for w in entry.wal_files] == [newest]
    assert [o.key for o in entry.orphans] == [superseded]
    assert entry.wal_count == 21 and {w.key for w in entry.wal} == set(uploaded) | {newest}
    assert {w.key: w.modified for w in entry.wal if w.kind == "segment"} == uploaded
    assert entry.wal_size == sum(range(250, 271)) - 260 + 1

    plan = plan_retention(read_catalog(storage, RING), lambda _db: Policy((KeepLast(1),)),
                          now=now, grace=GRACE)
    (cluster,) = [p for p in plan.databases if p.catalog.db_id == CLUSTER]
    want = {wal_object_key(CLUSTER, segment_name(1, n, SEG)) for n in (250, 251, 254)}
    assert {w.key for w in cluster.wal_delete} == want
    assert cluster.wal_delete_count == 3 and cluster.wal_delete_size == 250 + 251 + 254
    execute_plan(storage, plan, KEY)
    left = {o.key for o in storage.list(f"physical/{CLUSTER}/wal/")}
    assert left == (set(uploaded) | {newest}) - want
