"""Blocks: Prefect's standard suite, registration on a real Prefect API, secrets kept secret."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from prefect.blocks.core import Block
from pydantic import SecretStr

from pgbackflow.blocks import (
    BackupEncryptionKey,
    LocalStorage,
    PostgresDatabase,
    S3Storage,
    SmtpEmail,
)
from pgbackflow.tasks.keys import MasterKey
from tests.fixtures.prefect import BlockStandards

ALL_BLOCKS: list[type[Block]] = [BackupEncryptionKey, LocalStorage, PostgresDatabase, S3Storage,
                                 SmtpEmail]


class TestBackupEncryptionKeyStandards(BlockStandards):
    @pytest.fixture
    def block(self) -> type[Block]:
        return BackupEncryptionKey


class TestPostgresDatabaseStandards(BlockStandards):
    @pytest.fixture
    def block(self) -> type[Block]:
        return PostgresDatabase


class TestSmtpEmailStandards(BlockStandards):
    @pytest.fixture
    def block(self) -> type[Block]:
        return SmtpEmail


def test_encryption_key_block_rejects_a_bad_key() -> None:
    with pytest.raises(ValueError, match="not valid base64"):
        BackupEncryptionKey(key=SecretStr("pgbackflow-key-v1:!!!"))


def test_encryption_key_block_keyring_holds_retired_keys() -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    block = BackupEncryptionKey(
        key=SecretStr(new.to_text()), retired_keys=[SecretStr(old.to_text())]
    )
    ring = block.keyring()
    assert ring.current == new
    assert ring.find(old.key_id) == old
    assert new.to_text() not in repr(block) and new.to_text() not in str(block.model_dump())


def test_blocks_round_trip_through_the_prefect_api(prefect_api: str) -> None:
    key = MasterKey.generate()
    samples: list[Block] = [
        BackupEncryptionKey(key=SecretStr(key.to_text())),
        PostgresDatabase(host="db.example", port=6543, database="shop", user="backup",
                         password=SecretStr("canary-pw-1")),
        LocalStorage(folder="/var/backups/pg"),
        S3Storage(bucket="b", prefix="p", endpoint_url="http://127.0.0.1:9000",
                  access_key_id="AKIA", secret_access_key=SecretStr("canary-sk-2")),
    ]
    for index, block in enumerate(samples):
        name = f"roundtrip-{index}"
        block.save(name, overwrite=True)
        loaded = type(block).load(name)
        assert loaded.model_dump() == block.model_dump()
    loaded_key = BackupEncryptionKey.load("roundtrip-0")
    assert loaded_key.master_key() == key
    assert PostgresDatabase.load("roundtrip-1").settings().password == "canary-pw-1"


def test_block_register_makes_block_types_visible(prefect_api: str) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "blocks"],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for block in ALL_BLOCKS:
            slug = block.get_block_type_slug()
            block_type = client.read_block_type_by_slug(slug)
            assert block_type.name == block.get_block_type_name()
            schema = client.get_most_recent_block_schema_for_block_type(block_type.id)
            assert schema is not None
            fields: dict[str, Any] = schema.fields
            assert set(block.model_fields) <= set(fields["properties"]), slug
    secret_fields = {
        BackupEncryptionKey: {"key", "retired_keys"},
        PostgresDatabase: {"password"},
        S3Storage: {"secret_access_key"},
        SmtpEmail: {"password"},
    }
    for block, expected in secret_fields.items():
        declared = set(block.model_json_schema()["secret_fields"])
        assert {name.split(".")[0] for name in declared} >= expected, block
