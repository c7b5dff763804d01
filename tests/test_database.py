"""PostgresDatabase block and connection helpers against real servers."""

from __future__ import annotations

import socket

import pytest
from pydantic import SecretStr

from pgbackflow.blocks import PostgresDatabase
from pgbackflow.tasks.database import parse_dsn
from pgbackflow.tasks.errors import ConfigError, DatabaseError, TransientDatabaseError


def block_for(server: object, **overrides: object) -> PostgresDatabase:
    fields: dict[str, object] = {
        "host": server.host,  # type: ignore[attr-defined]
        "port": server.port,  # type: ignore[attr-defined]
        "database": "postgres",
        "user": server.superuser,  # type: ignore[attr-defined]
        "password": SecretStr(server.password),  # type: ignore[attr-defined]
        "sslmode": "disable",
    }
    fields.update(overrides)
    return PostgresDatabase(**fields)  # type: ignore[arg-type]


def test_check_reads_the_server_version(pg_server: object) -> None:
    info = block_for(pg_server).check()
    assert info.major == pg_server.major  # type: ignore[attr-defined]
    assert info.is_superuser and info.can_replicate


def test_wrong_password_is_permanent_and_clear(pg_server: object) -> None:
    with pytest.raises(DatabaseError) as excinfo:
        block_for(pg_server, password=SecretStr("definitely-wrong-canary")).check()
    assert not isinstance(excinfo.value, TransientDatabaseError)
    message = str(excinfo.value)
    assert "password authentication failed" in message and "check the password" in message
    assert "definitely-wrong-canary" not in message
    assert "\n" not in message


def test_missing_database(pg_server: object) -> None:
    with pytest.raises(DatabaseError, match="database 'no_such_db' does not exist"):
        block_for(pg_server, database="no_such_db").check()


def test_refused_port_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    block = PostgresDatabase(host="127.0.0.1", port=free_port, sslmode="disable")
    with pytest.raises(TransientDatabaseError, match="connection refused"):
        block.check()


def test_dsn_parsing() -> None:
    settings = parse_dsn("postgresql://alice:s3cret@db.internal:6432/shop?sslmode=require")
    assert (settings.host, settings.port, settings.dbname, settings.user) == (
        "db.internal", 6432, "shop", "alice")
    assert settings.password == "s3cret" and "s3cret" not in repr(settings)
    assert parse_dsn("host=h dbname=d user=u").port == 5432
    block = PostgresDatabase.from_dsn("host=h port=5433 dbname=d user=u password=pw")
    assert block.password is not None and block.password.get_secret_value() == "pw"


@pytest.mark.parametrize(
    "dsn", ["postgresql://u:canary-pw@host:notaport/db", "host=h port=abc", "dbname=x user=y",
            "this is not a dsn"],
)
def test_malformed_dsn_is_a_one_line_config_error(dsn: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_dsn(dsn)
    assert "\n" not in str(excinfo.value)
    assert "canary-pw" not in str(excinfo.value)
