"""Connecting to PostgreSQL with errors a DBA can act on.

The password travels only in memory (psycopg connection kwargs) or, for child processes, in
a 0600 passfile; never in argv, a DSN that gets logged, or an exception text.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgbackflow.tasks.errors import ConfigError, DatabaseError, TransientDatabaseError
from pgbackflow.tasks.process import pid_alive

DEFAULT_CONNECT_TIMEOUT_S = 10
_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}


@dataclass(frozen=True)
class ConnectionSettings:
    """Where and as whom to connect.

    Attributes:
        host: Host name, IP address or Unix socket directory.
        port: TCP port.
        dbname: Database name.
        user: Role to log in as.
        password: Password (kept out of repr), or None for passwordless/peer auth.
        sslmode: libpq sslmode.
        via: Where libpq really connects when it is not ``host:port``: the local end of an
            SSH tunnel (tasks/tunnel.py). ``host`` and ``port`` stay the server's own, for
            messages, identities and TLS host name checks.
    """

    host: str
    port: int = 5432
    dbname: str = "postgres"
    user: str = "postgres"
    password: str | None = field(default=None, repr=False)
    sslmode: str = "prefer"
    via: TunnelEnd | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"database port {self.port} is out of range: use 1-65535")
        if self.sslmode not in _SSLMODES:
            raise ConfigError(
                f"sslmode '{self.sslmode}' is not valid: use one of {', '.join(sorted(_SSLMODES))}"
            )

    @property
    def display(self) -> str:
        """``user@host:port/dbname`` (and the bastion it is reached through): safe for logs
        and messages."""
        where = f"{self.user}@{self.host}:{self.port}/{self.dbname}"
        return f"{where} via ssh {self.via.bastion}" if self.via else where

    def with_dbname(self, dbname: str) -> ConnectionSettings:
        """The same server and role, another database."""
        return replace(self, dbname=dbname)

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``psycopg.connect``."""
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
            "user": self.user,
            "sslmode": self.sslmode,
            "connect_timeout": DEFAULT_CONNECT_TIMEOUT_S,
            "application_name": "pgbackflow",
        }
        if self.password is not None:
            kwargs["password"] = self.password
        if self.via is not None:
            kwargs.update(hostaddr=self.via.address, port=self.via.port)
        return kwargs


@dataclass(frozen=True)
class TunnelEnd:
    """The local end of an SSH tunnel that libpq connects to instead of the server.

    Attributes:
        address: Local address (``127.0.0.1``), passed to libpq as ``hostaddr``.
        port: Local port.
        bastion: ``user@host:port`` of the bastion, for messages.
    """

    address: str
    port: int
    bastion: str


_UNKNOWN_DSN_PARAMETER = re.compile(
    r'invalid (?:connection option|URI query parameter:) "([A-Za-z_][A-Za-z0-9_]{0,62})"'
)


def parse_dsn(dsn: str) -> ConnectionSettings:
    """Parse a libpq URI (``postgresql://…``) or key=value DSN.

    Raises:
        ConfigError: the DSN is malformed or names options pgbackflow does not handle.
    """
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        # libpq's reason quotes pieces of the DSN, which may be pieces of a password; an
        # unknown parameter's name is safe to name (it is a key, not a value).
        unknown = _UNKNOWN_DSN_PARAMETER.search(str(exc))
        if unknown:
            raise ConfigError(
                f"database DSN has an unknown parameter {unknown.group(1)!r} (not a libpq "
                "connection parameter): remove or correct it"
            ) from None
        raise ConfigError(
            "database DSN is malformed: use postgresql://user@host:port/dbname "
            "or 'host=… port=… dbname=… user=…'"
        ) from None
    if not parts.get("host"):
        raise ConfigError("database DSN names no host: add host=… or postgresql://user@HOST/db")
    try:
        port = int(str(parts.get("port") or 5432))
    except ValueError:
        raise ConfigError(f"database DSN port '{parts.get('port')}' is not a number") from None
    password = parts.get("password")
    return ConnectionSettings(
        host=str(parts["host"]),
        port=port,
        dbname=str(parts.get("dbname") or parts.get("user") or "postgres"),
        user=str(parts.get("user") or "postgres"),
        password=None if password is None else str(password),
        sslmode=str(parts.get("sslmode") or "prefer"),
    )


