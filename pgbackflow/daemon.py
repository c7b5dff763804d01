"""The warm resident process behind ``pgbackflow`` commands (see :mod:`pgbackflow.launcher`).

``python -m pgbackflow.daemon SOCKET KEY`` (the launcher starts it; nobody else needs to):

1. takes the daemon's lock (one daemon per key; a second one exits at once) and checks that
   the key still describes this process (the code may have changed since the launcher
   computed it);
2. sets the Prefect settings every command sets before importing Prefect, then imports the
   CLI, Prefect's engines and every pgbackflow module, and asks the Prefect API for its
   version once (each fresh process does, ~0.5 s); with no thread started, so forking is
   safe;
3. listens on SOCKET (0600, in the user's 0700 runtime directory; the peer must be this
   user). For each command it forks a child that takes the launcher's stdin/stdout/stderr,
   working directory, umask and volatile variables, becomes its own session and runs the
   command exactly as ``pgbackflow`` would; the exit code goes back to the launcher. A
   signal the launcher forwards is raised in the child; a launcher that disappears (killed)
   is treated as SIGTERM, then SIGKILL after :data:`GONE_GRACE_S`;
4. exits after :data:`pgbackflow.launcher.IDLE_S` idle seconds, on SIGTERM, or when its
   socket is removed or replaced. Running commands are not stopped: they finish and report
   their exit codes themselves.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import gc
import importlib
import io
import json
import os
import pkgutil
import runpy
import select
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any, NoReturn

from pgbackflow.launcher import (
    FORWARDED_SIGNALS,
    IDLE_S,
    MAX_MESSAGE,
    MODES,
    DaemonAddress,
    LineReader,
    daemon_key,
    is_volatile,
    peer_uid,
    runtime_dir,
    runtime_secret,
    send_message,
)

#: Seconds a command whose launcher vanished gets between SIGTERM and SIGKILL.
GONE_GRACE_S = 10.0
#: Set by a command child once its exit code is on its way: the launcher closing its end
#: then is no vanished launcher.
_finished = threading.Event()
#: Modules the first command of a process imports lazily (found by diffing ``sys.modules``
#: around a backup and a verification run in a process that had imported the rest).
LAZY_MODULES = ("prefect.flow_engine", "prefect.task_engine", "prefect.automations",
                "prefect.client.orchestration", "prefect.events.clients",
                "prefect.logging.handlers", "prefect.runner", "fastapi", "graphviz")


def log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pgbackflow daemon {os.getpid()}: "
                     f"{message}\n")
    sys.stderr.flush()


def warm_up(mode: str) -> None:
    """Everything a command would import or ask first, done once, before any fork."""
    # First: the CLI records the user's environment before any setting is added to it.
    from pgbackflow.cli.common import prefect_env_defaults

    if mode == "cli":
        # A flow run keeps the worker's settings (its logs must reach the worker's output).
        prefect_env_defaults(debug=False)
    import pgbackflow.blocks
    import pgbackflow.cli
    import pgbackflow.deployments
    import pgbackflow.flows
    import pgbackflow.tasks

    for package in (pgbackflow.tasks, pgbackflow.flows, pgbackflow.blocks,
                    pgbackflow.deployments, pgbackflow.cli):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if module.name != "pgbackflow.cli.__main__":
                importlib.import_module(module.name)
    for name in LAZY_MODULES:
        with suppress(ImportError):
            importlib.import_module(name)
    _ask_the_api_once(mode)
    if mode == "cli":
        from prefect.settings import get_current_settings

        from pgbackflow.cli import click_command
        from pgbackflow.flows.common import heartbeat_settings

        click_command()  # typer builds it from the app at every call otherwise
        heartbeat_settings(get_current_settings())  # validating every setting: ~40 ms
    from pgbackflow.tasks.toolsets import available_toolsets

    # Each toolset's version and zstd support: pg_config runs (6 per backup) cached per
    # process (per binary's mtime), so every fork finds them known.
    zstd = {toolset.major: toolset.supports_zstd for toolset in available_toolsets()}
    log("PostgreSQL toolsets: " + (", ".join(
        f"{major}{' (zstd)' if has_zstd else ''}" for major, has_zstd in zstd.items()) or "none"))


def _ask_the_api_once(mode: str) -> None:
    """What each fresh process asks the Prefect API once, asked here so that every forked
    command finds it answered: the API's version (Prefect's clients ask it, and its event
    client asks it again under another key; a round trip of ~25 ms up to ~0.5 s on the
    first request) and whether the lost-run automation exists. Best effort: with the API
    down, each command asks (and reports) it itself."""
    import asyncio
    import logging

    from prefect._internal.version_checking import check_server_version
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return  # a temporary local server per command: nothing to ask yet
    from prefect.client.orchestration import get_client

    from pgbackflow.flows.common import lost_run_detection_exists

    try:
        with get_client(sync_client=True) as client:
            client.raise_for_api_version_mismatch_once()
        # asyncio.run joins its executor's threads: none is left running before a fork.
        asyncio.run(check_server_version(url, logging.getLogger("pgbackflow.daemon"),
                                         raise_on_error=False))
        # Only looked up: creating it would start Prefect's event loop thread before the
        # forks. A missing one is created by the first command that sends heartbeats.
        lost_run_detection_exists()
    except Exception as exc:  # the commands will report it themselves
        log(f"Prefect API questions skipped: {type(exc).__name__}")


class Daemon:
    """One warm process serving one :class:`DaemonAddress`."""

    def __init__(self, where: DaemonAddress, listener: socket.socket, idle_s: float,
                 lock_fd: int) -> None:
        self.where = where
        self.lock_fd = lock_fd
        self.listener = listener
        self.idle_s = idle_s
        self.children: dict[int, socket.socket] = {}
        self.last_activity = time.monotonic()
        self.stopping = False
        self.socket_inode = os.stat(where.socket).st_ino

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        log(f"serving {self.where.socket}")
        while not self.stopping:
            self._reap()
            if not self.children and time.monotonic() - self.last_activity > self.idle_s:
                log(f"idle for {self.idle_s:.0f} s, exiting")
                break
            if not self._socket_is_ours():
                log("socket removed or replaced, exiting")
                break
            with suppress(InterruptedError):
                ready, _, _ = select.select([self.listener], [], [], 0.5)
                if ready:
                    self._accept()
        self._close()

    def _stop(self, signum: int, _frame: object) -> None:
        log(f"received {signal.Signals(signum).name}, exiting (running commands go on)")
        self.stopping = True

    def _socket_is_ours(self) -> bool:
        try:
            return os.stat(self.where.socket).st_ino == self.socket_inode
        except OSError:
            return False

    def _close(self) -> None:
        if self._socket_is_ours():
            with suppress(OSError):
                os.unlink(self.where.socket)
        self.listener.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.last_activity = time.monotonic()
        fds: list[int] = []
        try:
            conn.settimeout(5)
            if peer_uid(conn) != os.getuid():
                log("refused a connection of another user")
                conn.close()
                return
            request, fds = _receive_request(conn)
            problem = _request_problem(request, fds, self.where.key)
            if problem:
                log(f"refused a command: {problem}")
                send_message(conn, {"refused": problem})
                conn.close()
                for fd in fds:
                    os.close(fd)
                return
        except (OSError, ValueError) as exc:
            log(f"dropped a connection: {type(exc).__name__}: {exc}")
            conn.close()
            for fd in fds:
                with suppress(OSError):
                    os.close(fd)
            return
        if self.where.mode == "flow-run":
            command = f"flow run {request.get('env', {}).get('PREFECT__FLOW_RUN_ID', '?')}"
        else:
            command = next((arg for arg in request["argv"][1:] if arg in COMMAND_NAMES),
                           "(other)")
        pid = os.fork()
        if pid == 0:
            self._become_command(conn, request, fds)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        # A sub-command's name only: any other argument may be a DSN with a password.
        log(f"command {command[:60]!r}: process {pid}")

    def _become_command(self, conn: socket.socket, request: dict[str, Any],
                        fds: list[int]) -> NoReturn:
        """In the forked child: drop the daemon's state, take the launcher's, run."""
        code = 1
        try:
            # The child says it started, before it runs anything: its "exit" then always
            # follows. (Said by the daemon after the fork, a quick command's "exit" came
            # first under load, and the launcher ran the command a second time itself.)
            send_message(conn, {"started": os.getpid()})
            self.listener.close()
            os.close(self.lock_fd)  # the lock is the daemon's, not its commands'
            for other in self.children.values():
                other.close()
            # The signals a process of its own would start with: the launcher's ignored
            # ones ignored (nohup), the rest at their defaults (the daemon's TERM and INT
            # handlers are its own).
            ignored = set(request.get("ignored", []))
            for signum in FORWARDED_SIGNALS:
                signal.signal(signum, signal.SIG_IGN if int(signum) in ignored
                              else signal.SIG_DFL)
            if int(signal.SIGINT) not in ignored:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            os.setsid()
            # Blocking again: the accept's 5 s timeout would end the follower's wait for a
            # signal after 5 s, and read as a vanished launcher.
            conn.settimeout(None)
            code = run_command(conn, request, fds, self.where.mode)
        finally:
            os._exit(code)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            # Killed by a signal: what a shell reports, and the signal for the launcher to
            # die of (Prefect's worker tells a SIGTERM from an exit code 143).
            message: dict[str, int] = ({"exit": code} if code >= 0
                                       else {"exit": 128 - code, "signal": -code})
            with suppress(OSError):
                send_message(conn, message)
            conn.close()
            self.last_activity = time.monotonic()


def _receive_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    payload, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 3)
    while not payload.endswith(b"\n"):
        more = conn.recv(MAX_MESSAGE)
        if not more or len(payload) > MAX_MESSAGE:
            for fd in fds:
                os.close(fd)
            raise ValueError("incomplete request")
        payload += more
    request = json.loads(payload)
    if not isinstance(request, dict):
        for fd in fds:
            os.close(fd)
        raise ValueError("request is not a JSON object")
    return request, list(fds)


def _request_problem(request: Mapping[str, Any], fds: list[int], key: str) -> str | None:
    if request.get("key") != key:
        return "the launcher's key differs from this daemon's"
    if len(fds) != 3:
        return f"expected stdin, stdout and stderr, got {len(fds)} descriptors"
    argv = request.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return "argv is not a list of strings"
    if not isinstance(request.get("cwd"), str) or not isinstance(request.get("umask"), int):
        return "cwd or umask missing"
    ignored = request.get("ignored", [])
    if not isinstance(ignored, list) or not all(isinstance(n, int) for n in ignored):
        return "ignored is not a list of signal numbers"
    env = request.get("env", {})
    if not isinstance(env, dict) or not all(
            isinstance(name, str) and is_volatile(name) and isinstance(value, str)
            for name, value in env.items()):
        return "env holds more than the volatile variables"
    return None


def run_command(conn: socket.socket, request: Mapping[str, Any], fds: list[int],
                mode: str) -> int:
    """Run the launcher's command (or flow run) in this forked process; its exit code."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.umask(int(request["umask"]))
    _take_volatile_env(request.get("env", {}))
    _attach_std_streams()
    threading.Thread(target=_follow_launcher, args=(conn,), daemon=True,
                     name="pgbackflow-launcher").start()
    code = 1
    try:
        os.chdir(request["cwd"])
        if mode == "flow-run":
            sys.argv = ["prefect.engine", *request["argv"][1:]]
            # What `python -m prefect.engine` runs, in this warm process. It imported
            # prefect.engine on purpose (that is what makes it warm): runpy's warning about
            # it went to the worker's output with every run.
            warnings.filterwarnings("ignore", category=RuntimeWarning,
                                    message=r"'prefect\.engine' found in sys\.modules")
            runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(request["argv"])
            from pgbackflow.cli import main

            main(prog_name="pgbackflow")
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except FileNotFoundError as exc:  # the working directory is gone
        sys.stderr.write(f"error: {exc}\n")
    finally:
        # What the interpreter does at exit: join the threads, run threading's exit hooks
        # (Prefect's log and event workers send what they hold), then the atexit ones.
        # Ctrl-C during one of them escaped this block before, and the launcher got exit 1
        # with no word: each step runs, and a finished command ends as interrupted (a
        # process of its own dies of the SIGINT there).
        interrupted = False
        steps = (threading._shutdown, atexit._run_exitfuncs,  # type: ignore[attr-defined]
                 sys.stdout.flush, sys.stderr.flush)
        for step in steps:
            try:
                with suppress(Exception):
                    step()
            except KeyboardInterrupt:
                interrupted = True
        if interrupted and code == 0:
            code = 128 + signal.SIGINT
            with suppress(Exception, KeyboardInterrupt):
                sys.stderr.write("interrupted\n")
                sys.stderr.flush()
        _finished.set()
        for _attempt in range(3):  # the launcher must hear the exit code
            try:
                with suppress(OSError):
                    send_message(conn, {"exit": code})
                break
            except KeyboardInterrupt:
                continue
    return code


