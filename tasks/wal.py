"""Continuous WAL archiving: pg_receivewal through a replication slot, every segment shipped.

pg_receivewal streams WAL into a local spool folder over the replication protocol. The
physical replication slot makes the server keep every segment until pg_receivewal has
flushed it, so a streamer that crashes and restarts resumes where it stopped (the spool keeps
the newest segment and the ``.partial`` one, which is where pg_receivewal resumes).

RPO: a completed segment is shipped within ``poll_interval`` (1 s). A 16 MB segment can take
hours to fill under light writes, so the segment being written is shipped too, as
``<segment>.partial``, every ``partial_interval`` seconds (default 30) when it changed. We
chose this over forcing segment switches on the server (pg_switch_wal needs extra grants
and wastes a segment each time). A restore uses the complete segment when there is one and
the partial one otherwise; the partial object of a segment is deleted once the segment is
complete.

Objects (encrypted, zstd)::

    physical/<db_id>/wal/<segment>.pgbf           a complete segment
    physical/<db_id>/wal/<segment>.partial.pgbf   the newest state of the segment in progress
    physical/<db_id>/wal/<timeline>.history.pgbf  timeline history files

Every object is its own AES-256-GCM archive (authenticated), but the archive does not name
the file it holds. So a fetched file is checked against its name: a segment's first page
header must carry the segment's position, segment size and the cluster's system
identifier, and every page the segment's own timeline once that timeline began (where
the history file says; before, an older one); a complete segment must end finished
(not a zero-padded older ``.partial`` upload); a history file may only name older
timelines. Names read from the storage must match the segment/history patterns exactly.
Coverage and gaps follow timeline switches as replay does. There is no WAL index: what
these checks cannot see (deleted newest segments) is described in docs/FORMAT.md.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg

from pgbackflow.tasks.archive import ArchiveError, ArchiveReader
from pgbackflow.tasks.database import (
    ConnectionSettings,
    connect,
    libpq_conninfo,
    libpq_password_env,
    lost_session_error,
)
from pgbackflow.tasks.errors import (
    ConfigError,
    DatabaseError,
    PgBackflowError,
    TransientDatabaseError,
)
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.manifest import InvalidIdError, check_id
from pgbackflow.tasks.pipeline import store_file
from pgbackflow.tasks.process import Tool
from pgbackflow.tasks.storage import Storage
from pgbackflow.tasks.toolsets import Toolset

WAL_DIR = "wal"
OBJECT_SUFFIX = ".pgbf"
PARTIAL = ".partial"
DEFAULT_SLOT = "pgbackflow"
DEFAULT_PARTIAL_INTERVAL_S = 30.0
DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
SLOT_RELEASE_WAIT_S = 15.0

# Used with fullmatch: '$' would also match before a trailing newline, and a storage key
# may hold one.
_SEGMENT = re.compile(r"[0-9A-F]{24}")
_HISTORY = re.compile(r"[0-9A-F]{8}\.history")
_SLOT = re.compile(r"[a-z0-9_]{1,63}")
# pg_receivewal's last word when the server ended the stream (a shutdown or restart).
_DISCONNECTED = re.compile(r"error: disconnected|unexpected termination of replication stream")
MAX_HISTORY_BYTES = 16 * 1024 * 1024
_WAL_MAGIC_MIN = 0xD100  # every supported major's XLOG_PAGE_MAGIC is 0xD1xx

logger = logging.getLogger("pgbackflow.wal")


class WalIntegrityError(ArchiveError):
    """A WAL object decrypted, but is not the segment its name says."""


def wal_prefix(db_id: str) -> str:
    """Storage prefix of a cluster's WAL (the id is checked: it becomes a key segment)."""
    check_id(db_id, "cluster id")
    return f"physical/{db_id}/{WAL_DIR}/"


def is_wal_file_name(name: str) -> bool:
    """Whether ``name`` is a segment, a ``<segment>.partial`` or a history file name."""
    return bool(
        _SEGMENT.fullmatch(name.removesuffix(PARTIAL)) or _HISTORY.fullmatch(name)
    )


def wal_object_key(db_id: str, file_name: str) -> str:
    """Storage key of a WAL file (``<segment>``, ``<segment>.partial`` or a history file).

    Raises:
        InvalidIdError: ``file_name`` is none of those (it would become a key and a path).
    """
    if not is_wal_file_name(file_name):
        raise InvalidIdError(
            f"{file_name[:60]!r} is not a WAL file name (24 hex digits, optionally .partial, "
            "or <8 hex digits>.history): check the name"
        )
    return wal_prefix(db_id) + file_name + OBJECT_SUFFIX


def segments_per_id(segment_size: int) -> int:
    """Segments per 4 GB "log id" (the middle 8 hex digits of a segment name)."""
    return 0x1_0000_0000 // segment_size


def segment_name(timeline: int, number: int, segment_size: int) -> str:
    """``000000010000000000000003`` for a timeline and segment number."""
    per_id = segments_per_id(segment_size)
    return f"{timeline:08X}{number // per_id:08X}{number % per_id:08X}"


