"""The storage interface every backend implements, and what all of them share.

Every backup object (encrypted dumps, base backups, WAL segments, manifests) is written and
read through `Storage`. Writers stream with bounded memory and publish atomically: an object
is visible to `Storage.list`, `Storage.stat` and readers only once `ObjectWriter.close`
succeeded. Leaving a writer's ``with`` block by an exception, calling `ObjectWriter.abort` or
killing the writing process never leaves a listed partial object. An aborted write removes
its temporary at once (also on a full disk: nothing is flushed on abort, S3 uploads are
aborted). What a killed writer leaves is removed by `sweep_stale_writes`, which every backup
runs first on its storages (`prepare_backup_storages`): temporaries idle for longer than the
grace period (``PGBACKFLOW_SWEEP_GRACE_HOURS``, default 24), and at once those of local
writers on this machine that are gone.

When a writer is the sink of a ``zstandard`` compressor, create the compressor with
``closefd=False`` and close it inside the storage writer's ``with`` block: otherwise the
compressor's own ``close`` (which also runs when an exception unwinds its ``with`` block)
would publish the half-written object.
"""

from __future__ import annotations

import logging
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import BinaryIO, Self

from pgbackflow.tasks.errors import ConfigError, ObjectNotFoundError, StorageError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
INCOMPLETE_DIR = ".pgbackflow-incomplete"
"""Folder (inside a local storage folder) holding objects that are still being written."""
LOGICAL_ROOT = "logical"
"""Top folder of logical backups."""
PHYSICAL_ROOT = "physical"
"""Top folder of physical backups and WAL."""
BACKUP_ROOTS = (LOGICAL_ROOT, PHYSICAL_ROOT)
"""The top folders pgbackflow writes backups to. A sweep of S3's incomplete uploads touches
nothing else: a bucket used without a prefix may be shared with other tools' uploads."""

