"""Point-in-time restore: a chain of base backups + WAL replay to any second.

1. Plan: pick the newest chain (full + incrementals) that ends before the target, check the
   target lies in the recoverable window and that no WAL segment is missing.
2. Unpack every backup of the chain (SHA-256 checked while reading), every object of every
   link at once, each decrypted and decompressed by a thread of its own ahead of its
   unpacker. A chain is combined in place (tasks/combine.py: the unpacked full becomes the
   output, only the incrementals' changed blocks are written over it; ``pg_combinebackup``
   only for chains with extra tablespaces); a full alone is unpacked straight into the
   target directory.
3. Meanwhile fetch the WAL needed into ``<dir>/pgbackflow_restore/wal`` (each segment's
   header is checked against its name and the cluster), so the server replays with a plain
   ``cp`` restore_command that needs neither our key nor the storage. Steps 2 and 3 are one
   function, :func:`build_data_dir`, which PITR, the Docker restore and physical
   verification share; the first job that fails stops the others.
4. Configure recovery (``recovery.signal``, target time, ``promote``), write ``restore.sh``
   (the same restore, by hand, with one command) and optionally start the server and wait
   until it is promoted.

Until a ``pitr`` into a directory has finished, the directory holds
``pgbackflow-restore-incomplete``, included from its postgresql.conf so that PostgreSQL
refuses to start it (the include is neutralised just before pgbackflow itself starts
recovery), and ``pitr`` refuses the directory with a one-line error saying to delete it.
A full backup is unpacked under a hidden sibling name and moved into place once marked; a
chain is combined in the work folder and moved likewise: a restore killed while unpacking
leaves the target as it was. Those hidden folders (``.<dir>.pgbackflow-restoring-…``,
``.pgbackflow-chain-…``) carry their owner's machine (boot id) and pid in the name and are
locked (flock) while it works on them; the next restore into the same parent folder removes
those whose owner is gone (same boot, lock free, pid gone), never a live one's.
"""

from __future__ import annotations

import contextvars
import fcntl
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from concurrent.futures import wait as wait_all
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from queue import Empty, Full, Queue
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pgbackflow.tasks.cluster import free_port
from pgbackflow.tasks.combine import combine_in_place
from pgbackflow.tasks.errors import ConfigError, ObjectNotFoundError, PgBackflowError
from pgbackflow.tasks.keys import Keyring
from pgbackflow.tasks.manifest import StoredObjectInfo, safe_join
from pgbackflow.tasks.pgconf import append_settings, request_recovery
from pgbackflow.tasks.physical import (
    PhysicalManifest,
    authenticate_backup,
    chain_of,
    parse_lsn,
    usable_backups,
)
from pgbackflow.tasks.pipeline import decrypted_chunks
from pgbackflow.tasks.process import (
    BOOT_TAG,
    OsUser,
    Tool,
    owner_state,
    remove_tree,
    uninterrupted,
)
from pgbackflow.tasks.runtime import (
    TARGET_NOT_REACHED,
    LocalRuntime,
    Recovery,
    StageRunner,
    recover,
    run_directly,
    stop_local_server,
)
from pgbackflow.tasks.storage import Storage
from pgbackflow.tasks.tarstream import UnsafeArchiveError, unpack_tar_stream
from pgbackflow.tasks.toolsets import Toolset, find_toolset
from pgbackflow.tasks.transfer import ProgressCallback, ProgressReporter
from pgbackflow.tasks.wal import (
    TimelineSpan,
    WalIntegrityError,
    WalInventory,
    fetch_wal_file,
    history_hole,
    newest_timeline,
    parse_segment_name,
    read_wal_inventory,
    route_files,
    route_gaps,
    route_history,
    segment_name,
    show_lsn,
    timeline_begins,
    timeline_route,
)

RESTORE_DIR = "pgbackflow_restore"
INCOMPLETE_MARKER = "pgbackflow-restore-incomplete"
"""In a PITR target until the restore finished: pitr refuses the directory, and while it
is included from postgresql.conf, PostgreSQL refuses to start it."""
_MARKER_HEADER = (
    "# pgbackflow: this point-in-time restore did not finish: do not use this directory.\n"
    "# Delete it and run pgbackflow pitr again (into a new or empty directory).\n"
)
_MARKER_BLOCK = (
    "# PostgreSQL refuses to start while postgresql.conf includes this file:\n"
    "pgbackflow_restore_incomplete = 'delete this directory and rerun pgbackflow pitr'\n"
)
_MARKER_INCLUDE = (
    f"include_if_exists = '{INCOMPLETE_MARKER}'  # pgbackflow: until the restore finished\n"
)
WAL_CACHE = "wal"
SCRIPT_NAME = "restore.sh"
LOG_NAME = "postgres.log"
WAL_FETCH_THREADS = 4
UNPACK_THREADS = 2
"""Tar objects unpacked at once (each with its own read-ahead thread decrypting and
decompressing): two keep both cores of a small machine busy."""
READ_AHEAD = 8
"""Plaintext chunks decrypted and decompressed ahead of an unpacker."""
COMBINE_OPTIONS = ("--copy-file-range", "--no-manifest")
"""pg_combinebackup copies unchanged files in the kernel; a manifest of the output would
need every byte read back for its checksums, and a restored data directory never uses it."""
T = TypeVar("T")
PROMOTE_TIMEOUT_S = 3600.0
_SEGMENT_NAME = re.compile(r"[0-9A-F]{24}")
"""PostgreSQL's log line when no transaction followed the target time."""


def parse_target_time(text: str) -> datetime | None:
    """``latest`` → None; an ISO-like timestamp with zone → aware datetime.

    Raises:
        ConfigError: unparsable, or without a time zone.
    """
    if text.strip().lower() == "latest":
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"target time {text!r} is not a timestamp: use e.g. '2026-11-21 10:15:30+00' "
            "or latest"
        ) from None
    if moment.tzinfo is None:
        raise ConfigError(
            f"target time {text!r} has no time zone: add one, e.g. '{text.strip()}+00'"
        )
    return moment.astimezone(UTC)


