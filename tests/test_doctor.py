"""``pgbackflow doctor`` and the checks at ``pgbackflow deploy`` against real Prefect servers.

Two real ``prefect server start`` processes of this module: the embedded default (SQLite, no
authentication, no encryption key), and one set up for production (basic auth, an
encryption key, PostgreSQL as its database). The doctor runs the way an operator runs it,
with the server's environment.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from psycopg import sql

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.keys import MasterKey, write_key_file
from pgbackflow.tasks.toolsets import find_toolset
from tests.fixtures.prefect_server import PrefectServer, running_prefect_server

pytestmark = [pytest.mark.pg, pytest.mark.xdist_group("doctor")]

AUTH = "admin:doctor-canary-pass"


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrefectServer,
                                                                          dict[str, str]]]:
    """A Prefect server on PostgreSQL with basic auth and an encryption key; its environment."""
    cluster = EphemeralCluster(find_toolset(17), settings={"fsync": "off"}).start()
    try:
        with cluster.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE prefect"))
        server_env = {
            "PREFECT_SERVER_API_AUTH_STRING": AUTH,
            "PREFECT_SERVER_ENCRYPTION_KEY": Fernet.generate_key().decode(),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
                f"postgresql+asyncpg://{cluster.superuser}:{cluster.password}@127.0.0.1:"
                f"{cluster.port}/prefect"),
        }
        home = tmp_path_factory.mktemp("prefect-production-home")
        with running_prefect_server(home, server_env) as server:
            yield server, {**server_env, "PREFECT_API_AUTH_STRING": AUTH}
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def embedded_default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """``prefect server start`` as installed: SQLite, no authentication, no encryption key."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-default-home")) as server:
        yield server


def test_the_embedded_default_gets_three_warnings(embedded_default: PrefectServer) -> None:
    prefect_server = embedded_default
    result = prefect_server.run_cli("doctor", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"warning: the Prefect API at {prefect_server.api_url} answers "
                               "without authentication")
    assert "PREFECT_SERVER_API_AUTH_STRING=user:password" in lines[0]
    assert lines[1].startswith("warning: PREFECT_SERVER_ENCRYPTION_KEY is not set in this "
                               "environment")
    assert lines[2].startswith("warning: the Prefect server's database is SQLite")
    assert result.stderr == ""

    as_json = json.loads(prefect_server.run_cli("doctor", "--json", check=False).stdout)
    assert [(f["check"], f["level"]) for f in as_json] == [
        ("auth", "warning"), ("encryption-key", "warning"), ("database", "warning")]


def test_deploy_says_the_same_warnings(embedded_default: PrefectServer, tmp_path: Path) -> None:
    prefect_server = embedded_default
    write_key_file(tmp_path / "master.key", MasterKey.generate())
    (tmp_path / "store").mkdir()
    config = tmp_path / "pgbackflow.toml"
    config.write_text(textwrap.dedent(f"""
        [key]
        file = "{tmp_path / 'master.key'}"
        [storages.local]
        url = "{tmp_path / 'store'}"
        [servers.pg]
        host = "127.0.0.1"
        [databases.doctorshop]
        server = "pg"
        storages = ["local"]
    """))
    result = prefect_server.run_cli("deploy", "--config", str(config), "--dry-run")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    starts = ("warning: the Prefect API at http://127.0.0.1:",
              "warning: PREFECT_SERVER_ENCRYPTION_KEY is not set",
              "warning: the Prefect server's database is SQLite")
    assert len(warnings) == 3 and all(map(str.startswith, warnings, starts)), result.stderr
    assert "not fit for the schedules of this config" in warnings[2]
    assert "+ deployment logical-backup/logical-doctorshop" in result.stdout


def test_a_production_server_passes(
    production: tuple[PrefectServer, dict[str, str]], tmp_path: Path
) -> None:
    server, env = production
    result = server.run_cli("doctor", env=env)
    assert result.stdout.splitlines() == [
        f"ok: the Prefect API at {server.api_url} requires authentication",
        "ok: PREFECT_SERVER_ENCRYPTION_KEY is set in this environment (the server's here)",
        "ok: the Prefect server's database is postgresql (its settings here)",
    ]
    # Without the credentials the server wants: one line saying what to set, exit 1.
    anonymous = {k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"}
    refused = server.run_cli("doctor", env=anonymous, check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"error: the Prefect API at {server.api_url} refuses this environment's credentials "
        "(HTTP 401): set PREFECT_API_AUTH_STRING to the server's user:password")
    wrong = server.run_cli("doctor", env={**env, "PREFECT_API_AUTH_STRING": "admin:nope"},
                           check=False)
    assert wrong.returncode == 1
    assert "PREFECT_API_AUTH_STRING does not match the server's auth string" in wrong.stderr
    assert "Traceback" not in refused.stderr + wrong.stderr