_PROBE_PREFIX = ".pgbackflow-probe-"
#: Characters no key may hold: C0 and C1 controls and DEL (terminals act on them), and the
#: lone surrogates a file name that is not UTF-8 decodes to (its raw bytes may be controls,
#: and printing one fails where output is strict UTF-8).
_CONTROL = re.compile("[\x01-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True)
class WriteActivity:
    """Writes in progress as a storage saw them at one moment (`Storage.write_activity`).

    Attributes:
        progress: When the writes into each folder last made progress (UTC), by the
            folder's name in ``label``.
        label: How ``progress`` names a folder key (the key itself, or a local
            temporary's folder tag).
    """

    progress: Mapping[str, datetime] = field(default_factory=dict)
    label: Callable[[str], str] = str

    def last(self, folder: str) -> datetime | None:
        """When writes into ``folder`` (a key without a trailing '/') last made progress,
        or None when none was in progress."""
        return self.progress.get(self.label(folder))


@dataclass(frozen=True, slots=True)
class StoredObject:
    """A complete object in a storage.

    Attributes:
        key: The '/'-separated key relative to the storage's root.
        size: Size in bytes.
        modified: Last modification time, timezone-aware UTC.
        etag: The server's fingerprint of the content where a listing gives one (S3's
            ETag); not part of equality.
    """

    key: str
    size: int
    modified: datetime
    etag: str | None = field(default=None, compare=False)


def check_key(key: str) -> str:
    """Validate a storage key and return it.

    Raises:
        ConfigError: If the key is empty, absolute, has empty, '.' or '..' segments, a NUL
            character or uses a name reserved for pgbackflow's own bookkeeping.
    """
    problem = _key_problem(key, allow_partial=False)
    if problem:
        raise ConfigError(
            f"storage key {key!r} is invalid ({problem}): use a relative '/'-separated path "
            "without empty, '.' or '..' segments"
        )
    return key


def is_valid_key(key: str) -> bool:
    """Whether ``key`` could be an object pgbackflow wrote (what `check_key` accepts).

    Listings skip other names: whoever can write to a storage may plant any name, and one
    with a control character or a '..' segment must neither reach a terminal nor stop a
    run that would later read or delete it.
    """
    return _key_problem(key, allow_partial=False) is None


def _check_prefix(prefix: str) -> str:
    if prefix and (problem := _key_problem(prefix, allow_partial=True)):
        raise ConfigError(
            f"storage prefix {prefix!r} is invalid ({problem}): use a relative '/'-separated "
            "path without empty, '.' or '..' segments"
        )
    return prefix


def _key_problem(key: str, *, allow_partial: bool) -> str | None:
    if not isinstance(key, str) or not key:
        return "empty"
    if "\x00" in key:
        return "contains a NUL character"
    if _CONTROL.search(key):
        return "contains a control character or bytes that are not UTF-8"
    if key.startswith("/"):
        return "absolute"
    segments = key.split("/")
    if allow_partial and segments[-1] == "":
        # A prefix may end with '/' ("dumps/") to select one folder.
        segments = segments[:-1]
    for segment in segments:
        if segment == "":
            return "has an empty segment"
        if segment in (".", ".."):
            return f"has a {segment!r} segment"
    if segments and segments[0] == INCOMPLETE_DIR:
        return f"{INCOMPLETE_DIR!r} is reserved"
    return None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class ObjectWriter(ABC):
    """A streaming writer for one object; the object appears only when `close` succeeds.

    Use it as a context manager: a normal exit publishes, an exception aborts. It is
    file-like enough to be the sink of ``shutil.copyfileobj`` or a ``zstandard``
    compressor (``write``, ``flush``, ``writable``, ``closed``).
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self._bytes_written = 0
        self._state = "open"

    @property
    def bytes_written(self) -> int:
        """Number of bytes accepted by `write` so far."""
        return self._bytes_written

    @property
    def closed(self) -> bool:
        """True once the object was published or aborted."""
        return self._state != "open"

    def writable(self) -> bool:
        """Return True: writers accept data until closed."""
        return True

    def flush(self) -> None:  # noqa: B027 - a no-op every backend shares
        """Do nothing: data becomes durable and visible only at `close`."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data`` to the object.

        Returns:
            The number of bytes written (always all of them).

        Raises:
            ValueError: If the writer is already closed or aborted.
            StorageError: If the backend failed; the writer is then aborted.
        """
        if self._state != "open":
            raise ValueError(f"writer for {self.key!r} is already {self._state}")
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return 0
        try:
            self._write(view)
        except BaseException:
            self.abort()
            raise
        self._bytes_written += view.nbytes
        return view.nbytes

    def close(self) -> None:
        """Publish the object atomically; a second call does nothing.

        Raises:
            StorageError: If publishing failed; nothing is published then.
        """
        if self._state != "open":
            if self._state == "aborted":
                raise ValueError(f"writer for {self.key!r} was aborted and cannot be published")
            return
        try:
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._state = "published"

    def abort(self) -> None:
        """Discard everything written; safe to call more than once and never raises."""
        if self._state != "open":
            return
        self._state = "aborted"
        try:
            self._discard()
        except Exception as exc:
            log.warning("could not clean up the aborted write of %r: %s", self.key, exc)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @abstractmethod
    def _write(self, view: memoryview) -> None: ...

    @abstractmethod
    def _publish(self) -> None: ...

    @abstractmethod
    def _discard(self) -> None: ...


class Storage(ABC):
    """Where backup objects live. Keys are relative '/'-separated paths."""

    @property
    @abstractmethod
    def location(self) -> str:
        """A human-readable location such as ``/backups`` or ``s3://bucket/prefix``."""

    @abstractmethod
    def open_write(self, key: str, *, size_hint: int | None = None) -> ObjectWriter:
        """Start writing object ``key``; it replaces any existing object when published.

        Args:
            key: The object's key.
            size_hint: The expected size in bytes, if known (lets S3 pick part sizes).
        """

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """Open object ``key`` for streaming reads.

        Raises:
            ObjectNotFoundError: If there is no such object.
        """

    @abstractmethod
    def list(self, prefix: str = "") -> list[StoredObject]:
        """Return the complete objects whose keys start with ``prefix``, sorted by key."""

    def iter_list(self, prefix: str = "") -> Iterator[StoredObject]:
        """The objects :meth:`list` returns, one at a time (sorted where the storage lists
        sorted): a storage that lists in pages yields each page as it arrives, so a reader
        that keeps less than the listing (the catalog) never holds all of it."""
        return iter(self.list(prefix))

    @abstractmethod
    def stat(self, key: str) -> StoredObject:
        """Describe object ``key``.

        Raises:
            ObjectNotFoundError: If there is no such object.
        """

    def exists(self, key: str) -> bool:
        """Return whether object ``key`` exists."""
        try:
            self.stat(key)
        except ObjectNotFoundError:
            return False
        return True

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete object ``key``; deleting a missing object does nothing."""

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete several objects (S3: batched requests); missing objects are no error."""
        for key in keys:
            self.delete(key)

    def write_bytes(self, key: str, data: bytes) -> StoredObject:
        """Write a small object in one call and return its description."""
        with self.open_write(key, size_hint=len(data)) as writer:
            writer.write(data)
        return self.stat(key)

    def read_bytes(self, key: str) -> bytes:
        """Read a small object whole."""
        with self.open_read(key) as reader:
            return reader.read()

    @abstractmethod
    def create_new(self, key: str, data: bytes) -> bool:
        """Write a small object only if ``key`` does not exist, atomically (locks).

        Returns:
            False when an object is already there (nothing was written).
        """

    def sweep_stale_writes(self, older_than: timedelta) -> tuple[str, ...]:
        """Remove what killed writers left (temporaries, incomplete uploads).

        Args:
            older_than: Leftovers idle (local) or started (S3) longer ago than this go.

        Returns:
            One line per removed leftover, for the log.
        """
        return ()

    def list_stale_writes(self, older_than: timedelta) -> tuple[str, ...]:
        """What `sweep_stale_writes` would remove now; nothing is removed."""
        return ()

    def write_activity(self, prefixes: Sequence[str]) -> WriteActivity:
        """The writes in progress into folders below ``prefixes``, as seen now.

        A backup folder without a manifest is either left behind or still being written;
        its objects must not age while a writer is still adding to it (a physical backup
        with tablespaces uploads one tar after the other for hours).

        Args:
            prefixes: Key prefixes such as ``logical/`` or ``physical/db1/base/``.
        """
        return WriteActivity()

    def check_exists(self) -> None:  # noqa: B027 - a storage without a root has nothing to check
        """Raise ObjectNotFoundError when the storage itself (folder, bucket) is missing."""

    def check_destination(self) -> None:
        """Raise when writing here can never work (a missing bucket); nothing is written."""
        self.check_exists()

    def clock(self) -> datetime:
        """The storage's current time: the modification time it gives a probe object
        written now (then deleted). The times it lists objects with are on this clock,
        which the clocks of the hosts that use the storage may not agree with."""
        key = f"{_PROBE_PREFIX}{secrets.token_hex(8)}"
        try:
            return self.write_bytes(key, b"pgbackflow clock probe\n").modified
        finally:
            try:
                self.delete(key)
            except StorageError as exc:  # one small object at the root, named as a probe
                log.warning("could not delete the clock probe %s of %s: %s", key,
                            self.location, exc)

    def check_writable(self) -> None:
        """Write, read back and delete a small probe object.

        Raises:
            StorageError: With a one-line explanation if any step failed.
        """
        key = f"{_PROBE_PREFIX}{secrets.token_hex(8)}"
        payload = f"pgbackflow write probe {key}\n".encode()
        try:
            with self.open_write(key, size_hint=len(payload)) as writer:
                writer.write(payload)
            echoed = self.read_bytes(key)
            self.delete(key)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(
                f"storage {self.location} failed the write test ({_one_line(exc)}): "
                "check its configuration and permissions"
            ) from exc
        if echoed != payload:
            raise StorageError(
                f"storage {self.location} returned different bytes than were written to probe "
                f"object {key!r}: check the storage server or filesystem"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"