def _take_volatile_env(env: Mapping[str, str]) -> None:
    """The launcher's volatile variables replace the daemon's (its starter's run id, PWD)."""
    for name in [name for name in os.environ if is_volatile(name) and name not in env]:
        del os.environ[name]
    os.environ.update(env)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1


def _attach_std_streams() -> None:
    """sys.stdout/stderr and the CLI's consoles decided buffering, width and colour from the
    daemon's /dev/null; decide again for the launcher's terminal, pipe or file."""
    for stream, line_buffering in ((sys.stdout, os.isatty(1)), (sys.stderr, True)):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=line_buffering)
    from pgbackflow.cli.render import attach_consoles

    attach_consoles()


def _follow_launcher(conn: socket.socket) -> None:
    """Raise forwarded signals here; if the launcher vanishes, end as if interrupted."""
    reader = LineReader(conn)
    while True:
        message = reader.next_or_end()
        if message is None:
            break
        signum = message.get("signal")
        if isinstance(signum, int) and signum in {int(s) for s in signal.Signals}:
            os.kill(os.getpid(), signum)
    if _finished.is_set():
        return
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GONE_GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def listen(where: DaemonAddress) -> socket.socket:
    """Bind ``where.socket`` (0600) and move it into place only once it accepts."""
    temporary = where.socket.with_name(f".{where.key}.{os.getpid()}")
    with suppress(FileNotFoundError):
        os.unlink(temporary)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(temporary))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    os.replace(temporary, where.socket)
    return listener


