"""``pgbackflow`` as users run it: run the command in a warm resident process when one is up.

A ``pgbackflow`` process pays ~3-4 s before its command starts (Python imports Prefect,
pydantic, boto3, the Docker SDK, the flows; Prefect checks the API's version) against 0.09 s
for a tiny ``pg_dump``. The daemon (:mod:`pgbackflow.daemon`) pays it once: it imports all of
it, then forks one child per command. This launcher is the ``pgbackflow`` executable: it
imports only the standard library, hands its arguments, working directory, umask and its own
stdin/stdout/stderr (the file descriptors themselves, so terminals, pipes and redirections
behave as they would here) to the daemon, forwards the signals it receives (Ctrl-C, SIGTERM)
and exits with the command's exit code.

A daemon serves exactly one set of inputs: this user, this interpreter, this version of the
code and installed packages, these Prefect settings files and this environment (all but the
variables a shell changes on its own, :data:`VOLATILE_ENV`, and those a command reads when it
connects, :data:`PER_COMMAND_PREFIXES`: each command hands over its own). Another set gets
another daemon; each exits after :data:`IDLE_S` idle seconds (``PGBACKFLOW_DAEMON_IDLE_S``).
When there is no daemon for the current set, the command runs in this process, as it always
did, and a daemon is started in the background for the next one.

``PGBACKFLOW_DAEMON=off`` runs every command in its own process and starts no daemon;
``--debug`` and the long-running commands (:data:`IN_PROCESS_COMMANDS`) always do.
``pgbackflow daemon status|stop`` lists and stops this user's daemons.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import resource
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

#: Variables a shell sets or changes on its own: not part of a daemon's identity; the
#: command's child gets the launcher's values. So do Prefect's per-run variables
#: (``PREFECT__FLOW_RUN_ID``, ``PREFECT__CONTROL_TOKEN``, ...: two underscores), which a
#: worker sets for each flow-run process and Prefect reads when the run starts, not at import.
VOLATILE_ENV = frozenset({
    "PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES",
    # Per terminal, SSH login or service run: one daemon each would be one never reused.
    "TMUX_PANE", "WINDOWID", "TERM_SESSION_ID", "GPG_TTY", "XDG_SESSION_ID", "SSH_CLIENT",
    "SSH_CONNECTION", "SSH_TTY", "INVOCATION_ID", "JOURNAL_STREAM",
})
PER_RUN_PREFIX = "PREFECT__"
#: Variables read when a command connects, not when a process starts: libpq's (``PGPASSWORD``,
#: ``PGHOST``, ``PGSSLMODE``, ...) and AWS's (credentials, profile, region, endpoint).
#: Commands that differ only in these share one daemon, each with its own values, and no
#: daemon keeps them: a script that backs up fifty databases, each with its own
#: ``PGPASSWORD``, started fifty daemons of ~130 MB holding a password each for 15 minutes,
#: none of them used again. pgbackflow's own ``PGBACKFLOW_*`` settings are not among them.
PER_COMMAND_PREFIXES = ("PG", "AWS_")
OWN_PREFIX = "PGBACKFLOW_"
#: What a daemon runs: ``pgbackflow`` commands, or flow runs a Prefect worker started
#: (``python -m pgbackflow.engine``, the pool's flow-run command). A daemon does one.
MODES = ("cli", "flow-run")
#: Commands that always run in their own process: supervisors and streamers that live for
#: hours, manage their own children and signals, and gain nothing from a warm start.
IN_PROCESS_COMMANDS = frozenset({"worker", "agent", "wal-stream", "demo", "daemon"})
#: Files whose contents Prefect reads as settings when it is imported, relative to the
#: working directory (changing one, or another directory holding one, needs another daemon).
CWD_SETTINGS_FILES = ("prefect.toml", ".env", "pyproject.toml")
IDLE_S = 900.0
#: Seconds to wait for the daemon to take a command (a wedged daemon: an error, never a
#: second run of the command here).
ACCEPT_TIMEOUT_S = 30.0
#: Seconds a daemon's "cannot serve these inputs" mark holds back new daemons.
FAILED_MARK_S = 600.0
MAX_MESSAGE = 1 << 20
_OFF = {"off", "0", "no", "false"}
#: Signals forwarded to the command (a terminal's Ctrl-C and Ctrl-\\, a hang-up, a kill).
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)


class DaemonAddress(NamedTuple):
    """Where the daemon for one set of inputs listens, and what identifies that set.

    Attributes:
        key: Hex digest over the inputs a daemon is bound to (see :func:`daemon_key`).
        socket: Its Unix socket (in a 0700 directory of this user).
        mode: What it runs (one of :data:`MODES`).
    """

    key: str
    socket: Path
    mode: str = "cli"

    @property
    def lock(self) -> Path:
        """Held (flock) by the daemon for its whole life; holds its pid."""
        return self.socket.with_suffix(".lock")

    @property
    def log(self) -> Path:
        """The daemon's own log (start, stop, refusals; never a command's output)."""
        return self.socket.with_suffix(".log")

    @property
    def failed(self) -> Path:
        """Written by a daemon that cannot serve these inputs: no launcher starts another
        (each would import everything and fail the same way); a change of code or
        environment gives another key."""
        return self.socket.with_suffix(".failed")


def runtime_dir(env: Mapping[str, str]) -> Path | None:
    """This user's directory for daemon sockets, created 0700; None when it is not safely
    ours (another owner, group/other access, a symlink): then no daemon is used."""
    uid = os.getuid()
    if env.get("PGBACKFLOW_RUNTIME_DIR"):
        path = Path(env["PGBACKFLOW_RUNTIME_DIR"])
    elif env.get("XDG_RUNTIME_DIR"):
        path = Path(env["XDG_RUNTIME_DIR"]) / "pgbackflow"
    else:
        path = Path(f"/tmp/pgbackflow-{uid}")  # nosec B108 - checked below: ours and 0700
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        return None
    return path


def _code_files() -> Iterator[Path]:
    """pgbackflow's own modules (the package's subpackages are symlinks in a checkout)."""
    for root, _dirs, files in os.walk(Path(__file__).resolve().parent, followlinks=True):
        for name in files:
            if name.endswith(".py"):
                yield Path(root) / name


def is_volatile(name: str) -> bool:
    """Whether ``name`` is left out of a daemon's identity and environment (each command
    brings its own value, or its absence)."""
    return (name in VOLATILE_ENV or name.startswith(PER_RUN_PREFIX)
            or (name.startswith(PER_COMMAND_PREFIXES) and not name.startswith(OWN_PREFIX)))


def daemon_key(env: Mapping[str, str], cwd: str, mode: str = "cli",
               secret: bytes = b"") -> str:
    """A digest of everything a warm process has bound at import time or hands on to its
    commands: what it runs, the user and groups, resource limits and cgroup, the
    interpreter, pgbackflow's code, the installed packages, Prefect's settings files and the
    environment (but the volatile variables). A change in any of them makes another key.
    Keyed with the runtime directory's ``secret``: the key shows in ``ps`` (the daemon's
    argv), and the environment it digests may hold a password."""
    digest = hmac.new(secret, digestmod=hashlib.sha256)

    def add(*parts: object) -> None:
        digest.update("\0".join(map(str, parts)).encode("utf-8", "surrogateescape") + b"\1")

    # The interpreter and its environment (a venv's bin/python and bin/python3 are one).
    add("mode", mode, "uid", os.getuid(), "python", os.path.realpath(sys.executable),
        sys.prefix, sys.version)
    add("groups", os.getgid(), *sorted(os.getgroups()))
    for limit in (resource.RLIMIT_NOFILE, resource.RLIMIT_CORE, resource.RLIMIT_FSIZE,
                  resource.RLIMIT_NPROC, resource.RLIMIT_AS):
        add("rlimit", limit, *resource.getrlimit(limit))
    with suppress(OSError):
        add("cgroup", Path("/proc/self/cgroup").read_text())
    for path in sorted(_code_files()):
        with suppress(OSError):
            info = path.stat()
            add("code", path, info.st_mtime_ns, info.st_size)
    # Installing or removing a package changes its site-packages directory's mtime.
    for entry in sys.path:
        if entry.endswith("-packages") and os.path.isdir(entry):
            add("packages", entry, os.stat(entry).st_mtime_ns)
    prefect_home = Path(env.get("PREFECT_HOME") or Path(env.get("HOME", "/")) / ".prefect")
    profiles = Path(env.get("PREFECT_PROFILES_PATH") or prefect_home / "profiles.toml")
    for settings_file in (profiles,
                          *(Path(cwd) / name for name in CWD_SETTINGS_FILES)):
        with suppress(OSError):
            info = settings_file.stat()
            add("settings", settings_file, info.st_mtime_ns, info.st_size)
    for name in sorted(env):
        if not is_volatile(name):
            add("env", name, env[name])
    return digest.hexdigest()[:32]


#: Longest Unix socket path Linux takes (sun_path: 108 bytes with the terminating NUL).
MAX_SOCKET_PATH = 107
#: Room a socket name needs in the runtime directory: the daemon binds ``.<key>.<pid>``
#: first (32 + 2 + up to 7 characters), then renames it to ``<key>.sock``.
SOCKET_NAME_ROOM = 42


def address(env: Mapping[str, str], cwd: str, mode: str = "cli") -> DaemonAddress | None:
    """Where the daemon for these inputs listens; None when no daemon can be used (no safe
    runtime directory, or one whose path leaves no room for a socket name)."""
    directory = runtime_dir(env)
    if directory is None or len(os.fsencode(directory)) + SOCKET_NAME_ROOM > MAX_SOCKET_PATH:
        return None
    secret = runtime_secret(directory)
    if secret is None:
        return None
    key = daemon_key(env, cwd, mode, secret)
    return DaemonAddress(key, directory / f"{key}.sock", mode)


def runtime_secret(directory: Path) -> bytes | None:
    """The runtime directory's random key for daemon keys (0600, made on first use)."""
    path = directory / "secret"
    with suppress(FileExistsError, OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, os.urandom(32))
        finally:
            os.close(fd)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        secret = os.read(fd, 64)
    finally:
        os.close(fd)
    return secret if len(secret) == 32 else None


