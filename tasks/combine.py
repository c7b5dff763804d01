"""Combine an unpacked backup chain (a full and PostgreSQL 17+ incrementals) in place.

``pg_combinebackup`` writes a new directory: it copies the whole full backup (1.26 GB for a
1.22 GB database) to apply a few percent of changed blocks, while the full has just been
unpacked for it. Here the unpacked full *becomes* the output: files the newest backup holds
whole are moved in (a rename), relation files it holds as ``INCREMENTAL.<name>`` get only
their changed blocks written over the full's copy, and what the newest backup no longer has
is removed. The result is, byte for byte, what ``pg_combinebackup --no-manifest`` writes
(tests/test_combine.py compares the two on real chains), following its rules:

- the newest incremental's truncation length and blocks decide the file's length;
- each block comes from the newest backup that holds it, going back through the chain to the
  first backup holding the whole file; a block no backup holds reads as zeros;
- ``INCREMENTAL.`` names count only in ``base/``, ``global`` and ``pg_tblspc/``;
- ``backup_label`` is the newest one without its ``INCREMENTAL FROM`` lines.

Chains with extra tablespaces keep using ``pg_combinebackup`` (see tasks/pitr.py): their
files live outside the data directory and are relocated by its ``--tablespace-mapping``.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pgbackflow.tasks.errors import PgBackflowError

BLOCK_SIZE = 8192
"""PostgreSQL's BLCKSZ: every toolset we install is built with the default."""
SEGMENT_BLOCKS = 131072
"""RELSEG_SIZE: blocks in one 1 GB relation segment file."""
INCREMENTAL_MAGIC = 0xD3AE1F0D
INCREMENTAL_PREFIX = "INCREMENTAL."
_COPY_RUN = 128
"""Blocks copied in one read/write (1 MiB): adjacent changed blocks go together."""
_LSN = re.compile(r"([0-9A-F]{1,8})/([0-9A-F]{1,8})")


class CombineError(PgBackflowError):
    """The unpacked backups do not form a chain that can be combined."""


@dataclass(frozen=True)
class IncrementalFile:
    """The header of one ``INCREMENTAL.<name>`` file: which blocks it holds (in the order
    they follow the header) and how long the relation file was when it was taken."""

    path: Path
    blocks: tuple[int, ...]
    truncation_blocks: int
    header_size: int

    @classmethod
    def read(cls, path: Path) -> IncrementalFile:
        """Read and check the header (the file's size must match it exactly)."""
        with path.open("rb") as source:
            head = source.read(12)
            if len(head) < 12:
                raise CombineError(f"{path}: too short for an incremental file header")
            magic, count, truncation = struct.unpack("<III", head)
            if magic != INCREMENTAL_MAGIC:
                raise CombineError(f"{path}: not an incremental file (magic 0x{magic:08x})")
            if count > SEGMENT_BLOCKS or truncation > SEGMENT_BLOCKS:
                raise CombineError(f"{path}: {count} blocks / truncation length {truncation} "
                                   f"exceed a segment's {SEGMENT_BLOCKS} blocks")
            numbers = source.read(4 * count)
            size = os.fstat(source.fileno()).st_size
        if len(numbers) < 4 * count:
            raise CombineError(f"{path}: header ends before its {count} block numbers")
        blocks = struct.unpack(f"<{count}I", numbers)
        header = 12 + 4 * count
        if count and header % BLOCK_SIZE:
            header += BLOCK_SIZE - header % BLOCK_SIZE  # block data starts block-aligned
        if size != header + count * BLOCK_SIZE:
            raise CombineError(
                f"{path}: {size} bytes where its header promises {header + count * BLOCK_SIZE} "
                f"({count} blocks of {BLOCK_SIZE}): cut short, or a block size other than 8 kB"
            )
        if any(block >= SEGMENT_BLOCKS for block in blocks) or len(set(blocks)) != count:
            raise CombineError(f"{path}: block numbers out of range or repeated")
        return cls(path, blocks, truncation, header)

    @property
    def length_blocks(self) -> int:
        """Blocks of the reconstructed file: the truncation length, or further if a block
        beyond it was written since."""
        return max(self.truncation_blocks, max(self.blocks, default=-1) + 1)


