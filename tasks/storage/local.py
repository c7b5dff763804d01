"""Objects as files below a local (or mounted) folder: `LocalFolderStorage` and its writer."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
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
    _check_prefix,
    check_key,
)

LOCAL_WRITE_BUFFER = MiB
"""Bytes a local writer gathers before writing them to its temporary file."""


class LocalFolderStorage(Storage):
    """Objects as files below a local (or mounted) folder.

    A writer writes to ``<folder>/.pgbackflow-incomplete/<boot>-<pid>-<random>`` on the same
    filesystem, fsyncs it, renames it into place with `os.replace` and fsyncs the parent
    folder, so the object appears complete or not at all, also after a crash. While it
    writes it holds an exclusive ``flock`` on the temporary: a sweep on the same machine
    (same boot) tells a live writer from a dead one by that lock and the pid.
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
        return self.folder.joinpath(*check_key(key).split("/"))

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
        final = self._path(key)
        try:
            temp, fd = self._new_temporary()
        except OSError as exc:
            raise self._not_writable(exc) from exc
        return _LocalWriter(self, key, temp, final, fd)

    def _new_temporary(self) -> tuple[Path, int]:
        """A new writer's temporary (named after this boot and pid) and its descriptor,
        flocked while this process holds it open."""
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        self.incomplete_folder.mkdir(parents=True, exist_ok=True)
        temp = self.incomplete_folder / f"{BOOT_TAG}-{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        # Where locks are unsupported the writer goes on; sweeps then judge by age alone.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return temp, fd

    def create_new(self, key: str, data: bytes) -> bool:
        """Write a small object only if ``key`` does not exist: written to a temporary, then
        hard-linked into place (``link`` fails on an existing name), so it appears whole."""
        final = self._path(key)
        try:
            temp, fd = self._new_temporary()
            try:
                with os.fdopen(fd, "wb", closefd=True) as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                final.parent.mkdir(parents=True, exist_ok=True)
                os.link(temp, final)
            except FileExistsError:
                return False
            finally:
                temp.unlink(missing_ok=True)
            _fsync_dir(final.parent)
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
        """Open object ``key`` for streaming reads."""
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise self._not_found(key) from exc
        except OSError as exc:
            raise StorageError(
                f"cannot read '{path}' ({exc.strerror}): check the file's permissions"
            ) from exc

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
        start = self.folder.joinpath(*base_parts)
        try:
            for key, st in self._walk(start, "/".join(base_parts)):
                if key.startswith(prefix):
                    yield StoredObject(key, st.st_size, _utc(st.st_mtime))
        except OSError as exc:
            raise StorageError(
                f"cannot list local storage folder '{self.folder}' ({exc.strerror}): "
                "check its permissions"
            ) from exc

    def _walk(self, folder: Path, key_prefix: str) -> Iterator[tuple[str, os.stat_result]]:
        try:
            entries = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return
        with entries:  # closed when the reader stops early, too
            for entry in entries:
                key = f"{key_prefix}/{entry.name}" if key_prefix else entry.name
                if not key_prefix and entry.name == INCOMPLETE_DIR:
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        yield from self._walk(Path(entry.path), key)
                    elif entry.is_file(follow_symlinks=False):
                        yield key, entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while listing

    def stat(self, key: str) -> StoredObject:
        """Describe object ``key``."""
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise self._not_found(key) from exc
        except OSError as exc:
            raise StorageError(
                f"cannot inspect '{path}' ({exc.strerror}): check the folder's permissions"
            ) from exc
        if not path.is_file():
            raise self._not_found(key)
        return StoredObject(key, st.st_size, _utc(st.st_mtime))

    def delete(self, key: str) -> None:
        """Delete object ``key`` and the folders it leaves empty."""
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            return
        except OSError as exc:
            raise StorageError(
                f"cannot delete '{path}' ({exc.strerror}): check the folder's permissions"
            ) from exc
        parent = path.parent
        while parent != self.folder:
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (or in use): keep it
            parent = parent.parent

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

    def _sweep(
        self, older_than: timedelta, *, dead_writers: bool, remove: bool = True
    ) -> tuple[str, ...]:
        now = time.time()
        cutoff = now - older_than.total_seconds()
        removed: tuple[str, ...] = ()
        try:
            entries = [*os.scandir(self.incomplete_folder)]
        except FileNotFoundError:
            return ()
        except OSError as exc:
            raise self._not_writable(exc) from exc
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode):
                    continue  # writers only ever make regular files
                writer = _local_writer_state(entry.path, entry.name)
                if writer == "alive":
                    continue
                if info.st_mtime <= cutoff:
                    reason = f"idle for {(now - info.st_mtime) / 3600:.1f} h"
                elif dead_writers and writer == "gone":
                    reason = "its writer is gone"
                else:
                    continue
                if remove:
                    os.unlink(entry.path)
                removed += (f"{entry.path} ({info.st_size} bytes, {reason})",)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._not_writable(exc) from exc
        return removed


_TEMP_NAME = re.compile(r"(?P<boot>[0-9a-f]{12})-(?P<pid>\d+)-[0-9a-f]{16}")


def _local_writer_state(path: str, name: str) -> str:
    """"alive", "gone" or "unknown" (another machine, an old name, no lock support): see
    :func:`owner_state`; the temporary's name holds the writer's boot and pid."""
    match = _TEMP_NAME.fullmatch(name)
    if match is None:
        return "unknown"
    return owner_state(path, match["boot"], int(match["pid"]))


class _LocalWriter(ObjectWriter):
    """Buffers up to LOCAL_WRITE_BUFFER and writes with os.write on a raw descriptor.

    No buffered file object: closing one flushes it, and on a full disk that flush fails
    again and used to skip the removal of the temporary. Aborting drops the buffer unwritten.
    """

    def __init__(
        self, storage: LocalFolderStorage, key: str, temp: Path, final: Path, fd: int
    ) -> None:
        super().__init__(key)
        self._storage = storage
        self._temp = temp
        self._final = final
        self._fd: int | None = fd
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
        try:
            os.fsync(self._fd)
            fd, self._fd = self._fd, None
            os.close(fd)
            for attempt in range(3):
                self._final.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(self._temp, self._final)
                    break
                except FileNotFoundError:
                    # A concurrent delete pruned the freshly made parent folder: make it again.
                    if attempt == 2:
                        raise
            _fsync_dir(self._final.parent)
        except IsADirectoryError as exc:
            raise StorageError(
                f"cannot publish '{self._final}': a folder of that name is in the way; "
                "choose another key or remove the folder"
            ) from exc
        except OSError as exc:
            raise self._storage._not_writable(exc) from exc

    def _discard(self) -> None:
        self._buffer = bytearray()  # never written: a full disk cannot stop the clean-up
        try:
            self._temp.unlink(missing_ok=True)
        finally:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)