#: The CLI's sub-command names (the log names a command only by one of these).
COMMAND_NAMES: set[str] = set()


def _command_names() -> set[str]:
    import typer.main

    from pgbackflow.cli import app

    # A click group (typer vendors its own click): its sub-commands by name.
    commands = getattr(typer.main.get_command(app), "commands", {})
    return {name for name in commands if isinstance(name, str)}


def _cannot_serve(where: DaemonAddress, reason: str) -> int:
    """Say why in the log, and mark these inputs so no launcher starts another daemon."""
    log(f"not serving: {reason}")
    with suppress(OSError):
        where.failed.write_text(f"{reason}\n")
    return 1


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[2] not in MODES:
        sys.stderr.write("usage: python -m pgbackflow.daemon SOCKET KEY cli|flow-run "
                         "(pgbackflow starts it)\n")
        return 2
    socket_path, key, mode = Path(argv[0]), argv[1], argv[2]
    where = DaemonAddress(key, socket_path, mode)
    if runtime_dir(os.environ) != socket_path.parent:
        log(f"{socket_path.parent} is not this user's runtime directory, not starting")
        return 1
    lock_fd = os.open(where.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return 0  # another daemon for this key is starting or serving
        raise
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, f"{os.getpid()}\n".encode())
    try:
        secret = runtime_secret(socket_path.parent)
        same = secret is not None and daemon_key(os.environ, os.getcwd(), mode, secret) == key
    except FileNotFoundError:  # a flow run's temporary working directory, gone already
        same = False
    if not same:
        log("the code, settings or environment changed since the launcher asked; not starting")
        return 1
    _take_volatile_env({})  # its starter's; each command brings its own
    for signum in FORWARDED_SIGNALS:  # not its starter's (nohup): its commands' start clean
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    # In the starter's directory: Prefect reads prefect.toml/.env/pyproject.toml there at
    # import, the files the key describes.
    warm_up(mode)
    COMMAND_NAMES.update(_command_names() if mode == "cli" else ())
    os.chdir("/")  # each command runs in its launcher's directory; this one may go away
    if threading.active_count() != 1:
        names = ", ".join(t.name for t in threading.enumerate())
        return _cannot_serve(where, f"threads running after the warm-up ({names}); forking "
                                    "is unsafe")
    gc.collect()
    gc.freeze()  # the children share these pages; no collection of ours copies them
    try:
        listener = listen(where)
    except OSError as exc:
        return _cannot_serve(where, f"cannot listen on {where.socket}: {exc}")
    log(f"warm after {time.monotonic() - started:.2f} s")
    idle_s = float(os.environ.get("PGBACKFLOW_DAEMON_IDLE_S") or IDLE_S)
    Daemon(where, listener, idle_s, lock_fd).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
