"""Reading tar streams as they pass by, and unpacking them.

pg_basebackup writing a tar to stdout puts its ``backup_manifest`` (the next incremental's
input) and ``global/pg_control`` (the system identifier) inside the stream; the backup
pipeline picks them out on the fly instead of reading the archive back.

Unpacking never trusts the archive: ``tarfile``'s own extraction (even with its filters)
follows links already written, so a restore writes members itself: regular files and
directories only, each created fresh below the target through directory descriptors opened
without following links.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import os
import pwd
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

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

    def pieces(self, size: int) -> Iterator[memoryview]:
        """The next ``size`` bytes as views of the chunks (no copies); fewer at the end."""
        while size:
            if self._position >= len(self._current):
                try:
                    self._current, self._position = memoryview(next(self._chunks)), 0
                except StopIteration:
                    return
                continue
            end = min(self._position + size, len(self._current))
            piece = self._current[self._position:end]
            size -= len(piece)
            self._position = end
            yield piece

    def read_exact(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer only at the end of the stream)."""
        return b"".join(self.pieces(size))

    def drain(self) -> None:
        for _ in self._chunks:
            pass


class UnsafeArchiveError(PgBackflowError):
    """A tar member a restore refuses to write: a link, a device, or a path out of the target."""


_READ_SIZE = 1 << 20
_REGULAR = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE})
_KINDS = {
    tarfile.LNKTYPE: "a hard link",
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}
# Every directory below the target is opened without following links: a directory swapped
# for a link (by the archive or by anyone else meanwhile) cannot redirect a write.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_EXCL: a name that exists (file, link, anything) is never opened, truncated or appended.
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _SafeUnpacker:
    """Writes tar members below one directory, refusing anything that could reach outside.

    Only regular files and directories are written, each created fresh (never an existing
    name) through descriptors of directories opened without following links. Symbolic links
    are written only where the caller allows them: ``pg_tblspc/<oid>`` members re-pointed to
    the restore's own tablespace folders, and (for tool archives) links to a sibling name.

    Args:
        target: The directory to unpack into (it may itself be a link: the caller chose it).
        label: The archive, for messages.
        tablespace_links: ``oid`` → folder for ``pg_tblspc/<oid>`` link members.
        sibling_links: Allow links whose target is a plain name in the same directory.
    """

    def __init__(
        self,
        target: Path,
        label: str,
        tablespace_links: Mapping[str, Path],
        sibling_links: bool,
    ) -> None:
        self._target = target
        self._label = label
        self._tablespace_links = tablespace_links
        self._sibling_links = sibling_links
        self._as_root = os.geteuid() == 0
        self._owners: dict[tuple[str, int, str, int], tuple[int, int]] = {}
        self._dirs: dict[tuple[str, ...], int] = {
            (): os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        }

    def close(self) -> None:
        """Close every directory descriptor."""
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def refuse(self, member: tarfile.TarInfo, why: str) -> UnsafeArchiveError:
        """The one-line error for a member that is not written."""
        return UnsafeArchiveError(
            f"{self._label}: member {member.name!r} refused ({why}); nothing was written "
            f"outside {self._target}: the archive was tampered with or is not what pgbackflow "
            "stores, do not use it"
        )

    def _parts(self, member: tarfile.TarInfo) -> tuple[str, ...]:
        name = member.name
        if name.startswith("/"):
            raise self.refuse(member, "absolute path")
        parts = tuple(part for part in name.split("/") if part not in ("", "."))
        if ".." in parts:
            raise self.refuse(member, "path with '..'")
        return parts

    def add(self, member: tarfile.TarInfo, content: Callable[[int], None]) -> None:
        """Write one member (or raise UnsafeArchiveError without writing it); ``content``
        writes a regular member's data into the descriptor it is given."""
        parts = self._parts(member)
        if member.isdir():
            if parts:
                fd = self._dir(parts, member)
                # Owner rwx always: later members are written into it.
                os.fchmod(fd, (member.mode & 0o777) | 0o700)
                self._chown(member, fd)
            return
        if not parts:
            raise self.refuse(member, "no name")
        if member.type in _REGULAR:
            self._file(parts, member, content)
        elif member.issym():
            self._link(parts, member)
        else:
            kind = _KINDS.get(member.type, f"tar type {member.type!r}")
            target = f" to {member.linkname!r}" if member.linkname else ""
            raise self.refuse(member, f"{kind}{target}")

    def _dir(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> int:
        """Descriptor of the directory ``parts`` below the target, created when missing."""
        known = self._dirs.get(parts)
        if known is not None:
            return known
        parent = self._dir(parts[:-1], member)
        with contextlib.suppress(FileExistsError):
            os.mkdir(parts[-1], 0o700, dir_fd=parent)
        try:
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                where = "/".join(parts)
                raise self.refuse(
                    member, f"{where!r} in the target is a link or a file, not a directory"
                ) from None
            raise
        self._dirs[parts] = fd
        return fd

    def _file(
        self, parts: tuple[str, ...], member: tarfile.TarInfo, content: Callable[[int], None]
    ) -> None:
        parent = self._dir(parts[:-1], member)
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, 0o600, dir_fd=parent)
        except FileExistsError:
            raise self.refuse(member, "its name already exists in the target") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR):
                raise self.refuse(member, "its name already exists in the target") from None
            raise
        try:
            content(fd)
            os.fchmod(fd, member.mode & 0o777)
            self._chown(member, fd)
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)

    def _link(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        if len(parts) == 2 and parts[0] == "pg_tblspc" and parts[1] in self._tablespace_links:
            # Never the archive's own link target: the source's path means nothing here.
            destination = str(self._tablespace_links[parts[1]])
        elif self._sibling_links and "/" not in member.linkname and member.linkname not in (
            "", ".", "..",
        ):
            destination = member.linkname
        else:
            raise self.refuse(member, f"a symbolic link to {member.linkname!r}")
        parent = self._dir(parts[:-1], member)
        try:
            os.symlink(destination, parts[-1], dir_fd=parent)
        except FileExistsError:
            raise self.refuse(member, "its name already exists in the target") from None

    def _chown(self, member: tarfile.TarInfo, fd: int) -> None:
        """As root, the member's owner (by name, else by id), as tar itself does."""
        if not self._as_root:
            return
        key = (member.uname, member.uid, member.gname, member.gid)
        ids = self._owners.get(key)
        if ids is None:
            uid, gid = member.uid, member.gid
            with contextlib.suppress(KeyError):
                uid = pwd.getpwnam(member.uname).pw_uid if member.uname else uid
            with contextlib.suppress(KeyError):
                gid = grp.getgrnam(member.gname).gr_gid if member.gname else gid
            ids = self._owners[key] = (uid, gid)
        os.fchown(fd, *ids)


def unpack_tar_stream(
    chunks: Iterable[bytes],
    target: Path,
    *,
    label: str,
    tablespace_links: Mapping[str, Path] | None = None,
) -> int:
    """Unpack a tar delivered as chunks into ``target``; returns the number of members.

    Only regular files and directories are written, every one inside ``target`` and created
    fresh; a ``pg_tblspc/<oid>`` link is written only for an oid in ``tablespace_links``,
    pointing to the folder given there. Anything else (other links, hard links, devices,
    FIFOs, absolute or ``..`` paths, a name written twice) stops the unpacking with an
    :class:`UnsafeArchiveError` naming the archive and the member. The iterator is consumed
    to its end so checksums over it complete.
    """
    reader = _ChunkReader(chunks)
    unpacker = _open_unpacker(target, label, tablespace_links or {}, sibling_links=False)
    count = 0
    member_name = ""
    try:
        while (member := _next_member(reader, label)) is not None:
            member_name = member.name
            count += 1
            unpacker.add(member, functools.partial(_write_pieces, reader, member, label))
            # The data of a member not written (a directory's, a link's) and the padding.
            _skip(reader, _padded(member.size) - (member.size if member.isreg() else 0),
                  label)
    except OSError as exc:
        raise _write_error(label, member_name, target, exc) from None
    finally:
        unpacker.close()
    reader.drain()
    # The data directory itself must be private.
    os.chmod(target, 0o700)
    return count


def unpack_tar_file(
    source: IO[bytes], target: Path, *, label: str, mode: str = "r|*"
) -> int:
    """Unpack a tar read from ``source`` (e.g. a toolset's ``.tar.gz``) into ``target``.

    The rules of :func:`unpack_tar_stream`, except that symbolic links to a sibling name
    (``libpq.so.5 -> libpq.so.5.17``) are allowed: they cannot point out of their directory.
    """
    return _unpack(source, target, label, {}, sibling_links=True, mode=mode)


def _unpack(
    source: _ChunkReader | IO[bytes],
    target: Path,
    label: str,
    tablespace_links: Mapping[str, Path],
    *,
    sibling_links: bool,
    mode: str = "r|",
) -> int:
    count = 0
    member_name = ""
    unpacker = _open_unpacker(target, label, tablespace_links, sibling_links=sibling_links)
    try:
        with tarfile.open(fileobj=source, mode=mode) as archive:  # type: ignore[call-overload]
            for member in archive:
                member_name = member.name
                unpacker.add(member, functools.partial(_copy_member, archive, member))
                count += 1
    except tarfile.TarError as exc:
        raise PgBackflowError(
            f"{label}: not a valid tar archive ({exc}): the archive is damaged"
        ) from None
    except OSError as exc:
        raise _write_error(label, member_name, target, exc) from None
    finally:
        unpacker.close()
    return count


def _open_unpacker(
    target: Path, label: str, tablespace_links: Mapping[str, Path], *, sibling_links: bool
) -> _SafeUnpacker:
    try:
        return _SafeUnpacker(target, label, tablespace_links, sibling_links)
    except OSError as exc:
        raise PgBackflowError(
            f"{label}: cannot unpack into {target} ({exc.strerror}): use an existing, "
            "writable directory"
        ) from None


def _write_error(label: str, member: str, target: Path, exc: OSError) -> PgBackflowError:
    return PgBackflowError(
        f"{label}: cannot unpack member {member!r} into {target} "
        f"({exc.strerror or exc}): free space or fix the directory's permissions"
    )


def _copy_member(archive: tarfile.TarFile, member: tarfile.TarInfo, fd: int) -> None:
    source = archive.extractfile(member)
    assert source is not None  # regular members always have data
    while data := source.read(_READ_SIZE):
        _write_all(fd, memoryview(data))


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


# Stream unpacking parses the headers itself: tarfile's stream mode copies every byte
# through its buffers twice, which was a fifth of a restore's unpacking time. A header is
# still decoded (and its checksum checked) by tarfile, and only plain ustar/GNU headers are
# accepted, which is all pg_basebackup writes (it refuses names over 99 bytes): extension
# headers (pax, GNU long names, sparse maps) are refused by type like devices.
_ZERO_BLOCK = bytes(BLOCK)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _damaged(label: str, why: str) -> PgBackflowError:
    return PgBackflowError(f"{label}: not a valid tar archive ({why}): the archive is damaged")


def _next_member(reader: _ChunkReader, label: str) -> tarfile.TarInfo | None:
    """The next member's header; None at the end of the archive."""
    header = reader.read_exact(BLOCK)
    if not header or header == _ZERO_BLOCK:
        return None
    if len(header) < BLOCK:
        raise _damaged(label, "truncated header")
    try:
        return tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        raise _damaged(label, str(exc)) from None


def _write_pieces(reader: _ChunkReader, member: tarfile.TarInfo, label: str, fd: int) -> None:
    left = member.size
    for piece in reader.pieces(member.size):
        _write_all(fd, piece)
        left -= len(piece)
    if left:
        raise _damaged(label, f"unexpected end of data in member {member.name!r}")


def _skip(reader: _ChunkReader, size: int, label: str) -> None:
    for piece in reader.pieces(size):
        size -= len(piece)
    if size:
        raise _damaged(label, "unexpected end of data")


__all__ = [
    "TarMemberCapture",
    "UnsafeArchiveError",
    "unpack_tar_file",
    "unpack_tar_stream",
]