def parse_segment_name(name: str, segment_size: int) -> tuple[int, int]:
    """``(timeline, segment number)`` of a segment file name."""
    if not _SEGMENT.fullmatch(name):
        raise ConfigError(f"'{name}' is not a WAL segment name (24 hex digits)")
    return int(name[:8], 16), int(name[8:16], 16) * segments_per_id(segment_size) + int(
        name[16:], 16
    )


def check_segment_start(
    head: bytes, name: str, segment_size: int, system_identifier: str | None, label: str
) -> None:
    """Check a segment's first page header against its name and the cluster.

    The page address and system identifier bind a segment's content to its name: a valid
    archive swapped in under another segment's name fails here.

    Raises:
        WalIntegrityError: the content is not that segment of that cluster.
    """
    if len(head) < 40:
        raise WalIntegrityError(f"{label}: too short for a WAL segment: the object is damaged")
    magic, _info, page_timeline, page_address = struct.unpack_from("<HHIQ", head, 0)
    sysid, seg_size = struct.unpack_from("<QI", head, 24)
    timeline, number = parse_segment_name(name, segment_size)
    if magic < _WAL_MAGIC_MIN or magic > 0xD1FF:
        raise WalIntegrityError(
            f"{label}: not a WAL segment (bad page magic): the object is damaged"
        )
    if page_address != number * segment_size or seg_size != segment_size:
        raise WalIntegrityError(
            f"{label}: holds WAL of another position (page address {page_address:X}, expected "
            f"{number * segment_size:X}): the object was replaced"
        )
    if system_identifier is not None and str(sysid) != system_identifier:
        raise WalIntegrityError(
            f"{label}: WAL of another cluster (system identifier {sysid}, expected "
            f"{system_identifier}): the object was replaced"
        )
    # A segment on timeline N starts with WAL of N or, where N forked off mid-segment, of
    # an older timeline; never of a newer one.
    if page_timeline > timeline:
        raise WalIntegrityError(
            f"{label}: holds WAL of timeline {page_timeline} under a timeline {timeline} name: "
            "the object was replaced"
        )


