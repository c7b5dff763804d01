"""Moving archive bytes: one stream to several storages, checksums, progress.

A backup written to several storages (3-2-1) is produced once; a storage that fails is
dropped from the stream and reported, and the backup counts only where its write completed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pgbackflow.tasks.errors import PgBackflowError, StorageError
from pgbackflow.tasks.storage import ObjectWriter, Storage

logger = logging.getLogger("pgbackflow.transfer")

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class WriteOutcome:
    """How writing one object to one storage ended.

    Attributes:
        location: The storage, as shown to users.
        error: None when the object was published; else why not.
    """

    location: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the object is complete in this storage."""
        return self.error is None


class FanOutWriter:
    """Writes the same bytes to one object in each of several storages.

    Also computes the SHA-256 and size of the bytes. A destination whose write fails is
    aborted (nothing listed there) and dropped; the others carry on. If every destination
    fails, the next write raises.

    Args:
        storages: Where to write.
        key: The object key, the same in every storage.
        size_hint: Expected size, for multipart planning.
    """

    def __init__(self, storages: Sequence[Storage], key: str, size_hint: int | None = None) -> None:
        if not storages:
            raise ValueError("FanOutWriter needs at least one storage")
        self.key = key
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._failed: dict[str, str] = {}
        self._all_transient = True
        self._writers: dict[str, ObjectWriter] = {}
        for storage in storages:
            try:
                self._writers[storage.location] = storage.open_write(key, size_hint=size_hint)
            except StorageError as exc:
                self._failed[storage.location] = str(exc)
                self._all_transient &= exc.transient
        self._check_alive()

    def _check_alive(self) -> None:
        if self._writers:
            return
        if len(self._failed) == 1:
            error = StorageError(next(iter(self._failed.values())))
        else:
            reasons = "; ".join(f"{loc}: {err}" for loc, err in self._failed.items())
            error = StorageError(f"writing {self.key} failed in every storage ({reasons})")
        # Retrying helps only if every storage failed for a passing reason.
        error.transient = self._all_transient
        raise error

    def _drop(self, location: str, exc: BaseException) -> None:
        writer = self._writers.pop(location)
        writer.abort()
        self._failed[location] = str(exc) if isinstance(exc, PgBackflowError) else repr(exc)
        self._all_transient &= getattr(exc, "transient", False)
        logger.warning("storage %s dropped from %s: %s", location, self.key, self._failed[location])

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Send ``data`` to every live destination."""
        self.sha256.update(data)
        self.size += len(data)
        for location, writer in list(self._writers.items()):
            try:
                writer.write(data)
            except (StorageError, OSError) as exc:
                self._drop(location, exc)
        self._check_alive()
        return len(data)

    def publish(self) -> list[WriteOutcome]:
        """Publish the object in every live destination; report each storage's outcome."""
        for location, writer in list(self._writers.items()):
            try:
                writer.close()
            except (StorageError, OSError) as exc:
                self._drop(location, exc)
        # Small objects meet a missing bucket only when they are published.
        self._check_alive()
        outcomes = [WriteOutcome(location) for location in self._writers]
        outcomes += [WriteOutcome(location, error) for location, error in self._failed.items()]
        self._writers.clear()
        return outcomes

    def abort(self) -> None:
        """Abort every destination: nothing of this object becomes visible anywhere."""
        for writer in self._writers.values():
            writer.abort()
        self._writers.clear()

    @property
    def hexdigest(self) -> str:
        """SHA-256 of everything written, hex."""
        return self.sha256.hexdigest()


class ProgressReporter:
    """Calls ``callback(total_bytes)`` at most every ``interval`` seconds while bytes flow."""

    def __init__(self, callback: ProgressCallback | None, interval: float = 2.0) -> None:
        self._callback = callback
        self._interval = interval
        self._last = time.monotonic()
        self.total = 0

    def add(self, count: int) -> None:
        """Account for ``count`` more bytes."""
        self.total += count
        if self._callback is None:
            return
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._callback(self.total)


class Readable(Protocol):
    """A binary stream to read from."""

    def read(self, size: int = -1, /) -> bytes: ...


class HashingReader:
    """Wraps a readable stream, hashing (SHA-256) and counting what passes through."""

    def __init__(self, source: Readable) -> None:
        self._source = source
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        """Read like the wrapped stream, hashing the bytes."""
        data = self._source.read(size)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) whatever is left, so the digest covers the whole object."""
        while self.read(1 << 20):
            pass


