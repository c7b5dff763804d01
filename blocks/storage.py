"""Where backups are kept, as Prefect blocks: a local folder or an S3 bucket."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr

from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.storage import LocalFolderStorage, S3ObjectStorage, parse_storage_url

_DOCS = HttpUrl("https://github.com/pgbackflow/pgbackflow/blob/main/docs/BLOCKS.md")


class LocalStorage(Block):
    """Backups kept as files below a folder on the machine that runs the flows.

    Use a mounted network filesystem or a dedicated disk: a folder on the database's own
    disk does not survive losing that disk.

    Attributes:
        folder: Absolute path of the folder; created on the first backup if missing.

    Example:
        ```python
        from pgbackflow.blocks.storage import LocalStorage

        local_storage = LocalStorage.load("BLOCK_NAME")
        local_storage.check()
        ```
    """

    _block_type_name: ClassVar[str] = "pgbackflow Local Storage"
    _block_type_slug: ClassVar[str] = "pgbackflow-local-storage"
    _description: ClassVar[str] = (
        "A local or mounted folder where pgbackflow keeps backups, written atomically."
    )
    _documentation_url: ClassVar[HttpUrl] = _DOCS
    _code_example: ClassVar[str] = """
```python
from pgbackflow.blocks.storage import LocalStorage

local_storage = LocalStorage.load("BLOCK_NAME")
local_storage.check()
```
"""

    folder: str = Field(
        description="Absolute path of the backup folder, created on the first backup if missing.",
        examples=["/var/backups/postgres"],
    )

    def open(self) -> LocalFolderStorage:
        """The storage this block describes."""
        return LocalFolderStorage(Path(self.folder))

    def check(self) -> None:
        """Write, read back and delete a probe file.

        Raises:
            StorageError: If the folder cannot be used, with a one-line reason.
        """
        self.open().check_writable()


class S3Storage(Block):
    """Backups kept in an S3 bucket (AWS or an S3-compatible server such as MinIO).

    Without keys the standard AWS credential chain is used (environment, profile, role).

    Attributes:
        bucket: The bucket name.
        prefix: Key prefix (folder) for this installation's backups inside the bucket.
        endpoint_url: Endpoint of an S3-compatible server; empty for AWS.
        region: Region of the bucket; empty for the AWS default.
        access_key_id: Access key id; empty for the standard AWS credential chain.
        secret_access_key: Secret access key belonging to ``access_key_id``.

    Example:
        ```python
        from pgbackflow.blocks.storage import S3Storage

        s3_storage = S3Storage.load("BLOCK_NAME")
        s3_storage.check()
        ```
    """

    _block_type_name: ClassVar[str] = "pgbackflow S3 Storage"
    _block_type_slug: ClassVar[str] = "pgbackflow-s3-storage"
    _description: ClassVar[str] = (
        "An S3 or S3-compatible bucket where pgbackflow keeps backups, uploaded in streaming "
        "multipart uploads that publish atomically."
    )
    _documentation_url: ClassVar[HttpUrl] = _DOCS
    _code_example: ClassVar[str] = """
```python
from pgbackflow.blocks.storage import S3Storage

s3_storage = S3Storage.load("BLOCK_NAME")
s3_storage.check()
```
"""

    bucket: str = Field(description="Name of the bucket.", examples=["acme-pg-backups"])
    prefix: str = Field(
        default="",
        description="Key prefix (folder) inside the bucket for these backups; empty for the root.",
        examples=["production"],
    )
    endpoint_url: str | None = Field(
        default=None,
        description="Endpoint URL of an S3-compatible server; leave empty for AWS.",
        examples=["https://minio.internal:9000"],
    )
    region: str | None = Field(
        default=None,
        description="Region of the bucket; leave empty for the AWS default.",
        examples=["eu-central-1"],
    )
    access_key_id: str | None = Field(
        default=None,
        description="Access key id; leave empty to use the standard AWS credential chain.",
    )
    secret_access_key: SecretStr | None = Field(
        default=None,
        description="Secret access key belonging to the access key id.",
    )

    def open(self) -> S3ObjectStorage:
        """The storage this block describes."""
        return S3ObjectStorage(
            self.bucket,
            self.prefix,
            endpoint_url=self.endpoint_url or None,
            region=self.region or None,
            access_key_id=self.access_key_id or None,
            secret_access_key=(
                self.secret_access_key.get_secret_value() if self.secret_access_key else None
            ),
        )

    def check(self) -> None:
        """Write, read back and delete a probe object.

        Raises:
            StorageError: If the bucket cannot be used, with a one-line reason.
        """
        self.open().check_writable()


def storage_block_from_url(url: str) -> LocalStorage | S3Storage:
    """A storage block from a CLI argument.

    Accepted: ``/path``, ``file:///path``, ``s3://bucket/prefix`` or ``block:slug/name``.

    For S3 the endpoint comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, the
    region from ``AWS_REGION`` or ``AWS_DEFAULT_REGION``, and credentials from the standard
    AWS chain when the storage is opened (environment, profiles, instance roles), so no
    secret is copied into the block. ``block:`` loads a saved block from the Prefect API.

    Raises:
        ConfigError: If the URL is empty, uses another scheme or names an unusable block.
    """
    text = url.strip()
    if text.startswith("block:"):
        return _load_storage_block(text.removeprefix("block:"))
    parsed = parse_storage_url(text)
    if parsed.scheme == "s3":
        return S3Storage(
            bucket=parsed.location,
            prefix=parsed.prefix,
            endpoint_url=parsed.endpoint_url,
            region=parsed.region,
        )
    return LocalStorage(folder=parsed.location)


def _load_storage_block(reference: str) -> LocalStorage | S3Storage:
    slug, _, name = reference.partition("/")
    kinds: dict[str, type[LocalStorage] | type[S3Storage]] = {
        LocalStorage.get_block_type_slug(): LocalStorage,
        S3Storage.get_block_type_slug(): S3Storage,
    }
    if slug not in kinds or not name:
        raise ConfigError(
            f"storage block:{reference} is not a storage block reference: use "
            f"block:{LocalStorage.get_block_type_slug()}/NAME or "
            f"block:{S3Storage.get_block_type_slug()}/NAME"
        )
    try:
        block = kinds[slug].load(name)
    except ValueError as exc:
        raise ConfigError(
            f"storage block:{reference} cannot be loaded ({str(exc).splitlines()[0]}): create it "
            "in the Prefect UI or with Block.save()"
        ) from None
    assert isinstance(block, LocalStorage | S3Storage)
    return block
