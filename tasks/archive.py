"""The encrypted archive format every stored object uses (specified in docs/FORMAT.md).

An archive is a 102-byte header followed by frames. Each frame carries one AES-256-GCM
encrypted chunk of at most ``chunk_size`` plaintext bytes. The data key is random per
object and wrapped by a master key, so rotating the master key rewrites headers only.

Both directions stream: the writer holds at most one chunk, the reader one frame and a
20-byte look-ahead, whatever the object size.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Protocol, cast

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pgbackflow.tasks.errors import PgBackflowError
from pgbackflow.tasks.keys import KEY_BYTES, WRONG_KEY_HINT, Keyring, MasterKey

MAGIC = b"PGBFARCH"
FORMAT_VERSION = 1
FLAG_ZSTD = 0x01
KNOWN_FLAGS = FLAG_ZSTD

DEFAULT_CHUNK_SIZE = 1024 * 1024
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
DECOMPRESS_READ = 1024 * 1024
"""Plaintext bytes per decompression call (see ArchiveReader.__iter__)."""
DEFAULT_ZSTD_LEVEL = 5

TAG_BYTES = 16
# magic, version, flags, chunk_size, object_id, nonce_prefix: never changes after writing.
_OBJECT_HEADER = struct.Struct(">8sBBI16s4s")
# key_id, wrap_nonce, wrapped data key (32 bytes + GCM tag): rewritten on key rotation.
_KEY_HEADER = struct.Struct(">8s12s48s")
OBJECT_HEADER_BYTES = _OBJECT_HEADER.size  # 34
HEADER_BYTES = OBJECT_HEADER_BYTES + _KEY_HEADER.size  # 102
# object tag (object_id[:8]), chunk index, plaintext length.
_FRAME_HEADER = struct.Struct(">8sQI")
FRAME_HEADER_BYTES = _FRAME_HEADER.size  # 20


class ArchiveError(PgBackflowError):
    """An archive could not be read or failed an integrity check."""


class NotAnArchiveError(ArchiveError):
    """The bytes do not start with a pgbackflow archive header."""


class UnsupportedArchiveError(ArchiveError):
    """The archive uses a format version or flags this code does not know."""


class WrongKeyError(ArchiveError):
    """None of the given master keys is the one the archive was written with."""


class HeaderTamperedError(ArchiveError):
    """The header failed authentication although the key id matches."""


class ForeignHeaderError(ArchiveError):
    """The header and the data come from different objects."""


class ChunkOrderError(ArchiveError):
    """A chunk is missing, reordered or duplicated."""


class ChunkTamperedError(ArchiveError):
    """A chunk failed authentication: its bytes were changed."""


class TruncatedArchiveError(ArchiveError):
    """The archive ends early (at a chunk boundary or inside a frame)."""


class TrailingDataError(ArchiveError):
    """Bytes follow the archive's final chunk."""


class Sink(Protocol):
    """Where archive bytes go: a file, a pipe or a storage writer."""

    def write(self, data: bytes, /) -> int | None: ...


class Source(Protocol):
    """Where archive bytes come from."""

    def read(self, size: int, /) -> bytes: ...


