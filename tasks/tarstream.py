"""Reading tar streams as they pass by, and unpacking them.

pg_basebackup writing a tar to stdout puts its ``backup_manifest`` (the next incremental's
input) and ``global/pg_control`` (the system identifier) inside the stream; the backup
pipeline picks them out on the fly instead of reading the archive back.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from pgbackflow.tasks.errors import PgBackflowError

BLOCK = 512


def _tar_number(field: bytes) -> int:
    """A tar numeric field: octal text, or base-256 when the high bit is set (big files)."""
    if field and field[0] & 0x80:
        value = field[0] & 0x3F
        for byte in field[1:]:
            value = (value << 8) | byte
        return value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


class TarMemberCapture:
    """Watches a tar stream chunk by chunk and keeps the content of the named members.

    Memory holds at most one header block plus the captured members.

    Args:
        names: Member names to keep (as stored in the tar, e.g. ``backup_manifest``).
    """

    def __init__(self, names: Iterable[str]) -> None:
        self._wanted = frozenset(names)
        self.members: dict[str, bytes] = {}
        self.member_count = 0
        self._header = bytearray()
        self._remaining = 0  # data + padding bytes left in the current member
        self._data_left = 0  # data bytes left (without padding)
        self._capturing: bytearray | None = None
        self._capturing_name = ""
        self._ended = False

    def __call__(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._remaining:
                take = min(self._remaining, len(view))
                if self._capturing is not None and self._data_left:
                    keep = min(take, self._data_left)
                    self._capturing += view[:keep]
                self._data_left = max(0, self._data_left - take)
                self._remaining -= take
                view = view[take:]
                if not self._remaining and self._capturing is not None:
                    self.members[self._capturing_name] = bytes(self._capturing)
                    self._capturing = None
                continue
            if self._ended:
                return
            need = BLOCK - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == BLOCK:
                self._start_member(bytes(self._header))
                self._header.clear()

    def _start_member(self, header: bytes) -> None:
        if header == bytes(BLOCK):
            self._ended = True
            return
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix and header[257:262] == b"ustar":
            name = f"{prefix}/{name}"
        size = _tar_number(header[124:136])
        typeflag = header[156:157]
        if typeflag in (b"0", b"\0", b"7"):
            self.member_count += 1
        self._data_left = size
        self._remaining = -(-size // BLOCK) * BLOCK
        if name in self._wanted and typeflag in (b"0", b"\0"):
            self._capturing = bytearray()
            self._capturing_name = name
            if size == 0:
                self.members[name] = b""
                self._capturing = None


class _ChunkReader:
    """A file-like view of an iterator of byte chunks (what tarfile's stream mode reads).

    Reads may return fewer bytes than asked (tarfile's stream mode loops until it has
    enough): slicing one chunk at a time keeps unpacking linear in the archive size.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._current = memoryview(b"")
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            rest = self._current[self._position:].tobytes() + b"".join(self._chunks)
            self._current, self._position = memoryview(b""), 0
            return rest
        while self._position >= len(self._current):
            try:
                self._current, self._position = memoryview(next(self._chunks)), 0
            except StopIteration:
                return b""
        end = min(self._position + size, len(self._current))
        data = self._current[self._position:end].tobytes()
        self._position = end
        return data

    def drain(self) -> None:
        for _ in self._chunks:
            pass


def unpack_tar_stream(chunks: Iterable[bytes], target: Path, *, label: str) -> int:
    """Unpack a tar delivered as chunks into ``target``; returns the number of members.

    Members that would land outside ``target`` (absolute paths, ``..``, links pointing out)
    are refused. The iterator is consumed to its end so checksums over it complete.
    """
    reader = _ChunkReader(chunks)
    count = 0
    try:
        with tarfile.open(fileobj=reader, mode="r|") as archive:  # type: ignore[call-overload]
            for member in archive:
                archive.extract(member, target, filter="tar")
                count += 1
    except (tarfile.TarError, OSError) as exc:
        if isinstance(exc, PermissionError | FileExistsError):
            raise PgBackflowError(f"{label}: cannot unpack into {target}: {exc}") from None
        if isinstance(exc, tarfile.TarError):
            raise PgBackflowError(
                f"{label}: not a valid tar archive ({exc}): the backup is damaged"
            ) from None
        raise
    reader.drain()
    # tarfile applies the members' modes; the data directory itself must be private.
    os.chmod(target, 0o700)
    return count


__all__ = ["TarMemberCapture", "unpack_tar_stream"]
