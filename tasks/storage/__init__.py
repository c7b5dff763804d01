"""Backup object storage: one streaming interface, a local-folder and an S3 backend.

- `base`: the `Storage` interface, `ObjectWriter` (atomic publish), `StoredObject`, key checks
  and the constants every backend shares (the interface's contract is in its docstring);
- `local`: `LocalFolderStorage` (temporary file, fsync, rename) and its writer;
- `s3`: `S3ObjectStorage` (multipart upload, part sizes), its writer and reader, and the fast
  parser of listing pages;
- `url`: `StorageURL` and `parse_storage_url` (a storage argument to a storage);
- `sweep`: before a backup, folder checks and the sweep of killed writers' leftovers.
"""

from pgbackflow.tasks.storage.base import INCOMPLETE_DIR, ObjectWriter, Storage, StoredObject
from pgbackflow.tasks.storage.local import LocalFolderStorage
from pgbackflow.tasks.storage.s3 import (
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    S3ObjectStorage,
    multipart_part_size,
)
from pgbackflow.tasks.storage.sweep import (
    DEFAULT_SWEEP_GRACE,
    SWEEP_GRACE_ENV,
    SweepReport,
    prepare_backup_storages,
    sweep_grace,
)
from pgbackflow.tasks.storage.url import StorageURL, parse_storage_url

__all__ = [
    "DEFAULT_SWEEP_GRACE",
    "INCOMPLETE_DIR",
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "SWEEP_GRACE_ENV",
    "LocalFolderStorage",
    "ObjectWriter",
    "S3ObjectStorage",
    "Storage",
    "StorageURL",
    "StoredObject",
    "SweepReport",
    "multipart_part_size",
    "parse_storage_url",
    "prepare_backup_storages",
    "sweep_grace",
]