@dataclass(frozen=True)
class ArchiveHeader:
    """A parsed archive header.

    Attributes:
        version: Format version.
        flags: Flag bits (FLAG_ZSTD: the plaintext is a zstd stream).
        chunk_size: Plaintext bytes per full chunk.
        object_id: Random id of this object.
        nonce_prefix: Random 4-byte prefix of every chunk nonce.
        key_id: Id of the master key that wraps the data key.
        wrap_nonce: Nonce used to wrap the data key.
        wrapped_key: The data key encrypted under the master key (with its tag).
    """

    version: int
    flags: int
    chunk_size: int
    object_id: bytes
    nonce_prefix: bytes
    key_id: bytes
    wrap_nonce: bytes
    wrapped_key: bytes

    @property
    def compressed(self) -> bool:
        """Whether the plaintext is zstd-compressed by pgbackflow."""
        return bool(self.flags & FLAG_ZSTD)

    @property
    def object_header(self) -> bytes:
        """The immutable first 34 bytes: part of every chunk's associated data."""
        return _OBJECT_HEADER.pack(
            MAGIC, self.version, self.flags, self.chunk_size, self.object_id, self.nonce_prefix
        )

    def to_bytes(self) -> bytes:
        """Serialise the full 102-byte header."""
        return self.object_header + _KEY_HEADER.pack(
            self.key_id, self.wrap_nonce, self.wrapped_key
        )

    @classmethod
    def parse(cls, raw: bytes, label: str = "archive") -> ArchiveHeader:
        """Parse and sanity-check a header (no cryptography involved)."""
        if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
            raise NotAnArchiveError(
                f"{label}: not a pgbackflow archive (bad magic bytes): "
                "check that the right file was given"
            )
        if len(raw) < HEADER_BYTES:
            raise TruncatedArchiveError(
                f"{label}: archive truncated inside its header ({len(raw)} of {HEADER_BYTES} "
                "bytes): the object is incomplete"
            )
        _, version, flags, chunk_size, object_id, nonce_prefix = _OBJECT_HEADER.unpack_from(raw)
        key_id, wrap_nonce, wrapped_key = _KEY_HEADER.unpack_from(raw, OBJECT_HEADER_BYTES)
        if version != FORMAT_VERSION:
            raise UnsupportedArchiveError(
                f"{label}: archive format version {version} is not supported by this pgbackflow "
                f"(knows version {FORMAT_VERSION}): upgrade pgbackflow"
            )
        if flags & ~KNOWN_FLAGS or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise HeaderTamperedError(
                f"{label}: archive header is corrupted (flags {flags:#x}, chunk size "
                f"{chunk_size}): the object is damaged"
            )
        return cls(version, flags, chunk_size, object_id, nonce_prefix, key_id, wrap_nonce,
                   wrapped_key)


def _wrap_aad(header: ArchiveHeader) -> bytes:
    # The wrap authenticates the whole header except the wrapped key itself.
    return header.object_header + header.key_id


def _chunk_nonce(nonce_prefix: bytes, index: int) -> bytes:
    return nonce_prefix + struct.pack(">Q", index)


def _chunk_aad(object_header: bytes, index: int, final: bool) -> bytes:
    return object_header + struct.pack(">QB", index, 1 if final else 0)


def _wrap_data_key(
    master: MasterKey, data_key: bytes, object_header: bytes
) -> tuple[bytes, bytes]:
    wrap_nonce = secrets.token_bytes(12)
    wrapped = AESGCM(master.material).encrypt(wrap_nonce, data_key, object_header + master.key_id)
    return wrap_nonce, wrapped


def unwrap_data_key(header: ArchiveHeader, keyring: Keyring, label: str = "archive") -> bytes:
    """Recover an archive's data key with the matching master key.

    Raises:
        WrongKeyError: no key in ``keyring`` has the header's key id.
        HeaderTamperedError: the key matches but the header does not authenticate.
    """
    master = keyring.find(header.key_id)
    if master is None:
        raise WrongKeyError(
            f"{label}: wrong encryption key (archive needs key id {header.key_id.hex()}, "
            f"given {', '.join(keyring.key_ids_hex())}): {WRONG_KEY_HINT}"
        )
    try:
        return AESGCM(master.material).decrypt(header.wrap_nonce, header.wrapped_key,
                                               _wrap_aad(header))
    except InvalidTag:
        raise HeaderTamperedError(
            f"{label}: archive header failed authentication with the right key (key id "
            f"{header.key_id.hex()}): the header was corrupted or tampered with"
        ) from None


def rewrap_header(raw_header: bytes, keyring: Keyring, new_key: MasterKey) -> bytes:
    """Re-wrap an archive's data key under ``new_key``: the body stays byte-identical.

    Args:
        raw_header: The first HEADER_BYTES bytes of the archive.
        keyring: Holds the key the archive is wrapped with now.
        new_key: The master key to wrap with from now on.

    Returns:
        The replacement header bytes.
    """
    header = ArchiveHeader.parse(raw_header)
    data_key = unwrap_data_key(header, keyring)
    wrap_nonce, wrapped = _wrap_data_key(new_key, data_key, header.object_header)
    return header.object_header + _KEY_HEADER.pack(new_key.key_id, wrap_nonce, wrapped)


