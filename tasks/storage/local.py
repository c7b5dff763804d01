"""Objects as files below a local (or mounted) folder: `LocalFolderStorage` and its writer."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from pgbackflow.tasks.errors import ConfigError, ObjectNotFoundError, StorageError
from pgbackflow.tasks.process import BOOT_TAG, owner_state
from pgbackflow.tasks.storage.base import (
    INCOMPLETE_DIR,
    MiB,
    ObjectWriter,
    Storage,
    StoredObject,
    WriteActivity,
    _check_prefix,
    check_key,
    is_valid_key,
)

LOCAL_WRITE_BUFFER = MiB
"""Bytes a local writer gathers before writing them to its temporary file."""


class LocalFolderStorage(Storage):
    """Objects as files below a local (or mounted) folder.

    A writer writes to ``<folder>/.pgbackflow-incomplete/<boot>-<pid>-<random>-<tag>`` (the
    tag names the object's folder, see `write_activity`) on the same filesystem, fsyncs it,
    renames it into place with `os.replace` and fsyncs the parent folder, so the object
    appears complete or not at all, also after a crash. While it writes it holds an
    exclusive ``flock`` on the temporary: a sweep on the same machine (same boot) tells a
    live writer from a dead one by that lock and the pid.

    Whoever can write to the folder may have planted symbolic links, FIFOs or devices in it.
    Below the folder itself, every operation walks folder by folder with ``O_NOFOLLOW``
    descriptors (`_folders`): a link is never followed, so no read, write, listing or delete
    reaches outside the folder; only regular files are objects.
    """

    def __init__(self, folder: Path | str) -> None:
        """Create a storage rooted at ``folder`` (created on the first write if missing)."""
        text = str(folder)
        if not text.strip():
            raise ConfigError(
                "local storage folder is empty: set it to an absolute path such as /backups"
            )
        self.folder = Path(os.path.abspath(os.path.expanduser(text)))

    @property
    def location(self) -> str:
        """The folder's absolute path."""
        return str(self.folder)

    @property
    def incomplete_folder(self) -> Path:
        """Where writers keep objects until they are published."""
        return self.folder / INCOMPLETE_DIR

    def _path(self, key: str) -> Path:
        """Where object ``key`` is, for messages (operations go through `_folders`)."""
        return self.folder.joinpath(*check_key(key).split("/"))

    @contextlib.contextmanager
    def _folders(self, parts: Sequence[str], *, create: bool = False) -> Iterator[list[int]]:
        """Descriptors of the storage folder and of each folder ``parts`` names below it.

        Each is opened relative to the one before, without following a symbolic link, so
        what is reached is inside the folder even if the folder changes meanwhile.

        Raises:
            FileNotFoundError: A folder is missing (and ``create`` is false).
            NotADirectoryError: A file is in the way of a folder.
            StorageError: A folder below the storage folder is a symbolic link.
        """
        fds = [os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
        try:
            for depth, part in enumerate(parts, 1):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fds[-1])
                try:
                    fds.append(os.open(part, _FOLDER_FLAGS, dir_fd=fds[-1]))
                except NotADirectoryError:
                    if _is_link(part, fds[-1]):
                        raise self._link_refused("/".join(parts[:depth])) from None
                    raise
            yield fds
        finally:
            for fd in fds:
                os.close(fd)

    def _link_refused(self, relative: str) -> StorageError:
        return StorageError(
            f"local storage folder '{self.folder}': '{relative}' is a symbolic link, and "
            "pgbackflow never follows links inside its storage (whoever can write there "
            "could point them anywhere): replace it with a real folder or remove it"
        )

    def _not_writable(self, exc: OSError) -> StorageError:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, (FileExistsError, NotADirectoryError)) or exc.errno in (
            errno.EEXIST,
            errno.ENOTDIR,
        ):
            reason = "a file is in the way of a folder"
        if exc.errno == errno.ENOSPC:
            return StorageError(
                f"local storage folder '{self.folder}' is full (No space left on device): "
                "free space or choose another folder"
            )
        return StorageError(
            f"local storage folder '{self.folder}' is not writable ({reason}): "
            "fix its permissions or choose another folder"
        )

    def open_write(self, key: str, *, size_hint: int | None = None) -> ObjectWriter:
        """Start writing object ``key`` (``size_hint`` is not needed locally)."""
        check_key(key)
        try:
            temp = self._new_temporary(key)
        except OSError as exc:
            raise self._not_writable(exc) from exc
        return _LocalWriter(self, key, temp)

    def _new_temporary(self, key: str) -> _Temporary:
        """A new writer's temporary for ``key`` (named after this boot, this pid and the
        key's folder), flocked while this process holds it open."""
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._folders([INCOMPLETE_DIR], create=True) as fds:
            folder_fd = os.dup(fds[-1])
        folder = _folder_tag(key.rpartition("/")[0])
        name = f"{BOOT_TAG}-{os.getpid()}-{secrets.token_hex(8)}-{folder}"
        try:
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                dir_fd=folder_fd,
            )
        except BaseException:
            os.close(folder_fd)
            raise
        # Where locks are unsupported the writer goes on; sweeps then judge by age alone.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return _Temporary(folder_fd, name, fd)

    def create_new(self, key: str, data: bytes) -> bool:
        """Write a small object only if ``key`` does not exist: written to a temporary, then
        hard-linked into place (``link`` fails on an existing name), so it appears whole."""
        *folders, name = check_key(key).split("/")
        try:
            temp = self._new_temporary(key)
            try:
                with os.fdopen(temp.fd, "wb", closefd=True) as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                with self._folders(folders, create=True) as fds:
                    os.link(temp.name, name, src_dir_fd=temp.folder_fd, dst_dir_fd=fds[-1],
                             follow_symlinks=False)
                    os.fsync(fds[-1])
            except FileExistsError:
                return False
            finally:
                temp.remove()
        except OSError as exc:
            raise self._not_writable(exc) from exc
        return True

    def check_exists(self) -> None:
        """Raise ObjectNotFoundError when the folder does not exist."""
        if not self.folder.is_dir():
            raise ObjectNotFoundError(
                f"local storage folder '{self.folder}' does not exist: check the path"
            )

    def check_root(self) -> None:
        """Refuse a missing folder whose parent is missing too (a mistyped path).

        Raises:
            ConfigError: Neither the folder nor its parent exists.
            StorageError: A file is in the way of the folder.
        """
        if self.folder.is_dir():
            return
        if self.folder.exists() or self.folder.is_symlink():
            raise self._not_writable(NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
        parent = self.folder.parent
        if not parent.is_dir():
            raise ConfigError(
                f"local storage folder '{self.folder}' does not exist, nor does its parent "
                f"'{parent}': create it first (mkdir -p '{self.folder}') or correct the path; "
                "nothing was written"
            )

    def check_destination(self) -> None:
        """A missing folder is made by the first write: only a mistyped path (its parent is
        missing too) or a file in its place is refused."""
        self.check_root()

    def create_root(self) -> bool:
        """Create the folder (not its parents; see `check_root`); True when it was created."""
        self.check_root()
        try:
            self.folder.mkdir()
        except FileExistsError:
            return False
        except OSError as exc:
            raise self._not_writable(exc) from exc
        return True

    def open_read(self, key: str) -> BinaryIO:
        """Open object ``key`` for streaming reads (a regular file, never through a link)."""
        *folders, name = check_key(key).split("/")
        try:
            with self._folders(folders) as fds:
                # O_NONBLOCK: opening a planted FIFO must not wait for a writer.
                fd = os.open(name, _READ_FLAGS | os.O_NONBLOCK, dir_fd=fds[-1])
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise self._not_found(key) from exc
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link, a socket: no object
                raise self._not_found(key) from exc
            raise StorageError(
                f"cannot read '{self._path(key)}' ({exc.strerror}): check the file's permissions"
            ) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise self._not_found(key)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb")

    def _not_found(self, key: str) -> ObjectNotFoundError:
        return ObjectNotFoundError(
            f"object '{key}' does not exist in local storage folder '{self.folder}': "
            "check the key or list the folder's backups"
        )

    def list(self, prefix: str = "") -> list[StoredObject]:
        """Return complete objects whose keys start with ``prefix``, sorted by key."""
        return sorted(self.iter_list(prefix), key=lambda obj: obj.key)

    def iter_list(self, prefix: str = "") -> Iterator[StoredObject]:
        """The objects whose keys start with ``prefix``, one at a time as a depth-first
        ``os.scandir`` walk meets them (directory order, not sorted: :meth:`list` sorts).

        No folder is read whole first (a cluster's WAL folder holds 100,000s of files), so
        a reader that keeps less than the listing (the catalog) never holds all of it: the
        walk keeps one open directory stream per level.
        """
        _check_prefix(prefix)
        # Only walk the deepest folder the prefix pins down.
        base_parts = prefix.split("/")[:-1] if prefix else []
        try:
            with self._folders(base_parts) as fds:
                for key, st in self._walk(fds[-1], "/".join(base_parts)):
                    if key.startswith(prefix):
                        yield StoredObject(key, st.st_size, _utc(st.st_mtime))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StorageError(
                f"cannot list local storage folder '{self.folder}' ({exc.strerror}): "
                "check its permissions"
            ) from exc

    def _walk(self, folder_fd: int, key_prefix: str) -> Iterator[tuple[str, os.stat_result]]:
        """Regular files below ``folder_fd`` with valid keys; links and other files are no
        objects and are never followed."""
        with os.scandir(folder_fd) as entries:  # closed when the reader stops early, too
            for entry in entries:
                key = f"{key_prefix}/{entry.name}" if key_prefix else entry.name
                if not key_prefix and entry.name == INCOMPLETE_DIR:
                    continue
                if not is_valid_key(key):
                    continue  # not a name pgbackflow writes (a control character, ...)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        sub_fd = os.open(entry.name, _FOLDER_FLAGS, dir_fd=folder_fd)
                        try:
                            yield from self._walk(sub_fd, key)
                        finally:
                            os.close(sub_fd)
                    elif entry.is_file(follow_symlinks=False):
                        yield key, entry.stat(follow_symlinks=False)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # deleted, or replaced by a link, while listing

    def stat(self, key: str) -> StoredObject:
        """Describe object ``key`` (a regular file; a link is no object)."""
        *folders, name = check_key(key).split("/")
        try:
            with self._folders(folders) as fds:
                st = os.stat(name, dir_fd=fds[-1], follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise self._not_found(key) from exc
        except OSError as exc:
            raise StorageError(
                f"cannot inspect '{self._path(key)}' ({exc.strerror}): check the folder's "
                "permissions"
            ) from exc
        if not stat.S_ISREG(st.st_mode):
            raise self._not_found(key)
        return StoredObject(key, st.st_size, _utc(st.st_mtime))

    def delete(self, key: str) -> None:
        """Delete object ``key`` and the folders it leaves empty (a link in its place is
        removed itself; what it points to is never touched)."""
        *folders, name = check_key(key).split("/")
        try:
            with self._folders(folders) as fds:
                try:
                    os.unlink(name, dir_fd=fds[-1])
                except (FileNotFoundError, IsADirectoryError):
                    return
                # fds[i] holds folders[i]: prune the folders left empty, deepest first.
                for depth in range(len(folders) - 1, -1, -1):
                    try:
                        os.rmdir(folders[depth], dir_fd=fds[depth])
                    except OSError:
                        break  # not empty (or in use): keep it
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StorageError(
                f"cannot delete '{self._path(key)}' ({exc.strerror}): check the folder's "
                "permissions"
            ) from exc

    def sweep_incomplete(self, older_than: timedelta, *, dead_writers: bool = False) -> int:
        """Remove temporaries not written to for ``older_than``; never a live writer's.

        Args:
            older_than: Idle time after which a temporary counts as left behind.
            dead_writers: Also remove, whatever their age, those of writers on this machine
                that are gone (their pid is dead and their lock free).

        Returns:
            The number of files removed.
        """
        return len(self._sweep(older_than, dead_writers=dead_writers))

    def sweep_stale_writes(self, older_than: timedelta) -> tuple[str, ...]:
        """Remove idle temporaries and those of dead writers of this machine."""
        return self._sweep(older_than, dead_writers=True)

    def list_stale_writes(self, older_than: timedelta) -> tuple[str, ...]:
        """The temporaries `sweep_stale_writes` would remove now; nothing is removed."""
        return self._sweep(older_than, dead_writers=True, remove=False)

    def write_activity(self, prefixes: Sequence[str]) -> WriteActivity:
        """The temporaries being written, by their folder's tag: their last write, or now
        while their writer on this machine lives (a dump may wait on a lock without
        writing). A temporary's name says its folder, not the prefix: all are returned."""
        active: dict[str, datetime] = {}
        try:
            with self._folders([INCOMPLETE_DIR]) as fds:
                for name, info, writer in _temporaries(fds[-1]):
                    match = _TEMP_NAME.fullmatch(name)
                    if match is None or match["folder"] is None or writer == "gone":
                        continue
                    last = datetime.now(UTC) if writer == "alive" else _utc(info.st_mtime)
                    tag = match["folder"]
                    active[tag] = max(last, active.get(tag, last))
        except (FileNotFoundError, NotADirectoryError):
            return WriteActivity()
        except OSError as exc:
            raise self._not_writable(exc) from exc
        return WriteActivity(active, _folder_tag)

    def _sweep(
        self, older_than: timedelta, *, dead_writers: bool, remove: bool = True
    ) -> tuple[str, ...]:
        try:
            with self._folders([INCOMPLETE_DIR]) as fds:
                return self._sweep_folder(fds[-1], older_than, dead_writers, remove)
        except (FileNotFoundError, NotADirectoryError):
            return ()
        except OSError as exc:
            raise self._not_writable(exc) from exc

    def _sweep_folder(
        self, folder_fd: int, older_than: timedelta, dead_writers: bool, remove: bool
    ) -> tuple[str, ...]:
        now = time.time()
        cutoff = now - older_than.total_seconds()
        removed: tuple[str, ...] = ()
        for name, info, writer in _temporaries(folder_fd):
            if writer == "alive":
                continue
            if info.st_mtime <= cutoff:
                reason = f"idle for {(now - info.st_mtime) / 3600:.1f} h"
            elif dead_writers and writer == "gone":
                reason = "its writer is gone"
            else:
                continue
            if remove:
                try:
                    os.unlink(name, dir_fd=folder_fd)
                except FileNotFoundError:
                    continue
            removed += (f"{self.incomplete_folder / name} ({info.st_size} bytes, {reason})",)
        return removed


def _temporaries(folder_fd: int) -> Iterator[tuple[str, os.stat_result, str]]:
    """The writers' temporaries in the incomplete folder ``folder_fd``: name, stat and the
    writer's state (`_local_writer_state`). Only regular files: writers make nothing else,
    and a planted FIFO or device is never opened."""
    with os.scandir(folder_fd) as scan:
        entries = [*scan]
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                continue
            state = _local_writer_state(folder_fd, entry.name)
        except FileNotFoundError:
            continue
        yield entry.name, info, state


_TEMP_NAME = re.compile(
    r"(?P<boot>[0-9a-f]{12})-(?P<pid>\d+)-[0-9a-f]{16}(?:-(?P<folder>[0-9a-f]{16}))?"
)


def _folder_tag(folder: str) -> str:
    """What a temporary's name says of the folder its object goes to (`write_activity`)."""
    return hashlib.sha256(folder.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _local_writer_state(folder_fd: int, name: str) -> str:
    """"alive", "gone" or "unknown" (another machine, an old name, no lock support): see
    :func:`owner_state`; the temporary's name holds the writer's boot and pid."""
    match = _TEMP_NAME.fullmatch(name)
    if match is None:
        return "unknown"
    return owner_state(name, match["boot"], int(match["pid"]), dir_fd=folder_fd)


@dataclass
class _Temporary:
    """A writer's temporary file: its name in the incomplete folder (``folder_fd``, opened
    without following a link) and its own descriptor."""

    folder_fd: int | None
    name: str
    fd: int

    def remove(self) -> None:
        """Delete the file (if still there) and let the folder go; idempotent."""
        if self.folder_fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name, dir_fd=self.folder_fd)
        finally:
            self.release()

    def release(self) -> None:
        """Close the folder's descriptor (the file was published or removed); idempotent."""
        fd, self.folder_fd = self.folder_fd, None
        if fd is not None:
            os.close(fd)


class _LocalWriter(ObjectWriter):
    """Buffers up to LOCAL_WRITE_BUFFER and writes with os.write on a raw descriptor.

    No buffered file object: closing one flushes it, and on a full disk that flush fails
    again and used to skip the removal of the temporary. Aborting drops the buffer unwritten.
    """

    def __init__(self, storage: LocalFolderStorage, key: str, temp: _Temporary) -> None:
        super().__init__(key)
        self._storage = storage
        self._temp = temp
        self._fd: int | None = temp.fd
        self._buffer = bytearray()

    def _write(self, view: memoryview) -> None:
        if len(self._buffer) + view.nbytes <= LOCAL_WRITE_BUFFER:
            self._buffer += view
            return
        self._write_buffer()
        if view.nbytes >= LOCAL_WRITE_BUFFER:
            self._write_all(view)
        else:
            self._buffer += view

    def _write_buffer(self) -> None:
        data, self._buffer = self._buffer, bytearray()
        self._write_all(memoryview(data))

    def _write_all(self, view: memoryview) -> None:
        assert self._fd is not None
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise self._storage._not_writable(exc) from exc

    def _publish(self) -> None:
        assert self._fd is not None
        self._write_buffer()
        *folders, name = self.key.split("/")
        try:
            os.fsync(self._fd)
            fd, self._fd = self._fd, None
            os.close(fd)
            for attempt in range(3):
                try:
                    with self._storage._folders(folders, create=True) as fds:
                        os.replace(self._temp.name, name, src_dir_fd=self._temp.folder_fd,
                                   dst_dir_fd=fds[-1])
                        os.fsync(fds[-1])
                    break
                except FileNotFoundError:
                    # A concurrent delete pruned the freshly made parent folder: make it again.
                    if attempt == 2:
                        raise
            self._temp.release()
        except IsADirectoryError as exc:
            raise StorageError(
                f"cannot publish '{self._storage._path(self.key)}': a folder of that name is "
                "in the way; choose another key or remove the folder"
            ) from exc
        except OSError as exc:
            raise self._storage._not_writable(exc) from exc

    def _discard(self) -> None:
        self._buffer = bytearray()  # never written: a full disk cannot stop the clean-up
        try:
            self._temp.remove()
        finally:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)


_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: O_NOCTTY: a planted terminal device must not become a command's controlling terminal.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


def _is_link(name: str, folder_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)