class UnreachableDatabaseError(TransientDatabaseError):
    """The server cannot be reached (refused, timed out, not accepting connections yet).

    Attributes:
        waiting_for: What a retry waits for, e.g. "database db1:5432/shop not reachable
            (connection refused)": the line each retry logs.
    """

    def __init__(self, message: str, settings: ConnectionSettings, reason: str) -> None:
        super().__init__(message)
        self.waiting_for = (
            f"database {settings.host}:{settings.port}/{settings.dbname} not reachable ({reason})"
        )


# What libpq, psycopg and the server say when a session dies under a running request: a
# shutdown or restart (fast or immediate), a crash of another backend, pg_terminate_backend,
# a network failure. Each may pass: the whole request is worth running again. The server's
# own reason comes first: a client's stderr holds it and the symptom in either order.
_SESSION_LOST = (
    re.compile(
        r"terminating connection due to administrator command"
        r"|terminating connection because of crash of another server process"
        r"|the database system is shutting down",
        re.IGNORECASE,
    ),
    re.compile(
        r"server closed the connection unexpectedly"
        r"|the connection is lost|the connection is closed|consuming input failed"
        r"|could not (?:receive|send) data (?:from|to) server|connection reset by peer"
        r"|SSL SYSCALL error|no connection to the server",
        re.IGNORECASE,
    ),
)


def session_lost(text: str) -> str | None:
    """The phrase of ``text`` (a server or libpq message) saying the session was lost, if any:
    the server's reason where it gave one, else the client's symptom."""
    for pattern in _SESSION_LOST:
        if match := pattern.search(text):
            return match.group(0)
    return None


class LostSessionError(TransientDatabaseError):
    """A session died under a running request (shutdown, restart, terminated, network).

    Attributes:
        waiting_for: The short form for the line each retry logs.
    """

    def __init__(self, message: str, waiting_for: str) -> None:
        super().__init__(message)
        self.waiting_for = waiting_for


def lost_session_error(
    settings: ConnectionSettings, during: str, text: str, *, reader: str | None = None
) -> TransientDatabaseError | None:
    """A transient one-line error when ``text`` says the connection was refused or lost.

    Args:
        settings: The database the session was with.
        during: What was running, e.g. "the dump".
        text: The failure's message (psycopg's, or a client tool's stderr).
        reader: Which client noticed (e.g. "pg_dump"), for the message.

    Returns:
        The error to raise, or None when ``text`` reports something else.
    """
    if "Connection refused" in text:
        return UnreachableDatabaseError(
            f"database {settings.display}: connection refused during {during}: check that "
            "PostgreSQL is running and listening there",
            settings, "connection refused",
        )
    phrase = session_lost(text)
    if phrase is None:
        return None
    detail = f"{reader}: {phrase}" if reader else phrase
    return LostSessionError(
        f"database {settings.display}: connection lost during {during} ({detail}): the server "
        "shut down or restarted, or the network failed; rerun once it accepts connections",
        f"database {settings.host}:{settings.port}/{settings.dbname} connection lost during "
        f"{during} ({detail})",
    )


