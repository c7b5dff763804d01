"""The Docker sandbox: a ``postgres:<major>`` container with no network.

The host reaches the server only through a Unix socket in a bind-mounted directory; the dump
is handed over read-only in another bind mount and restored by the container's own
pg_restore (``docker exec``). The container runs as the image's ``postgres`` user with every
capability dropped, ``no-new-privileges``, and the job's CPU, memory and pids limits. Labels
mark it as ours, so a later run can sweep containers a crashed run left behind.

The image's entrypoint is bypassed: it starts as root (needs capabilities to chown and switch
users) and, for a fresh PGDATA, runs initdb, then a temporary server for its init scripts,
then stops it and starts the real one. A throwaway sandbox needs none of that: it runs
``initdb`` and ``postgres`` from the image's PATH on its PGDATA, as the official image's
contract provides them (binaries on PATH, a ``postgres`` user owning PGDATA or its parent).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psycopg

from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.docker_engine import DockerClient, docker, docker_client
from pgbackflow.tasks.process import ToolResult, pid_alive
from pgbackflow.tasks.sandbox import (
    DEFAULT_IMAGE_TEMPLATE,
    SANDBOX_LABEL,
    Sandbox,
    SandboxError,
    SandboxResources,
    _settings_for,
)

#: Boots the sandbox as the postgres user: a trust-only cluster (no network anyway), not
#: fsynced (thrown away), then the server with the settings passed as arguments.
BOOT_SCRIPT = (
    'initdb --pgdata="$PGDATA" --username=postgres --auth=trust --no-sync --no-instructions'
    ' >/dev/null && exec postgres "$@"'
)
#: Contents only: in the official images PGDATA (up to 17) is itself the volume mount point.
_DELETE_PGDATA = 'rm -rf -- "$PGDATA"/*'
SOCKET_DIR = "/var/run/postgresql"
RESTORE_DIR = "/restore"
READY_TIMEOUT_S = 120.0
# Set on the command line, so a server answering with it is the one we started.
_READY_MARK = ("listen_addresses", "localhost")


def sweep_leftover_sandboxes(client: DockerClient) -> list[str]:
    """Remove sandbox containers of this host whose owning process is gone.

    Returns:
        Names of the removed containers.
    """
    removed = []
    host = socket.gethostname()
    # Other agents' sandboxes come and go meanwhile: one removed between the listing and
    # its inspection (or our removal) is not an error.
    for container in client.containers.list(all=True, filters={"label": SANDBOX_LABEL},
                                            ignore_removed=True):
        labels = container.labels
        if labels.get("pgbackflow.host") != host:
            continue  # another agent's container: not ours to judge
        owner = int(labels.get("pgbackflow.pid", "0") or 0)
        if owner and pid_alive(owner):
            continue
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True, v=True)
            removed.append(container.name)
    return removed


class DockerSandbox(Sandbox):
    """A throwaway ``postgres:<major>`` container (image configurable by template).

    Args:
        major: PostgreSQL major of the backup.
        resources: CPU, memory and pids limits of the container.
        image_template: Image name with ``{major}``, e.g. ``registry/postgres:{major}``.
        labels: Extra labels (database id, flow run id) for operators and sweeps.
    """

    kind = "docker"

    def __init__(
        self,
        major: int,
        resources: SandboxResources | None = None,
        *,
        image_template: str = DEFAULT_IMAGE_TEMPLATE,
        labels: dict[str, str] | None = None,
    ) -> None:
        super().__init__(major, resources or SandboxResources())
        self.image = image_template.format(major=major)
        self._labels = labels or {}
        self._client: DockerClient | None = None
        self._container: Any = None
        self._socket_dir = self.work_dir / "socket"
        # Exists from the start: the dump is spooled here while the container starts.
        self._restore_dir = self.work_dir / "restore"
        self._restore_dir.mkdir(mode=0o755)

    @property
    def container_name(self) -> str:
        """Name of the container (derived from the unique work dir)."""
        return self.work_dir.name.lower()

    @property
    def dump_dir(self) -> Path:
        """Host directory visible read-only in the container at /restore."""
        return self._restore_dir

    def start(self) -> None:
        """Sweep leftovers, start the container and wait for the final server."""
        client = docker_client("verify with --sandbox local")
        self._client = client
        sweep_leftover_sandboxes(client)
        # The container's postgres user (uid 999 in the official image) creates the socket
        # here; the enclosing work dir stays root-only on the host.
        self._socket_dir.mkdir(mode=0o777)
        self._socket_dir.chmod(0o777)
        settings = {
            **_settings_for(self.major),
            _READY_MARK[0]: _READY_MARK[1],
            # Images differ in their compiled-in socket directory: name the bind mount.
            "unix_socket_directories": SOCKET_DIR,
        }
        server_args = [arg for k, v in settings.items() for arg in ("-c", f"{k}={v}")]
        labels = {
            SANDBOX_LABEL: "1",
            "pgbackflow.host": socket.gethostname(),
            "pgbackflow.pid": str(os.getpid()),
            **self._labels,
        }
        try:
            self._container = client.containers.run(
                self.image,
                entrypoint=["/bin/sh", "-c", BOOT_SCRIPT, "pgbackflow-sandbox"],
                command=server_args,
                user="postgres",
                name=self.container_name,
                detach=True,
                labels=labels,
                # No network at all: the only way in is the socket directory below.
                network_mode="none",
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                pids_limit=self.resources.pids,
                nano_cpus=int(self.resources.cpus * 1e9),
                mem_limit=f"{self.resources.memory_mb}m",
                volumes={
                    str(self._socket_dir): {"bind": SOCKET_DIR, "mode": "rw"},
                    str(self._restore_dir): {"bind": RESTORE_DIR, "mode": "ro"},
                },
            )
        except docker.errors.ImageNotFound:
            raise SandboxError(
                f"image {self.image} not found: pull or build it (docker/build_images.py), or "
                "pass --image with a template like registry/postgres:{major}"
            ) from None
        except docker.errors.APIError as exc:
            explanation = str(getattr(exc, "explanation", None) or exc).splitlines()[0][:200]
            if "images/create" in str(exc) or "pull" in explanation.lower() or \
                    "registry" in explanation:
                raise SandboxError(
                    f"image {self.image} is not on this host and pulling it failed "
                    f"({explanation}): pull or build it (docker/build_images.py), or pass --image"
                ) from None
            raise SandboxError(f"starting container from {self.image} failed: {explanation}") \
                from None
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        settings = self.settings
        while time.monotonic() < deadline:
            self._container.reload()
            if self._container.status in {"exited", "dead"}:
                logs = self._container.logs(tail=5).decode("utf-8", "replace").strip()
                raise SandboxError(
                    f"container {self.container_name} ({self.image}) stopped while starting: "
                    + " | ".join(logs.splitlines())
                )
            try:
                with psycopg.connect(connect_timeout=2, **{
                    k: v for k, v in settings.connect_kwargs().items() if k != "connect_timeout"
                }) as conn:
                    row = conn.execute("SELECT current_setting(%s)", (_READY_MARK[0],)).fetchone()
                    if row and row[0] == _READY_MARK[1]:
                        return
            except psycopg.OperationalError:
                pass
            time.sleep(0.05)
        raise SandboxError(
            f"container {self.container_name} ({self.image}) not ready after "
            f"{READY_TIMEOUT_S:.0f} s"
        )

    def _destroy_server(self) -> None:
        if self._container is not None:
            # Delete the restored data while the server still runs. When the container stops,
            # its filesystems are unmounted and the kernel writes every dirty page of the
            # underlying filesystem back first (~0.5 s for a 1 GB restore here); the dirty
            # pages of files already deleted are simply dropped.
            shutil.rmtree(self._restore_dir, ignore_errors=True)
            with contextlib.suppress(docker.errors.APIError):
                self._container.exec_run(["sh", "-c", _DELETE_PGDATA], user="postgres")
            with contextlib.suppress(docker.errors.NotFound):
                # v=True: the image's VOLUME (PGDATA) goes too.
                self._container.remove(force=True, v=True)
            self._container = None

    @property
    def settings(self) -> ConnectionSettings:
        """The server's Unix socket in the bind-mounted directory (trust: no network)."""
        return ConnectionSettings(
            host=str(self._socket_dir), port=5432, dbname="postgres", user="postgres",
            sslmode="disable",
        )

    def pg_restore(
        self, dbname: str, args: Sequence[str], dump: Path | Iterable[bytes]
    ) -> ToolResult:
        """The container's own pg_restore, run with ``docker exec`` as postgres, of a dump
        spooled in ``dump_dir`` (bind-mounted into the container)."""
        if not isinstance(dump, Path) or dump.parent != self._restore_dir:
            raise SandboxError(f"a Docker sandbox restores a dump file in {self._restore_dir}")
        command = [
            "pg_restore", "--no-password", *args, "--host", SOCKET_DIR,
            "--username", "postgres", "--dbname", dbname, f"{RESTORE_DIR}/{dump.name}",
        ]
        exit_code, (stdout, stderr) = self._container.exec_run(
            command, user="postgres", demux=True
        )
        err_text = (stderr or b"").decode("utf-8", "replace")
        lines = [line for line in err_text.splitlines() if line.strip()]
        return ToolResult(
            tool="pg_restore",
            returncode=int(exit_code),
            stdout=stdout or b"",
            stderr_tail="\n".join(lines[-20:]),
            stderr_errors=tuple(line for line in lines if "error" in line.lower())[:500],
        )

    @property
    def description(self) -> str:
        """Image and container."""
        return f"docker {self.image} ({self.container_name}, {self.resources.cpus:g} CPU, " \
               f"{self.resources.memory_mb} MB)"
