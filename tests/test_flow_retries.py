"""Prefect retries: transient errors are retried, permanent ones fail at once."""

from __future__ import annotations

import socket
from typing import Any
from uuid import UUID

import pytest
from prefect import flow
from prefect.context import get_run_context

from pgbackflow.flows.logical_backup import inspect_source
from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.errors import DatabaseError, TransientDatabaseError
from tests.fixtures.prefect import settled_task_runs

pytestmark = pytest.mark.usefixtures("prefect_api")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_inspect(settings: ConnectionSettings) -> tuple[BaseException, UUID]:
    fast = inspect_source.with_options(retry_delay_seconds=0)
    seen: dict[str, Any] = {}

    @flow
    def probe() -> None:
        seen["flow_run_id"] = get_run_context().flow_run.id  # type: ignore[union-attr]
        fast(settings)

    with pytest.raises(DatabaseError) as excinfo:
        probe()
    return excinfo.value, seen["flow_run_id"]


def task_run_counts(flow_run_id: UUID) -> list[int]:
    return [run.run_count for run in settled_task_runs(flow_run_id)]


def test_connection_refused_is_retried() -> None:
    error, flow_run_id = run_inspect(
        ConnectionSettings(host="127.0.0.1", port=closed_port(), sslmode="disable")
    )
    assert isinstance(error, TransientDatabaseError)
    assert inspect_source.retries == 3
    assert task_run_counts(flow_run_id) == [1 + inspect_source.retries]


def test_wrong_password_is_not_retried(pg_servers: Any) -> None:
    server = pg_servers.get(17)
    error, flow_run_id = run_inspect(ConnectionSettings(
        host=server.host, port=server.port, user=server.superuser, password="nope",
        sslmode="disable",
    ))
    assert not isinstance(error, TransientDatabaseError)
    assert task_run_counts(flow_run_id) == [1]