def query_error(settings: ConnectionSettings, during: str, exc: psycopg.Error) -> DatabaseError:
    """A one-line error for a query that failed during ``during`` (e.g. "the dump").

    A lost or refused session is transient (see :func:`lost_session_error`); a query the
    server cancelled (statement_timeout, lock_timeout, an operator's cancel) names the
    settings to check; anything else names the server's own message.
    """
    text = str(exc)
    lost = lost_session_error(settings, during, text)
    if lost is not None:
        return lost
    first = (text.strip().splitlines() or [type(exc).__name__])[0].strip()
    if isinstance(exc, (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable)):
        return DatabaseError(
            f"database {settings.display}: the server cancelled a query during {during} "
            f"({first}): check statement_timeout and lock_timeout of the role and database "
            f"(e.g. ALTER ROLE {settings.user} SET statement_timeout = 0)"
        )
    return DatabaseError(f"database {settings.display}: {during} failed ({first})")


def connection_error(exc: psycopg.Error, settings: ConnectionSettings) -> DatabaseError:
    """Turn a psycopg connection failure into a one-line, actionable error.

    Permanent causes (bad password, missing database or role, pg_hba rejection) are
    ``DatabaseError``; causes that may pass (refused, timeout, server starting) are
    ``TransientDatabaseError`` so tasks retry them.
    """
    text = str(exc)
    where = settings.display
    if "password authentication failed" in text or "no password supplied" in text:
        return DatabaseError(
            f"database {where}: password authentication failed for user '{settings.user}': "
            "check the password"
        )
    if re.search(r'database ".*" does not exist', text):
        return DatabaseError(
            f"database {where}: database '{settings.dbname}' does not exist: check the name "
            "or create it"
        )
    if re.search(r'role ".*" does not exist', text):
        return DatabaseError(
            f"database {where}: role '{settings.user}' does not exist: check the user name"
        )
    if "no pg_hba.conf entry" in text:
        return DatabaseError(
            f"database {where}: the server's pg_hba.conf rejects this connection: add an entry "
            "for this host and user"
        )
    if "could not translate host name" in text or "Name or service not known" in text:
        return DatabaseError(f"database {where}: unknown host '{settings.host}': check the host")
    if "Connection refused" in text:
        return UnreachableDatabaseError(
            f"database {where}: connection refused: check host and port and that PostgreSQL "
            "is running and listening there",
            settings, "connection refused",
        )
    if "timeout expired" in text or "timed out" in text:
        return UnreachableDatabaseError(
            f"database {where}: connection timed out after {DEFAULT_CONNECT_TIMEOUT_S} s: check "
            "the network path and firewall",
            settings, f"connection timed out after {DEFAULT_CONNECT_TIMEOUT_S} s",
        )
    if "starting up" in text or "shutting down" in text or "in recovery mode" in text:
        return UnreachableDatabaseError(
            f"database {where}: server is not ready yet (starting up or shutting down): retry "
            "once it accepts connections",
            settings, "server starting up or shutting down",
        )
    first_line = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    return DatabaseError(f"database {where}: connection failed ({first_line.strip()})")