def check_history(content: bytes, name: str, label: str) -> None:
    """Check a timeline history file against its name: it may only name older timelines.

    Each line is ``<parent timeline> <switch LSN> <reason>`` (comments and blank lines
    allowed); parents grow line by line and stay below the file's own timeline.

    Raises:
        WalIntegrityError: the content is not the history of that timeline.
    """
    if not _HISTORY.fullmatch(name):
        raise InvalidIdError(f"{name[:60]!r} is not a timeline history file name")
    timeline = int(name[:8], 16)
    previous = 0
    for number, line in enumerate(content.decode("ascii", "replace").splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            parent = int(fields[0])
        except ValueError:
            parent = -1
        if len(fields) < 2 or "/" not in fields[1] or not previous < parent < timeline:
            raise WalIntegrityError(
                f"{label}: line {number} is not a history entry of an ancestor of timeline "
                f"{timeline}: the object was replaced"
            )
        previous = parent


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as PostgreSQL's WAL records use: for short records only."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_RECORD_HEADER = 24  # SizeOfXLogRecord: tot_len, xid, prev, info, rmid, 2 pad, crc
_XLOG_SWITCH = 0x40  # RM_XLOG_ID (0) record that ends a segment early
_XLP_FIRST_IS_CONTRECORD = 0x0001
_SHORT_PAGE_HEADER = 24


def _is_switch_record(record: bytes) -> bool:
    """Whether 24 bytes are a WAL segment switch record (header fields and CRC)."""
    if len(record) != _RECORD_HEADER:
        return False
    tot_len, _xid, _prev, info, rmid, _pad, crc = struct.unpack("<IIQBBHI", record)
    return bool(
        tot_len == _RECORD_HEADER and rmid == 0 and info & 0xF0 == _XLOG_SWITCH
        and crc32c(record[:20]) == crc
    )


def check_segment_complete(data: bytes, name: str, segment_size: int, label: str) -> None:
    """Refuse a segment that ends unfinished: an older ``.partial`` stored under its name.

    pg_receivewal pads the segment in progress with zeros, so an upload of it is full-size
    and starts with the right page header. A finished segment instead either has a page
    header on its last page, or ends early with a segment switch record followed only by
    zeros. Anything else would make replay stop early, silently.

    Raises:
        WalIntegrityError: the content is not a finished segment.
    """
    block = struct.unpack_from("<I", data, 36)[0] if len(data) >= 40 else 0
    if block < 1024 or segment_size % block or len(data) != segment_size:
        raise WalIntegrityError(f"{label}: bad WAL page size {block}: the object is damaged")
    _timeline, number = parse_segment_name(name, segment_size)
    last_page = len(data) - block
    magic, _info, _tli, address = struct.unpack_from("<HHIQ", data, last_page)
    if _WAL_MAGIC_MIN <= magic <= 0xD1FF and address == number * segment_size + last_page:
        return
    end = len(data.rstrip(b"\0"))  # one past the last non-zero byte
    start = (end - 1) & ~7  # records are 8-byte aligned; a CRC may end in zero bytes
    for offset in range(start, max(start - 32, -1), -8):
        page = offset - offset % block
        head = _SHORT_PAGE_HEADER if page else 40
        if offset < page + head:
            # The switch record's tail may sit on this page, after a continuation header.
            info, = struct.unpack_from("<H", data, page + 2)
            remaining, = struct.unpack_from("<I", data, page + 16)
            if page and info & _XLP_FIRST_IS_CONTRECORD and 0 < remaining < _RECORD_HEADER:
                record = data[page - (_RECORD_HEADER - remaining):page] + data[
                    page + head:page + head + remaining]
                if _is_switch_record(record) and end <= page + head + remaining:
                    return
            continue
        if offset + _RECORD_HEADER >= end and _is_switch_record(
            data[offset:offset + _RECORD_HEADER]
        ):
            return
    raise WalIntegrityError(
        f"{label}: the segment ends unfinished (zeros from byte {end} on, no segment switch "
        "before them): an older .partial upload was stored under the complete segment's "
        "name; restore to a time before this segment or from another copy of the storage"
    )


# ---------------------------------------------------------------------------------------
# What is stored


@dataclass
class WalInventory:
    """The WAL files of one cluster in a storage.

    Attributes:
        complete: Complete segment numbers per timeline.
        partial: Segment numbers shipped as partial, per timeline.
        histories: Timelines with a history file.
        newest: Upload time of the newest WAL object (the end of the coverage window).
        segment_size: Bytes per segment.
    """

    segment_size: int
    complete: dict[int, set[int]] = field(default_factory=dict)
    partial: dict[int, set[int]] = field(default_factory=dict)
    histories: set[int] = field(default_factory=set)
    newest: datetime | None = None

    def last_segment(self, timeline: int) -> int | None:
        """The newest segment number on a timeline (complete or partial)."""
        numbers = self.complete.get(timeline, set()) | self.partial.get(timeline, set())
        return max(numbers) if numbers else None

    def has(self, timeline: int, number: int) -> bool:
        """Whether a segment is stored complete or partial."""
        return number in self.complete.get(timeline, set()) or number in self.partial.get(
            timeline, set()
        )

    def gaps(self, timeline: int, first: int, last: int | None = None) -> list[str]:
        """Names of the segments missing between ``first`` and ``last`` (default: newest)
        on one timeline (see :func:`route_gaps` for gaps across timeline switches).

        Only the newest segment may be partial; a partial one before it is a gap.
        """
        end = self.last_segment(timeline) if last is None else last
        if end is None:
            return [segment_name(timeline, first, self.segment_size)]
        complete = self.complete.get(timeline, set())
        missing = []
        for number in range(first, end + 1):
            if number in complete or (number == end and self.has(timeline, number)):
                continue
            missing.append(segment_name(timeline, number, self.segment_size))
        return missing


def show_lsn(position: int) -> str:
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


@dataclass(frozen=True)
class WalGap:
    """Consecutive segments missing from the WAL a restore needs.

    Attributes:
        timeline: The timeline the segments belong to.
        first: First missing segment number.
        last: Last missing segment number.
        segment_size: Bytes per segment.
    """

    timeline: int
    first: int
    last: int
    segment_size: int

    @property
    def first_name(self) -> str:
        """Name of the first missing segment."""
        return segment_name(self.timeline, self.first, self.segment_size)

    def describe(self) -> str:
        """``<segment> (LSN a to b)`` or ``<first> to <last> (N segments, LSN a to b)``."""
        lsn = f"LSN {show_lsn(self.first * self.segment_size)} to " + show_lsn(
            (self.last + 1) * self.segment_size
        )
        if self.first == self.last:
            return f"{self.first_name} ({lsn})"
        last = segment_name(self.timeline, self.last, self.segment_size)
        return f"{self.first_name} to {last} ({self.last - self.first + 1} segments, {lsn})"


@dataclass(frozen=True)
class TimelineSpan:
    """The segments replay reads from one timeline.

    Attributes:
        timeline: The timeline.
        first: First segment number needed from it.
        last: Last one (the segment before the next timeline begins); None on the newest
            timeline, which is read to its newest stored segment.
    """

    timeline: int
    first: int
    last: int | None


def parse_history(content: bytes) -> list[tuple[int, int]]:
    """``[(timeline, switch LSN)]`` of a history file: each ancestor and where it ended."""
    entries = []
    for line in content.decode("ascii", "replace").splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith("#"):
            continue
        high, _, low = fields[1].partition("/")
        entries.append((int(fields[0]), (int(high, 16) << 32) | int(low, 16)))
    return entries


def read_history(
    storage: Storage, db_id: str, timeline: int, keyring: Keyring
) -> list[tuple[int, int]]:
    """The checked, parsed history file of ``timeline`` (see :func:`parse_history`)."""
    name = f"{timeline:08X}.history"
    key = wal_object_key(db_id, name)
    label = f"{storage.location}/{key}"
    content = b""
    with storage.open_read(key) as raw:
        for chunk in ArchiveReader(raw, keyring, label=label):
            content += chunk
            if len(content) > MAX_HISTORY_BYTES:
                raise WalIntegrityError(
                    f"{label}: too large for a timeline history file: the object was replaced"
                )
    check_history(content, name, label)
    return parse_history(content)


def newest_timeline(inventory: WalInventory, timeline: int) -> int:
    """The timeline replay ends on: like PostgreSQL's ``recovery_target_timeline = latest``,
    the newest one whose history files follow ``timeline`` without a hole."""
    while timeline + 1 in inventory.histories:
        timeline += 1
    return timeline


def timeline_route(
    inventory: WalInventory,
    timeline: int,
    first: int,
    history: Sequence[tuple[int, int]] | None = None,
) -> list[TimelineSpan]:
    """The timelines and segments replay from segment ``first`` of ``timeline`` reads.

    Args:
        inventory: What is stored.
        timeline: The base backup's timeline.
        first: The first segment needed (the backup's end).
        history: The parsed history file of :func:`newest_timeline` (see
            :func:`read_history`); None when it cannot be read (no key): each newer
            timeline is then taken to begin at its oldest stored segment.
    """
    target = newest_timeline(inventory, timeline)
    size = inventory.segment_size
    begins: list[tuple[int, int]] = [(timeline, first)]
    if target != timeline:
        if history is not None:
            lineage = [tli for tli, _ in history]
            if timeline not in lineage:
                return [TimelineSpan(timeline, first, None)]  # recovery will say why
            at = lineage.index(timeline)
            # Timeline lineage[i + 1] (or the target) begins where lineage[i] ended.
            following = [*lineage[at + 1:], target]
            for tli, (_, end) in zip(following, history[at:], strict=True):
                begins.append((tli, end // size))
        else:
            for tli in range(timeline + 1, target + 1):
                numbers = inventory.complete.get(tli, set()) | inventory.partial.get(tli, set())
                if not numbers:
                    break
                # The parent's newest segment holds the switch if it is partial (the new
                # timeline has that segment whole); else the new one begins after it.
                parent = begins[-1][0]
                begin = min(numbers)
                before = inventory.last_segment(parent)
                if before is not None:
                    partial = before not in inventory.complete.get(parent, set())
                    begin = min(begin, before if partial else before + 1)
                begins.append((tli, begin))
    spans = []
    for index, (tli, begin) in enumerate(begins):
        start = max(begin, first)
        last = begins[index + 1][1] - 1 if index + 1 < len(begins) else None
        if last is None or last >= start:
            spans.append(TimelineSpan(tli, start, last))
    return spans


def route_history(
    storage: Storage, db_id: str, inventory: WalInventory, timeline: int,
    keyring: Keyring | None,
) -> list[tuple[int, int]] | None:
    """The history of the timeline replay from ``timeline`` ends on (read and checked
    with ``keyring``), or None: timeline 1, no key, or not stored."""
    target = newest_timeline(inventory, timeline)
    if keyring is None or target == 1 or target not in inventory.histories:
        return None
    return read_history(storage, db_id, target, keyring)


def timeline_begins(history: Sequence[tuple[int, int]] | None, target: int) -> dict[int, int]:
    """Where each timeline of ``target``'s lineage began (its parent's switch LSN; 0 for
    timeline 1), from ``target``'s history; without one only timeline 1 is known."""
    begins = {1: 0}
    if history:
        following = [tli for tli, _ in history[1:]] + [target]
        for tli, (_, end) in zip(following, history, strict=True):
            begins[tli] = end
    return begins


def history_hole(inventory: WalInventory, timeline: int) -> int | None:
    """The timeline whose history file is missing while WAL of it (or of a newer timeline)
    is stored, after ``timeline``; None when there is no such hole.

    Replay follows history files (``recovery_target_timeline = latest``): without that
    file it stays on the older timeline, and would restore the branch the switch
    abandoned, silently ignoring the newer timeline's WAL.
    """
    reached = newest_timeline(inventory, timeline)
    stored = set(inventory.histories) | {
        tli for numbers in (inventory.complete, inventory.partial)
        for tli, segments in numbers.items() if segments
    }
    return reached + 1 if any(tli > reached for tli in stored) else None


def stored_route(
    storage: Storage,
    db_id: str,
    inventory: WalInventory,
    timeline: int,
    first: int,
    keyring: Keyring | None,
) -> list[TimelineSpan]:
    """:func:`timeline_route` with the newest timeline's history read from the storage
    (checked with ``keyring``; without one, the switch points are estimated)."""
    history = route_history(storage, db_id, inventory, timeline, keyring)
    return timeline_route(inventory, timeline, first, history)


def route_gaps(inventory: WalInventory, spans: Sequence[TimelineSpan]) -> list[WalGap]:
    """Segments of the route missing from the storage.

    Every segment must be stored complete, except the newest one, which may be partial;
    nothing stored on the newest timeline at all is the end of the WAL, not a gap.
    """
    gaps: list[WalGap] = []
    for span in spans:
        complete = inventory.complete.get(span.timeline, set())
        if span.last is None:
            end = inventory.last_segment(span.timeline)
            if end is None or end < span.first:
                continue
            allowed = {end} & inventory.partial.get(span.timeline, set())
        else:
            end, allowed = span.last, set()
        stored = complete | allowed  # once: per segment it made long routes quadratic
        missing = [n for n in range(span.first, end + 1) if n not in stored]
        for number in missing:
            if gaps and gaps[-1].timeline == span.timeline and gaps[-1].last == number - 1:
                gaps[-1] = WalGap(span.timeline, gaps[-1].first, number, inventory.segment_size)
            else:
                gaps.append(WalGap(span.timeline, number, number, inventory.segment_size))
    return gaps


def route_files(inventory: WalInventory, spans: Sequence[TimelineSpan]) -> list[str]:
    """The WAL files replay along ``spans`` reads: history files, then segments in order."""
    names = [
        f"{t:08X}.history" for t in sorted(inventory.histories)
        if spans and spans[0].timeline < t <= spans[-1].timeline
    ]
    for span in spans:
        end = inventory.last_segment(span.timeline) if span.last is None else span.last
        if end is None:
            continue
        names += [
            segment_name(span.timeline, n, inventory.segment_size)
            for n in range(span.first, end + 1)
        ]
    return names


def read_wal_inventory(storage: Storage, db_id: str, segment_size: int) -> WalInventory:
    """List a cluster's WAL objects (read as the catalog reads them: tasks/catalog.py)."""
    from pgbackflow.tasks.catalog import wal_inventory

    return wal_inventory(storage.list(wal_prefix(db_id)), db_id, segment_size)


def fetch_wal_file(
    storage: Storage,
    db_id: str,
    file_name: str,
    destination: Path,
    keyring: Keyring,
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    system_identifier: str | None = None,
    timeline_begin: int | None = None,
) -> str | None:
    """Decrypt a WAL file for ``restore_command``; the complete segment, else the partial.

    Args:
        timeline_begin: The LSN where the segment's timeline began (from the history file;
            0 for timeline 1): every page after that point must be of that timeline. None:
            not known, only newer timelines are refused.

    Returns:
        The key fetched, or None when the storage has no such file (recovery then ends).

    Raises:
        ArchiveError: the object is damaged, truncated or not the segment it claims to be.
    """
    is_segment = bool(_SEGMENT.fullmatch(file_name))
    if not (is_segment or _HISTORY.fullmatch(file_name)):
        raise InvalidIdError(
            f"{file_name[:60]!r} is not a WAL segment or history file name: check the name"
        )
    candidates = [file_name, file_name + PARTIAL] if is_segment else [file_name]
    for candidate in candidates:
        key = wal_object_key(db_id, candidate)
        if not storage.exists(key):
            continue
        label = f"{storage.location}/{key}"
        partial = destination.with_name(destination.name + ".pgbackflow-tmp")
        try:
            size = _decrypt_wal(storage, key, partial, keyring, label, SegmentPages(
                file_name, segment_size, system_identifier, timeline_begin, label
            ) if is_segment else None)
            if is_segment and size != segment_size:
                raise WalIntegrityError(
                    f"{label}: {size} bytes instead of a {segment_size}-byte segment: the "
                    "object is damaged"
                )
            if is_segment and candidate == file_name:
                check_segment_complete(partial.read_bytes(), file_name, segment_size, label)
            if not is_segment:
                if size > MAX_HISTORY_BYTES:
                    raise WalIntegrityError(
                        f"{label}: {size} bytes is not a timeline history file: the object "
                        "was replaced"
                    )
                check_history(partial.read_bytes(), file_name, label)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.rename(destination)
        return key
    return None


def _decrypt_wal(
    storage: Storage,
    key: str,
    target: Path,
    keyring: Keyring,
    label: str,
    pages: SegmentPages | None,
) -> int:
    size = 0
    with storage.open_read(key) as raw, target.open("wb") as out:
        for chunk in ArchiveReader(raw, keyring, label=label):
            if pages is not None:
                pages.feed(chunk)
            out.write(chunk)
            size += len(chunk)
    if pages is not None:
        pages.finish()
    return size


class SegmentPages:
    """Checks a segment's page headers as its bytes pass: the first against the name and
    cluster (:func:`check_segment_start`), then every page's timeline.

    A segment of timeline N holds pages of N only, except up to the page where N began:
    there, where N forked off mid-segment, the older timeline's pages come first. So an
    older timeline's segment stored under N's name (its pages carry the old timeline and
    the right addresses) is refused before replay: PostgreSQL would stop at it ("out-of-
    sequence timeline ID") and promote as if the WAL ended there, silently dropping every
    later transaction. Pages that are zeros or carry another address (the unwritten rest
    of a segment) are not WAL replay reads, and are left alone.
    """

    _HEADER = 16  # xlp_magic, xlp_info, xlp_tli, xlp_pageaddr

    def __init__(self, name: str, segment_size: int, system_identifier: str | None,
                 timeline_begin: int | None, label: str) -> None:
        self.name = name
        self.segment_size = segment_size
        self.system_identifier = system_identifier
        self.timeline, number = parse_segment_name(name, segment_size)
        self.start = number * segment_size
        self.timeline_begin = timeline_begin
        self.label = label
        self.head = b""
        self.block = 0
        self.offset = 0  # bytes of the segment seen before the current chunk
        self.next_page = 0  # segment offset of the next page header to check
        self.carry = b""  # the start of a header cut by the end of a chunk

    def feed(self, chunk: bytes) -> None:
        """Check the page headers in the next ``chunk`` of the segment."""
        chunk_start, self.offset = self.offset, self.offset + len(chunk)
        if not self.block:
            self.head += chunk[:40 - len(self.head)]
            if len(self.head) < 40:
                return
            self._first_page()
        if self.carry:
            self.carry += chunk[:self._HEADER - len(self.carry)]
            if len(self.carry) < self._HEADER:
                return
            self._page(self.next_page - self.block, self.carry)
            self.carry = b""
        while self.next_page < self.offset:
            at = self.next_page - chunk_start
            header = chunk[at:at + self._HEADER]
            self.next_page += self.block
            if len(header) < self._HEADER:
                self.carry = header
                return
            self._page(self.next_page - self.block, header)

    def finish(self) -> None:
        """The segment ended: a segment too short for its first header is refused."""
        if not self.block:
            check_segment_start(self.head, self.name, self.segment_size,
                                self.system_identifier, self.label)

    def _first_page(self) -> None:
        check_segment_start(self.head, self.name, self.segment_size, self.system_identifier,
                            self.label)
        block = struct.unpack_from("<I", self.head, 36)[0]
        if block < 1024 or self.segment_size % block:
            raise WalIntegrityError(f"{self.label}: bad WAL page size {block}: the object is "
                                    "damaged")
        self.block = block
        self._page(0, self.head[:self._HEADER])
        self.next_page = block

    def _page(self, offset: int, header: bytes) -> None:
        magic, _info, page_timeline, address = struct.unpack("<HHIQ", header)
        position = self.start + offset
        if not _WAL_MAGIC_MIN <= magic <= 0xD1FF or address != position:
            return
        begin = self.timeline_begin
        if page_timeline > self.timeline or (
            begin is not None and page_timeline != self.timeline
            and position >= begin - begin % self.block + self.block
        ):
            since = "" if begin is None else f", which began at LSN {show_lsn(begin)}"
            raise WalIntegrityError(
                f"{self.label}: the page at LSN {show_lsn(position)} holds WAL of timeline "
                f"{page_timeline}, not of timeline {self.timeline}{since}: the object was "
                "replaced (replay would stop there as if the WAL ended); restore to a time "
                "before it or from another copy of the storage"
            )
        if begin is not None and page_timeline == self.timeline and position + self.block <= begin:
            raise WalIntegrityError(
                f"{self.label}: the page at LSN {show_lsn(position)} holds WAL of timeline "
                f"{page_timeline} before that timeline began (LSN {show_lsn(begin)}): the object "
                "was replaced"
            )


# ---------------------------------------------------------------------------------------
# Shipping and streaming


@dataclass
class ShippingStatus:
    """What the streamer has done so far (for progress artifacts).

    Attributes:
        segments_shipped: Complete segments uploaded in this run.
        partials_shipped: Partial uploads in this run.
        last_segment: The newest complete segment uploaded.
        last_shipped_at: When anything was last uploaded.
        bytes_shipped: Stored bytes uploaded.
    """

    segments_shipped: int = 0
    partials_shipped: int = 0
    last_segment: str | None = None
    last_shipped_at: float | None = None
    bytes_shipped: int = 0


class WalShipper:
    """Uploads what pg_receivewal wrote to the spool folder.

    Args:
        spool: pg_receivewal's ``--directory``.
        storages: Destinations.
        master_key: Wraps each object's data key.
        db_id: The cluster's id in the storages.
        partial_interval: Seconds between uploads of the segment in progress.
    """

    def __init__(
        self,
        spool: Path,
        storages: Sequence[Storage],
        master_key: MasterKey,
        db_id: str,
        *,
        partial_interval: float = DEFAULT_PARTIAL_INTERVAL_S,
    ) -> None:
        self.spool = spool
        self.storages = list(storages)
        self.master_key = master_key
        self.db_id = db_id
        self.partial_interval = partial_interval
        self.status = ShippingStatus()
        self._shipped: set[str] = set()
        self._partial_state: tuple[str, int] | None = None
        self._partial_at = 0.0

    def _upload(self, path: Path, name: str) -> None:
        write = store_file(path, self.storages, wal_object_key(self.db_id, name), self.master_key)
        failed = [o for o in write.outcomes if not o.ok]
        if failed:
            # Keep the file in the spool: the next pass retries it.
            raise PgBackflowError(
                f"WAL file {name} could not be stored in {failed[0].location}: {failed[0].error}"
            )
        self.status.bytes_shipped += write.info.stored_size
        self.status.last_shipped_at = time.time()

    def ship(self, *, final: bool = False) -> list[str]:
        """Upload completed segments and history files, and the partial one when due.

        Returns:
            Names of the complete files uploaded.
        """
        names = sorted(p.name for p in self.spool.iterdir())
        done = [n for n in names if (_SEGMENT.fullmatch(n) or _HISTORY.fullmatch(n))]
        uploaded: list[str] = []
        for name in done:
            if name in self._shipped:
                continue
            self._upload(self.spool / name, name)
            self._shipped.add(name)
            uploaded.append(name)
            if _SEGMENT.fullmatch(name):
                self.status.segments_shipped += 1
                self.status.last_segment = name
                self._drop_partial_object(name)
        self._prune([n for n in done if _SEGMENT.fullmatch(n)])
        partials = [
            n for n in names if n.endswith(PARTIAL) and _SEGMENT.fullmatch(n[: -len(PARTIAL)])
        ]
        if partials:
            self._ship_partial(partials[-1], force=final)
        return uploaded

    def _ship_partial(self, name: str, *, force: bool) -> None:
        path = self.spool / name
        try:
            stat = path.stat()
        except FileNotFoundError:  # completed (renamed) between listing and now
            return
        state = (name, stat.st_mtime_ns)
        now = time.monotonic()
        due = force or now - self._partial_at >= self.partial_interval
        if state == self._partial_state or not due:
            return
        try:
            self._upload(path, name)
        except FileNotFoundError:
            # pg_receivewal finished the segment and renamed it after the stat above (a
            # restarted streamer died of this in CI): the complete one ships next pass.
            if path.exists():
                raise
            return
        self._partial_state = state
        self._partial_at = now
        self.status.partials_shipped += 1

    def _drop_partial_object(self, segment: str) -> None:
        key = wal_object_key(self.db_id, segment + PARTIAL)
        for storage in self.storages:
            try:
                if storage.exists(key):
                    storage.delete(key)
            except PgBackflowError as exc:
                logger.warning("could not delete the superseded %s: %s", key, exc)

    def _prune(self, segments: list[str]) -> None:
        # The newest complete segment stays: pg_receivewal resumes after the newest one it
        # finds, which matters when no .partial is left (PostgreSQL 14 ignores the slot).
        for name in segments[:-1]:
            if name in self._shipped:
                (self.spool / name).unlink(missing_ok=True)


def check_slot_name(slot: str) -> str:
    """Return ``slot`` if PostgreSQL accepts it as a replication slot name.

    Raises:
        ConfigError: It does not.
    """
    if not _SLOT.fullmatch(slot):
        raise ConfigError(
            f"replication slot name {slot!r} is invalid: use lowercase letters, digits and '_'"
            " (at most 63)"
        )
    return slot


def ensure_slot(
    settings: ConnectionSettings, slot: str, *, before_create: Callable[[], None] | None = None
) -> bool:
    """Create the physical replication slot if missing; returns whether it was created.

    Args:
        settings: The server.
        slot: The slot's name.
        before_create: Called when the slot is missing, before it is made: what must hold
            before the server keeps WAL for it (a slot nobody streams from holds WAL for
            ever); its exception leaves no slot.

    Raises:
        ConfigError: bad slot name, or the slot is in use by another client.
    """
    check_slot_name(slot)
    with connect(settings) as conn:
        # A streamer killed a moment ago leaves its WAL sender behind until the server
        # notices the closed connection: give the slot a few seconds to come free.
        deadline = time.monotonic() + SLOT_RELEASE_WAIT_S
        while True:
            row = conn.execute(
                "SELECT slot_type, active_pid FROM pg_replication_slots WHERE slot_name = %s",
                (slot,),
            ).fetchone()
            if row is None or row[1] is None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if row is not None:
            if row[0] != "physical":
                raise ConfigError(
                    f"replication slot {slot!r} on {settings.host}:{settings.port} is a "
                    f"{row[0]} slot: pick another name with --slot"
                )
            if row[1] is not None:
                # Transient: a streamer that just died may hold it until the server notices.
                raise TransientDatabaseError(
                    f"replication slot {slot!r} on {settings.host}:{settings.port} is in use by "
                    f"server process {row[1]}: another WAL streamer is running for this cluster;"
                    " stop it or use another --slot"
                )
            return False
        if before_create is not None:
            before_create()
        try:
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
        except psycopg.errors.InsufficientPrivilege:
            raise ConfigError(
                f"role {settings.user!r} cannot create replication slots on {settings.host}:"
                f"{settings.port}: grant it REPLICATION (ALTER ROLE ... REPLICATION)"
            ) from None
        except psycopg.errors.DuplicateObject:
            return False
        except psycopg.Error as exc:
            raise DatabaseError(
                f"creating replication slot {slot!r} on {settings.host}:{settings.port} failed: "
                f"{str(exc).strip().splitlines()[0]}"
            ) from None
    return True


class WalStreamer:
    """Runs pg_receivewal on a slot and ships what it writes, until told to stop.

    Args:
        settings: The source server.
        toolset: Whose pg_receivewal to run (the server's major).
        shipper: Uploads the spool.
        slot: The physical replication slot.
        poll_interval: Seconds between spool scans.
        on_status: Called after every scan that shipped something.
    """

    def __init__(
        self,
        settings: ConnectionSettings,
        toolset: Toolset,
        shipper: WalShipper,
        *,
        slot: str = DEFAULT_SLOT,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        on_status: Callable[[ShippingStatus], None] | None = None,
    ) -> None:
        self.settings = settings
        self.toolset = toolset
        self.shipper = shipper
        self.slot = slot
        self.poll_interval = poll_interval
        self.on_status = on_status

    def run(self, stop: threading.Event, *, max_seconds: float | None = None) -> ShippingStatus:
        """Stream until ``stop`` is set or ``max_seconds`` pass, then ship what is left.

        Raises:
            TransientDatabaseError: pg_receivewal exited (server gone, network): a retry
                resumes from the slot without losing WAL.
        """
        # What can fail for good is checked before a new slot exists: a slot made by a run
        # that then stops would hold WAL on the server for ever. (Only that a storage can be
        # there, not a test write: a bucket that takes uploads but refuses deletes works.)
        check_slot_name(self.slot)
        self._prepare_spool()

        def storages_usable() -> None:
            for storage in self.shipper.storages:
                storage.check_destination()

        ensure_slot(self.settings, self.slot, before_create=storages_usable)
        pg_receivewal = Tool(self.toolset.binary("pg_receivewal"))
        args = [
            f"--directory={self.shipper.spool}",
            f"--slot={self.slot}",
            "--no-loop",
            "--no-password",
            "--synchronous",
            "--status-interval=1",
            f"--dbname={libpq_conninfo(self.settings)}",
        ]
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        with (
            libpq_password_env(self.settings) as env,
            pg_receivewal.background(args, env=env) as child,
        ):
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                self._scan()
                ended = child.exited()
                if ended is not None:
                    self._scan(final=True)
                    tail = (ended.stderr_tail.strip().splitlines() or ["no message"])[-1]
                    # A restart, shutdown or network failure: the retry resumes from the slot.
                    text = "\n".join([ended.stderr_tail, *ended.stderr_errors])
                    if _DISCONNECTED.search(text):  # the server ended the stream (shutdown)
                        text += "\nserver closed the connection unexpectedly"
                    lost = lost_session_error(
                        self.settings, "WAL streaming", text, reader="pg_receivewal"
                    )
                    if lost is not None:
                        raise lost
                    raise TransientDatabaseError(
                        f"pg_receivewal for {self.settings.host}:{self.settings.port} stopped "
                        f"(exit {ended.returncode}: {tail}); restarting resumes from slot "
                        f"{self.slot!r} without losing WAL"
                    )
                stop.wait(self.poll_interval)
            child.stop()
            self._scan(final=True)
        return self.shipper.status

    def _prepare_spool(self) -> None:
        spool = self.shipper.spool
        try:
            spool.mkdir(parents=True, exist_ok=True)
            spool.chmod(0o700)
        except OSError as exc:
            raise ConfigError(
                f"WAL spool folder '{spool}' cannot be used ({exc.strerror or exc}): set "
                "--spool-dir (spool_dir in the config) to a writable folder on the worker's "
                "persistent disk"
            ) from None

    def _scan(self, *, final: bool = False) -> None:
        before = (self.shipper.status.segments_shipped, self.shipper.status.partials_shipped)
        self.shipper.ship(final=final)
        after = (self.shipper.status.segments_shipped, self.shipper.status.partials_shipped)
        if after != before and self.on_status is not None:
            self.on_status(self.shipper.status)


__all__ = [
    "DEFAULT_SLOT",
    "ShippingStatus",
    "TimelineSpan",
    "WalGap",
    "WalIntegrityError",
    "WalInventory",
    "WalShipper",
    "WalStreamer",
    "check_history",
    "check_segment_complete",
    "check_segment_start",
    "crc32c",
    "ensure_slot",
    "fetch_wal_file",
    "is_wal_file_name",
    "newest_timeline",
    "parse_history",
    "parse_segment_name",
    "read_history",
    "read_wal_inventory",
    "route_files",
    "route_gaps",
    "segment_name",
    "stored_route",
    "timeline_route",
    "wal_object_key",
    "wal_prefix",
]