def command_of(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (the first argument that is not an option)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def daemon_allowed(env: Mapping[str, str]) -> bool:
    return env.get("PGBACKFLOW_DAEMON", "").strip().lower() not in _OFF


def wants_daemon(argv: list[str], env: Mapping[str, str]) -> bool:
    return (daemon_allowed(env) and "--debug" not in argv
            and command_of(argv) not in IN_PROCESS_COMMANDS)


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def send_message(sock: socket.socket, message: Mapping[str, object]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


class LineReader:
    """Newline-delimited JSON messages from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def next(self) -> dict[str, object] | None:
        """The next message; None at end of stream."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
            if len(self.buffer) > MAX_MESSAGE:
                raise ValueError("message too long")
        line, _, self.buffer = self.buffer.partition(b"\n")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
        return message

    def next_or_end(self) -> dict[str, object] | None:
        """The next message; None at end of stream, or when the stream broke."""
        try:
            return self.next()
        except (OSError, ValueError):
            return None


def run_in_daemon(where: DaemonAddress, argv: list[str], cwd: str) -> int | None:
    """Run ``argv`` (a command's arguments, or the engine's for a flow run) in the daemon
    at ``where``; its exit code, or None when no daemon took it (none running, another
    user's, refused): then the caller runs it. A daemon that takes the command but does not
    say so within :data:`ACCEPT_TIMEOUT_S` is an error, never a second run here."""
    std_fds = [0, 1, 2]
    try:
        for fd in std_fds:
            os.fstat(fd)
    except OSError:
        return None  # a closed stdin/stdout: nothing to hand over
    # Signals this process ignores (nohup, a background job of a non-interactive shell)
    # stay ignored by the command, as they would be by a process of its own.
    ignored = [int(s) for s in FORWARDED_SIGNALS if signal.getsignal(s) is signal.SIG_IGN]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(ACCEPT_TIMEOUT_S)
        try:
            sock.connect(str(where.socket))
            if peer_uid(sock) != os.getuid():
                return None
        except OSError:
            return None
        umask = os.umask(0o022)
        os.umask(umask)
        request = {
            "key": where.key, "argv": ["pgbackflow", *argv], "cwd": cwd, "umask": umask,
            "env": {name: value for name, value in os.environ.items() if is_volatile(name)},
            "ignored": ignored,
        }
        payload = json.dumps(request).encode() + b"\n"
        reader = LineReader(sock)  # one reader: "exit" may come in the same read as "started"
        try:
            socket.send_fds(sock, [payload], std_fds)
            reply = reader.next()
        except TimeoutError:
            sys.stderr.write(f"error: the pgbackflow daemon at {where.socket} took the command "
                             f"but did not start it within {ACCEPT_TIMEOUT_S:.0f} s; stop it "
                             "with `pgbackflow daemon stop` (or run with "
                             "PGBACKFLOW_DAEMON=off) and rerun\n")
            return 1
        except (OSError, ValueError):
            return None  # it closed the connection before forking: nothing started
        if reply is not None and isinstance(reply.get("exit"), int):
            return _exit_code_of(reply)  # it ran (and ended) there: never a second run here
        child = reply.get("started") if reply is not None else None
        if not isinstance(child, int):
            return None  # refused (its reason is in the daemon's log)
        sock.settimeout(None)
        return _wait_for_exit(sock, reader, ignored, child)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT  # before the command started; closing ends it if it did
    finally:
        sock.close()


def _wait_for_exit(sock: socket.socket, reader: LineReader, ignored: list[int],
                   child: int) -> int:
    """Forward signals to the command (process ``child``, leader of its own session) until
    its exit code arrives; a command killed by a signal kills this process with it (a shell,
    or Prefect's worker, sees what happened)."""

    def forward(signum: int, _frame: object) -> None:
        with suppress(OSError):
            send_message(sock, {"signal": signum})

    def stop_job(_signum: int, _frame: object) -> None:
        # Ctrl-Z: the command and its tools stop with this process, as a job of its own
        # would; a stopped process reads no socket, so the signals go to its group directly.
        with suppress(OSError):
            os.killpg(child, signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)

    def continue_job(_signum: int, _frame: object) -> None:
        with suppress(OSError):
            os.killpg(child, signal.SIGCONT)

    for signum in FORWARDED_SIGNALS:
        if int(signum) not in ignored:
            signal.signal(signum, forward)
    if signal.getsignal(signal.SIGTSTP) is not signal.SIG_IGN:
        signal.signal(signal.SIGTSTP, stop_job)
    signal.signal(signal.SIGCONT, continue_job)
    while True:
        message = reader.next_or_end()
        if message is None:
            sys.stderr.write("error: the pgbackflow daemon ended while it ran this command; "
                             "check the command's outcome and rerun it (PGBACKFLOW_DAEMON=off "
                             "runs commands without the daemon)\n")
            return 1
        if isinstance(message.get("exit"), int):
            return _exit_code_of(message)


def _exit_code_of(message: Mapping[str, object]) -> int:
    """The command's exit code from its ``exit`` message; a command killed by a signal
    kills this process with it."""
    code = message["exit"]
    assert isinstance(code, int)
    killed_by = message.get("signal")
    if isinstance(killed_by, int) and killed_by in {int(s) for s in signal.Signals}:
        sys.stdout.flush()
        signal.signal(killed_by, signal.SIG_DFL)
        os.kill(os.getpid(), killed_by)
    return code


def start_daemon(where: DaemonAddress) -> None:
    """Start a daemon for ``where`` in the background (its own session, no terminal)."""
    import subprocess  # only here: the common path imports nothing it does not use

    with suppress(OSError):
        if time.time() - where.failed.stat().st_mtime < FAILED_MARK_S:
            return
    try:
        log_fd = os.open(where.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        return
    try:
        # Our own interpreter and module, argv we built: no shell.
        subprocess.Popen(  # nosec B603
            [sys.executable, "-m", "pgbackflow.daemon", str(where.socket), where.key,
             where.mode],
            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, start_new_session=True,
            close_fds=True,
            # Without this command's volatile variables: /proc/PID/environ keeps a process's
            # first environment, and a worker's supervisor finds a run's processes by the
            # PREFECT__FLOW_RUN_ID there (the daemon would pass for the run that started it).
            env={name: value for name, value in os.environ.items() if not is_volatile(name)})
    except OSError:
        pass
    finally:
        os.close(log_fd)


def _cwd() -> str | None:
    """The working directory; None if it was removed (the command runs here and says so)."""
    try:
        return os.getcwd()
    except OSError:
        return None


def run_flow_run() -> None:
    """``python -m pgbackflow.engine``: Prefect's ``python -m prefect.engine`` for a flow run
    a worker started, run in a warm daemon; without one, the engine itself in this process
    (same pid, same environment) and a daemon started for the next run."""
    cwd = _cwd()
    if daemon_allowed(os.environ) and cwd is not None:
        where = address(os.environ, cwd, "flow-run")
        if where is not None:
            code = run_in_daemon(where, sys.argv[1:], cwd)
            if code is not None:
                sys.exit(code)
            start_daemon(where)
    sys.stdout.flush()
    sys.stderr.flush()
    # Our own interpreter, Prefect's engine module, the worker's arguments: no shell.
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *sys.argv[1:]])  # nosec B606


def main() -> None:
    """The ``pgbackflow`` executable."""
    argv = sys.argv[1:]
    cwd = _cwd()
    if wants_daemon(argv, os.environ) and cwd is not None:
        where = address(os.environ, cwd)
        if where is not None:
            code = run_in_daemon(where, argv, cwd)
            if code is not None:
                sys.exit(code)
            # A daemon already starting or serving holds the lock: the new one exits at once.
            start_daemon(where)
    try:
        from pgbackflow.cli import main as run_here
    except KeyboardInterrupt:
        # Ctrl-C while Prefect and the flows are imported (seconds), before the command's
        # own handling exists: interrupted, as later, not a traceback of the imports.
        if "--debug" in argv:
            raise
        sys.stderr.write("interrupted\n")
        sys.exit(128 + signal.SIGINT)
    run_here()


class RunningDaemon(NamedTuple):
    """A daemon of this user (``pgbackflow daemon status``)."""

    key: str
    pid: int
    socket: Path


def running_daemons(env: Mapping[str, str]) -> list[RunningDaemon]:
    """This user's daemons: those holding their lock (a dead one's lock is free)."""
    import fcntl

    directory = runtime_dir(env)
    if directory is None:
        return []
    found = []
    for lock in sorted(directory.glob("*.lock")):
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:  # held: a daemon is alive; it wrote its pid there
                pid = int(os.read(fd, 32).decode().strip() or 0)
                if pid > 0:
                    found.append(RunningDaemon(lock.stem, pid, lock.with_suffix(".sock")))
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except ValueError:
            pass
        finally:
            os.close(fd)
    return found


def stop_daemons(env: Mapping[str, str]) -> list[RunningDaemon]:
    """SIGTERM every daemon of this user (their running commands go on); those stopped."""
    stopped = []
    for daemon in running_daemons(env):
        try:
            os.kill(daemon.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        stopped.append(daemon)
    return stopped
