"""Test configuration: real engines, one of each per session.

Fixtures live in tests/fixtures/ by concern (PostgreSQL servers, S3, Prefect).
"""

from __future__ import annotations

import os

# No network beyond loopback: keep Prefect from phoning home.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.s3",
    "tests.fixtures.prefect",
    "tests.fixtures.prefect_server",
    "tests.fixtures.docker",
    "tests.fixtures.mounts",
]
