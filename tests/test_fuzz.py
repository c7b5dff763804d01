"""Fuzzing of what reads untrusted input: the archive reader and the storage URL parsers.

Anything may be in a bucket and anything may be typed on a command line: the only acceptable
failure is one of the project's own errors (a ``PgBackflowError``, one line). An archive
either decrypts to exactly what was written or is refused. The manifest parser is fuzzed in
tests/test_manifest_auth.py.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable
from pathlib import PurePosixPath

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgbackflow.blocks.storage import LocalStorage, S3Storage, storage_block_from_url
from pgbackflow.tasks.archive import (
    FRAME_HEADER_BYTES,
    HEADER_BYTES,
    MAGIC,
    TAG_BYTES,
    ArchiveReader,
    ArchiveWriter,
    decrypt_stream,
)
from pgbackflow.tasks.errors import PgBackflowError
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.storage import parse_storage_url

_FUZZ = settings(max_examples=1500, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])

KEY = MasterKey.generate()
OTHER_KEY = MasterKey.generate()
RING = Keyring([KEY])
CHUNK = 1024


def _payload(size: int, seed: int) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 5)) & 0xFF for i in range(size))


def _encrypt(data: bytes, *, compress: bool) -> bytes:
    sink = io.BytesIO()
    with ArchiveWriter(sink, KEY, compress=compress, chunk_size=CHUNK) as writer:
        for start in range(0, len(data), 700):
            writer.write(data[start : start + 700])
    return sink.getvalue()


# (plaintext, archive): empty, one short chunk, several chunks, compressed and not.
SAMPLES = [
    (plain, _encrypt(plain, compress=compress))
    for plain in (b"", b"hello", _payload(CHUNK * 3 + 100, 1), _payload(CHUNK * 2, 2))
    for compress in (False, True)
]


def _assert_clean(exc: BaseException) -> None:
    assert isinstance(exc, PgBackflowError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} without a message"
    assert "\n" not in message and "\r" not in message, repr(message)


def _decrypt(archive: bytes, keyring: Keyring = RING) -> bytes | None:
    """The plaintext, or None after checking the error is one of ours."""
    out = io.BytesIO()
    try:
        decrypt_stream(io.BytesIO(archive), out, keyring, label="fuzz-object")
    except Exception as exc:
        _assert_clean(exc)
        return None
    return out.getvalue()


def _iterate(archive: bytes) -> bytes | None:
    """The same through ArchiveReader, reading the source in odd sizes."""

    class Dribble(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            return super().read(size if size is None or size < 0 else min(size, 37) or size)

    try:
        return b"".join(ArchiveReader(Dribble(archive), RING, label="fuzz-object"))
    except Exception as exc:
        _assert_clean(exc)
        return None


def test_samples_decrypt() -> None:
    for plain, archive in SAMPLES:
        assert _decrypt(archive) == plain


# --------------------------------------------------------------------------- mutations

_Mutation = Callable[[bytes], bytes]


@st.composite
def _mutation(draw: st.DrawFn, size: int) -> _Mutation:
    kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate",
                                 "swap", "append", "lengths"]))
    pos = draw(st.integers(0, max(size - 1, 0)))
    if kind == "flip":
        bit = draw(st.integers(0, 7))
        return lambda b: b[:pos] + bytes([b[pos] ^ (1 << bit)]) + b[pos + 1 :] if b else b
    if kind == "set":
        value = draw(st.binary(min_size=1, max_size=8))
        return lambda b: b[:pos] + value + b[pos + len(value) :]
    if kind == "truncate":
        return lambda b: b[:pos]
    if kind == "insert":
        value = draw(st.binary(min_size=1, max_size=64))
        return lambda b: b[:pos] + value + b[pos:]
    if kind == "delete":
        count = draw(st.integers(1, 64))
        return lambda b: b[:pos] + b[pos + count :]
    if kind == "append":
        value = draw(st.binary(min_size=1, max_size=128))
        return lambda b: b + value
    frame = CHUNK + FRAME_HEADER_BYTES + TAG_BYTES
    first, second = draw(st.integers(0, 4)), draw(st.integers(0, 4))

    def _frames(b: bytes) -> list[bytes]:
        return [b[start : start + frame] for start in range(HEADER_BYTES, len(b), frame)]

    if kind == "duplicate":
        def duplicate(b: bytes) -> bytes:
            parts = _frames(b)
            if parts:
                parts.insert(min(second, len(parts)), parts[min(first, len(parts) - 1)])
            return b[:HEADER_BYTES] + b"".join(parts)
        return duplicate
    if kind == "swap":
        def swap(b: bytes) -> bytes:
            parts = _frames(b)
            if parts:
                i, j = min(first, len(parts) - 1), min(second, len(parts) - 1)
                parts[i], parts[j] = parts[j], parts[i]
            return b[:HEADER_BYTES] + b"".join(parts)
        return swap
    # "lengths": rewrite a frame's length or index field (the frame header is not encrypted).
    field_value = draw(st.sampled_from([0, 1, CHUNK - 1, CHUNK + 1, 2**31, 2**32 - 1])
                       | st.integers(0, 2**32 - 1))

    def lengths(b: bytes) -> bytes:
        start = HEADER_BYTES + min(first, max(len(_frames(b)) - 1, 0)) * frame
        if start + FRAME_HEADER_BYTES > len(b):
            return b
        if second % 2:
            return b[: start + 16] + struct.pack(">I", field_value) + b[start + 20 :]
        return b[: start + 8] + struct.pack(">Q", field_value) + b[start + 16 :]
    return lengths


@_FUZZ
@given(data=st.data(), sample=st.sampled_from(range(len(SAMPLES))))
def test_fuzz_mutated_archives(data: st.DataObject, sample: int) -> None:
    plain, archive = SAMPLES[sample]
    mutated = archive
    for _ in range(data.draw(st.integers(1, 3))):
        mutated = data.draw(_mutation(len(mutated)))(mutated)
    result = _decrypt(mutated)
    # Whatever decrypts is exactly what was written: never altered, never partial.
    assert result is None or (result == plain and mutated == archive), (
        f"a mutated archive decrypted to {len(result or b'')} bytes"
    )
    assert _iterate(mutated) == result


@_FUZZ
@given(tail=st.binary(max_size=2 * CHUNK + 200), sample=st.sampled_from(range(len(SAMPLES))))
def test_fuzz_valid_header_random_body(tail: bytes, sample: int) -> None:
    """An authentic header followed by anything: the chunk checks alone must hold."""
    plain, archive = SAMPLES[sample]
    mutated = archive[:HEADER_BYTES] + tail
    result = _decrypt(mutated)
    assert result is None or (result == plain and mutated == archive)


@_FUZZ
@given(raw=st.binary(max_size=400)
       | st.binary(max_size=400).map(lambda b: MAGIC + b)
       | st.binary(max_size=400).map(lambda b: SAMPLES[2][1][:34] + b))
def test_fuzz_random_bytes(raw: bytes) -> None:
    assert _decrypt(raw) is None
    assert _decrypt(raw, Keyring([OTHER_KEY])) is None


@settings(max_examples=100, deadline=None, database=None)
@given(sample=st.sampled_from(range(len(SAMPLES))), cut=st.integers(0, 5000))
def test_fuzz_wrong_key(sample: int, cut: int) -> None:
    _, archive = SAMPLES[sample]
    assert _decrypt(archive[: max(cut, HEADER_BYTES)], Keyring([OTHER_KEY])) is None


# --------------------------------------------------------------------------- storage URLs

_SCHEMES = st.sampled_from(["s3", "S3", "file", "FILE", "http", "https", "gs", "block", "c",
                            "s3+x", "", "1s3"])
_URL_TEXT = st.text(
    alphabet=st.characters(codec="utf-8") | st.sampled_from(list("/:@[]?#%.~ \t\n\x00\\")),
    max_size=40,
)
_URLS = (
    st.text(max_size=60)
    | _URL_TEXT
    | st.builds(lambda scheme, sep, rest: f"{scheme}{sep}{rest}", _SCHEMES,
                st.sampled_from([":", "://", ":///", "://[", "://localhost/", "://[::1]:x/"]),
                _URL_TEXT)
)


def _non_block(url: str) -> bool:
    return not url.strip().startswith("block:")


@_FUZZ
@given(url=_URLS)
def test_fuzz_parse_storage_url(url: str) -> None:
    try:
        parsed = parse_storage_url(url)
    except Exception as exc:
        _assert_clean(exc)
        return
    assert parsed.scheme in ("file", "s3")
    if parsed.scheme == "file":
        assert PurePosixPath(parsed.location).is_absolute(), (url, parsed)
    else:
        assert parsed.location and "/" not in parsed.location, (url, parsed)


@_FUZZ
@given(url=_URLS.filter(_non_block))
def test_fuzz_storage_block_from_url(url: str) -> None:
    try:
        block = storage_block_from_url(url)
        # Opening builds the storage (and checks bucket and prefix) without any request.
        storage = block.open()
    except Exception as exc:
        _assert_clean(exc)
        return
    assert isinstance(block, LocalStorage | S3Storage)
    if isinstance(block, LocalStorage):
        assert os.path.isabs(storage.location), (url, storage.location)
