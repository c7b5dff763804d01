"""Storage arguments (``/path``, ``file:///path``, ``s3://bucket/prefix``): `StorageURL`,
`parse_storage_url` and the opening of the storage a URL names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.storage.base import Storage
from pgbackflow.tasks.storage.local import LocalFolderStorage
from pgbackflow.tasks.storage.s3 import S3ObjectStorage


@dataclass(frozen=True)
class StorageURL:
    """A parsed storage argument.

    Attributes:
        scheme: "file" or "s3".
        location: The folder (absolute) or the bucket.
        prefix: Key prefix inside the bucket ("" for folders).
        endpoint_url: S3 endpoint from the environment, if any.
        region: S3 region from the environment, if any.
    """

    scheme: str
    location: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None

    def open(self) -> Storage:
        """The storage (S3 credentials from the standard AWS chain)."""
        if self.scheme == "s3":
            return S3ObjectStorage(
                self.location, self.prefix, endpoint_url=self.endpoint_url, region=self.region
            )
        return LocalFolderStorage(self.location)


def parse_storage_url(url: str) -> StorageURL:
    """Parse ``/path``, ``file:///path`` or ``s3://bucket/prefix``.

    For S3 the endpoint comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` and the
    region from ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.

    Raises:
        ConfigError: If the URL is empty or uses another scheme.
    """
    text = url.strip()
    if not text:
        raise ConfigError(
            "storage is empty: use /path, file:///path, s3://bucket/prefix or block:slug/name"
        )
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # "Invalid IPv6 URL": an unbalanced '[' or ']'
        raise ConfigError(
            f"storage URL {url!r} is malformed ({exc}): use /path, file:///path, "
            "s3://bucket/prefix or block:slug/name"
        ) from None
    if parts.scheme in ("s3", "file") and (parts.query or parts.fragment):
        # Not repeated whole: what follows '?' may be a secret someone pasted there.
        raise ConfigError(
            f"storage URL {parts.scheme}://{parts.netloc}{parts.path} has a '?' query or a "
            "'#' fragment, which pgbackflow does not read: remove it (S3 settings come from "
            "the AWS environment or a storage block)"
        )
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"storage URL {url!r} has no bucket: use s3://bucket/prefix")
        return StorageURL(
            "s3",
            parts.netloc,
            unquote(parts.path).strip("/"),
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None,
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
        )
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"storage URL {url!r} names a remote host: use file:///absolute/path")
        if not parts.path.startswith("/"):
            raise ConfigError(f"storage URL {url!r} has no absolute path: use file:///absolute/path")
        return StorageURL("file", unquote(parts.path))
    if parts.scheme and len(parts.scheme) > 1:
        raise ConfigError(
            f"storage URL {url!r} has unsupported scheme '{parts.scheme}': use /path, "
            "file:///path, s3://bucket/prefix or block:slug/name"
        )
    return StorageURL("file", str(Path(text).absolute()))