def connect(settings: ConnectionSettings, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """Open a connection, translating failures into pgbackflow errors."""
    try:
        return psycopg.connect(autocommit=autocommit, **settings.connect_kwargs())
    except psycopg.OperationalError as exc:
        raise connection_error(exc, settings) from None


@dataclass(frozen=True)
class ServerInfo:
    """What a connection test learns about a server.

    Attributes:
        version_num: ``server_version_num``, e.g. 170011.
        version: Human ``server_version``, e.g. "17.11".
        is_superuser: Whether the role is a superuser.
        can_replicate: Whether the role has REPLICATION (needed for physical backups).
    """

    version_num: int
    version: str
    is_superuser: bool
    can_replicate: bool

    @property
    def major(self) -> int:
        """The major version (14, 15, …)."""
        return self.version_num // 10000


def check_connection(settings: ConnectionSettings) -> ServerInfo:
    """Connect, read the server version and the role's powers, disconnect."""
    with connect(settings) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'),"
            " rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    if row is None:  # the role we are logged in as always exists
        raise DatabaseError(f"database {settings.display}: cannot read the current role")
    return ServerInfo(
        version_num=row[0], version=row[1].split()[0], is_superuser=row[2], can_replicate=row[3]
    )


def libpq_conninfo(settings: ConnectionSettings) -> str:
    """A conninfo string for child processes' argv: everything but the password."""
    where = {"hostaddr": settings.via.address, "port": str(settings.via.port)} if settings.via \
        else {"port": str(settings.port)}
    return make_conninfo(
        host=settings.host,
        dbname=settings.dbname,
        user=settings.user,
        sslmode=settings.sslmode,
        application_name="pgbackflow",
        connect_timeout=str(DEFAULT_CONNECT_TIMEOUT_S),
        **where,
    )


def _passfile_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


# Fallback passfiles are named pgbackflow-<our pid>-<random>.pgpass so a later run can tell a
# stale one (its pid is dead) from one in use; versions before the memfd passfile used
# pgbackflow-<random>.pgpass (mkstemp, no pid).
_PASSFILE_PREFIX = "pgbackflow-"
_PASSFILE_SUFFIX = ".pgpass"
_PASSFILE_WITH_PID = re.compile(r"pgbackflow-(\d+)-[A-Za-z0-9_]+\.(?:pgpass|sshkey)")
_LEGACY_PASSFILE = re.compile(r"pgbackflow-[A-Za-z0-9_]+\.pgpass")
# A legacy passfile may still be in use by an old version's long-running child
# (pg_receivewal); only older ones that no live process names in PGPASSFILE are removed.
_LEGACY_PASSFILE_MIN_AGE_S = 24 * 3600


def _passfile_line(settings: ConnectionSettings, password: str) -> bytes:
    # Through a tunnel libpq matches the local port (the passfile serves this child only).
    host, port = ("*", str(settings.via.port)) if settings.via else (
        _passfile_field(settings.host), str(settings.port))
    line = ":".join([host, port, "*", _passfile_field(settings.user), _passfile_field(password)])
    return (line + "\n").encode()


def _passfiles_in_use() -> set[bytes] | None:
    """``PGPASSFILE`` values of the live processes we may inspect; None if we cannot tell.

    Processes we may not read belong to other users and cannot read our 0600 files anyway.
    """
    proc = Path("/proc")
    try:
        entries = [entry for entry in proc.iterdir() if entry.name.isdigit()]
    except OSError:
        return None
    if not entries:
        return None
    in_use: set[bytes] = set()
    for entry in entries:
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # exited meanwhile, or not ours
            continue
        for variable in environ.split(b"\0"):
            if variable.startswith(b"PGPASSFILE="):
                in_use.add(variable.removeprefix(b"PGPASSFILE="))
    return in_use


def _sweep_stale_passfiles(directory: Path) -> None:
    """Delete plaintext passfiles that killed (SIGKILL, OOM) pgbackflow processes left behind.

    Only our own regular files are considered: ``pgbackflow-<pid>-*.pgpass`` whose pid is dead,
    and legacy ``pgbackflow-*.pgpass`` (no pid) that are a day old and named by no live
    process's ``PGPASSFILE``. Best effort: a failure here never stops the caller.
    """
    try:
        candidates = [path for suffix in (_PASSFILE_SUFFIX, ".sshkey")
                      for path in directory.glob(f"{_PASSFILE_PREFIX}*{suffix}")]
    except OSError:
        return
    euid = os.geteuid()
    now = time.time()
    in_use: set[bytes] | None = None
    scanned = False
    for path in candidates:
        try:
            info = path.lstat()
            if not stat.S_ISREG(info.st_mode) or info.st_uid != euid:
                continue
            with_pid = _PASSFILE_WITH_PID.fullmatch(path.name)
            if with_pid is not None:
                stale = not pid_alive(int(with_pid.group(1)))
            elif (_LEGACY_PASSFILE.fullmatch(path.name) is not None
                  and now - info.st_mtime > _LEGACY_PASSFILE_MIN_AGE_S):
                if not scanned:
                    in_use, scanned = _passfiles_in_use(), True
                stale = in_use is not None and os.fsencode(path) not in in_use
            else:
                stale = False
            if stale:
                path.unlink(missing_ok=True)
        except OSError:
            continue


def _memfd_passfile(content: bytes) -> tuple[int, str] | None:
    """An anonymous in-memory 0600 passfile and a path other processes of ours can open.

    The path is ``/proc/<our pid>/fd/<fd>``: children started with ``close_fds`` (no fd
    inheritance needed) open it through our fd table while we live; when we exit, however we
    die, the kernel frees the memory and nothing is left on any filesystem. libpq ``stat()``s
    it (following the magic link) and sees a regular file with mode 0600, which it accepts.

    Returns:
        ``(fd, path)``, or None where memfd or a usable ``/proc`` is missing.
    """
    if sys.platform != "linux":
        return None
    try:
        # CLOEXEC: children reach it by path, never by an inherited descriptor.
        fd = os.memfd_create("pgbackflow-pgpass", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:  # e.g. ENOSYS under a seccomp filter
        return None
    try:
        # memfds start 0777; libpq ignores passfiles with any group/world bit.
        os.fchmod(fd, 0o600)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        with suppress(OSError):  # read-only from now on; merely hardening
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                        | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        path = f"/proc/{os.getpid()}/fd/{fd}"
        ours, seen = os.fstat(fd), os.stat(path)
        # The path must lead to this very file (a /proc of our pid namespace), and /proc/<pid>
        # must be ours: a non-dumpable process's /proc entries belong to root, and its children
        # running as us could not open the path (libpq then silently finds no password).
        if ((seen.st_dev, seen.st_ino) != (ours.st_dev, ours.st_ino)
                or not stat.S_ISREG(seen.st_mode) or stat.S_IMODE(seen.st_mode) != 0o600
                or os.stat(f"/proc/{os.getpid()}/fd").st_uid != os.geteuid()):
            os.close(fd)
            return None
    except OSError:
        os.close(fd)
        return None
    return fd, path


@contextmanager
def libpq_password_env(settings: ConnectionSettings) -> Iterator[dict[str, str]]:
    """Environment for a libpq child process: ``PGPASSFILE`` naming a 0600 passfile.

    On Linux the passfile lives only in memory (a memfd reached through
    ``/proc/<our pid>/fd/<n>``), so even a SIGKILLed or OOM-killed process leaves no password
    on disk. Elsewhere it is a 0600 temp file ``pgbackflow-<pid>-*.pgpass``, removed on exit;
    ones left by killed processes are swept on the next call.

    The children must run while the context is open, as our OS user (or root).

    Yields:
        Variables to add to the child's environment (empty when there is no password).
    """
    if settings.password is None:
        yield {}
        return
    with private_file(_passfile_line(settings, settings.password)) as path:
        yield {"PGPASSFILE": path}


@contextmanager
def private_file(content: bytes, suffix: str = _PASSFILE_SUFFIX) -> Iterator[str]:
    """A 0600 file holding a secret (a passfile, an SSH key) for our child processes: its path.

    In memory where possible (see :func:`_memfd_passfile`: nothing on disk even after
    SIGKILL); else a temp file ``pgbackflow-<pid>-*<suffix>`` (``.pgpass`` or ``.sshkey``),
    removed on exit, and swept by a later call once its process is gone.
    """
    _sweep_stale_passfiles(Path(tempfile.gettempdir()))
    memfd = _memfd_passfile(content)
    if memfd is not None:
        fd, proc_path = memfd
        try:
            yield proc_path
        finally:
            os.close(fd)
        return
    # mkstemp creates the file 0600; libpq and ssh refuse files readable by others anyway.
    fd, name = tempfile.mkstemp(prefix=f"{_PASSFILE_PREFIX}{os.getpid()}-", suffix=suffix)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
        yield str(path)
    finally:
        path.unlink(missing_ok=True)
