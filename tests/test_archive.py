"""The encrypted archive format: round trips, every tampering case, the standalone decryptor."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from pgbackflow import standalone_decrypt
from pgbackflow.tasks.archive import (
    FLAG_ZSTD,
    FRAME_HEADER_BYTES,
    HEADER_BYTES,
    TAG_BYTES,
    ArchiveError,
    ArchiveReader,
    ArchiveWriter,
    ChunkOrderError,
    ChunkTamperedError,
    ForeignHeaderError,
    HeaderTamperedError,
    NotAnArchiveError,
    TrailingDataError,
    TruncatedArchiveError,
    WrongKeyError,
    _ChunkEncryptor,
    decrypt_stream,
    rewrap_header,
)
from pgbackflow.tasks.keys import Keyring, MasterKey, write_key_file

CHUNK = 1024


@pytest.fixture(scope="module")
def key() -> MasterKey:
    return MasterKey.generate()


def make_payload(size: int, seed: int = 0) -> bytes:
    # Incompressible-ish but deterministic: hash chain.
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def encrypt(data: bytes, key: MasterKey, *, compress: bool = False, chunk: int = CHUNK) -> bytes:
    sink = io.BytesIO()
    with ArchiveWriter(sink, key, compress=compress, chunk_size=chunk) as writer:
        # Uneven writes: the writer must not depend on write boundaries.
        for start in range(0, len(data), 777):
            writer.write(data[start : start + 777])
    return sink.getvalue()


def decrypt(archive: bytes, *keys: MasterKey) -> bytes:
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(archive), out, Keyring(keys), label="test-object")
    return out.getvalue()


def frames(archive: bytes) -> tuple[bytes, list[bytes]]:
    """Split an archive into its header and raw frames."""
    pos, parts = HEADER_BYTES, []
    while pos < len(archive):
        length = struct.unpack_from(">I", archive, pos + 16)[0]
        end = pos + FRAME_HEADER_BYTES + length + TAG_BYTES
        parts.append(archive[pos:end])
        pos = end
    return archive[:HEADER_BYTES], parts


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK, 3 * CHUNK + 7, 50_000])
def test_round_trip(key: MasterKey, size: int, compress: bool) -> None:
    data = make_payload(size)
    archive = encrypt(data, key, compress=compress)
    assert decrypt(archive, key) == data
    if not compress:
        _, parts = frames(archive)
        # Exact multiples end with a full final chunk, never an extra empty one.
        assert len(parts) == max(1, -(-size // CHUNK))


def test_default_chunk_size_multi_chunk(key: MasterKey) -> None:
    data = make_payload(3 * 1024 * 1024 + 11)
    sink = io.BytesIO()
    with ArchiveWriter(sink, key, compress=False) as writer:
        writer.write(data)
    assert writer.bytes_in == len(data)
    assert writer.bytes_out == len(sink.getvalue())
    assert decrypt(sink.getvalue(), key) == data


def test_compression_shrinks_compressible_data(key: MasterKey) -> None:
    data = b"id,name,comment\n" + b"42,alice,hello world\n" * 50_000
    archive = encrypt(data, key, compress=True)
    assert len(archive) < len(data) / 20
    assert ArchiveReader(io.BytesIO(archive), Keyring([key])).header.compressed


def test_every_flipped_byte_is_rejected(key: MasterKey) -> None:
    archive = encrypt(make_payload(2 * CHUNK + 100), key)
    for position in range(len(archive)):
        damaged = bytearray(archive)
        damaged[position] ^= 0x01
        with pytest.raises(ArchiveError):
            decrypt(bytes(damaged), key)


def test_flipped_byte_in_chunk_names_the_chunk(key: MasterKey) -> None:
    archive = bytearray(encrypt(make_payload(3 * CHUNK), key))
    _header, parts = frames(bytes(archive))
    # A ciphertext byte of chunk 1.
    archive[HEADER_BYTES + len(parts[0]) + FRAME_HEADER_BYTES + 5] ^= 0x80
    with pytest.raises(ChunkTamperedError, match=r"test-object: chunk 1 failed authentication"):
        decrypt(bytes(archive), key)


def test_flipped_header_byte_is_a_header_error(key: MasterKey) -> None:
    archive = bytearray(encrypt(b"hello", key))
    archive[20] ^= 0x01  # inside object_id
    with pytest.raises(HeaderTamperedError, match="header failed authentication"):
        decrypt(bytes(archive), key)


def test_bad_magic(key: MasterKey) -> None:
    with pytest.raises(NotAnArchiveError, match="not a pgbackflow archive"):
        decrypt(b"PGDMP" + b"\0" * 200, key)


@pytest.mark.parametrize("chunks_kept", [1, 2])
def test_truncation_at_chunk_boundary(key: MasterKey, chunks_kept: int) -> None:
    archive = encrypt(make_payload(3 * CHUNK + 10), key)
    header, parts = frames(archive)
    truncated = header + b"".join(parts[:chunks_kept])
    with pytest.raises(
        TruncatedArchiveError, match=rf"archive truncated after chunk {chunks_kept - 1}"
    ):
        decrypt(truncated, key)


def test_truncation_after_header(key: MasterKey) -> None:
    archive = encrypt(b"data", key)
    with pytest.raises(TruncatedArchiveError, match="truncated after its header"):
        decrypt(archive[:HEADER_BYTES], key)


def test_truncation_inside_a_chunk(key: MasterKey) -> None:
    archive = encrypt(make_payload(2 * CHUNK), key)
    with pytest.raises(TruncatedArchiveError, match="truncated inside chunk 1"):
        decrypt(archive[:-5], key)


def test_reordered_chunks(key: MasterKey) -> None:
    header, parts = frames(encrypt(make_payload(4 * CHUNK), key))
    swapped = header + parts[0] + parts[2] + parts[1] + parts[3]
    with pytest.raises(ChunkOrderError, match="expected chunk 1, found chunk 2"):
        decrypt(swapped, key)


def test_duplicated_chunk(key: MasterKey) -> None:
    header, parts = frames(encrypt(make_payload(3 * CHUNK), key))
    duplicated = header + parts[0] + parts[1] + parts[1] + parts[2]
    with pytest.raises(ChunkOrderError, match="chunk 1 duplicated at position 2"):
        decrypt(duplicated, key)


def test_header_from_another_object(key: MasterKey) -> None:
    data = make_payload(2 * CHUNK)
    header_a, _ = frames(encrypt(data, key))
    _, parts_b = frames(encrypt(data, key))
    with pytest.raises(ForeignHeaderError, match="header belongs to another object"):
        decrypt(header_a + b"".join(parts_b), key)


def test_chunk_spliced_from_another_object(key: MasterKey) -> None:
    data = make_payload(3 * CHUNK)
    header_a, parts_a = frames(encrypt(data, key))
    _, parts_b = frames(encrypt(data, key))
    with pytest.raises(ChunkOrderError, match="position 1 comes from another object"):
        decrypt(header_a + parts_a[0] + parts_b[1] + parts_a[2], key)


def test_trailing_data_after_final_chunk(key: MasterKey) -> None:
    header, parts = frames(encrypt(make_payload(2 * CHUNK), key))
    # A well-formed frame header for "chunk 2" after the real final chunk.
    extra = parts[1][:8] + struct.pack(">QI", 2, 0) + b"\0" * TAG_BYTES
    with pytest.raises(TrailingDataError, match="after the final chunk 1"):
        decrypt(header + b"".join(parts) + extra, key)


def sealed_payload(payload: bytes, key: MasterKey) -> bytes:
    """A correctly encrypted archive flagged zstd whose payload is ``payload`` as given: every
    chunk authenticates, only the compressed stream inside is wrong."""
    sink = io.BytesIO()
    encryptor = _ChunkEncryptor(sink, key, flags=FLAG_ZSTD, chunk_size=CHUNK)
    encryptor.write(payload)
    encryptor.finish()
    return sink.getvalue()


@pytest.mark.parametrize("threads", [0, 2], ids=["single", "multithreaded"])
@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "checksum"])
def test_compressed_payload_must_end_exactly_with_its_frame(
    key: MasterKey, threads: int, checksum: bool
) -> None:
    # Many blocks, so that block headers straddle chunk boundaries (CHUNK is 1 KiB).
    data = b"row\n" * 200_000 + make_payload(40_000)
    frame = zstandard.ZstdCompressor(
        level=5, threads=threads, write_checksum=checksum
    ).compress(data)
    assert decrypt(sealed_payload(frame, key), key) == data
    # The decompressor alone takes a cut frame for a complete one: every cut is refused,
    # at the checksum, inside a block header, inside a block, right after the magic.
    for cut in sorted({*range(1, 12), *range(13, len(frame) - 3, 997), len(frame) - 4}):
        with pytest.raises(ArchiveError, match="compressed payload ends early"):
            decrypt(sealed_payload(frame[:-cut], key), key)
    for trailing in (b"\0", frame):
        with pytest.raises(ArchiveError, match="compressed payload has data after its end"):
            decrypt(sealed_payload(frame + trailing, key), key)
    with pytest.raises(ArchiveError, match="compressed payload is invalid"):
        decrypt(sealed_payload(b"\x28\xb5\x2f\xfc" + frame[4:], key), key)
    with pytest.raises(ArchiveError, match="compressed payload ends early"):
        decrypt(sealed_payload(b"", key), key)


def test_standalone_decryptor_refuses_what_the_reader_refuses(
    key: MasterKey, tmp_path: Path
) -> None:
    """The disaster-recovery decryptor judges a compressed payload like ArchiveReader: a cut
    frame, data after the frame and an invalid frame fail (exit 1, one line), never pass."""
    data = b"row\n" * 200_000 + make_payload(40_000)
    frame = zstandard.ZstdCompressor(level=5).compress(data)

    def standalone(archive: bytes) -> bytes:
        sink = io.BytesIO()
        standalone_decrypt.decrypt(io.BytesIO(archive), sink, key.material)
        return sink.getvalue()

    assert standalone(sealed_payload(frame, key)) == data
    for cut in (1, 5, len(frame) // 2):
        with pytest.raises(standalone_decrypt.DecryptError, match="ends early"):
            standalone(sealed_payload(frame[:-cut], key))
    # Within the frame's last chunk, and in chunks after it.
    for trailing in (b"\0", frame):
        with pytest.raises(standalone_decrypt.DecryptError, match="data after its end"):
            standalone(sealed_payload(frame + trailing, key))
    with pytest.raises(standalone_decrypt.DecryptError, match="compressed payload is invalid"):
        standalone(sealed_payload(b"\x28\xb5\x2f\xfc" + frame[4:], key))
    # As a user runs it: one line, no traceback.
    key_file = tmp_path / "master.key"
    write_key_file(key_file, key)
    archive = tmp_path / "trailing.pgbf"
    archive.write_bytes(sealed_payload(frame + frame, key))
    proc = subprocess.run(
        [sys.executable, standalone_decrypt.__file__, "--key-file", str(key_file),
         str(archive), str(tmp_path / "out")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("decrypt failed: compressed payload has data after its end")
    assert "Traceback" not in proc.stderr


def test_wrong_key_names_the_key_id(key: MasterKey) -> None:
    other = MasterKey.generate()
    archive = encrypt(b"secret rows", key)
    with pytest.raises(WrongKeyError) as excinfo:
        decrypt(archive, other)
    message = str(excinfo.value)
    assert f"wrong encryption key (archive needs key id {key.key_id_hex}" in message
    assert other.key_id_hex in message
    assert "\n" not in message


def test_each_tampering_case_has_its_own_error(key: MasterKey) -> None:
    """The classes differ, so a DBA can tell a wrong key from damage from truncation."""
    classes = {
        ChunkTamperedError, HeaderTamperedError, TruncatedArchiveError, ChunkOrderError,
        ForeignHeaderError, WrongKeyError, TrailingDataError, NotAnArchiveError,
    }
    assert len(classes) == 8
    for first in classes:
        for second in classes - {first}:
            assert not issubclass(first, second)


def test_key_rotation_rewraps_header_only(key: MasterKey) -> None:
    data = make_payload(5000)
    archive = encrypt(data, key, compress=True)
    new_key = MasterKey.generate()
    new_header = rewrap_header(archive[:HEADER_BYTES], Keyring([key]), new_key)
    rotated = new_header + archive[HEADER_BYTES:]
    assert rotated[HEADER_BYTES:] == archive[HEADER_BYTES:]
    assert decrypt(rotated, new_key) == data
    with pytest.raises(WrongKeyError):
        decrypt(rotated, key)
    # A keyring holding old and new keys reads both generations.
    assert decrypt(archive, new_key, key) == data


class _Counting(io.RawIOBase):
    """A sink that keeps nothing, only counts and hashes."""

    def __init__(self) -> None:
        self.size = 0
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.size += len(data)
        self.digest.update(data)
        return len(data)


class _Generated(io.RawIOBase):
    """A source of ``size`` pseudo-random bytes produced on demand."""

    def __init__(self, size: int) -> None:
        self.remaining = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = min(n if n >= 0 else self.remaining, self.remaining, 1 << 16)
        self.remaining -= n
        return os.urandom(n)


def test_streaming_memory_is_constant(key: MasterKey) -> None:
    """64 MiB through encrypt and decrypt while Python allocations stay a few chunks big."""
    size = 64 * 1024 * 1024
    archive_path = io.BytesIO()  # the archive itself must be kept: measure around it
    tracemalloc.start()
    try:
        source = _Generated(size)
        with ArchiveWriter(archive_path, key, compress=True) as writer:
            while data := source.read(1 << 16):
                writer.write(data)
        encrypted_size = len(archive_path.getbuffer())
        tracemalloc.reset_peak()
        baseline, _ = tracemalloc.get_traced_memory()
        archive_path.seek(0)
        sink = _Counting()
        decrypt_stream(archive_path, sink, Keyring([key]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.size == size
    assert encrypted_size > size  # random data: compression cannot hide buffering
    assert peak - baseline < 8 * 1024 * 1024


def test_standalone_decryptor_agrees(key: MasterKey, tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    write_key_file(key_file, key)
    for name, data, compress in [
        ("empty", b"", False),
        ("plain", make_payload(3 * 1024 * 1024 + 3), False),
        ("zstd", b"row\n" * 300_000 + make_payload(100), True),
    ]:
        archive = tmp_path / f"{name}.pgbf"
        with archive.open("wb") as out, ArchiveWriter(out, key, compress=compress) as writer:
            writer.write(data)
        result = tmp_path / f"{name}.out"
        # Run it the way a user would: a file executed by a plain interpreter.
        proc = subprocess.run(
            [sys.executable, standalone_decrypt.__file__, "--key-file", str(key_file),
             str(archive), str(result)],
            capture_output=True, text=True, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert result.read_bytes() == data
        assert stat.S_IMODE(result.stat().st_mode) == 0o600, name  # the plain dump
    # An existing output is kept unless --force; forced, it is written owner-only too.
    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    mine.chmod(0o644)
    argv = [sys.executable, standalone_decrypt.__file__, "--key-file", str(key_file),
            str(tmp_path / "plain.pgbf"), str(mine)]
    refused = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and "already exists: pass --force" in refused.stderr
    assert mine.read_text() == "mine"
    forced = subprocess.run([*argv, "--force"], capture_output=True, text=True, check=False)
    assert forced.returncode == 0, forced.stderr
    assert mine.read_bytes() == (tmp_path / "plain.out").read_bytes()
    assert stat.S_IMODE(mine.stat().st_mode) == 0o600


def test_standalone_decryptor_rejects_tampering(key: MasterKey, tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    write_key_file(key_file, key)
    header, parts = frames(encrypt(make_payload(3 * CHUNK), key))
    cases = {
        "flipped": header + parts[0][:30] + bytes([parts[0][30] ^ 1]) + parts[0][31:]
        + parts[1] + parts[2],
        "truncated": header + parts[0] + parts[1],
        "reordered": header + parts[0] + parts[2] + parts[1],
        "wrong-key": encrypt(b"x", MasterKey.generate()),
    }
    for name, archive in cases.items():
        path = tmp_path / f"{name}.pgbf"
        path.write_bytes(archive)
        proc = subprocess.run(
            [sys.executable, standalone_decrypt.__file__, "--key-file", str(key_file),
             str(path), str(tmp_path / "out")],
            capture_output=True, text=True, check=False,
        )
        assert proc.returncode == 1, name
        assert "decrypt failed" in proc.stderr, name
        assert not (tmp_path / "out").exists(), f"{name}: the incomplete output was left"
