"""A PostgreSQL database to back up or restore into, as a Prefect block."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, Literal

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr

from pgbackflow.tasks.database import ConnectionSettings, ServerInfo, check_connection, parse_dsn
from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.tunnel import SshBastion, open_tunnel

#: Ids pgbackflow writes into storage keys and tags: no '/', no '..', at most 100 characters.
DB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


def checked_db_id(db_id: str, what: str = "db_id") -> str:
    """``db_id`` if it is a valid id, else a one-line ConfigError naming ``what``."""
    if not re.fullmatch(DB_ID_PATTERN, db_id):
        raise ConfigError(
            f"{what} {db_id!r} is invalid: use up to 100 letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return db_id


class PostgresDatabase(Block):
    """Connection details of one PostgreSQL database.

    Attributes:
        host: Host name or IP address of the server.
        port: TCP port the server listens on.
        database: Name of the database.
        user: Role to connect as.
        password: Password of that role.
        sslmode: libpq sslmode (disable, allow, prefer, require, verify-ca, verify-full).
        db_id: Stable id of this database in pgbackflow (its backups' folder in storage, its
            deployments and run tags). Empty: derived from the server's system identifier and
            the database name once connected.
        ssh_host: An SSH bastion every connection goes through (closed networks); ``host``
            and ``port`` are then as the bastion sees the server. Empty: direct connections.
        ssh_port: The bastion's SSH port.
        ssh_user: Login on the bastion (port forwarding only; no shell needed).
        ssh_private_key: That login's private key (no passphrase).
        ssh_host_key: The bastion's public host key(s), as ``ssh-keyscan`` prints them: any
            other key is refused.

    Example:
        ```python
        from pgbackflow.blocks.database import PostgresDatabase

        postgres_database = PostgresDatabase.load("BLOCK_NAME")
        info = postgres_database.check()
        ```
    """

    _block_type_name: ClassVar[str] = "pgbackflow PostgreSQL Database"
    _block_type_slug: ClassVar[str] = "pgbackflow-postgres-database"
    _description: ClassVar[str] = (
        "Connection details of a PostgreSQL database that pgbackflow backs up or restores into."
    )
    _documentation_url: ClassVar[HttpUrl] = HttpUrl(
        "https://github.com/pgbackflow/pgbackflow/blob/main/docs/BLOCKS.md"
    )
    _code_example: ClassVar[str] = """
```python
from pgbackflow.blocks.database import PostgresDatabase

postgres_database = PostgresDatabase.load("BLOCK_NAME")
info = postgres_database.check()
```
"""

    host: str = Field(description="Host name or IP address of the PostgreSQL server.")
    port: int = Field(default=5432, ge=1, le=65535, description="TCP port of the server.")
    database: str = Field(default="postgres", description="Name of the database.")
    user: str = Field(default="postgres", description="Role to connect as.")
    password: SecretStr | None = Field(default=None, description="Password of the role.")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        default="prefer", description="libpq sslmode for the connection."
    )
    db_id: str | None = Field(
        default=None,
        pattern=DB_ID_PATTERN,
        description=(
            "Stable id of this database in pgbackflow: names its backups, deployments and run "
            "tags. Empty: derived from the server's identity once connected."
        ),
    )

    ssh_host: str | None = Field(
        default=None,
        description=(
            "SSH bastion every connection goes through (closed networks); host and port are "
            "then as the bastion sees the server. Empty: connect directly."
        ),
    )
    ssh_port: int = Field(default=22, ge=1, le=65535, description="SSH port of the bastion.")
    ssh_user: str | None = Field(default=None, description="Login on the bastion.")
    ssh_private_key: SecretStr | None = Field(
        default=None, description="Private key of that login (OpenSSH or PEM, no passphrase)."
    )
    ssh_host_key: str | None = Field(
        default=None,
        description=(
            "The bastion's public host key(s), one per line as ssh-keyscan prints them; any "
            "other key is refused."
        ),
    )

    @classmethod
    def from_dsn(cls, dsn: str) -> PostgresDatabase:
        """Build the block from a libpq URI or key=value DSN."""
        settings = parse_dsn(dsn)
        return cls(
            host=settings.host,
            port=settings.port,
            database=settings.dbname,
            user=settings.user,
            password=None if settings.password is None else SecretStr(settings.password),
            sslmode=settings.sslmode,
        )

    def settings(self) -> ConnectionSettings:
        """Plain connection settings for the tasks that connect.

        Raises:
            ConfigError: the block names an SSH bastion: connect through
                :meth:`connection_settings`, which opens the tunnel.
        """
        if self.ssh_host:
            raise ConfigError(
                f"database {self.host}:{self.port}/{self.database} is reached through ssh "
                f"bastion {self.ssh_host}: open it with connection_settings()"
            )
        return self._direct_settings()

    def bastion(self) -> SshBastion | None:
        """The SSH bastion the database is reached through, if any.

        Raises:
            ConfigError: ``ssh_host`` is set but the user or the private key is missing.
        """
        if not self.ssh_host:
            return None
        if not self.ssh_user or self.ssh_private_key is None:
            raise ConfigError(
                f"ssh bastion {self.ssh_host} of database {self.host}:{self.port}: give "
                "ssh_user and ssh_private_key too"
            )
        return SshBastion(
            host=self.ssh_host, port=self.ssh_port, user=self.ssh_user,
            private_key=self.ssh_private_key.get_secret_value(),
            host_key=self.ssh_host_key or "",
        )

    @contextmanager
    def connection_settings(self) -> Iterator[ConnectionSettings]:
        """Settings to connect with, through the SSH bastion's tunnel when there is one.

        The tunnel is open until the block exits (see tasks/tunnel.py).
        """
        bastion = self.bastion()
        if bastion is None:
            yield self._direct_settings()
            return
        with open_tunnel(self._direct_settings(), bastion) as settings:
            yield settings

    def _direct_settings(self) -> ConnectionSettings:
        return ConnectionSettings(
            host=self.host,
            port=self.port,
            dbname=self.database,
            user=self.user,
            password=None if self.password is None else self.password.get_secret_value(),
            sslmode=self.sslmode,
        )

    def check(self) -> ServerInfo:
        """Connection test: connects and returns the server version and role powers.

        Raises:
            DatabaseError: with a one-line reason (wrong password, unreachable, ...).
        """
        with self.connection_settings() as settings:
            return check_connection(settings)