def _show(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S+00")


@dataclass(frozen=True)
class PitrPlan:
    """What a point-in-time restore will use.

    Attributes:
        db_id: The cluster.
        chain: Full backup first, then its incrementals, ending with the chosen backup.
        target: The target time, or None for the end of the WAL.
        wal_segments: WAL file names to fetch, in replay order.
        earliest: Start of the recoverable window (end of the oldest full backup).
        latest: End of the window (newest WAL upload, or the newest backup's end).
        timeline_begins: Where each timeline of the route began (see
            :func:`tasks.wal.timeline_begins`): the fetched segments' pages are checked
            against it.
        must_reach: ``(timeline, LSN)`` a replay to the end of the WAL must reach (see
            :attr:`WalRoute.must_reach`); None: no WAL after the backup.
    """

    db_id: str
    chain: tuple[PhysicalManifest, ...]
    target: datetime | None
    wal_segments: tuple[str, ...]
    earliest: datetime
    latest: datetime
    timeline_begins: tuple[tuple[int, int], ...] = ()
    must_reach: tuple[int, int] | None = None

    @property
    def newest(self) -> PhysicalManifest:
        """The backup the chain ends with."""
        return self.chain[-1]

    @property
    def window(self) -> str:
        """The recoverable window, for messages."""
        return f"{_show(self.earliest)} to {_show(self.latest)}"


def plan_pitr(
    storage: Storage, db_id: str, target: datetime | None, keyring: Keyring | None = None
) -> PitrPlan:
    """Choose the chain and the WAL for a restore to ``target`` (None: as late as possible).

    With ``keyring`` only backups whose manifests verify are considered, and ``latest`` is
    refused while the newest manifest is refused. Without, every readable manifest is
    planned with; :func:`unpack_backup` authenticates each one before using its data.

    Raises:
        ObjectNotFoundError: no backups, or WAL segments the restore needs are missing.
        ConfigError: the target lies outside the recoverable window (which the message names).
        ManifestError: a manifest the restore would need (or the newest, for latest) is
            refused.
    """
    backups, refused = usable_backups(storage, db_id, keyring, newest=target is None)
    fulls = [b for b in backups if b.mode == "full"]
    if not fulls:
        raise ObjectNotFoundError(
            f"no physical full backup of {db_id} in {storage.location}: run pgbackflow "
            "physical-backup first"
        )
    segment_size = backups[-1].wal_segment_size
    inventory = read_wal_inventory(storage, db_id, segment_size)
    earliest = fulls[0].finished_at
    latest = max(
        [backups[-1].finished_at] + ([inventory.newest] if inventory.newest is not None else [])
    )
    if target is not None and not earliest <= target <= latest:
        raise ConfigError(
            f"target time {_show(target)} is outside the recoverable window of {db_id}: "
            f"{_show(earliest)} to {_show(latest)}; pick a time inside it"
        )
    usable = [b for b in backups if target is None or b.finished_at <= target]
    chain = _newest_complete_chain(usable, backups, refused)
    base = chain[-1]
    route = _wal_to_fetch(storage, inventory, base, target, keyring)
    return PitrPlan(db_id, tuple(chain), target, route.files, earliest, latest,
                    route.begins, route.must_reach)


def _newest_complete_chain(
    candidates: Sequence[PhysicalManifest],
    backups: Sequence[PhysicalManifest],
    refused: dict[str, str],
) -> list[PhysicalManifest]:
    problems: list[str] = []
    for backup in reversed(candidates):
        try:
            return chain_of(backup, backups, refused)
        except ObjectNotFoundError as exc:
            problems.append(str(exc))
    raise ObjectNotFoundError(
        "no complete backup chain before the target: " + ("; ".join(problems[:2]) or "none")
    )


def _wal_to_fetch(
    storage: Storage,
    inventory: WalInventory,
    base: PhysicalManifest,
    target: datetime | None,
    keyring: Keyring | None,
) -> WalRoute:
    """WAL after the backup's own up to the newest stored, across timeline switches (as
    replay follows them); gaps refused with the segments and LSNs they cover."""
    route = plan_wal_route(
        storage, inventory, base, keyring,
        advice="restore to a time before the gap from an older chain, or take a new full backup",
    )
    if not route.segments and target is not None and target > base.finished_at:
        raise ObjectNotFoundError(
            f"no WAL after backup {base.backup_id} on timeline {base.timeline} is stored, "
            f"so only its end ({_show(base.finished_at)}) can be restored: run pgbackflow "
            "wal-stream for this cluster, or target latest"
        )
    # Every segment to the end of the stored WAL: a segment's upload time says nothing
    # about when its records were written (a streamer that was down uploads late), and
    # replay stops at the target by itself.
    return route


@dataclass(frozen=True)
class WalRoute:
    """The stored WAL replay reads after a base backup, across timeline switches.

    Attributes:
        spans: The timelines and segments replay reads (see :func:`tasks.wal.stored_route`).
        files: History files, then segments in replay order (empty: no WAL after the
            backup is stored, replay ends where the backup becomes consistent).
        base_timeline: The backup's timeline.
        begins: Where each timeline of the route began, as far as the history file tells
            (``(timeline, LSN)`` pairs, see :func:`tasks.wal.timeline_begins`).
        must_reach: ``(timeline, LSN)`` a replay to the end must reach: past the start of
            the segment before the newest (the newest may be a ``.partial`` holding nothing
            yet, and a record that began before it may continue past what is stored), and
            at least the backup's end. Ending earlier means PostgreSQL found the stored WAL
            unusable there. None: no segments.
    """

    spans: tuple[TimelineSpan, ...]
    files: tuple[str, ...]
    base_timeline: int
    begins: tuple[tuple[int, int], ...] = ()
    must_reach: tuple[int, int] | None = None

    @property
    def segments(self) -> tuple[str, ...]:
        """The segment names of :attr:`files`."""
        return tuple(name for name in self.files if _SEGMENT_NAME.fullmatch(name))

    @property
    def end_timeline(self) -> int:
        """The timeline of the newest segment replayed (the backup's when none is)."""
        return int(self.segments[-1][:8], 16) if self.segments else self.base_timeline

    @property
    def end_segment(self) -> str | None:
        """The newest segment replayed (None when none is)."""
        return self.segments[-1] if self.segments else None


def plan_wal_route(
    storage: Storage,
    inventory: WalInventory,
    base: PhysicalManifest,
    keyring: Keyring | None,
    *,
    advice: str,
) -> WalRoute:
    """The WAL from ``base``'s end to the newest stored, following timeline switches like
    PostgreSQL's ``recovery_target_timeline = latest`` (pitr and verification share it).

    Args:
        advice: What to do about a gap, the end of the error's line.

    Raises:
        ObjectNotFoundError: a segment on the route is missing (the message names the gaps
            with their segments and LSNs).
    """
    size = base.wal_segment_size
    first = parse_lsn(base.end_lsn) // size  # the backup carries its WAL
    hole = history_hole(inventory, base.timeline)
    if hole is not None:
        raise ObjectNotFoundError(
            f"WAL of {base.db_id} after backup {base.backup_id}: the history file "
            f"{hole:08X}.history is missing from {storage.location} while WAL of a newer "
            f"timeline is stored, so replay would restore the branch timeline {hole} "
            "abandoned; put the file back from another copy of the storage"
        )
    history = route_history(storage, base.db_id, inventory, base.timeline, keyring)
    spans = timeline_route(inventory, base.timeline, first, history)
    begins = tuple(sorted(timeline_begins(
        history, newest_timeline(inventory, base.timeline)).items()))
    route = WalRoute(tuple(spans), tuple(route_files(inventory, spans)), base.timeline, begins)
    if not route.segments:
        return WalRoute(route.spans, (), base.timeline, begins)
    missing = route_gaps(inventory, spans)
    if missing:
        more = f" and {len(missing) - 2} more gaps" if len(missing) > 2 else ""
        shown = "; ".join(gap.describe() for gap in missing[:2]) + more
        raise ObjectNotFoundError(
            f"WAL of {base.db_id} after backup {base.backup_id} has gaps ({shown} missing from "
            f"{storage.location}): replay cannot pass them; {advice}"
        )
    segments = [parse_segment_name(name, size) for name in route.segments]
    backup_end = parse_lsn(base.end_lsn)
    if len(segments) > 1:
        # Replay reads the newest segment (a .partial may hold nothing yet), where it ends
        # at the start of a record that continues past what is stored; such a record may
        # have begun in the segment before (one longer than a segment, even earlier: then
        # this check is wrong, and says so in its message).
        floor = (segments[-2][0], max(segments[-2][1] * size + 1, backup_end))
    else:
        floor = (segments[0][0], backup_end)
    return replace(route, must_reach=floor)


# ---------------------------------------------------------------------------------------
# Building the data directory


def tablespace_root(data_dir: Path) -> Path:
    """Where a restore puts the cluster's extra tablespaces: ``<data dir>.tablespaces``."""
    return data_dir.with_name(data_dir.name + ".tablespaces")


def check_target_dir(target_dir: Path, *, tablespaces: bool = False) -> None:
    """A restore writes only into a missing or empty directory (and tablespace folder)."""
    if tablespaces:
        check_target_dir(tablespace_root(target_dir))
    if target_dir.exists():
        if not target_dir.is_dir():
            raise ConfigError(f"--to-dir {target_dir} is a file: name a new or empty directory")
        if (target_dir / INCOMPLETE_MARKER).exists():
            raise ConfigError(
                f"--to-dir {target_dir} holds an interrupted restore ({INCOMPLETE_MARKER}): "
                f"do not use it; stop any server in it, delete it (rm -rf {target_dir}) and "
                "rerun, or restore into another directory"
            )
        if any(target_dir.iterdir()):
            raise ConfigError(
                f"--to-dir {target_dir} is not empty: restore into a new or empty directory "
                "(nothing there was touched)"
            )


def unpack_backup(
    storage: Storage,
    backup: PhysicalManifest,
    keyring: Keyring,
    directory: Path,
    progress: ProgressReporter | None = None,
) -> int:
    """Decrypt (SHA-256 checked) and unpack one backup's tars into ``directory``.

    The backup's stored manifest must verify with ``keyring`` first, however the backup was
    picked. Extra tablespaces go to ``<directory>.tablespaces/<oid>``, linked from
    ``pg_tblspc/<oid>``; ``tablespace_map`` is dropped, since it names the source's paths
    and PostgreSQL would recreate the links from it. Its objects are unpacked in parallel.
    """
    with _Restore(storage, keyring, progress) as restore:
        jobs = restore.prepare(backup, directory)
        counts = restore.wait(restore.unpack(job) for job in jobs)
        restore.finish(backup, directory)
    return sum(counts)


@dataclass(frozen=True)
class _ObjectJob:
    """One stored tar and the folder it is unpacked into."""

    info: StoredObjectInfo
    destination: Path
    tablespace_links: dict[str, Path]


class _Cancelled(PgBackflowError):
    """A job stopped because another job of the same restore failed (never shown)."""


class _Restore:
    """Runs one restore's downloads on thread pools: tar objects (each decrypted and
    decompressed ahead of its unpacker in a thread of its own) and WAL files. The first
    failure stops every other job, and is the one raised.

    Workers run in a copy of the caller's context, so progress reaches the same Prefect API.
    """

    def __init__(
        self, storage: Storage, keyring: Keyring, progress: ProgressReporter | None
    ) -> None:
        self.storage = storage
        self.keyring = keyring
        self.progress = progress
        self.stop = threading.Event()
        self._pool = ThreadPoolExecutor(UNPACK_THREADS, thread_name_prefix="pgbackflow-unpack")
        self._wal_pool = ThreadPoolExecutor(WAL_FETCH_THREADS, thread_name_prefix="pgbackflow-wal")

    def __enter__(self) -> _Restore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()  # a no-op after success; after a failure, the rest stops early
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._wal_pool.shutdown(wait=True, cancel_futures=True)

    def prepare(self, backup: PhysicalManifest, directory: Path) -> list[_ObjectJob]:
        """Authenticate the backup's manifest; its objects and where each goes."""
        authenticate_backup(self.storage, backup, self.keyring)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # pg_tblspc/<oid> links of the base tar point to our folders, never the source's paths.
        locations = {
            str(t.oid): tablespace_root(directory.absolute()) / str(t.oid)
            for t in backup.tablespaces
        }
        jobs = [_ObjectJob(backup.base, directory, locations)]
        jobs += [
            _ObjectJob(t.object, locations[str(t.oid)], {}) for t in backup.tablespaces
        ]
        return jobs

    def unpack(self, job: _ObjectJob) -> Future[int]:
        """Start unpacking one object."""
        return self._pool.submit(contextvars.copy_context().run, self._unpack, job)

    def _unpack(self, job: _ObjectJob) -> int:
        if self.stop.is_set():
            raise _Cancelled("cancelled")
        job.destination.mkdir(mode=0o700, parents=True, exist_ok=True)
        label = f"{self.storage.location}/{job.info.key}"
        ahead = _read_ahead(decrypted_chunks(self.storage, job.info, self.keyring), self.stop)
        chunks = ahead if self.progress is None else _counted(ahead, self.progress)
        try:
            return unpack_tar_stream(
                chunks, job.destination, label=label, tablespace_links=job.tablespace_links
            )
        finally:
            ahead.close()  # joins its thread: nothing reads on once this job ended

    def finish(self, backup: PhysicalManifest, directory: Path) -> None:
        """Once its objects are unpacked: our tablespace links and ``backup_manifest``."""
        for tablespace in backup.tablespaces:
            oid = str(tablespace.oid)
            link = directory / "pg_tblspc" / oid
            link.parent.mkdir(exist_ok=True)
            if link.is_symlink():
                link.unlink()
            elif link.exists():
                raise UnsafeArchiveError(
                    f"{self.storage.location}/{backup.base.key}: pg_tblspc/{oid} is not a link: "
                    "the archive was tampered with or is not what pgbackflow stores, do not "
                    "use it"
                )
            link.symlink_to(tablespace_root(directory.absolute()) / oid)
        if backup.tablespaces:
            (directory / "tablespace_map").unlink(missing_ok=True)
        manifest = directory / "backup_manifest"
        if not manifest.exists():
            # Spooled backups (extra tablespaces) keep it beside the tars, not inside
            # base.tar; pg_combinebackup needs it in every input.
            with manifest.open("wb") as out:
                for chunk in decrypted_chunks(self.storage, backup.backup_manifest, self.keyring):
                    out.write(chunk)

    def fetch_wal(self, plan: PitrPlan, wal_dir: Path) -> list[Future[str | None]]:
        """Start fetching (and checking) the planned WAL into ``wal_dir``."""
        wal_dir.mkdir(parents=True, exist_ok=True)
        base = plan.newest
        begins = dict(plan.timeline_begins)

        def fetch(name: str) -> str | None:
            if self.stop.is_set():
                raise _Cancelled("cancelled")
            key = fetch_wal_file(
                self.storage, plan.db_id, name, wal_dir / name, self.keyring,
                segment_size=base.wal_segment_size, system_identifier=base.system_identifier,
                timeline_begin=begins.get(int(name[:8], 16)),
            )
            return name if key is not None else None

        return [
            self._wal_pool.submit(contextvars.copy_context().run, fetch, name)
            for name in plan.wal_segments
        ]

    def wait(self, futures: Iterable[Future[T]]) -> list[T]:
        """Results in order; on the first failure the other jobs stop and it is raised (a
        job that only stopped because of it is never the one reported)."""
        pending = list(futures)
        try:
            for future in as_completed(pending):
                error = future.exception()
                if error is not None and not isinstance(error, _Cancelled):
                    raise error
        except BaseException:
            self.stop.set()
            # Nothing may still write when the caller removes what was written.
            wait_all(pending)
            raise
        return [future.result() for future in pending]


def _read_ahead(
    chunks: Iterator[bytes], stop: threading.Event
) -> Generator[bytes, None, None]:
    """``chunks``, produced by a thread of their own ``READ_AHEAD`` chunks ahead: reading,
    decrypting and decompressing overlap with unpacking (zstd, AES-GCM and file writes
    release the GIL). Stops (raising) when ``stop`` is set."""
    queue: Queue[bytes | BaseException | None] = Queue(READ_AHEAD)
    done = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                while True:
                    if done.is_set() or stop.is_set():
                        return
                    try:
                        queue.put(chunk, timeout=0.1)
                        break
                    except Full:
                        continue
            item: BaseException | None = None
        except BaseException as exc:  # handed to the consumer, raised there
            item = exc
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        while not (done.is_set() or stop.is_set()):
            with suppress(Full):
                queue.put(item, timeout=0.1)
                return

    producer = threading.Thread(target=produce, name="pgbackflow-read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            try:
                item = queue.get(timeout=0.1)
            except Empty:
                if stop.is_set():
                    raise _Cancelled("cancelled") from None
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            if stop.is_set():
                raise _Cancelled("cancelled")
            yield item
    finally:
        done.set()
        producer.join()


def _counted(chunks: Iterator[bytes], progress: ProgressReporter) -> Iterator[bytes]:
    for chunk in chunks:
        progress.add(len(chunk))
        yield chunk


_RESTORING = ".pgbackflow-restoring-"
_CHAIN = ".pgbackflow-chain-"
_STAGING_NAME = re.compile(
    r"(?:\..+\.pgbackflow-restoring|\.pgbackflow-chain)-"
    r"(?P<boot>[0-9a-z]{12}|unknown)-(?P<pid>\d+)-[0-9a-z_]+"
)


@contextmanager
def _staging_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A hidden work folder in ``parent`` named after this machine's boot and our pid, and
    locked while we hold it (the lock goes with us, even on kill -9). Removed on leaving
    unless it was moved away."""
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{BOOT_TAG}-{os.getpid()}-", dir=parent))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with suppress(OSError):  # no lock support (some network file systems): pid only
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield path
    finally:
        try:
            remove_tree(path)
        finally:
            os.close(fd)


def sweep_interrupted_restores(parent: Path) -> list[str]:
    """Remove the hidden work folders of restores into ``parent`` whose owner is gone.

    Returns:
        One line per removed folder, for the log.
    """
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = _STAGING_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match["pid"])
        if owner_state(entry.path, match["boot"], pid) != "gone":
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            removed.append(
                f"removed {entry.path}: left by an interrupted restore (pid {pid} on this "
                "machine is gone)"
            )
    return removed


def build_data_dir(
    storage: Storage,
    plan: PitrPlan,
    keyring: Keyring,
    target_dir: Path,
    toolset: Toolset | None,
    *,
    on_step: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
    mark_incomplete: bool = False,
) -> list[str]:
    """Build ``target_dir`` (missing or empty) from the chain and fetch the planned WAL into
    ``<target_dir>/pgbackflow_restore/wal``, all at once; returns the WAL files fetched.

    Every object of every backup of the chain is decrypted (SHA-256 checked), decompressed
    and unpacked in parallel, a full alone straight into the data directory, a chain into
    one folder per link, then combined in place (``pg_combinebackup`` with extra
    tablespaces); the WAL is fetched (each segment's header checked) meanwhile.
    ``toolset`` (for ``pg_combinebackup``) may be None for a full alone.

    ``progress`` is called with the plaintext bytes unpacked so far. With
    ``mark_incomplete`` the directory holds :data:`INCOMPLETE_MARKER` (included from
    postgresql.conf, so PostgreSQL refuses to start it) from before its first file until
    :func:`finish_restore`: a restore killed half-way is never taken for a good one.
    Work folders of earlier restores into the same parent folder whose owner is gone are
    removed first (one ``on_step`` line each). A restore that fails leaves the target (and
    its tablespace folder) as it found them.

    Raises:
        ObjectNotFoundError: a planned WAL file disappeared since the plan was made.
    """
    with_tablespaces = bool(plan.newest.tablespaces)
    step = on_step or (lambda _message: None)
    parent = target_dir.absolute().parent
    for line in sweep_interrupted_restores(parent):
        step(line)
    check_target_dir(target_dir, tablespaces=with_tablespaces)
    parent.mkdir(parents=True, exist_ok=True)
    created = [p for p in (target_dir, tablespace_root(target_dir)) if not p.exists()]
    reporter = ProgressReporter(progress) if progress is not None else None
    try:
        with _Restore(storage, keyring, reporter) as restore:
            if len(plan.chain) == 1:
                fetched = _build_full(restore, plan, target_dir, step, mark_incomplete)
            else:
                if toolset is None:
                    toolset = find_toolset(plan.newest.server_major)
                fetched = _build_chain(restore, plan, target_dir, toolset, step, mark_incomplete)
    except BaseException:
        uninterrupted(lambda: _undo(target_dir, created))
        raise
    target_dir.chmod(0o700)
    return fetched


def _build_full(
    restore: _Restore, plan: PitrPlan, target_dir: Path, step: Callable[[str], None],
    mark_incomplete: bool,
) -> list[str]:
    backup = plan.newest
    step(f"unpacking full backup {backup.backup_id}, fetching {len(plan.wal_segments)} WAL "
         "files meanwhile")
    if not mark_incomplete or backup.tablespaces:
        # In place (its pg_tblspc links name the directory; or the caller's own work folder).
        if mark_incomplete:
            _write_marker(target_dir)
        fetched = _unpack_with_wal(restore, plan, [backup], [target_dir], target_dir)
        if mark_incomplete:
            _include_marker(target_dir)
        return fetched
    # Unpacked under a hidden name and moved into place once marked: a kill mid-unpack
    # leaves the target as it was (a rerun just works).
    parent = target_dir.absolute().parent
    with _staging_dir(parent, f".{target_dir.name}{_RESTORING}") as staging:
        _write_marker(staging)
        fetched = _unpack_with_wal(restore, plan, [backup], [staging], staging)
        _include_marker(staging)
        if target_dir.exists():
            target_dir.rmdir()
        staging.rename(target_dir)
    return fetched


def _build_chain(
    restore: _Restore, plan: PitrPlan, target_dir: Path, toolset: Toolset,
    step: Callable[[str], None], mark_incomplete: bool,
) -> list[str]:
    with _staging_dir(target_dir.absolute().parent, _CHAIN) as work:
        dirs = [safe_join(work, backup.backup_id) for backup in plan.chain]
        step(f"unpacking {len(dirs)} backups ({', '.join(b.mode for b in plan.chain)}), "
             f"fetching {len(plan.wal_segments)} WAL files meanwhile")
        fetched = _unpack_with_wal(restore, plan, list(plan.chain), dirs, work / "wal-ahead")
        if any(backup.tablespaces for backup in plan.chain):
            output = _combine_with_tool(dirs, work, target_dir, plan, toolset, step,
                                        mark_incomplete)
        else:
            step(f"combining {len(dirs)} backups in place (only the changed blocks are "
                 "written over the unpacked full)")
            stats = combine_in_place(dirs[0], dirs[1:])
            step(f"combined: {stats.rebuilt_files} files rebuilt ({stats.blocks_written} "
                 f"blocks written), {stats.moved_files} taken whole, {stats.removed_files} "
                 "removed")
            output = dirs[0]
        wal_home = output / RESTORE_DIR
        wal_home.mkdir(mode=0o700, exist_ok=True)
        (work / "wal-ahead").rename(wal_home / WAL_CACHE)
        if mark_incomplete:
            _write_marker(output)
            _include_marker(output)
        if output != target_dir:
            # Moved into place whole, so the target never holds a partial directory.
            if target_dir.exists():
                target_dir.rmdir()
            output.rename(target_dir)
    return fetched


def _combine_with_tool(
    dirs: Sequence[Path], work: Path, target_dir: Path, plan: PitrPlan, toolset: Toolset,
    step: Callable[[str], None], mark_incomplete: bool,
) -> Path:
    """``pg_combinebackup``, for chains with extra tablespaces: it relocates their files
    (kept outside the data directory) with ``--tablespace-mapping``."""
    step(f"combining {len(dirs)} backups with pg_combinebackup")
    # It creates its output itself: into the work folder when marked (moved into place
    # once marked), else straight into the target.
    output = work / "combined" if mark_incomplete else target_dir
    if target_dir.exists() and not mark_incomplete:
        target_dir.rmdir()
    # Tablespaces move from the newest link's folders to ours next to the output.
    relocate = [
        f"--tablespace-mapping={tablespace_root(dirs[-1]) / str(t.oid)}="
        f"{tablespace_root(target_dir.absolute()) / str(t.oid)}"
        for t in plan.newest.tablespaces
    ]
    Tool(toolset.binary("pg_combinebackup")).run(
        [*map(str, dirs), "--output", str(output), *COMBINE_OPTIONS, *relocate],
        timeout=None,
    )
    (output / "tablespace_map").unlink(missing_ok=True)
    return output


def _unpack_with_wal(
    restore: _Restore,
    plan: PitrPlan,
    backups: Sequence[PhysicalManifest],
    dirs: Sequence[Path],
    wal_at: Path,
) -> list[str]:
    """Unpack ``backups`` into ``dirs`` and fetch the planned WAL, all jobs at once: into
    ``wal_at/pgbackflow_restore/wal`` when ``wal_at`` is one of ``dirs``, else into
    ``wal_at`` itself (moved into the data directory later)."""
    jobs = [restore.prepare(b, d) for b, d in zip(backups, dirs, strict=True)]
    wal_dir = wal_at / RESTORE_DIR / WAL_CACHE if wal_at in dirs else wal_at
    # Longest first: the full's base tar bounds the wall time, so it starts at once.
    ordered = sorted((job for group in jobs for job in group),
                     key=lambda job: -job.info.raw_size)
    unpacks: list[Future[Any]] = [restore.unpack(job) for job in ordered]
    wal = restore.fetch_wal(plan, wal_dir)  # (its folder even without WAL: restore.sh goes beside)
    restore.wait([*unpacks, *wal])
    for backup, directory in zip(backups, dirs, strict=True):
        restore.finish(backup, directory)
    fetched = [future.result() for future in wal]
    gone = [name for name, got in zip(plan.wal_segments, fetched, strict=True) if got is None]
    if gone:
        # Replay would stop before it, silently: that is not the restore that was asked for.
        raise ObjectNotFoundError(
            f"WAL file {gone[0]} of {plan.db_id} disappeared from {restore.storage.location} "
            "after the restore was planned: someone is changing the storage; check it and retry"
        )
    return [name for name in fetched if name is not None]


def _undo(target_dir: Path, created: Sequence[Path]) -> None:
    """After a failed build: remove what it wrote (the target was missing or empty)."""
    for path in (target_dir, tablespace_root(target_dir)):
        if path in created:
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and not path.is_symlink():
            for entry in list(path.iterdir()):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def _replace_marker(data_dir: Path, text: str) -> None:
    """Write the marker whole or not at all (a temporary renamed over it): a kill -9 while
    it is written must not leave an empty marker that no longer says what happened."""
    partial = data_dir / (INCOMPLETE_MARKER + ".partial")
    with partial.open("w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, data_dir / INCOMPLETE_MARKER)


def _write_marker(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _replace_marker(data_dir, _MARKER_HEADER + _MARKER_BLOCK)


def _include_marker(data_dir: Path) -> None:
    """Make PostgreSQL refuse to start the directory while the marker exists."""
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write("\n" + _MARKER_INCLUDE)


def allow_recovery_start(data_dir: Path) -> None:
    """Before pgbackflow starts the server for recovery: the marker stays (the restore is
    not finished), but no longer stops PostgreSQL."""
    marker = data_dir / INCOMPLETE_MARKER
    if marker.exists():
        _replace_marker(data_dir, _MARKER_HEADER + "# Recovery was started by pgbackflow.\n")


def block_recovery_start(data_dir: Path) -> None:
    """Undo :func:`allow_recovery_start`: the restore did not finish after all."""
    if (data_dir / INCOMPLETE_MARKER).exists():
        _replace_marker(data_dir, _MARKER_HEADER + _MARKER_BLOCK)


def finish_restore(data_dir: Path) -> None:
    """The restore is complete: drop the include line, then the marker."""
    conf = data_dir / "postgresql.conf"
    if conf.exists():
        text = conf.read_text()
        if _MARKER_INCLUDE in text:
            conf.write_text(text.replace("\n" + _MARKER_INCLUDE, "").replace(_MARKER_INCLUDE, ""))
    (data_dir / INCOMPLETE_MARKER).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Recovery configuration, the script, starting


def configure_recovery(
    data_dir: Path, target: datetime | None, *, port: int | None = None
) -> None:
    """Write the recovery settings and ``recovery.signal``.

    ``archive_mode`` is switched off: the restored server must not push WAL into the
    source's archive.
    """
    wal_dir = data_dir.absolute() / RESTORE_DIR / WAL_CACHE
    restore_command = f"cp {shlex.quote(str(wal_dir))}/%f %p"
    settings = {
        "restore_command": restore_command,
        "recovery_target_action": "promote",
        "archive_mode": "off",
    }
    if target is not None:
        # Full precision: commits within the target's second must land on the right side.
        settings["recovery_target_time"] = target.astimezone(UTC).strftime(
            "%Y-%m-%d %H:%M:%S.%f+00"
        )
    if port is not None:
        settings["port"] = str(port)
        settings["listen_addresses"] = "127.0.0.1"
        # PostgreSQL's default socket folder: the server locks its socket and refuses a taken one.
        settings["unix_socket_directories"] = "/tmp"  # nosec B108
    append_settings(data_dir, "Point-in-time restore by pgbackflow.", settings)
    request_recovery(data_dir)


def write_restore_script(
    path: Path, plan: PitrPlan, *, storage_url: str, key_file: Path | None
) -> None:
    """A bash script that redoes this restore by hand: ``restore.sh NEW_EMPTY_DIR``."""
    python = shlex.quote(sys.executable)
    target = "latest" if plan.target is None else plan.target.isoformat()
    # The script runs from anywhere: paths typed relative to the command's folder go absolute.
    if not urlsplit(storage_url).scheme:  # a path, not s3://, file:// or block:
        storage_url = str(Path(storage_url).expanduser().absolute())
    key_arg = (f" --key-file {shlex.quote(str(key_file.expanduser().absolute()))}"
               if key_file else "")
    body = f"""#!/usr/bin/env bash
# Point-in-time restore of {plan.db_id} to {target}, written by pgbackflow.
# Redo it by hand:  {SCRIPT_NAME} NEW_EMPTY_DIR  (S3 credentials from the usual AWS_* variables)
# Chain: {' -> '.join(f'{b.mode} {b.backup_id}' for b in plan.chain)}
set -euo pipefail
DIR="${{1:?usage: {SCRIPT_NAME} NEW_EMPTY_DIR}}"
if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR")" ]; then echo "$DIR is not empty" >&2; exit 1; fi
exec {python} -m pgbackflow.cli pitr --from {shlex.quote(storage_url)} \\
  --db-id {shlex.quote(plan.db_id)} \\
  --target-time {shlex.quote(target)} --to-dir "$DIR"{key_arg}
"""
    path.write_text(body)
    path.chmod(0o755)


def local_runtime(data_dir: Path, toolset: Toolset, user: OsUser, *,
                  what: str = "restored server") -> LocalRuntime:
    """The local runtime of a restored data directory (its log in the restore folder)."""
    return LocalRuntime(data_dir, toolset, user, data_dir / RESTORE_DIR / LOG_NAME, what=what)


def start_and_wait(
    data_dir: Path,
    toolset: Toolset,
    user: OsUser,
    *,
    timeout: float = PROMOTE_TIMEOUT_S,
) -> Recovery:
    """Start the restored server as ``user`` and wait until recovery ends and it is promoted.

    Raises:
        DatabaseError: the server stopped during recovery (the log tail says why).
    """
    check_reachable(data_dir.parent, user, "the restored server")
    hand_over(data_dir, user)
    return recover(local_runtime(data_dir, toolset, user), timeout)


def hand_over(data_dir: Path, user: OsUser) -> None:
    """Give the data directory (and its tablespaces) to the server's OS user, when root
    built it: PostgreSQL refuses to run as root and needs to own its directory."""
    _chown_tree(data_dir, user)
    if tablespace_root(data_dir).exists():
        _chown_tree(tablespace_root(data_dir), user)


class PitrDestination(ABC):
    """Where a point-in-time restore puts the cluster and where its server runs: a
    directory on this host (:class:`DirectoryDestination`, a local ``pg_ctl`` runtime) or a
    Docker volume (``tasks.pitr_docker``, a container). :func:`restore_to` drives both
    through the same stages."""

    #: The stage that moves the built data directory where it runs; None: built in place.
    place_stage: str | None = None

    @abstractmethod
    def build(
        self, storage: Storage, plan: PitrPlan, keyring: Keyring, toolset: Toolset | None,
        step: Callable[[str], None], progress: ProgressCallback | None,
    ) -> list[str]:
        """Build the data directory with its recovery settings; returns the WAL fetched."""

    @abstractmethod
    def place(self) -> None:
        """Move what :meth:`build` made to where the server runs (see ``place_stage``)."""

    @abstractmethod
    def start(self, timeout: float, plan: PitrPlan) -> Recovery:
        """Start the restored server and wait until it is promoted; a replay that ended
        before the end of ``plan``'s WAL fails (:func:`check_replay_end`), undone as a
        failed start is."""

    @abstractmethod
    def finish(self) -> None:
        """The restore succeeded: drop what only the restore needed."""

    @abstractmethod
    def undo(self) -> None:
        """The restore failed or was cancelled: remove what this restore created."""


@dataclass(frozen=True)
class PitrOutcome:
    """What :func:`restore_to` did.

    Attributes:
        wal_files: WAL files fetched for the replay.
        recovery: How the started server's recovery ended; None when not started.
    """

    wal_files: int
    recovery: Recovery | None


def restore_to(
    storage: Storage,
    plan: PitrPlan,
    keyring: Keyring,
    destination: PitrDestination,
    *,
    toolset: Toolset | None,
    start: bool,
    timeout: float = PROMOTE_TIMEOUT_S,
    on_step: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
    run_stage: StageRunner = run_directly,
) -> PitrOutcome:
    """The one point-in-time restore: build-data-dir, then (for a destination that builds
    elsewhere) its place stage, then with ``start`` start-restored-server; each stage run
    by ``run_stage`` (a task run of that name in the flows). On any failure or cancellation
    the destination undoes what this restore created.

    Args:
        toolset: Host toolset for ``pg_combinebackup`` (None: found for the chain's major;
            not needed for a full backup alone).
    """
    step = on_step or (lambda _message: None)
    try:
        fetched = run_stage("build-data-dir", lambda: destination.build(
            storage, plan, keyring, toolset, step, progress))
        if destination.place_stage is not None:
            run_stage(destination.place_stage, destination.place)
        recovery = None
        if start:
            recovery = run_stage("start-restored-server", lambda: destination.start(timeout, plan))
        destination.finish()
    except BaseException:
        destination.undo()
        raise
    return PitrOutcome(len(fetched), recovery)


def check_replay_end(plan: PitrPlan, recovery: Recovery) -> None:
    """Refuse a replay to the end of the WAL that ended before the end of the WAL it was
    given (``plan.must_reach``).

    PostgreSQL ends recovery, and promotes, wherever the WAL it reads stops making sense
    (a record that does not continue, a page of another timeline): to it that is the end
    of the WAL. A segment of the storage replaced by another genuine one would then cut
    the restore short without an error, and a target time after that point would look
    "not reached" as if no transaction had followed it.

    Raises:
        WalIntegrityError: replay ended early; where, and which segment it had to reach.
    """
    if plan.must_reach is None or (plan.target is not None and recovery.reached_target):
        return
    floor_timeline, floor = plan.must_reach
    size = plan.newest.wal_segment_size
    needed = segment_name(floor_timeline, floor // size, size)
    if recovery.ended_at is None:
        raise WalIntegrityError(
            f"the restored server of {plan.db_id} was promoted without a timeline history "
            f"file, so where its replay ended is unknown (it had to reach segment {needed}): "
            "the restore is not trusted"
        )
    timeline, ended = recovery.ended_at
    if ended < floor or timeline < floor_timeline:
        raise WalIntegrityError(
            f"replay of {plan.db_id} ended at LSN {show_lsn(ended)} on timeline {timeline}, "
            f"before the end of the stored WAL (segment {needed}): PostgreSQL found the WAL "
            "after that point unusable, so the stored WAL was damaged or replaced there; "
            f"restore to a time before LSN {show_lsn(ended)}, or from another copy of the "
            "storage (a single WAL record longer than a segment at the end of the stored WAL "
            "also ends there: retry once the next segment is stored)"
        )


class DirectoryDestination(PitrDestination):
    """A data directory on this host (missing or empty), started by ``pg_ctl`` as ``user``.

    Args:
        directory: The target data directory.
        port: Where the started server listens (127.0.0.1); None: not to be started here.
        user: OS user that runs the server (needed with ``port``). Not started here, root
            still hands the finished directory to this user, who starts it by hand.
        toolset: The server's toolset (default: the one the restore combined with, else
            found for the chain's major).
        script: Write ``restore.sh`` (redo this restore by hand) for this storage URL and
            key file; None: no script (a throwaway restore).
        mark_incomplete: Keep PostgreSQL from starting the directory until the restore
            finished (see :func:`build_data_dir`).
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        user: OsUser | None = None,
        toolset: Toolset | None = None,
        script: tuple[str, Path | None] | None = None,
        mark_incomplete: bool = True,
    ) -> None:
        self.directory = directory.absolute()
        self.port = port
        self.user = user
        self.script = script
        self.mark_incomplete = mark_incomplete
        self._toolset = toolset
        self._major = 0
        self._started: Toolset | None = None  # the server's toolset while it may run

    @property
    def script_path(self) -> Path:
        """Where ``restore.sh`` is written."""
        return restore_dir_of(self.directory) / SCRIPT_NAME

    def build(
        self, storage: Storage, plan: PitrPlan, keyring: Keyring, toolset: Toolset | None,
        step: Callable[[str], None], progress: ProgressCallback | None,
    ) -> list[str]:
        """Unpack and combine into the directory, then write the recovery settings."""
        self._toolset = self._toolset or toolset
        self._major = plan.newest.server_major
        fetched = build_data_dir(storage, plan, keyring, self.directory, toolset,
                                 on_step=step, progress=progress,
                                 mark_incomplete=self.mark_incomplete)
        self.configure(plan)
        return fetched

    def configure(self, plan: PitrPlan) -> None:
        """Recovery settings (and the script) for the built directory."""
        configure_recovery(self.directory, plan.target, port=self.port)
        if self.script is not None:
            storage_url, key_file = self.script
            write_restore_script(self.script_path, plan, storage_url=storage_url,
                                 key_file=key_file)

    def start(self, timeout: float, plan: PitrPlan) -> Recovery:
        """Start as ``user`` on ``port`` and wait for the promotion; the fetched WAL goes."""
        if self.port is None or self.user is None:
            raise ConfigError("a restore to start needs a port and the server's OS user")
        toolset = self._toolset or find_toolset(self._major)
        self._started = toolset  # from here on, undo stops a server and blocks the directory
        allow_recovery_start(self.directory)
        try:
            recovery = start_and_wait(self.directory, toolset, self.user, timeout=timeout)
            check_replay_end(plan, recovery)
        except BaseException:
            # Failed, timed out, cancelled (Ctrl-C, a stop) while recovering, or ended short
            # of the WAL: the server
            # this restore started does not go on alone, and the unfinished directory is
            # blocked again, so no one starts it by hand either.
            self._stop_unfinished()
            raise
        remove_wal_cache(self.directory)
        return recovery

    def _stop_unfinished(self) -> None:
        """Stop the server this restore started and block the unfinished directory."""
        toolset, user = self._started, self.user
        self._started = None
        if toolset is not None and user is not None:
            def stop_and_block() -> None:
                stop_local_server(Tool(toolset.binary("pg_ctl")), self.directory, user)
                block_recovery_start(self.directory)

            uninterrupted(stop_and_block)

    def place(self) -> None:
        """Nothing to move: built in place."""

    def finish(self) -> None:
        """Clear the incomplete-restore marker; a directory not started here goes to the
        server's user (``start`` handed it over already)."""
        finish_restore(self.directory)
        if self._started is None and self.user is not None:
            hand_over(self.directory, self.user)
        self._started = None

    def undo(self) -> None:
        """A failed build already left the directory as it found it, and a directory whose
        server did not come up keeps its marker (never taken for good). Failed or
        interrupted after its server came up (the stage's task run closing, the WAL cache
        going), the restore stops that server and blocks the directory again."""
        self._stop_unfinished()


def check_reachable(path: Path, user: OsUser, runs: str) -> None:
    """The server's OS user must be able to walk down to ``path``.

    Args:
        path: The data (or work) directory.
        user: The OS user that runs the server.
        runs: What that server is, for the message ("the restored server").
    """
    for folder in [path.absolute(), *path.absolute().parents]:
        if not folder.exists():
            continue
        info = folder.stat()
        if info.st_uid == user.uid:
            allowed = bool(info.st_mode & 0o100)
        elif info.st_gid == user.gid:
            allowed = bool(info.st_mode & 0o010)
        else:
            allowed = bool(info.st_mode & 0o001)
        if not allowed:
            raise ConfigError(
                f"OS user {user.name!r} that runs {runs} cannot enter {folder}: use a "
                f"directory it can reach, or chmod o+x {folder}"
            )


def _chown_tree(root: Path, user: OsUser) -> None:
    if os.geteuid() != 0:
        return
    os.chown(root, user.uid, user.gid)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), user.uid, user.gid, follow_symlinks=False)


def restore_dir_of(data_dir: Path) -> Path:
    """Where pgbackflow keeps its restore files inside the data directory."""
    return data_dir / RESTORE_DIR


def remove_wal_cache(data_dir: Path) -> None:
    """Drop the fetched WAL once the server no longer needs it (after promotion)."""
    shutil.rmtree(data_dir / RESTORE_DIR / WAL_CACHE, ignore_errors=True)


__all__ = [
    "INCOMPLETE_MARKER",
    "TARGET_NOT_REACHED",
    "DirectoryDestination",
    "PitrDestination",
    "PitrOutcome",
    "PitrPlan",
    "WalRoute",
    "allow_recovery_start",
    "build_data_dir",
    "check_reachable",
    "check_target_dir",
    "configure_recovery",
    "finish_restore",
    "free_port",
    "local_runtime",
    "parse_target_time",
    "plan_pitr",
    "plan_wal_route",
    "remove_wal_cache",
    "restore_dir_of",
    "restore_to",
    "start_and_wait",
    "sweep_interrupted_restores",
    "tablespace_root",
    "unpack_backup",
    "write_restore_script",
]
