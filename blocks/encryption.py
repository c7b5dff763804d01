"""The master encryption key as a Prefect block."""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr, field_validator

from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.keys import Keyring, MasterKey


class BackupEncryptionKey(Block):
    """The master key that wraps every backup's data key (AES-256-GCM).

    Attributes:
        key: The current master key, ``pgbackflow-key-v1:<base64>``; new backups use it.
        retired_keys: Earlier master keys, kept so backups made before a rotation still decrypt.

    Example:
        ```python
        from pgbackflow.blocks.encryption import BackupEncryptionKey

        encryption_key = BackupEncryptionKey.load("BLOCK_NAME")
        keyring = encryption_key.keyring()
        ```
    """

    _block_type_name: ClassVar[str] = "pgbackflow Encryption Key"
    _block_type_slug: ClassVar[str] = "pgbackflow-encryption-key"
    _description: ClassVar[str] = (
        "Master key that encrypts pgbackflow backups. Keep a copy outside Prefect: without it "
        "no backup can be decrypted."
    )
    _documentation_url: ClassVar[HttpUrl] = HttpUrl(
        "https://github.com/pgbackflow/pgbackflow/blob/main/docs/FORMAT.md"
    )
    _code_example: ClassVar[str] = """
```python
from pgbackflow.blocks.encryption import BackupEncryptionKey

encryption_key = BackupEncryptionKey.load("BLOCK_NAME")
keyring = encryption_key.keyring()
```
"""

    key: SecretStr = Field(
        description="Current master key as written in a key file: pgbackflow-key-v1:<base64>.",
    )
    retired_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Earlier master keys, still accepted for decryption after a rotation.",
    )

    @field_validator("key")
    @classmethod
    def _key_is_valid(cls, value: SecretStr) -> SecretStr:
        try:
            MasterKey.from_text(value.get_secret_value(), source="encryption key block")
        except ConfigError as exc:
            # pydantic reports ValueErrors as validation errors of the field.
            raise ValueError(str(exc)) from None
        return value

    @classmethod
    def generate(cls) -> BackupEncryptionKey:
        """A block holding a freshly generated master key."""
        return cls(key=SecretStr(MasterKey.generate().to_text()))

    def master_key(self) -> MasterKey:
        """The key new backups are encrypted with."""
        return MasterKey.from_text(self.key.get_secret_value(), source="encryption key block")

    def keyring(self) -> Keyring:
        """All keys, current first: what readers may decrypt with."""
        retired = [
            MasterKey.from_text(k.get_secret_value(), source="encryption key block (retired key)")
            for k in self.retired_keys
        ]
        return Keyring([self.master_key(), *retired])
