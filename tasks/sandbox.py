"""Throwaway PostgreSQL servers to restore backups into, for verification.

One interface, two implementations: a Docker container of the matching major (the default,
as in production) and a local ephemeral cluster (hosts without Docker). Both are tuned for a
disposable restore (no fsync, minimal WAL) and destroyed with everything in them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.errors import ConfigError, PgBackflowError, StorageError
from pgbackflow.tasks.logical import HostPgRestore
from pgbackflow.tasks.process import ToolResult
from pgbackflow.tasks.toolsets import find_toolset

logger = logging.getLogger("pgbackflow.sandbox")

#: Server settings for a restore whose result is thrown away.
THROWAWAY_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "summarize_wal": "off",
    "autovacuum": "off",
}

#: pg_restore flags every sandbox restore uses: a sandbox has no tablespaces.
RESTORE_ARGS = ("--no-tablespaces",)
SANDBOX_LABEL = "pgbackflow.sandbox"
DEFAULT_IMAGE_TEMPLATE = "postgres:{major}"


#: Where sandboxes keep their work dirs (default: the system's temporary folder). A process in
#: a container that starts Docker sandboxes on the host's engine sets it to a host folder
#: mounted at the same path: the sandbox's bind mounts name host paths (docker/compose.yaml).
SANDBOX_DIR_ENV = "PGBACKFLOW_SANDBOX_DIR"


def sandbox_parent_dir() -> str | None:
    """The folder of ``PGBACKFLOW_SANDBOX_DIR``, or None for the system's temporary folder."""
    folder = os.environ.get(SANDBOX_DIR_ENV)
    if not folder:
        return None
    if not Path(folder).is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{SANDBOX_DIR_ENV}={folder} is not a writable folder: create it for this user, "
            "or unset it to use the temporary folder"
        )
    return folder


class SandboxError(PgBackflowError):
    """A sandbox could not be started or used."""


@dataclass(frozen=True)
class SandboxResources:
    """What one sandbox may use.

    Attributes:
        cpus: CPU cores (Docker ``nano_cpus``; pg_restore ``-j``).
        memory_mb: Memory limit in MB.
        pids: Process limit.
    """

    cpus: float = 1.0
    memory_mb: int = 1024
    pids: int = 512

    @property
    def restore_jobs(self) -> int:
        """Parallel pg_restore jobs: one per CPU given."""
        return max(1, int(self.cpus))


def _settings_for(major: int) -> dict[str, str]:
    # summarize_wal exists from 17 on; older servers refuse unknown settings.
    return {k: v for k, v in THROWAWAY_SETTINGS.items() if k != "summarize_wal" or major >= 17}


class Sandbox(ABC):
    """A throwaway PostgreSQL server of one major.

    Use as a context manager: leaving the block destroys the server and its data, also on
    errors and cancellation.
    """

    kind: str = "sandbox"

    def __init__(self, major: int, resources: SandboxResources) -> None:
        self.major = major
        self.resources = resources
        # The pid in the name tells which process a leftover belonged to.
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"pgbackflow-verify-{major}-{os.getpid()}-",
                                              dir=sandbox_parent_dir()))

    @property
    def dump_dir(self) -> Path:
        """Where the decrypted dump is spooled for the sandbox's pg_restore."""
        return self.work_dir

    @abstractmethod
    def start(self) -> None:
        """Start the server and wait until it accepts connections."""

    @abstractmethod
    def _destroy_server(self) -> None:
        """Stop and remove the server and its data."""

    @property
    @abstractmethod
    def settings(self) -> ConnectionSettings:
        """How the host connects to the sandbox as superuser (database ``postgres``)."""

    @abstractmethod
    def pg_restore(
        self, dbname: str, args: Sequence[str], dump: Path | Iterable[bytes]
    ) -> ToolResult:
        """The sandbox's own pg_restore into ``dbname`` (a :class:`PgRestoreRunner`);
        a Docker sandbox reads only a file spooled in ``dump_dir``."""

    @property
    @abstractmethod
    def description(self) -> str:
        """What the sandbox is, for reports."""

    def destroy(self) -> None:
        """Remove the server and every byte it held; safe to call twice."""
        try:
            self._destroy_server()
        finally:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


class LocalSandbox(Sandbox):
    """An ephemeral cluster from the matching major's binaries on this host."""

    kind = "local"

    def __init__(self, major: int, resources: SandboxResources | None = None) -> None:
        super().__init__(major, resources or SandboxResources())
        self._toolset = find_toolset(major)
        self._cluster = EphemeralCluster(self._toolset, settings=_settings_for(major))

    def start(self) -> None:
        """Start the cluster."""
        self._cluster.start()

    def _destroy_server(self) -> None:
        self._cluster.stop()

    @property
    def settings(self) -> ConnectionSettings:
        """Loopback TCP with the cluster's random superuser password."""
        return ConnectionSettings(
            host=self._cluster.host, port=self._cluster.port, dbname="postgres",
            user=self._cluster.superuser, password=self._cluster.password, sslmode="disable",
        )

    def pg_restore(
        self, dbname: str, args: Sequence[str], dump: Path | Iterable[bytes]
    ) -> ToolResult:
        """The toolset's pg_restore, over loopback with a passfile."""
        return HostPgRestore(self._toolset, self.settings).pg_restore(dbname, args, dump)

    @property
    def description(self) -> str:
        """Local PostgreSQL and where it listens."""
        return f"local PostgreSQL {self._toolset.version} on 127.0.0.1:{self._cluster.port}"


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path``."""
    return shutil.disk_usage(path).free


def require_free_disk(
    what: str, needed: int, where: Path, budget_bytes: int | None, *, advice: str
) -> None:
    """Refuse ``what`` ("verifying backup X") before it writes anything when it needs more
    than the agent's disk budget, or more than ``where`` has free (``advice`` says how)."""
    if budget_bytes is not None and needed > budget_bytes:
        raise StorageError(
            f"{what} needs {needed / 1e9:.1f} GB of disk, more than the agent's disk budget "
            f"of {budget_bytes / 1e9:.1f} GB: raise --max-disk-gb"
        )
    free = free_disk_bytes(where)
    if free < needed:
        raise StorageError(
            f"not enough free disk in {where} for {what}: {free / 1e9:.1f} GB free, "
            f"{needed / 1e9:.1f} GB needed: {advice}"
        )


def sandbox_for(kind: str, major: int, resources: SandboxResources,
                image_template: str = DEFAULT_IMAGE_TEMPLATE) -> Sandbox:
    """The sandbox named by ``kind`` ("docker" or "local")."""
    if kind == "local":
        return LocalSandbox(major, resources)
    if kind == "docker":
        from pgbackflow.tasks.docker_sandbox import DockerSandbox

        sandbox: Sandbox = DockerSandbox(major, resources, image_template=image_template)
        return sandbox
    raise ConfigError(f"sandbox '{kind}' is unknown: use docker or local")