@dataclass(frozen=True)
class _Listing:
    """One unpacked backup's tree, by the names the combined output uses."""

    root: Path
    directories: frozenset[str]
    whole: dict[str, Path]
    incremental: dict[str, Path]

    @classmethod
    def of(cls, root: Path) -> _Listing:
        directories: set[str] = set()
        whole: dict[str, Path] = {}
        incremental: dict[str, Path] = {}
        for folder, subfolders, files in os.walk(root):
            relative = os.path.relpath(folder, root)
            prefix = "" if relative == "." else relative + "/"
            for name in subfolders:
                if not os.path.islink(os.path.join(folder, name)):
                    directories.add(prefix + name)
            for name in files:
                path = Path(folder, name)
                if path.is_symlink():
                    continue  # pg_tblspc links: ours, not the backup's
                if not prefix and name in ("backup_label", "backup_manifest"):
                    continue  # written anew / not kept, as pg_combinebackup --no-manifest
                if name.startswith(INCREMENTAL_PREFIX) and _holds_incrementals(relative):
                    incremental[prefix + name[len(INCREMENTAL_PREFIX):]] = path
                else:
                    whole[prefix + name] = path
        return cls(root, frozenset(directories), whole, incremental)


def _holds_incrementals(relative_dir: str) -> bool:
    """Where PostgreSQL writes INCREMENTAL files (elsewhere such a name is an ordinary file)."""
    return (relative_dir.startswith(("base/", "pg_tblspc/")) or relative_dir == "global")


@dataclass(frozen=True)
class _Label:
    start_lsn: int
    start_timeline: int
    from_lsn: int | None
    from_timeline: int | None


def _read_label(backup_dir: Path) -> tuple[_Label, str]:
    path = backup_dir / "backup_label"
    try:
        text = path.read_text()
    except OSError as exc:
        raise CombineError(f"{path}: cannot read it ({exc.strerror})") from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields.setdefault(key, value)

    def lsn(key: str) -> int | None:
        if key not in fields:
            return None
        match = _LSN.match(fields[key])
        if match is None:
            raise CombineError(f"{path}: {key} is not an LSN: {fields[key]!r}")
        return int(match[1], 16) << 32 | int(match[2], 16)

    def timeline(key: str) -> int | None:
        value = fields.get(key)
        if value is None:
            return None
        if not value.isdigit() or int(value) == 0:
            raise CombineError(f"{path}: {key} is not a timeline: {value!r}")
        return int(value)

    start = lsn("START WAL LOCATION")
    start_timeline = timeline("START TIMELINE")
    if start is None or start_timeline is None:
        raise CombineError(f"{path}: no START WAL LOCATION / START TIMELINE")
    return _Label(start, start_timeline, lsn("INCREMENTAL FROM LSN"),
                  timeline("INCREMENTAL FROM TLI")), text


def _system_identifier(backup_dir: Path) -> int:
    path = backup_dir / "global" / "pg_control"
    try:
        with path.open("rb") as control:
            head = control.read(8)
    except OSError as exc:
        raise CombineError(f"{path}: cannot read it ({exc.strerror})") from None
    if len(head) < 8:
        raise CombineError(f"{path}: too short for a control file")
    return int(struct.unpack("<Q", head)[0])


def _check_chain(full_dir: Path, increments: Sequence[Path]) -> str:
    """Each incremental was taken from the backup before it, all of one cluster; returns the
    newest ``backup_label``'s text."""
    previous, text = _read_label(full_dir)
    if previous.from_lsn is not None:
        raise CombineError(f"{full_dir}: is an incremental backup, not a full one")
    system = _system_identifier(full_dir)
    for directory in increments:
        label, text = _read_label(directory)
        if label.from_lsn is None or label.from_timeline is None:
            raise CombineError(f"{directory}: is a full backup, not an incremental one")
        if (label.from_lsn, label.from_timeline) != (previous.start_lsn,
                                                     previous.start_timeline):
            raise CombineError(
                f"{directory}: was taken from a backup other than the one before it in the "
                "chain (its INCREMENTAL FROM LSN/TLI do not match that backup's start)"
            )
        if _system_identifier(directory) != system:
            raise CombineError(f"{directory}: belongs to another cluster (system identifier)")
        previous = label
    return text


@dataclass(frozen=True)
class CombineStats:
    """What combining wrote, for the log."""

    moved_files: int
    rebuilt_files: int
    blocks_written: int
    removed_files: int


