"""The one import of the Docker SDK and the one way to get a client of the local engine.

Imported only by the modules that run containers (tasks/pitr_docker.py,
tasks/docker_sandbox.py), never by the restore core: importing the SDK (requests, urllib3, …)
costs start-up time and memory that a process without containers should not pay.
"""

from __future__ import annotations

import importlib
from typing import Any

from pgbackflow.tasks.errors import ConfigError

# The SDK is untyped, and mypy would resolve "docker" to this repository's docker/ folder
# (image build scripts); at run time the installed package wins.
docker: Any = importlib.import_module("docker")
importlib.import_module("docker.errors")
DockerClient = Any


def docker_client(instead: str) -> DockerClient:
    """A client for the local engine; without one, a one-line error that says to start it
    or to do ``instead`` (e.g. "verify with --sandbox local")."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise ConfigError(
            f"no Docker engine reachable ({str(exc).splitlines()[0][:160]}): start Docker, "
            f"or {instead}"
        ) from None
    return client


__all__ = ["DockerClient", "docker", "docker_client"]
