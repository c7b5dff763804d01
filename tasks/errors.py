"""Errors meant for the person running pgbackflow.

Every message is one line that names the input, says what is wrong and what to do.
``transient`` tells Prefect tasks whether a retry can help.
"""

from __future__ import annotations


class PgBackflowError(Exception):
    """Base class: a one-line, user-facing error."""

    transient: bool = False


class ConfigError(PgBackflowError):
    """A setting or argument is missing or malformed."""


class ToolsetError(PgBackflowError):
    """PostgreSQL client/server binaries of a needed major version are unavailable."""


class StorageError(PgBackflowError):
    """A storage backend refused or failed an operation."""


class TransientStorageError(StorageError):
    """A storage failure that may pass (timeouts, 5xx, connection resets)."""

    transient = True


class ObjectNotFoundError(StorageError):
    """The named object does not exist in the storage."""


class DatabaseError(PgBackflowError):
    """A PostgreSQL server refused or failed a request."""


class TransientDatabaseError(DatabaseError):
    """A database failure that may pass (connection refused, server starting up)."""

    transient = True
