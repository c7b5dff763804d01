"""Prefect blocks of pgbackflow: credentials and configuration, one block per concern.

``prefect block register -m blocks`` registers every block type listed here.
"""

from pgbackflow.blocks.database import PostgresDatabase
from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.blocks.notifications import SmtpEmail
from pgbackflow.blocks.storage import LocalStorage, S3Storage

__all__ = ["BackupEncryptionKey", "LocalStorage", "PostgresDatabase", "S3Storage", "SmtpEmail"]
