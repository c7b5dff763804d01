"""Point-in-time restore into a Docker volume (``pgbackflow pitr --docker``).

The data directory is built on the host exactly as for ``--to-dir`` (unpack, combine, fetch
the WAL), then configured for the paths *inside* the container and copied into a named
volume through a short-lived helper container (a tar stream, so it also works with a remote
engine). With ``start`` a server container runs from the image of the chain's major with
the volume as ``PGDATA``, reachable on ``127.0.0.1:<port>``, and the restore waits until
recovery has finished and the server is promoted. Without ``start`` the volume is left
ready and the ``docker run`` command a DBA would use is returned.

Networking: on an engine with the default ``bridge`` network the port is published to
127.0.0.1; engines started with ``--bridge=none`` (CI) share the host's network instead and
the server itself listens on 127.0.0.1:<port>. The restored ``pg_hba.conf`` is the source's,
plus one password line for the address the host's connections arrive from (the network's
gateway when published, 127.0.0.1 with host networking).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import shlex
import socket
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

from pgbackflow.tasks.docker_engine import DockerClient, docker, docker_client
from pgbackflow.tasks.errors import ConfigError, DatabaseError, PgBackflowError
from pgbackflow.tasks.keys import Keyring
from pgbackflow.tasks.pgconf import append_settings, request_recovery
from pgbackflow.tasks.pitr import (
    PROMOTE_TIMEOUT_S,
    RESTORE_DIR,
    WAL_CACHE,
    PitrDestination,
    PitrOutcome,
    PitrPlan,
    build_data_dir,
    check_replay_end,
    free_port,
    restore_to,
)
from pgbackflow.tasks.process import remove_tree
from pgbackflow.tasks.runtime import (
    PostgresRuntime,
    Recovery,
    StageRunner,
    log_tail,
    recover,
    run_directly,
)
from pgbackflow.tasks.storage import Storage
from pgbackflow.tasks.toolsets import Toolset
from pgbackflow.tasks.transfer import ProgressCallback

logger = logging.getLogger("pgbackflow.pitr")

#: Label on the volume and the containers a restore creates (value: the cluster id).
PITR_LABEL = "pgbackflow.pitr"
CONTAINER_PORT = 5432
SOCKET_DIR = "/var/run/postgresql"
DEFAULT_PGDATA = "/var/lib/postgresql/data"
HOST_NETWORK = "host"
DEFAULT_BRIDGE = "bridge"
#: Where helper containers mount the volume (not PGDATA: nothing of the image is copied up).
HELPER_MOUNT = "/volume"
#: Root in a helper needs these to chown the copied tree and to read or empty a volume whose
#: files belong to postgres; everything else is dropped.
HELPER_CAPABILITIES = ["CHOWN", "DAC_OVERRIDE", "FOWNER"]
TAR_CHUNK = 1024 * 1024
TAR_QUEUE_CHUNKS = 8
POLL_INTERVAL_S = 0.25
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
# PostgreSQL's own message when no transaction followed the target (see tasks/pitr.py).
# Promoted and answering: recovery.signal is gone, pg_control says "in production" (written
# together with the end of recovery) and the postmaster accepts connections.
_PROMOTED_PROBE = (
    'test ! -e "$PGDATA/recovery.signal" '
    '&& pg_controldata "$PGDATA" | grep -q "in production" '
    f'&& pg_isready -q -h {SOCKET_DIR} -p "$PORT"'
)


#: Prints the newest timeline history file in the server's pg_wal (see
#: PostgresRuntime.newest_history).
_NEWEST_HISTORY = (
    'cd "$PGDATA/pg_wal" && newest=$(ls | grep -E "^[0-9A-F]{8}[.]history$" | sort | tail -n 1) '
    '&& test -n "$newest" && cat "$newest"'
)


class DockerRestoreError(PgBackflowError):
    """The Docker engine refused or failed a step of a restore into a volume."""


@dataclass(frozen=True)
class DockerRestoreResult:
    """A restore into a Docker volume.

    Attributes:
        volume: The named volume that holds the restored data directory.
        image: The image the server runs from.
        pgdata: Where the volume is mounted in the server container (the image's PGDATA).
        network: ``host`` or the bridge network the port is published from.
        port: Port on 127.0.0.1 of the started server (or the one ``run_command`` uses).
        run_command: The ``docker run`` command that starts (or started) the server.
        container_name: Name of the server container (the one ``run_command`` creates).
        container_id: Id of the started container; None without ``start``.
        wal_files: WAL files fetched for the replay.
        last_transaction: "last completed transaction was at log time …" of the replay.
        reached_target: False when no transaction followed the target, so replay ran to the
            end of the WAL (the same data); None without ``start``.
        created_volume: False when an existing empty volume was filled.
    """

    volume: str
    image: str
    pgdata: str
    network: str
    port: int
    run_command: str
    container_name: str
    container_id: str | None
    wal_files: int
    last_transaction: str | None
    reached_target: bool | None
    created_volume: bool


def restore_into_docker_volume(
    storage: Storage,
    plan: PitrPlan,
    keyring: Keyring,
    *,
    volume: str,
    image: str | None = None,
    start: bool = False,
    port: int | None = None,
    network: str | None = None,
    container_name: str | None = None,
    toolset: Toolset | None = None,
    work_dir: Path | None = None,
    client: DockerClient | None = None,
    timeout: float = PROMOTE_TIMEOUT_S,
    on_step: Callable[[str], None] | None = None,
    run_stage: StageRunner = run_directly,
) -> DockerRestoreResult:
    """Restore ``plan`` into the named Docker volume and optionally start a server on it.

    Args:
        storage: Where the backups and WAL are.
        plan: From :func:`tasks.pitr.plan_pitr`.
        keyring: Keys to decrypt the backups and WAL.
        volume: A new (or existing and empty) Docker volume.
        image: Server image (default ``postgres:<major of the chain>``).
        start: Start a server container and wait until it is promoted.
        port: Port on 127.0.0.1 (default: a free one with ``start``, else 5432).
        network: ``host`` or a bridge network (default: ``bridge`` if the engine has it,
            else ``host``).
        container_name: Name of the server container (default: the volume's name).
        toolset: Host toolset for ``pg_combinebackup`` (default: found for the major; not
            needed for a chain of one full backup).
        work_dir: Where the data directory is built before the copy (default: TMPDIR).
        client: Docker client (default: the local engine).
        timeout: Seconds to wait for the promotion.
        on_step: Called with a line per step (progress for logs).
        run_stage: Runs each stage (build-data-dir, copy-into-volume,
            start-restored-server): the flow makes each one a task run.

    Raises:
        ConfigError: Bad names, a missing image, a non-empty volume, a taken container
            name or port; nothing was created.
        DatabaseError: The server stopped during recovery or was not promoted in time; what
            this call created was removed.
    """
    own_client = client is None
    client = client if client is not None else docker_client(
        "restore into a directory with --to-dir")
    try:
        destination = VolumeDestination(
            client, plan, volume=volume, image=image, start=start, port=port,
            network=network, container_name=container_name, work_dir=work_dir,
        )
        outcome = restore_to(storage, plan, keyring, destination, toolset=toolset,
                             start=start, timeout=timeout, on_step=on_step,
                             run_stage=run_stage)
        return destination.result(outcome)
    finally:
        if own_client:
            client.close()


class VolumeDestination(PitrDestination):
    """A Docker volume (new, or existing and empty), started in a container of ``image``.

    The data directory is built in a host work folder, then copied into the volume
    (``copy-into-volume``). Everything is checked when this is made: a refusal creates
    nothing. See :func:`restore_into_docker_volume` for the arguments.
    """

    place_stage = "copy-into-volume"

    def __init__(
        self,
        client: DockerClient,
        plan: PitrPlan,
        *,
        volume: str,
        image: str | None,
        start: bool,
        port: int | None,
        network: str | None,
        container_name: str | None,
        work_dir: Path | None,
    ) -> None:
        if plan.newest.tablespaces:
            raise ConfigError(
                f"cluster {plan.db_id} has extra tablespaces, which a restore into a Docker "
                "volume does not place yet: restore with --to-dir instead"
            )
        major = plan.newest.server_major
        self.client = client
        self.volume = volume
        self.image = image or f"postgres:{major}"
        self.name = container_name or volume
        _check_name("volume", volume)
        _check_name("container name", self.name)
        self.pgdata = _image_pgdata(client, self.image, major)
        self.network = _choose_network(client, network)
        if start:
            _check_container_free(client, self.name)
            port = port or free_port()
            _check_port_free(port)
        self.port = port or CONTAINER_PORT
        self.existed = _volume_exists(client, volume)
        if self.existed and not _volume_is_empty(client, self.image, volume):
            raise ConfigError(
                f"docker volume {volume!r} already holds data: restore into a new or empty "
                "volume (nothing in it was touched)"
            )
        self.run_args = _server_run_args(volume, self.pgdata, self.network, self.port)
        self.run_command = shlex.join(["docker", "run", "-d", "--name", self.name,
                                       *self.run_args.cli, self.image, *self.run_args.command])
        self.labels = {PITR_LABEL: plan.db_id, f"{PITR_LABEL}.target": _target_text(plan.target)}
        self.work_dir = work_dir
        self.work: Path | None = None
        self.created_volume = False
        self.container: Any = None
        self.step: Callable[[str], None] = lambda _message: None

    def build(
        self, storage: Storage, plan: PitrPlan, keyring: Keyring, toolset: Toolset | None,
        step: Callable[[str], None], progress: ProgressCallback | None,
    ) -> list[str]:
        """Build in a host work folder, with the container's recovery settings."""
        self.step = step
        self.work = Path(tempfile.mkdtemp(prefix="pgbackflow-pitr-docker-", dir=self.work_dir))
        data_dir = self.work / "data"
        # A lone full backup needs no host toolset (None): only a chain is combined.
        fetched = build_data_dir(storage, plan, keyring, data_dir, toolset, on_step=step,
                                 progress=progress)
        step(f"fetched {len(fetched)} WAL files")
        configure_container_recovery(
            data_dir, plan.target, pgdata=self.pgdata,
            client_address=_client_address(self.client, self.network),
        )
        return fetched

    def place(self) -> None:
        """Create the volume (unless it existed) and copy the data directory into it."""
        assert self.work is not None  # built first
        if not self.existed:
            self.client.volumes.create(name=self.volume, labels=self.labels)
            self.created_volume = True
        self.step(f"copying the data directory into docker volume {self.volume}")
        _copy_into_volume(self.client, self.image, self.volume, self.work / "data")
        self._drop_work()  # the volume has it now: free the disk early

    def start(self, timeout: float, plan: PitrPlan) -> Recovery:
        """Run the server container and wait for the promotion; the fetched WAL goes."""
        self.step(f"starting {self.image} on 127.0.0.1:{self.port} ({self.network} network) "
                  f"as {self.name}")
        runtime = _ContainerRuntime(self.client, self.image, self.name, self.run_args,
                                    self.labels, self.volume, self.pgdata)
        try:
            recovery = recover(runtime, timeout)
            check_replay_end(plan, recovery)
        finally:
            self.container = runtime.container  # removed by undo() if the restore fails
        _exec(self.container, ["rm", "-rf", f"{self.pgdata}/{RESTORE_DIR}/{WAL_CACHE}"])
        self.step(f"server in {self.name} is promoted; last transaction replayed: "
                  f"{recovery.last_transaction or 'none'}")
        return recovery

    def finish(self) -> None:
        """Drop the work folder; without a start, say how to start the server."""
        self._drop_work()
        if self.container is None:
            self.step(f"volume {self.volume} is ready; start the server with: "
                      f"{self.run_command}")

    def undo(self) -> None:
        """Remove the container and a created volume; empty an existing one again."""
        self._drop_work()
        _undo(self.client, self.image, self.volume, self.container,
              created_volume=self.created_volume, existed=self.existed)

    def result(self, outcome: PitrOutcome) -> DockerRestoreResult:
        """The restore's result, for reports."""
        recovery = outcome.recovery
        return DockerRestoreResult(
            self.volume, self.image, self.pgdata, self.network, self.port, self.run_command,
            self.name, str(self.container.id) if self.container is not None else None,
            outcome.wal_files, recovery.last_transaction if recovery else None,
            recovery.reached_target if recovery else None, self.created_volume,
        )

    def _drop_work(self) -> None:
        if self.work is not None:
            remove_tree(self.work)
            self.work = None


# ---------------------------------------------------------------------------------------
# Checks before anything is created


def _check_name(what: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r} is not a valid Docker name: use letters, digits, '_', '.' and "
            "'-', starting with a letter or digit"
        )


def _image_pgdata(client: DockerClient, image: str, major: int) -> str:
    """PGDATA of ``image`` (which must exist locally and be of ``major``)."""
    try:
        found = client.images.get(image)
    except docker.errors.ImageNotFound:
        raise ConfigError(
            f"image {image} is not on this Docker engine: build it with "
            f"`python docker/build_images.py {major}` or pull it"
        ) from None
    env = dict(
        item.split("=", 1) for item in found.attrs["Config"].get("Env") or [] if "=" in item
    )
    image_major = env.get("PG_MAJOR", "")
    if image_major and image_major != str(major):
        raise ConfigError(
            f"image {image} holds PostgreSQL {image_major} but the backups are of {major}: use "
            f"postgres:{major}"
        )
    return env.get("PGDATA") or DEFAULT_PGDATA


def _choose_network(client: DockerClient, network: str | None) -> str:
    names = {net.name for net in client.networks.list()}
    if network is None:
        return DEFAULT_BRIDGE if DEFAULT_BRIDGE in names else HOST_NETWORK
    if network == "none":
        raise ConfigError(
            "network none leaves the restored server unreachable: use host or a bridge network"
        )
    if network not in names:
        raise ConfigError(
            f"docker network {network!r} does not exist: create it or use host"
        )
    return network


def _check_container_free(client: DockerClient, name: str) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        client.containers.get(name)
        raise ConfigError(
            f"a container named {name!r} already exists: remove it or pick another name"
        )


def _check_port_free(port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(
                f"port {port} on 127.0.0.1 is in use: pick another port (or none for a free one)"
            ) from None


def _volume_exists(client: DockerClient, volume: str) -> bool:
    try:
        client.volumes.get(volume)
    except docker.errors.NotFound:
        return False
    return True


def _volume_is_empty(client: DockerClient, image: str, volume: str) -> bool:
    listing = _run_helper(client, image, volume, f"ls -A {HELPER_MOUNT}", read_only=True)
    return not listing.strip()


# ---------------------------------------------------------------------------------------
# The data directory on the host


def _target_text(target: datetime | None) -> str:
    # Full precision: a target between two commits in the same second must stay between them.
    return "latest" if target is None else target.astimezone(UTC).isoformat(sep=" ")


def configure_container_recovery(
    data_dir: Path, target: datetime | None, *, pgdata: str, client_address: str | None
) -> None:
    """Write recovery settings for a server that sees ``data_dir`` as ``pgdata``.

    Besides what :func:`tasks.pitr.configure_recovery` writes, settings of the source that
    name host paths or addresses are replaced by the container's: the port, listen addresses,
    socket directory, hba/ident files, and the log goes to stderr (``docker logs``).
    ``client_address`` gets a password line at the end of ``pg_hba.conf``.
    """
    wal_dir = f"{pgdata}/{RESTORE_DIR}/{WAL_CACHE}"
    settings = {
        "restore_command": f"cp {shlex.quote(wal_dir)}/%f %p",
        "recovery_target_action": "promote",
        # The restored server must not push WAL into the source's archive.
        "archive_mode": "off",
        "port": str(CONTAINER_PORT),
        "listen_addresses": "*",
        "unix_socket_directories": SOCKET_DIR,
        "hba_file": f"{pgdata}/pg_hba.conf",
        "ident_file": f"{pgdata}/pg_ident.conf",
        # log_directory may be a host path; in a container the log is docker logs.
        "logging_collector": "off",
    }
    if target is not None:
        settings["recovery_target_time"] = _target_text(target)
    # A source configured outside its data directory (Debian's /etc/postgresql) has none.
    conf = data_dir / "postgresql.conf"
    if not conf.exists():
        conf.write_text("# Written by pgbackflow: the source kept its configuration elsewhere.\n")
    hba = data_dir / "pg_hba.conf"
    if not hba.exists():
        hba.write_text("# Written by pgbackflow: the source had no pg_hba.conf here.\n"
                       "local all all peer\n")
    (data_dir / "pg_ident.conf").touch()
    if client_address:
        # md5 also accepts SCRAM verifiers (then runs SCRAM), so every role of the source
        # that could log in with a password still can; appended, so the source's own lines
        # (including rejects) come first.
        with hba.open("a") as out:
            out.write(f"\n# pgbackflow: connections from the Docker host arrive from here.\n"
                      f"host all all {client_address}/32 md5\n")
    append_settings(data_dir, "Point-in-time restore into Docker by pgbackflow.", settings)
    request_recovery(data_dir)


def _client_address(client: DockerClient, network: str) -> str | None:
    """The address the host's connections come from (the bridge's gateway), if known."""
    if network == HOST_NETWORK:
        return "127.0.0.1"
    configs = client.networks.get(network).attrs.get("IPAM", {}).get("Config") or []
    for config in configs:
        gateway = str(config.get("Gateway") or "")
        if gateway and ":" not in gateway:
            return gateway
    return None


# ---------------------------------------------------------------------------------------
# Volume and containers


def _tar_chunks(directory: Path) -> Iterator[bytes]:
    """A tar of ``directory`` (members relative to it) in chunks, at most a few MB in memory.

    A thread writes the tar into a bounded queue; closing the generator early stops it.
    """
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(TAR_QUEUE_CHUNKS)
    stop = threading.Event()

    def put(item: bytes | BaseException | None) -> None:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        raise _Stopped

    class Sink:
        def write(self, data: bytes) -> int:
            put(bytes(data))
            return len(data)

    def anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""  # ownership is set in the volume, for the image's user
        return info

    def produce() -> None:
        try:
            # Stream mode ("w|") only ever calls write().
            sink = cast(IO[bytes], Sink())
            with tarfile.open(fileobj=sink, mode="w|", bufsize=TAR_CHUNK) as tar:
                tar.add(str(directory), arcname=".", filter=anonymous)
            put(None)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the reader, which raises it
            with contextlib.suppress(_Stopped):
                put(exc)

    thread = threading.Thread(target=produce, name="pgbackflow-tar", daemon=True)
    thread.start()
    try:
        while True:
            item = chunks.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class _Stopped(Exception):
    """The reader of a tar stream went away."""


def _copy_into_volume(client: DockerClient, image: str, volume: str, data_dir: Path) -> None:
    """Stream ``data_dir`` into the volume; hand it to the image's postgres user, mode 0700."""
    # By name: the uid differs between images (999 Debian and ours, 70 Alpine).
    script = f"chown -R postgres:postgres {HELPER_MOUNT} && chmod 700 {HELPER_MOUNT}"
    _run_helper(client, image, volume, script, archive=_tar_chunks(data_dir))


def _run_helper(
    client: DockerClient,
    image: str,
    volume: str,
    script: str,
    *,
    archive: Iterator[bytes] | None = None,
    read_only: bool = False,
    user: str = "root",
) -> str:
    """Run ``sh -c script`` in a throwaway container with the volume at /volume.

    ``archive`` (a tar stream) is unpacked into the volume before the script runs.

    Returns:
        The helper's output.
    """
    container = client.containers.create(
        image,
        entrypoint=["sh", "-c"],
        command=[script],
        user=user,
        network_mode="none",
        cap_drop=["ALL"],
        cap_add=HELPER_CAPABILITIES if user == "root" else [],
        security_opt=["no-new-privileges"],
        volumes={volume: {"bind": HELPER_MOUNT, "mode": "ro" if read_only else "rw"}},
        labels={PITR_LABEL: "helper"},
    )
    try:
        if archive is not None:
            container.put_archive(HELPER_MOUNT, archive)
        container.start()
        status = container.wait()
        output = bytes(container.logs()).decode("utf-8", "replace")
    except docker.errors.APIError as exc:
        raise DockerRestoreError(
            f"helper container for volume {volume} ({image}) failed: {_explain(exc)}"
        ) from None
    finally:
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True, v=True)
    if int(status.get("StatusCode", 1)) != 0:
        raise DockerRestoreError(
            f"helper container for volume {volume} ({image}) failed running {script!r}: "
            f"{log_tail(output)}"
        )
    return output


@dataclass(frozen=True)
class _RunArgs:
    cli: list[str]  # docker run options, for the DBA's command
    sdk: dict[str, Any]  # the same for containers.run()
    command: list[str]  # the server's command line
    server_port: int  # the port the server listens on inside the container


def _server_run_args(volume: str, pgdata: str, network: str, port: int) -> _RunArgs:
    """How the server container runs: as postgres, no capabilities, the volume as PGDATA."""
    cli = ["--user", "postgres", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "-v", f"{volume}:{pgdata}"]
    sdk: dict[str, Any] = {
        "user": "postgres",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "volumes": {volume: {"bind": pgdata, "mode": "rw"}},
    }
    if network == HOST_NETWORK:
        # The host's network namespace: the server itself must keep to loopback and the port.
        return _RunArgs(
            [*cli, "--network", HOST_NETWORK],
            {**sdk, "network_mode": HOST_NETWORK},
            ["postgres", "-c", f"port={port}", "-c", "listen_addresses=127.0.0.1"],
            port,
        )
    if network != DEFAULT_BRIDGE:
        cli += ["--network", network]
    cli += ["-p", f"127.0.0.1:{port}:{CONTAINER_PORT}"]
    sdk.update(network=network, ports={f"{CONTAINER_PORT}/tcp": ("127.0.0.1", port)})
    return _RunArgs(cli, sdk, ["postgres"], CONTAINER_PORT)


class _ContainerRuntime(PostgresRuntime):
    """The restored server in a container of ``image`` on the volume: created by the first
    :meth:`start`, started again by the second; promotion is probed inside it."""

    def __init__(self, client: DockerClient, image: str, name: str, run_args: _RunArgs,
                 labels: dict[str, str], volume: str, pgdata: str) -> None:
        self.client = client
        self.image = image
        self.name = name
        self.run_args = run_args
        self.labels = labels
        self.volume = volume
        self.pgdata = pgdata
        self.container: Any = None

    @property
    def description(self) -> str:
        return f"restored server in container {self.name}"

    def log_offset(self) -> int:
        return 0 if self.container is None else len(bytes(self.container.logs()))

    def log_since(self, offset: int) -> str:
        if self.container is None:
            return ""
        return bytes(self.container.logs())[offset:].decode("utf-8", "replace")

    def start(self) -> None:
        if self.container is not None:
            self.container.start()
            return
        try:
            self.container = self.client.containers.run(
                self.image, command=self.run_args.command, name=self.name, detach=True,
                labels=self.labels, **self.run_args.sdk,
            )
        except docker.errors.APIError as exc:
            raise DockerRestoreError(
                f"starting container {self.name} from {self.image} failed: {_explain(exc)}"
            ) from None

    def wait_promoted(self, deadline: float) -> bool:
        environment = {"PGDATA": self.pgdata, "PORT": str(self.run_args.server_port),
                       "LC_ALL": "C"}
        while time.monotonic() < deadline:
            self.container.reload()
            if self.container.status in {"exited", "dead"}:
                return False
            with contextlib.suppress(docker.errors.APIError):  # stopped between reload and exec
                result = self.container.exec_run(["sh", "-c", _PROMOTED_PROBE],
                                                 environment=environment)
                if int(result.exit_code) == 0:
                    return True
            time.sleep(POLL_INTERVAL_S)
        raise DatabaseError(
            f"{self.description} did not finish recovery in time: see docker logs {self.name}, "
            "or allow a longer timeout"
        )

    def newest_history(self) -> bytes | None:
        if self.container is None:
            return None
        result = self.container.exec_run(["sh", "-c", _NEWEST_HISTORY],
                                         environment={"PGDATA": self.pgdata, "LC_ALL": "C"})
        output = bytes(result.output)
        return output if int(result.exit_code) == 0 and output else None

    def drop_recovery_target(self) -> None:
        _run_helper(
            self.client, self.image, self.volume,
            f"sed -i '/^recovery_target_time/d' {HELPER_MOUNT}/postgresql.auto.conf",
            user="postgres",
        )

    def stop(self) -> None:
        if self.container is not None:
            with contextlib.suppress(docker.errors.NotFound):
                self.container.stop()


def _exec(container: Any, command: list[str]) -> None:
    result = container.exec_run(command)
    if int(result.exit_code) != 0:
        raise DockerRestoreError(
            f"{shlex.join(command)} in container {container.name} failed: "
            f"{log_tail(bytes(result.output).decode('utf-8', 'replace'))}"
        )


def _undo(
    client: DockerClient,
    image: str,
    volume: str,
    container: Any,
    *,
    created_volume: bool,
    existed: bool,
) -> None:
    """Remove what a failed restore created; an existing volume is only emptied again."""
    # Best effort: the original error is what the caller must see; a failed clean-up is logged.
    try:
        if container is not None:
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True, v=True)
        if created_volume:
            with contextlib.suppress(docker.errors.NotFound):
                client.volumes.get(volume).remove(force=True)
        elif existed:
            _run_helper(
                client, image, volume,
                f"find {HELPER_MOUNT} -mindepth 1 -maxdepth 1 -exec rm -rf {{}} +",
            )
    except (docker.errors.APIError, PgBackflowError) as exc:
        logger.warning("clean-up after the failed restore into volume %s failed: %s", volume, exc)


def _explain(exc: BaseException) -> str:
    return str(getattr(exc, "explanation", None) or exc).splitlines()[0][:200]


__all__ = [
    "DockerRestoreError",
    "DockerRestoreResult",
    "configure_container_recovery",
    "restore_into_docker_volume",
]
