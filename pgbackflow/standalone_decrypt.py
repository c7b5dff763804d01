#!/usr/bin/env python3
"""Decrypt a pgbackflow archive without pgbackflow.

A single file that needs only the ``cryptography`` package (and ``zstandard`` for
archives whose header has the zstd flag). It follows docs/FORMAT.md and nothing else, so
backups stay readable even if pgbackflow is gone. Copy it next to your key file.

Usage:
    python3 standalone_decrypt.py --key-file master.key [--force] IN OUT
    (IN or OUT may be '-' for stdin/stdout)

OUT is created readable by its owner only (it is the plain dump); an existing OUT is
refused unless --force. Exit status: 0 on success, 1 on any integrity or key error (a file
OUT is then removed; on stdout, what was written must not be used), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import struct
import sys
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"PGBFARCH"
HEADER_BYTES = 102
OBJECT_HEADER_BYTES = 34
FRAME_HEADER_BYTES = 20
TAG_BYTES = 16
FLAG_ZSTD = 0x01


class DecryptError(Exception):
    """The archive or key cannot be used."""


def read_key(path: str) -> bytes:
    """Return the 32 key bytes from a pgbackflow key file."""
    with open(path, encoding="ascii") as handle:
        lines = [ln.strip() for ln in handle if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1:
        raise DecryptError(f"key file {path}: expected exactly one key line")
    key = base64.b64decode(lines[0].removeprefix("pgbackflow-key-v1:"), validate=True)
    if len(key) != 32:
        raise DecryptError(f"key file {path}: key is not 32 bytes")
    return key


def read_exact(stream: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes unless the stream ends first."""
    data = b""
    while len(data) < size:
        part = stream.read(size - len(data))
        if not part:
            break
        data += part
    return data


def decrypt(source: BinaryIO, sink: BinaryIO, master_key: bytes) -> None:
    """Decrypt one archive from ``source`` into ``sink``."""
    header = read_exact(source, HEADER_BYTES)
    if header[:8] != MAGIC:
        raise DecryptError("not a pgbackflow archive")
    if len(header) < HEADER_BYTES:
        raise DecryptError("archive truncated inside its header")
    version, flags, chunk_size = struct.unpack_from(">BBI", header, 8)
    if version != 1:
        raise DecryptError(f"unsupported format version {version}")
    object_header = header[:OBJECT_HEADER_BYTES]
    object_id = header[14:30]
    nonce_prefix = header[30:34]
    key_id = header[34:42]
    wrap_nonce = header[42:54]
    wrapped_key = header[54:102]

    my_key_id = hmac.new(master_key, b"pgbackflow master key id v1", hashlib.sha256).digest()[:8]
    if key_id != my_key_id:
        raise DecryptError(
            f"wrong key: archive needs key id {key_id.hex()}, have {my_key_id.hex()}"
        )
    try:
        data_key = AESGCM(master_key).decrypt(wrap_nonce, wrapped_key, object_header + key_id)
    except InvalidTag:
        raise DecryptError("header failed authentication") from None
    aead = AESGCM(data_key)

    decompressor = None
    if flags & FLAG_ZSTD:
        import zstandard

        decompressor = zstandard.ZstdDecompressor().decompressobj()

    index = 0
    frame = read_exact(source, FRAME_HEADER_BYTES)
    while True:
        if len(frame) < FRAME_HEADER_BYTES:
            raise DecryptError(f"archive truncated at chunk {index}")
        tag, frame_index, length = struct.unpack(">8sQI", frame)
        if tag != object_id[:8]:
            raise DecryptError(f"chunk {index} belongs to another object")
        if frame_index != index:
            raise DecryptError(f"expected chunk {index}, found chunk {frame_index}")
        if length > chunk_size:
            raise DecryptError(f"chunk {index} is larger than the chunk size")
        body = read_exact(source, length + TAG_BYTES)
        if len(body) < length + TAG_BYTES:
            raise DecryptError(f"archive truncated inside chunk {index}")
        frame = read_exact(source, FRAME_HEADER_BYTES)
        final = not frame
        nonce = nonce_prefix + struct.pack(">Q", index)
        aad = object_header + struct.pack(">QB", index, 1 if final else 0)
        try:
            plaintext = aead.decrypt(nonce, body, aad)
        except InvalidTag:
            raise DecryptError(
                f"chunk {index} failed authentication (corrupted, or archive truncated)"
            ) from None
        if not final and length != chunk_size:
            raise DecryptError(f"chunk {index} is short but not final")
        sink.write(_inflate(decompressor, plaintext, index) if decompressor else plaintext)
        if final:
            break
        index += 1
    if decompressor is not None and not decompressor.eof:
        raise DecryptError("compressed payload ends early")


def _inflate(decompressor: Any, plaintext: bytes, index: int) -> bytes:
    """Decompress one chunk's plaintext; the payload is exactly one zstd frame, so bytes
    after the frame's end (in this chunk or a later one) are refused, not dropped."""
    import zstandard

    if decompressor.eof and plaintext:
        raise DecryptError(f"compressed payload has data after its end (chunk {index})")
    try:
        data: bytes = decompressor.decompress(plaintext)
    except zstandard.ZstdError as exc:
        raise DecryptError(f"compressed payload is invalid (chunk {index}): {exc}") from None
    if decompressor.unused_data:
        raise DecryptError(f"compressed payload has data after its end (chunk {index})")
    return data


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Decrypt a pgbackflow archive.")
    parser.add_argument("--key-file", required=True, help="pgbackflow master key file")
    parser.add_argument("input", help="archive to read, or - for stdin")
    parser.add_argument("output", help="file to write, or - for stdout")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)
    created = False
    try:
        key = read_key(args.key_file)
        source = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
        if args.output == "-":
            sink = sys.stdout.buffer
        else:
            try:
                sink = open_output(args.output, args.force)
            except FileExistsError:
                source.close()
                print(f"decrypt refused: output {args.output} already exists: pass --force "
                      "to overwrite it, or name another file", file=sys.stderr)
                return 1
            created = True
        with source, sink:
            decrypt(source, sink, key)
    except (DecryptError, OSError, ValueError) as exc:
        if created:  # an incomplete dump must not be mistaken for one
            os.unlink(args.output)
        print(f"decrypt failed: {exc}", file=sys.stderr)
        return 1
    return 0


def open_output(path: str, force: bool) -> BinaryIO:
    """``path`` for writing, owner-only; an existing file only with ``force``."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)  # an overwritten file keeps its mode otherwise
    return os.fdopen(fd, "wb")


if __name__ == "__main__":
    sys.exit(main())
