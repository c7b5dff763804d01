"""Test configuration: real engines, one of each per session.

Fixtures live in tests/fixtures/ by concern (PostgreSQL servers, S3, Prefect).
"""

from __future__ import annotations

import os

import pytest

# No network beyond loopback: keep Prefect from phoning home.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The CLI's warm daemon (pgbackflow/launcher.py) is tested in tests/test_daemon.py. By
# default here each `pgbackflow` command runs in its own process, as the kill -9 and fault
# tests assume. Commands run through PrefectServer.run_cli or in `as_users_run_it`'s
# environment (tests/fixtures/prefect_server.py) go through warm daemons, as users' do by
# default (a command costs ~1.4 CPU-s of imports in its own process); workers the tests
# start (PrefectServer.start_worker) run deployments through the flow-run daemon, as in
# production. Those daemons live in runtime directories of the server or the session,
# stopped with them: no test leaves a daemon behind.
os.environ.setdefault("PGBACKFLOW_DAEMON", "off")

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.s3",
    "tests.fixtures.prefect",
    "tests.fixtures.prefect_server",
    "tests.fixtures.docker",
    "tests.fixtures.mounts",
    "tests.fixtures.wal_site",
    "tests.fixtures.parallel",
]

#: Left out of the fast tier (``pytest -m "not slow" --pg-majors 17``, README): modules whose
#: tests take minutes (real Prefect servers and workers, automations waiting for deadlines,
#: kill -9 mid-transfer, every CLI subprocess paying Prefect's import, Docker images).
SLOW_MODULES = frozenset({
    "test_operate.py", "test_wal_operate.py", "test_wal_timed_restarts.py",
    "test_cli_heartbeats.py", "test_faults.py",
    "test_demo.py", "test_bad_inputs.py", "test_physical_faults.py", "test_pitr_docker.py",
    "test_docker_images.py", "test_verification_triggers.py", "test_physical_deployments.py",
    "test_leftovers.py", "test_backup_failures.py", "test_hostile_manifests.py",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)