class _ChunkEncryptor:
    """Cuts a byte stream into chunks and writes encrypted frames to a sink."""

    def __init__(self, sink: Sink, key: MasterKey, *, flags: int, chunk_size: int) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be within {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        data_key = secrets.token_bytes(KEY_BYTES)
        object_id = secrets.token_bytes(16)
        nonce_prefix = secrets.token_bytes(4)
        self._object_header = _OBJECT_HEADER.pack(
            MAGIC, FORMAT_VERSION, flags, chunk_size, object_id, nonce_prefix
        )
        wrap_nonce, wrapped = _wrap_data_key(key, data_key, self._object_header)
        self._aead = AESGCM(data_key)
        self._sink = sink
        self._chunk_size = chunk_size
        self._object_tag = object_id[:8]
        self._nonce_prefix = nonce_prefix
        self._buffer = bytearray()
        self._index = 0
        self.bytes_out = 0
        self.object_id = object_id
        self._emit(self._object_header + _KEY_HEADER.pack(key.key_id, wrap_nonce, wrapped))

    def _emit(self, data: bytes) -> None:
        self._sink.write(data)
        self.bytes_out += len(data)

    def _seal(self, plaintext: bytes | bytearray | memoryview, final: bool) -> None:
        ciphertext = self._aead.encrypt(
            _chunk_nonce(self._nonce_prefix, self._index),
            bytes(plaintext),
            _chunk_aad(self._object_header, self._index, final),
        )
        frame_header = _FRAME_HEADER.pack(self._object_tag, self._index, len(plaintext))
        self._emit(frame_header + ciphertext)
        self._index += 1

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data
        # Keep at least one byte back: only close() knows which chunk is the final one.
        if len(self._buffer) <= self._chunk_size:
            return
        view = memoryview(self._buffer)
        sealed = 0
        while len(self._buffer) - sealed > self._chunk_size:
            self._seal(view[sealed : sealed + self._chunk_size], final=False)
            sealed += self._chunk_size
        view.release()
        del self._buffer[:sealed]

    def finish(self) -> None:
        self._seal(self._buffer, final=True)
        self._buffer = bytearray()


class ArchiveWriter:
    """Streams plaintext into an encrypted (optionally zstd-compressed) archive.

    Use as a context manager; the final chunk is written by ``close()``. Leaving the block
    with an exception writes no final chunk, so readers see the archive as truncated.

    Args:
        sink: Receives the archive bytes (a storage writer, file or pipe).
        key: Master key that wraps the data key.
        compress: zstd-compress before encrypting (for producers that do not compress).
        chunk_size: Plaintext bytes per chunk.
        zstd_level: zstd compression level.
        zstd_threads: zstd worker threads (0: compress on the calling thread).
    """

    def __init__(
        self,
        sink: Sink,
        key: MasterKey,
        *,
        compress: bool,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
        zstd_threads: int = 0,
    ) -> None:
        self._encryptor = _ChunkEncryptor(
            sink, key, flags=FLAG_ZSTD if compress else 0, chunk_size=chunk_size
        )
        self._compressor = (
            zstandard.ZstdCompressor(level=zstd_level, threads=zstd_threads).compressobj()
            if compress
            else None
        )
        self.bytes_in = 0
        self._closed = False

    @property
    def bytes_out(self) -> int:
        """Archive bytes written to the sink so far."""
        return self._encryptor.bytes_out

    @property
    def object_id(self) -> bytes:
        """The random id recorded in this archive's header."""
        return self._encryptor.object_id

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Add plaintext; returns the number of bytes taken."""
        if self._closed:
            raise ValueError("write to a closed ArchiveWriter")
        size = len(data)
        self.bytes_in += size
        if self._compressor is not None:
            compressed = self._compressor.compress(data)
            if compressed:
                self._encryptor.write(compressed)
        else:
            self._encryptor.write(data)
        return size

    def close(self) -> None:
        """Flush the compressor and write the final chunk."""
        if self._closed:
            return
        self._closed = True
        if self._compressor is not None:
            self._encryptor.write(self._compressor.flush())
        self._encryptor.finish()

    def __enter__(self) -> ArchiveWriter:
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
            self._closed = True


def _read_exact(source: Source, size: int) -> bytes:
    """Read up to ``size`` bytes, looping over short reads (pipes, HTTP bodies)."""
    parts: list[bytes] = []
    remaining = size
    while remaining:
        data = source.read(remaining)
        if not data:
            break
        parts.append(data)
        remaining -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class ArchiveReader:
    """Streams the plaintext out of an archive, checking every integrity rule.

    Plaintext is yielded chunk by chunk as it is authenticated; an error about the end of
    the archive (truncation, trailing data) can only come after earlier chunks were
    yielded, so consumers must treat any exception as failure of the whole object.

    Args:
        source: Archive bytes (a storage reader, file or pipe).
        keyring: Master keys to try, by key id.
        label: Names the object in error messages.
    """

    def __init__(self, source: Source, keyring: Keyring, *, label: str = "archive") -> None:
        self._source = source
        self._label = label
        self.header = ArchiveHeader.parse(_read_exact(source, HEADER_BYTES), label)
        self._aead = AESGCM(unwrap_data_key(self.header, keyring, label))
        self.bytes_in = HEADER_BYTES

    def _check_frame(self, frame: bytes, expected: int) -> tuple[int, int]:
        """Validate a frame header; return (index, plaintext length)."""
        tag, index, length = _FRAME_HEADER.unpack(frame)
        label = self._label
        if tag != self.header.object_id[:8]:
            if expected == 0:
                raise ForeignHeaderError(
                    f"{label}: archive header belongs to another object (header object "
                    f"{self.header.object_id[:8].hex()}, data object {tag.hex()}): "
                    "the object was assembled from different archives"
                )
            raise ChunkOrderError(
                f"{label}: chunk at position {expected} comes from another object "
                f"({tag.hex()}): the archive was spliced"
            )
        if index < expected:
            raise ChunkOrderError(
                f"{label}: chunk {index} duplicated at position {expected}: the archive is damaged"
            )
        if index > expected:
            raise ChunkOrderError(
                f"{label}: chunks out of order or missing: expected chunk {expected}, found chunk "
                f"{index}: the archive is damaged"
            )
        if length > self.header.chunk_size:
            raise ChunkTamperedError(
                f"{label}: chunk {index} claims {length} bytes, more than the chunk size "
                f"{self.header.chunk_size}: the archive is corrupted"
            )
        return index, length

    def _open(self, index: int, body: bytes, final: bool) -> bytes:
        nonce = _chunk_nonce(self.header.nonce_prefix, index)
        object_header = self.header.object_header
        try:
            return self._aead.decrypt(nonce, body, _chunk_aad(object_header, index, final))
        except InvalidTag:
            pass
        # Authenticates with the other final marker: the frame is intact but the archive
        # ends in the wrong place.
        try:
            self._aead.decrypt(nonce, body, _chunk_aad(object_header, index, not final))
        except InvalidTag:
            raise ChunkTamperedError(
                f"{self._label}: chunk {index} failed authentication: the archive was corrupted "
                "or tampered with"
            ) from None
        if final:
            raise TruncatedArchiveError(
                f"{self._label}: archive truncated after chunk {index} (its final chunk is "
                "missing): the object is incomplete"
            )
        raise TrailingDataError(
            f"{self._label}: unexpected data after the final chunk {index}: the archive was "
            "altered"
        )

    def iter_chunks(self) -> Iterator[bytes]:
        """Yield decrypted payload chunks (still compressed if the header says so)."""
        frame = _read_exact(self._source, FRAME_HEADER_BYTES)
        expected = 0
        while True:
            if not frame:
                raise TruncatedArchiveError(
                    f"{self._label}: archive truncated after "
                    + (f"chunk {expected - 1}" if expected else "its header")
                    + ": the object is incomplete"
                )
            if len(frame) < FRAME_HEADER_BYTES:
                raise TruncatedArchiveError(
                    f"{self._label}: archive truncated inside chunk {expected}: the object is "
                    "incomplete"
                )
            index, length = self._check_frame(frame, expected)
            body = _read_exact(self._source, length + TAG_BYTES)
            if len(body) < length + TAG_BYTES:
                raise TruncatedArchiveError(
                    f"{self._label}: archive truncated inside chunk {index}: the object is "
                    "incomplete"
                )
            self.bytes_in += FRAME_HEADER_BYTES + len(body)
            frame = _read_exact(self._source, FRAME_HEADER_BYTES)
            final = not frame
            plaintext = self._open(index, body, final)
            if not final and length != self.header.chunk_size:
                raise ChunkTamperedError(
                    f"{self._label}: chunk {index} is short ({length} bytes) but not final: "
                    "the archive is corrupted"
                )
            yield plaintext
            if final:
                return
            expected += 1

    def __iter__(self) -> Iterator[bytes]:
        """Yield the plaintext (decompressed when the archive is compressed)."""
        if not self.header.compressed:
            yield from self.iter_chunks()
            return
        # stream_reader releases the GIL while it inflates (decompressobj holds it for a
        # whole call): a restore's unpackers write while their read-ahead threads inflate.
        # It stops at the end of the frame but cannot tell a truncated frame from a
        # complete one, so the frame's own structure is followed as it passes: the payload
        # must end exactly where its last block (and checksum) ends.
        payload = _PayloadFile(self.iter_chunks(), _FrameEnd(self._label))
        reader = zstandard.ZstdDecompressor().stream_reader(
            cast(IO[bytes], payload),  # it only calls read()
            read_size=self.header.chunk_size,
            read_across_frames=False,
        )
        while True:
            try:
                data = reader.read(DECOMPRESS_READ)
            except zstandard.ZstdError as exc:
                raise ArchiveError(
                    f"{self._label}: compressed payload is invalid ({exc}): the archive "
                    "was written incorrectly"
                ) from None
            if not data:
                break
            yield data
        payload.finish()


class _FrameEnd:
    """Follows a zstd frame's header and block headers (RFC 8878) over the compressed
    bytes, skipping block contents: it knows whether the payload ended exactly where the
    frame does, which the decompressor does not say."""

    _MAGIC = 0xFD2FB528

    def __init__(self, label: str) -> None:
        self._label = label
        self._pending = bytearray()  # a header field split across chunks
        self._need = 4  # bytes of the next header field
        self._skip = 0  # bytes to pass over (block contents, optional header fields)
        self._field = "magic"
        self._checksum = False
        self.complete = False

    def feed(self, data: bytes) -> None:
        """Take the next compressed bytes."""
        pos, size = 0, len(data)
        while pos < size:
            if self._skip:
                step = min(self._skip, size - pos)
                self._skip -= step
                pos += step
                continue
            if self.complete:
                raise ArchiveError(
                    f"{self._label}: compressed payload has data after its end: the archive "
                    "was written incorrectly"
                )
            step = min(self._need - len(self._pending), size - pos)
            self._pending += data[pos:pos + step]
            pos += step
            if len(self._pending) == self._need:
                field = bytes(self._pending)
                self._pending.clear()
                self._advance(field)

    def _advance(self, field: bytes) -> None:
        if self._field == "magic":
            if int.from_bytes(field, "little") != self._MAGIC:
                raise ArchiveError(
                    f"{self._label}: compressed payload is invalid (not a zstd frame): the "
                    "archive was written incorrectly"
                )
            self._field, self._need = "descriptor", 1
        elif self._field == "descriptor":
            flags = field[0]
            single_segment = bool(flags & 0x20)
            self._checksum = bool(flags & 0x04)
            content_size = (1 if single_segment else 0, 2, 4, 8)[flags >> 6]
            window = 0 if single_segment else 1
            self._skip = window + (0, 1, 2, 4)[flags & 0x03] + content_size
            self._field, self._need = "block", 3
        else:
            header = int.from_bytes(field, "little")
            kind, length = (header >> 1) & 0x03, header >> 3
            if kind == 3:
                raise ArchiveError(
                    f"{self._label}: compressed payload is invalid (reserved block type): "
                    "the archive was written incorrectly"
                )
            self._skip = 1 if kind == 1 else length  # an RLE block holds one byte
            if header & 0x01:  # the frame's last block
                self._skip += 4 if self._checksum else 0
                self.complete = True

    def check_complete(self) -> None:
        """Raise unless the bytes so far end exactly at the end of the frame."""
        if not self.complete or self._skip:
            raise ArchiveError(
                f"{self._label}: compressed payload ends early: the archive was written "
                "incorrectly"
            )


class _PayloadFile:
    """The decrypted chunks as the file zstd's ``stream_reader`` pulls from, each chunk
    shown to ``frame`` on its way."""

    def __init__(self, chunks: Iterator[bytes], frame: _FrameEnd) -> None:
        self._chunks = chunks
        self._frame = frame
        self._rest = b""

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (the rest of the current chunk, or the next one)."""
        if not self._rest:
            self._rest = next(self._chunks, b"")
            self._frame.feed(self._rest)
        if size < 0 or size >= len(self._rest):
            data, self._rest = self._rest, b""
        else:
            data, self._rest = self._rest[:size], self._rest[size:]
        return data

    def finish(self) -> None:
        """After the decompressor's end: the rest of the archive (authenticated to its
        final chunk) holds nothing more, and the frame ended exactly there."""
        for chunk in self._chunks:
            self._frame.feed(chunk)
        self._frame.check_complete()
        if self._rest:  # what the decompressor left unread can only lie beyond the frame
            self._frame.feed(self._rest)


def decrypt_stream(source: Source, sink: Sink, keyring: Keyring, *, label: str = "archive") -> int:
    """Decrypt an archive from ``source`` into ``sink``; returns plaintext bytes written."""
    total = 0
    for data in ArchiveReader(source, keyring, label=label):
        sink.write(data)
        total += len(data)
    return total