def combine_in_place(full_dir: Path, increments: Sequence[Path]) -> CombineStats:
    """Turn ``full_dir`` (an unpacked full backup) into the combination of it and
    ``increments`` (unpacked incrementals, oldest first, each taken from the one before).

    The incrementals' folders are consumed: files are moved out of them.

    Raises:
        CombineError: the folders are not such a chain, or an incremental file is damaged.
    """
    if not increments:
        raise CombineError("no incremental backup to combine with the full")
    newest_label = _check_chain(full_dir, increments)
    full = _Listing.of(full_dir)
    if full.incremental:
        name = next(iter(full.incremental))
        raise CombineError(f"{full_dir}: a full backup holding an incremental file ({name})")
    links = [_Listing.of(directory) for directory in increments]
    newest = links[-1]
    wanted = newest.whole.keys() | newest.incremental.keys()
    removed = 0
    for name in full.whole.keys() - wanted:
        (full_dir / name).unlink()
        removed += 1
    for name in sorted(full.directories - newest.directories, reverse=True):
        (full_dir / name).rmdir()  # deepest first; their files went above
    for name in sorted(newest.directories - full.directories):
        (full_dir / name).mkdir(mode=0o700, exist_ok=True)
    for name, path in newest.whole.items():
        os.replace(path, full_dir / name)
    blocks = 0
    for name in newest.incremental:
        blocks += _rebuild(name, full, links)
    (full_dir / "backup_manifest").unlink(missing_ok=True)
    label = full_dir / "backup_label"
    label.write_text("".join(line for line in newest_label.splitlines(keepends=True)
                             if not line.startswith(("INCREMENTAL FROM LSN: ",
                                                     "INCREMENTAL FROM TLI: "))))
    return CombineStats(len(newest.whole), len(newest.incremental), blocks, removed)


def _rebuild(name: str, full: _Listing, links: Sequence[_Listing]) -> int:
    """Rebuild ``name`` over the newest whole copy of it in the chain; returns the blocks
    written."""
    newest = IncrementalFile.read(links[-1].incremental[name])
    older: list[IncrementalFile] = []  # newest first
    base: Path | None = None
    for link in reversed(links[:-1]):
        if name in link.whole:
            base = link.whole[name]
            break
        if name not in link.incremental:
            raise CombineError(f"{link.root}: holds no {name} (whole or incremental), but a "
                               "later backup of the chain changed it")
        older.append(IncrementalFile.read(link.incremental[name]))
    target = full.root / name
    if base is not None:
        os.replace(base, target)
    elif name not in full.whole:
        raise CombineError(f"{full.root}: the full backup holds no {name}, but an incremental "
                           "of the chain changed it")
    fd = os.open(target, os.O_RDWR)
    try:
        base_size = os.fstat(fd).st_size
        written = 0
        # Oldest first, so the newest backup's copy of a block is the one that stays; older
        # incrementals count only below the newest truncation length (pg_combinebackup's rule).
        for source in reversed(older):
            written += _copy_blocks(source, fd, newest.truncation_blocks)
        written += _copy_blocks(newest, fd, None)
        length = newest.length_blocks
        # Blocks the base still holds past the newest truncation length read as zeros in
        # pg_combinebackup's output unless the newest backup rewrote them; so does a torn
        # last block of the base that no incremental rewrote.
        fresh = set(newest.blocks)
        base_blocks = -(-base_size // BLOCK_SIZE)
        zero = [b for b in range(newest.truncation_blocks, min(length, base_blocks))
                if b not in fresh]
        torn = base_size // BLOCK_SIZE
        if (torn < min(base_blocks, newest.truncation_blocks) and torn not in fresh
                and not any(torn in source.blocks for source in older)):
            zero.append(torn)
        for block in zero:
            os.pwrite(fd, bytes(BLOCK_SIZE), block * BLOCK_SIZE)
        os.ftruncate(fd, length * BLOCK_SIZE)
    finally:
        os.close(fd)
    return written + len(zero)


def _copy_blocks(source: IncrementalFile, fd: int, below: int | None) -> int:
    """Write ``source``'s blocks (those under ``below``, if given) at their places in ``fd``,
    adjacent ones together."""
    runs: list[tuple[int, int, int]] = []  # (index in source, block, count)
    for index, block in enumerate(source.blocks):
        if below is not None and block >= below:
            continue
        if runs:
            first_index, first_block, count = runs[-1]
            if (index == first_index + count and block == first_block + count
                    and count < _COPY_RUN):
                runs[-1] = (first_index, first_block, count + 1)
                continue
        runs.append((index, block, 1))
    written = 0
    with source.path.open("rb") as data:
        for index, block, count in runs:
            chunk = os.pread(data.fileno(), count * BLOCK_SIZE,
                             source.header_size + index * BLOCK_SIZE)
            if len(chunk) != count * BLOCK_SIZE:
                raise CombineError(f"{source.path}: ends inside block {block}")
            os.pwrite(fd, chunk, block * BLOCK_SIZE)
            written += count
    return written
