"""An ephemeral PostgreSQL cluster: initdb into a temp dir, start, use, stop and delete.

Used by the demo, the "local" restore-verification sandbox and the test fixtures. The
server listens on 127.0.0.1 only and requires scram-sha-256 passwords everywhere.
``initdb`` and ``postgres`` refuse to run as root, so when running as root the binaries
run as an unprivileged OS user (see :func:`resolve_os_user`).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Self

import psycopg
from psycopg.conninfo import make_conninfo

from pgbackflow.tasks.errors import ConfigError, DatabaseError
from pgbackflow.tasks.pgconf import settings_block
from pgbackflow.tasks.process import OsUser, Tool, ToolResult
from pgbackflow.tasks.runtime import log_tail, stop_local_server, watch_owner
from pgbackflow.tasks.toolsets import Toolset

__all__ = ["EphemeralCluster", "OsUser", "free_port", "read_log_from", "resolve_os_user"]

_HOST = "127.0.0.1"
_NO_SETTINGS: Mapping[str, str] = MappingProxyType({})
# Settings the cluster itself owns: overriding them would break how it is reached.
_RESERVED = frozenset({"listen_addresses", "port", "unix_socket_directories"})
_PORT_ATTEMPTS = 3
_READY_TIMEOUT = 30.0
_PG_HBA = """\
# Written by pgbackflow: loopback only, passwords always.
local   all             all                                     scram-sha-256
local   replication     all                                     scram-sha-256
host    all             all             127.0.0.1/32            scram-sha-256
host    replication     all             127.0.0.1/32            scram-sha-256
"""


def resolve_os_user(explicit: str | None = None) -> OsUser:
    """Pick the unprivileged OS user to run the server as.

    Order: ``explicit``; env ``PGBACKFLOW_CLUSTER_USER``; the current user unless root;
    the ``postgres`` user if it exists.

    Raises:
        ConfigError: The named user does not exist, is root, or none could be found.
    """
    name = explicit or os.environ.get("PGBACKFLOW_CLUSTER_USER")
    source = "os_user" if explicit else "PGBACKFLOW_CLUSTER_USER"
    if not name:
        if os.geteuid() != 0:
            entry = pwd.getpwuid(os.geteuid())
            return OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
        name, source = "postgres", "default"
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise ConfigError(
                "running as root and no unprivileged OS user for PostgreSQL exists; create one "
                "with `useradd --system --create-home postgres` or set PGBACKFLOW_CLUSTER_USER"
            ) from None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f"cluster OS user {name!r} (from {source}) does not exist; create it with "
            f"`useradd --system --create-home {name}` or name another user"
        ) from None
    if entry.pw_uid == 0:
        raise ConfigError(
            f"cluster OS user {name!r} (from {source}) is root, which initdb and postgres "
            "refuse; name an unprivileged user"
        )
    if os.geteuid() not in (0, entry.pw_uid):
        raise ConfigError(
            f"cluster OS user {name!r} (from {source}) differs from the current user and only "
            "root can switch users; run as that user or drop the setting"
        )
    return OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


class EphemeralCluster:
    """A throwaway PostgreSQL server on 127.0.0.1, deleted on :meth:`stop`.

    Args:
        toolset: Binaries to run; the cluster's major is the toolset's.
        port: TCP port; a free one is picked if None.
        os_user: OS account for the server (see :func:`resolve_os_user`).
        superuser: Name of the bootstrap superuser.
        password: Superuser password; random if None.
        settings: Extra or overriding server settings, e.g. ``{"fsync": "off"}``.
        base_dir: Where to create the temp dir; the system temp dir if None.
    """

    def __init__(
        self,
        toolset: Toolset,
        *,
        port: int | None = None,
        os_user: str | None = None,
        superuser: str = "postgres",
        password: str | None = None,
        settings: Mapping[str, str] = _NO_SETTINGS,
        base_dir: Path | None = None,
    ) -> None:
        if password is not None and (not password or "\n" in password or "\r" in password):
            raise ConfigError(
                "cluster password is empty or has a line break; pass a one-line password"
            )
        reserved = _RESERVED & set(settings)
        if reserved:
            raise ConfigError(
                f"cluster settings {sorted(reserved)} are managed by EphemeralCluster; "
                "pass port= instead or drop them"
            )
        for key in settings:
            if not key.replace("_", "").replace(".", "").isalnum():
                raise ConfigError(
                    f"cluster setting name {key!r} is not a valid GUC name; "
                    "use letters, digits, '_' and '.'"
                )
        self._toolset = toolset
        self._user = resolve_os_user(os_user)
        self._auto_port = port is None
        self._port = port if port is not None else free_port()
        self._superuser = superuser
        self._password = password if password is not None else secrets.token_urlsafe(24)
        self._settings = dict(settings)
        self._base_dir = base_dir
        self._root: Path | None = None
        self._base_conf = ""
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Self:
        """Create and start the cluster; a no-op if it is running.

        Raises:
            DatabaseError: initdb or the server failed; the message holds the log tail.
        """
        if self.running:
            return self
        try:
            self._create()
            self._start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its files; idempotent."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._root = None

    def halt(self) -> None:
        """Stop the server but keep its files (``resume`` starts it again): an outage.

        Raises:
            DatabaseError: pg_ctl could not stop it.
        """
        result = self._run(
            "pg_ctl", ["-D", self.data_dir, "-m", "fast", "-w", "-t", "60", "stop"],
            cwd=self.socket_dir, timeout=90,
        )
        if result.returncode != 0:
            raise DatabaseError(
                f"PostgreSQL on {_HOST}:{self._port} did not stop ({_tail(_output(result))})"
            )

    def resume(self) -> None:
        """Start a halted server again on the same port with the same data."""
        self._start_server()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- access ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the cluster has been started and not stopped."""
        return self._finalizer is not None and self._finalizer.alive

    @property
    def toolset(self) -> Toolset:
        """The binaries the server runs from."""
        return self._toolset

    @property
    def major(self) -> int:
        """Major version of the server."""
        return self._toolset.major

    @property
    def host(self) -> str:
        """Address the server listens on."""
        return _HOST

    @property
    def port(self) -> int:
        """TCP port the server listens on."""
        return self._port

    @property
    def os_user(self) -> str:
        """OS account the server runs as."""
        return self._user.name

    @property
    def superuser(self) -> str:
        """Name of the bootstrap superuser."""
        return self._superuser

    @property
    def password(self) -> str:
        """Password of the superuser."""
        return self._password

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (PGDATA)."""
        return self._started_root() / "data"

    @property
    def log_path(self) -> Path:
        """The server log file."""
        return self._started_root() / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        """Directory of the server's unix socket."""
        return self._started_root()

    def conninfo(self, dbname: str = "postgres") -> str:
        """Return a libpq ``key=value`` connection string, password included."""
        return make_conninfo(
            "",
            host=_HOST,
            port=self._port,
            user=self._superuser,
            password=self._password,
            dbname=dbname,
        )

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
        """Open an autocommit connection as the superuser."""
        return psycopg.connect(self.conninfo(dbname), autocommit=True)

    def __repr__(self) -> str:
        # The password stays out on purpose: reprs end up in logs and test reports.
        return (
            f"EphemeralCluster(major={self.major}, host={_HOST!r}, port={self._port}, "
            f"superuser={self._superuser!r}, os_user={self._user.name!r}, "
            f"running={self.running})"
        )

    # -- internals ---------------------------------------------------------------

    def _started_root(self) -> Path:
        if self._root is None:
            raise DatabaseError(
                f"PostgreSQL {self.major} ephemeral cluster is not started; call start() first"
            )
        return self._root

    def _create(self) -> None:
        root = Path(tempfile.mkdtemp(prefix=f"pgbackflow-pg{self.major}-", dir=self._base_dir))
        self._root = root
        # Stopped and deleted by stop(), or by the watchdog if this process dies first.
        owner_fd = watch_owner(root / "data", root)
        self._finalizer = weakref.finalize(
            self, _teardown, self._toolset.binary("pg_ctl"), root, self._user, owner_fd
        )
        os.chown(root, self._user.uid, self._user.gid)
        root.chmod(0o700)

        pwfile = root / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.fchown(fd, self._user.uid, self._user.gid)
                os.write(fd, (self._password + "\n").encode())
            finally:
                # Closed exactly once: a second close could hit a descriptor another thread
                # has opened under the same number meanwhile.
                os.close(fd)
            result = self._run(
                "initdb",
                [
                    "-D",
                    self.data_dir,
                    "-U",
                    self._superuser,
                    "-A",
                    "scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    # Throwaway data: skipping the final fsync saves seconds per cluster.
                    "--no-sync",
                ],
                cwd=root,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise DatabaseError(
                f"initdb of PostgreSQL {self._toolset.version} as OS user {self._user.name!r} "
                f"failed: {_tail(_output(result))}; check that the user can "
                f"read {self._toolset.bin_dir} and write {root}"
            )
        (self.data_dir / "pg_hba.conf").write_text(_PG_HBA)
        self._base_conf = (self.data_dir / "postgresql.conf").read_text()

    def _write_config(self) -> None:
        settings: dict[str, str] = {
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
        }
        if self.major >= 17:
            settings["summarize_wal"] = "on"
        settings.update(self._settings)
        settings.update(
            listen_addresses=_HOST,
            port=str(self._port),
            unix_socket_directories=str(self.socket_dir),
        )
        # Appended, so these win over initdb's defaults above them.
        block = settings_block("Written by pgbackflow's EphemeralCluster.", settings)
        (self.data_dir / "postgresql.conf").write_text(self._base_conf + block)

    def _run(
        self, binary: str, args: list[str | Path], *, cwd: Path, timeout: float = 120
    ) -> ToolResult:
        """Run a server binary as the cluster's OS user; the caller judges the exit code."""
        return Tool(self._toolset.binary(binary)).run(
            args, cwd=cwd, timeout=timeout, user=self._user, check=False
        )

    def _start_server(self) -> None:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._write_config()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            result = self._run(
                "pg_ctl",
                ["-D", self.data_dir, "-w", "-t", "60", "-l", self.log_path, "start"],
                cwd=self.socket_dir,
                timeout=90,
            )
            if result.returncode == 0:
                break
            log = read_log_from(self.log_path, log_offset)
            port_taken = "could not bind" in log or "Address already in use" in log
            if port_taken and self._auto_port and attempt < _PORT_ATTEMPTS:
                # Another process took the port between choosing and binding it.
                self._port = free_port()
                continue
            advice = (
                "pick a free port or pass port=None"
                if port_taken
                else "check the settings passed to the cluster"
            )
            raise DatabaseError(
                f"PostgreSQL {self._toolset.version} did not start on {_HOST}:{self._port} "
                f"({_tail(log or _output(result))}); {advice}"
            )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            try:
                with psycopg.connect(self.conninfo(), connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise DatabaseError(
                        f"PostgreSQL {self._toolset.version} on {_HOST}:{self._port} started "
                        f"but refuses connections ({_tail(str(exc))}); server log: "
                        f"{_tail(read_log_from(self.log_path, 0))}"
                    ) from None
                time.sleep(0.1)


def _output(result: ToolResult) -> str:
    return result.stderr_tail + "\n" + result.stdout.decode("utf-8", "replace")


def _teardown(pg_ctl: Path, root: Path, user: OsUser, owner_fd: int) -> None:
    """Stop the server in ``root`` if it runs, delete ``root``, then let the watchdog go."""
    try:
        stop_local_server(Tool(pg_ctl), root / "data", user, cwd=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        os.close(owner_fd)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def check_port_free(port: int, option: str = "--port") -> int:
    """Return ``port`` if a server can listen on it on 127.0.0.1 now.

    Checked before a restore unpacks anything: a server that cannot bind fails only after
    the whole chain is on disk.

    Raises:
        ConfigError: not a TCP port, or one in use.
    """
    if not 1 <= port <= 65535:
        raise ConfigError(f"{option} {port} is not a TCP port: use 1-65535, or leave it out "
                          "for a free one")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As PostgreSQL binds: a port whose last connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError as exc:
            raise ConfigError(
                f"{option} {port} is in use on {_HOST} ({exc.strerror}): pick another port, or "
                "leave it out for a free one; nothing was restored"
            ) from None
    return port


def read_log_from(path: Path, offset: int) -> str:
    """A log file's text from ``offset`` on ("" when it is missing)."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _tail(text: str) -> str:
    return log_tail(text, lines=5)
