"""The one streaming pipeline: producer → (zstd) → AES-256-GCM → every storage, and back.

Producers are an external tool's stdout (pg_dump, pg_basebackup) or a local file (a WAL
segment); readers get the plaintext back while the stored bytes' SHA-256 is checked.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pgbackflow.tasks.archive import DEFAULT_ZSTD_LEVEL, ArchiveError, ArchiveReader, ArchiveWriter
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.manifest import StoredObjectInfo
from pgbackflow.tasks.process import Tool
from pgbackflow.tasks.storage import Storage
from pgbackflow.tasks.transfer import (
    FanOutWriter,
    HashingReader,
    ProgressCallback,
    ProgressReporter,
    WriteOutcome,
)

Tap = Callable[[bytes], None]
"""Sees every plaintext chunk before it is compressed (e.g. to pick a file out of a tar)."""

FILE_READ_SIZE = 1 << 20


@dataclass(frozen=True)
class ObjectWrite:
    """One object written to several storages.

    Attributes:
        info: Key, sizes and checksum (identical in every storage).
        outcomes: Per-storage result.
    """

    info: StoredObjectInfo
    outcomes: tuple[WriteOutcome, ...]

    @property
    def completed_in(self) -> frozenset[str]:
        """Locations where the object is complete."""
        return frozenset(o.location for o in self.outcomes if o.ok)


class _EncryptingSink:
    """Counts, taps and encrypts what a producer writes."""

    def __init__(
        self, archive: ArchiveWriter, reporter: ProgressReporter, tap: Tap | None
    ) -> None:
        self._archive = archive
        self._reporter = reporter
        self._tap = tap

    def write(self, data: bytes) -> int:
        self._reporter.add(len(data))
        if self._tap is not None:
            self._tap(data)
        return self._archive.write(data)


def _write_object(
    produce: Callable[[_EncryptingSink], object],
    storages: Sequence[Storage],
    key: str,
    master_key: MasterKey,
    *,
    compress: bool,
    zstd_threads: int,
    size_hint: int | None,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
    progress: ProgressCallback | None,
    tap: Tap | None,
) -> ObjectWrite:
    fan_out = FanOutWriter(storages, key, size_hint=size_hint)
    try:
        archive = ArchiveWriter(
            fan_out, master_key, compress=compress, zstd_threads=zstd_threads,
            zstd_level=zstd_level,
        )
        produce(_EncryptingSink(archive, ProgressReporter(progress), tap))
        archive.close()
        outcomes = fan_out.publish()
    except BaseException:
        fan_out.abort()
        raise
    info = StoredObjectInfo(
        key=key, raw_size=archive.bytes_in, stored_size=fan_out.size, sha256=fan_out.hexdigest,
        object_id=archive.object_id.hex(),
    )
    return ObjectWrite(info, tuple(outcomes))


def stream_tool_into_storages(
    tool: Tool,
    args: Sequence[str],
    env: dict[str, str],
    storages: Sequence[Storage],
    key: str,
    master_key: MasterKey,
    *,
    compress: bool,
    zstd_threads: int = 0,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
    size_hint: int | None = None,
    progress: ProgressCallback | None = None,
    tap: Tap | None = None,
) -> ObjectWrite:
    """Run ``tool`` and stream its stdout, encrypted, into ``key`` of every storage.

    Args:
        tool: The producer.
        args: Its arguments.
        env: Extra environment (e.g. PGPASSFILE).
        storages: Destinations; the object counts only where its write completed.
        key: Object key.
        master_key: Wraps the object's data key.
        compress: zstd-compress before encrypting.
        zstd_threads: zstd worker threads; 0 compresses on the calling thread.
        zstd_level: zstd level (default 5).
        size_hint: Expected stored size, for multipart planning.
        progress: Called with the plaintext bytes produced so far.
        tap: Sees every plaintext chunk.
    """
    return _write_object(
        lambda sink: tool.stream_out(args, sink, env=env),
        storages, key, master_key, compress=compress, zstd_threads=zstd_threads,
        zstd_level=zstd_level, size_hint=size_hint, progress=progress, tap=tap,
    )


def store_file(
    path: Path,
    storages: Sequence[Storage],
    key: str,
    master_key: MasterKey,
    *,
    compress: bool = True,
    zstd_threads: int = 0,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
    progress: ProgressCallback | None = None,
    tap: Tap | None = None,
) -> ObjectWrite:
    """Encrypt a local file into ``key`` of every storage (options as for a tool's stdout)."""

    def produce(sink: _EncryptingSink) -> None:
        with path.open("rb") as source:
            while data := source.read(FILE_READ_SIZE):
                sink.write(data)

    return _write_object(
        produce, storages, key, master_key, compress=compress, zstd_threads=zstd_threads,
        zstd_level=zstd_level, size_hint=None, progress=progress, tap=tap,
    )


def store_bytes(
    data: bytes, storages: Sequence[Storage], key: str, master_key: MasterKey
) -> ObjectWrite:
    """Encrypt a small in-memory payload into ``key`` of every storage."""
    return _write_object(
        lambda sink: sink.write(data) and None, storages, key, master_key,
        compress=True, zstd_threads=0, size_hint=None, progress=None, tap=None,
    )


def decrypted_chunks(
    storage: Storage, info: StoredObjectInfo, keyring: Keyring
) -> Generator[bytes, None, None]:
    """Plaintext of a stored object; raises at the end if its SHA-256 differs from ``info``.

    Another archive put in its place (made with the same key, so every chunk authenticates)
    is refused by its header's object id before any plaintext is released, where ``info``
    records it; the SHA-256 still covers every byte at the end.

    Close the generator to stop early (the stored object is closed; nothing is checked).
    """
    label = f"{storage.location}/{info.key}"
    with storage.open_read(info.key) as raw:
        hashed = HashingReader(raw)
        reader = ArchiveReader(hashed, keyring, label=label)
        found = reader.header.object_id.hex()
        if info.object_id is not None and found != info.object_id:
            raise ArchiveError(
                f"{label}: this is another archive than the manifest names (object id "
                f"{found[:16]}…, manifest says {info.object_id[:16]}…): the object was "
                "replaced; nothing of it was used"
            )
        yield from reader
        hashed.drain()
    digest = hashed.sha256.hexdigest()
    if digest != info.sha256:
        raise ArchiveError(
            f"{storage.location}/{info.key}: checksum mismatch (stored bytes have sha256 "
            f"{digest[:16]}…, manifest says {info.sha256[:16]}…): the object was replaced or "
            "damaged"
        )


__all__ = [
    "ObjectWrite",
    "Tap",
    "decrypted_chunks",
    "store_bytes",
    "store_file",
    "stream_tool_into_storages",
]
