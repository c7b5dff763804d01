"""The storage blocks: Prefect's standard block checks, opening them, keeping secrets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.blocks.core import Block
from pydantic import SecretStr

from pgbackflow.blocks.storage import LocalStorage, S3Storage
from pgbackflow.tasks.errors import StorageError
from pgbackflow.tasks.storage import LocalFolderStorage, S3ObjectStorage
from tests.fixtures.prefect import BlockStandards
from tests.fixtures.s3 import S3Bucket

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


class TestLocalStorageBlock(BlockStandards):
    @pytest.fixture
    def block(self) -> type[Block]:
        return LocalStorage


class TestS3StorageBlock(BlockStandards):
    @pytest.fixture
    def block(self) -> type[Block]:
        return S3Storage


def test_block_type_slugs() -> None:
    assert LocalStorage.get_block_type_slug() == "pgbackflow-local-storage"
    assert S3Storage.get_block_type_slug() == "pgbackflow-s3-storage"
    assert LocalStorage.get_block_type_name() == "pgbackflow Local Storage"
    assert S3Storage.get_block_type_name() == "pgbackflow S3 Storage"


def test_local_block_opens_and_checks(tmp_path: Path) -> None:
    block = LocalStorage(folder=str(tmp_path / "backups"))
    storage = block.open()
    assert isinstance(storage, LocalFolderStorage)
    assert storage.folder == tmp_path / "backups"
    block.check()
    storage.write_bytes("x", b"y")
    assert LocalStorage(folder=str(tmp_path / "backups")).open().read_bytes("x") == b"y"


def test_local_block_check_reports_unusable_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="is not writable"):
        LocalStorage(folder=str(tmp_path / "file")).check()


def test_s3_block_opens_against_the_server(s3_bucket: S3Bucket) -> None:
    block = S3Storage(
        bucket=s3_bucket.bucket,
        prefix="prod",
        endpoint_url=s3_bucket.endpoint_url,
        region=s3_bucket.region,
        access_key_id=s3_bucket.access_key_id,
        secret_access_key=SecretStr(s3_bucket.secret_access_key),
    )
    block.check()
    storage = block.open()
    assert isinstance(storage, S3ObjectStorage)
    assert storage.location == f"s3://{s3_bucket.bucket}/prod"
    storage.write_bytes("dumps/a", b"payload")
    assert [obj.key for obj in storage.list()] == ["dumps/a"]
    stored = s3_bucket.client().get_object(Bucket=s3_bucket.bucket, Key="prod/dumps/a")
    assert stored["Body"].read() == b"payload"


def test_s3_block_check_reports_missing_bucket(s3_bucket: S3Bucket) -> None:
    block = S3Storage(bucket="absent-bucket", endpoint_url=s3_bucket.endpoint_url)
    with pytest.raises(StorageError, match="S3 bucket 'absent-bucket' does not exist at http"):
        block.check()


def test_s3_block_never_shows_the_secret(s3_bucket: S3Bucket) -> None:
    block = S3Storage(
        bucket=s3_bucket.bucket,
        endpoint_url=s3_bucket.endpoint_url,
        access_key_id="AKIAEXAMPLE",
        secret_access_key=SecretStr(SECRET),
    )
    shown = [
        repr(block),
        str(block),
        repr(block.model_dump()),
        json.dumps(block.model_dump(mode="json")),
        block.model_dump_json(),
        repr(block.open()),
        str(block.open().__dict__),
    ]
    for text in shown:
        assert SECRET not in text
    assert "AKIAEXAMPLE" in str(block)
    # The secret is still there for whoever asks for it explicitly.
    assert block.secret_access_key is not None
    assert block.secret_access_key.get_secret_value() == SECRET


def test_s3_block_accepts_plain_string_secret() -> None:
    block = S3Storage.model_validate({"bucket": "b", "secret_access_key": SECRET})
    assert isinstance(block.secret_access_key, SecretStr)
    assert SECRET not in repr(block)
