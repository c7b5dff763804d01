"""The one way pgbackflow runs external binaries (pg_dump, pg_restore, pg_basebackup, ...).

Children get a clean argv (never a password: that travels in a 0600 passfile named by
PGPASSFILE), their stderr is kept as a bounded tail for error messages, and a child is
killed, never orphaned, when the caller fails or is cancelled.
"""

from __future__ import annotations

import collections
import fcntl
import io
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal, Protocol

from pgbackflow.tasks.errors import PgBackflowError

STDERR_TAIL_LINES = 20
STDERR_ERROR_LINES = 500
READ_SIZE = 1024 * 1024
#: Pipe buffer for streamed stdin/stdout. Linux's 64 KiB default makes the tool wait
#: whenever we pause to encrypt and write a chunk (and pg_dump's server session with it);
#: 1 MiB (the unprivileged maximum) lets it run ahead.
PIPE_SIZE = 1024 * 1024


class ToolFailedError(PgBackflowError):
    """An external binary exited non-zero."""

    def __init__(self, result: ToolResult) -> None:
        self.result = result
        self.returncode = result.returncode
        lines = [line for line in result.stderr_tail.splitlines() if line.strip()][-5:]
        detail = f": {' | '.join(lines)}" if lines else ""
        super().__init__(f"{result.tool} failed (exit code {result.returncode}){detail}")


@dataclass(frozen=True)
class OsUser:
    """An OS account a child process runs as (initdb and postgres refuse root).

    Attributes:
        name: User name.
        uid: User id.
        gid: Primary group id.
    """

    name: str
    uid: int
    gid: int


class ByteSink(Protocol):
    """Anything that takes bytes."""

    def write(self, data: bytes, /) -> int | None: ...


@dataclass(frozen=True)
class ToolResult:
    """How a finished child went.

    Attributes:
        tool: Short name of the binary, for messages.
        returncode: Exit status.
        stdout: Captured stdout (empty when it was streamed elsewhere).
        stderr_tail: Last lines of stderr.
        stderr_errors: Every stderr line that reports an error (bounded), for tools like
            pg_restore whose errors scroll out of the tail.
    """

    tool: str
    returncode: int
    stdout: bytes
    stderr_tail: str
    stderr_errors: tuple[str, ...] = ()


#: Variables no external program gets: libpq's (a stray PGPASSWORD/PGHOST in the caller's
#: shell must not change where a child connects or with which secret: connection details
#: are always explicit), and the S3 and Prefect credentials pgbackflow itself uses (no
#: child talks to either, and a child may outlive the command: a server `pitr --start`
#: leaves running, whose superusers can read its environment, or pg_receivewal).
CHILD_ENV_DROPPED = ("PG", "AWS_", "PREFECT_")
#: Kept all the same: the session's time zone and client encoding, and the id of the flow
#: run a child works for (no secret; it tells an operator, and `ps e`, whose pg_dump it is).
CHILD_ENV_KEPT = frozenset({"PGTZ", "PGCLIENTENCODING", "PREFECT__FLOW_RUN_ID"})


SignalHandler = Callable[[int, FrameType | None], None]

#: The signals `unwind` turned into KeyboardInterrupt in this process, in order. A flow
#: that catches the interrupt itself (a verification ends Cancelled, its sandbox removed)
#: leaves the command only this to tell a stop (SIGTERM) from Ctrl-C.
_unwound_by: list[int] = []
_done: list[str] = []


def unwind(signum: int, frame: FrameType | None) -> None:
    """A signal handler: unwind the main thread as Ctrl-C does (``finally`` blocks and
    clean-up run), remembering which signal it was (`unwound_by`)."""
    _unwound_by.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def uninterrupted(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` to its end even if Ctrl-C or a stop (:func:`unwind`) arrives during
    it, then raise that interruption. A clean-up cut short by a second signal, or by the
    first one landing in it, left work folders and half-deleted directories behind.
    ``cleanup`` must be safe to run again from the start (it is, after an interruption)."""
    interrupted: KeyboardInterrupt | None = None
    while True:
        try:
            cleanup()
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
        except BaseException as exc:
            if interrupted is not None:  # still an interruption, with what failed after it
                raise interrupted from exc
            raise
    if interrupted is not None:
        raise interrupted


def remove_tree(path: Path) -> None:
    """``rm -rf path`` that an interruption does not cut short (see :func:`uninterrupted`)."""
    uninterrupted(lambda: shutil.rmtree(path, ignore_errors=True))


def note_done(what: str) -> None:
    """Note work this process finished for good (a backup stored complete): a command
    interrupted afterwards says so, instead of leaving "interrupted" to read as lost."""
    _done.append(what)


def done_before_interrupt() -> tuple[str, ...]:
    """What :func:`note_done` noted, in order, each once (a retried task notes again)."""
    return tuple(dict.fromkeys(_done))


def forget_done() -> None:
    """A new command begins: what earlier ones in this process did is not its own."""
    _done.clear()


def unwound_by() -> frozenset[int]:
    """The signals `unwind` handled in this process (a stop, then Ctrl-C during the
    clean-up, is still a stop)."""
    return frozenset(_unwound_by)


@contextmanager
def signal_handler(
    signum: int, handler: SignalHandler, *, unless_ignored: bool = False
) -> Iterator[bool]:
    """Handle ``signum`` with ``handler`` while the block runs, then restore the handler
    before it; yields whether it was installed (only the main thread can, and with
    ``unless_ignored`` a signal the process was started ignoring stays ignored)."""
    installed = not (unless_ignored and signal.getsignal(signum) == signal.SIG_IGN)
    if installed:
        try:
            previous = signal.signal(signum, handler)
        except ValueError:  # not the main thread: the caller owns signal handling
            installed = False
    if not installed:
        yield False
        return
    try:
        yield True
    finally:
        signal.signal(signum, previous)


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours minus `CHILD_ENV_DROPPED`, plus ``extra``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name in CHILD_ENV_KEPT or not name.startswith(CHILD_ENV_DROPPED)
    }
    env.setdefault("LC_ALL", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


class _StderrTail:
    """Drains a child's stderr on a thread, keeping the last lines."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self._lines.append(line)
            if "error" in line.lower() and len(self.errors) < STDERR_ERROR_LINES:
                self.errors.append(line)
        stream.close()

    def text(self) -> str:
        self._thread.join(timeout=5)
        return "\n".join(self._lines)


class Tool:
    """One external binary: runs it, streams it, explains its failures.

    Args:
        path: The executable.
        name: Short name for messages (defaults to the file name).
    """

    def __init__(self, path: Path, name: str | None = None) -> None:
        self.path = path
        self.name = name or path.name

    def _popen(
        self, args: Sequence[str | Path], env: Mapping[str, str] | None, *, stdin: int | None,
        stdout: int | None, cwd: Path | None = None, user: OsUser | None = None,
        die_with_parent: bool = False,
    ) -> subprocess.Popen[bytes]:
        switch: dict[str, Any] = {}
        if die_with_parent:
            switch["preexec_fn"] = _die_with_parent
        if user is not None and os.geteuid() != user.uid:
            # extra_groups=[] drops root's supplementary groups along with its uid.
            switch = {"user": user.uid, "group": user.gid, "extra_groups": []}
        # An argv list without a shell; the program is a resolved toolset binary.
        return subprocess.Popen(  # nosec B603
            [str(self.path), *map(str, args)],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=child_environment(env),
            cwd=cwd,
            # Own process group: a cancelled flow kills the child and anything it spawned.
            start_new_session=True,
            **switch,
        )

    def _finish(
        self, proc: subprocess.Popen[bytes], tail: _StderrTail, stdout: bytes, *, check: bool = True
    ) -> ToolResult:
        returncode = proc.wait()
        text = tail.text()
        result = ToolResult(self.name, returncode, stdout, text, tuple(tail.errors))
        if check and returncode != 0:
            raise ToolFailedError(result)
        return result

    def run(
        self,
        args: Sequence[str | Path],
        *,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        cwd: Path | None = None,
        timeout: float | None = None,
        user: OsUser | None = None,
    ) -> ToolResult:
        """Run to completion, capturing stdout.

        Args:
            args: Arguments after the binary.
            env: Extra environment variables.
            check: Raise ToolFailedError on a non-zero exit.
            cwd: Working directory.
            timeout: Seconds before the child (and its process group) is killed.
            user: Run as this OS user (needs root).
        """
        with self._running(
            args, env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd=cwd, user=user
        ) as (proc, tail):
            stdout = proc.stdout
            assert stdout is not None
            output: list[bytes] = []
            reader = threading.Thread(target=lambda: output.append(stdout.read()), daemon=True)
            reader.start()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise PgBackflowError(
                    f"{self.name} did not finish within {timeout:.0f} s and was stopped"
                ) from None
            reader.join()
            return self._finish(proc, tail, b"".join(output), check=check)

    def stream_out(
        self, args: Sequence[str], sink: ByteSink, *, env: Mapping[str, str] | None = None
    ) -> ToolResult:
        """Run, copying stdout into ``sink`` as it is produced (constant memory)."""
        with self._running(args, env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as (
            proc, tail,
        ):
            assert isinstance(proc.stdout, io.BufferedReader)
            _widen_pipe(proc.stdout.fileno())
            while data := proc.stdout.read1(READ_SIZE):
                sink.write(data)
            return self._finish(proc, tail, b"")

    def stream_in(
        self,
        args: Sequence[str],
        chunks: Iterable[bytes],
        *,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> ToolResult:
        """Run, feeding ``chunks`` to stdin; stdout is captured.

        With ``check=False`` a non-zero exit is returned, not raised, for callers that
        judge the errors themselves (pg_restore's "role does not exist").
        """
        with self._running(args, env, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as (
            proc, tail,
        ):
            assert proc.stdin is not None and proc.stdout is not None
            _widen_pipe(proc.stdin.fileno())
            output: list[bytes] = []
            stdout = proc.stdout
            reader = threading.Thread(target=lambda: output.append(stdout.read()), daemon=True)
            reader.start()
            try:
                for chunk in chunks:
                    proc.stdin.write(chunk)
                proc.stdin.close()
            except BrokenPipeError:
                # The child stopped reading: its exit code and stderr say why.
                pass
            reader.join()
            return self._finish(proc, tail, b"".join(output), check=check)

    @contextmanager
    def background(
        self, args: Sequence[str | Path], *, env: Mapping[str, str] | None = None
    ) -> Iterator[BackgroundTool]:
        """Start a long-running child (stdout discarded); it is killed on leaving the block.

        Use :meth:`BackgroundTool.stop` for a graceful SIGTERM first. The child also gets
        SIGTERM if this thread dies (kill -9 of the caller), so it never outlives it: an
        orphaned pg_receivewal would keep its replication slot busy.
        """
        with self._running(
            args, env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, die_with_parent=True
        ) as (proc, tail):
            yield BackgroundTool(self.name, proc, tail)

    @contextmanager
    def _running(
        self, args: Sequence[str | Path], env: Mapping[str, str] | None, *, stdin: int | None,
        stdout: int | None, cwd: Path | None = None, user: OsUser | None = None,
        die_with_parent: bool = False,
    ) -> Iterator[tuple[subprocess.Popen[bytes], _StderrTail]]:
        try:
            proc = self._popen(
                args, env, stdin=stdin, stdout=stdout, cwd=cwd, user=user,
                die_with_parent=die_with_parent,
            )
        except OSError as exc:
            raise PgBackflowError(
                f"cannot run {self.name} at '{self.path}' ({exc.strerror}): check the toolset "
                "installation (pgbackflow toolsets list)"
            ) from None
        assert proc.stderr is not None
        tail = _StderrTail(proc.stderr)
        try:
            yield proc, tail
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None and not stream.closed:
                    with suppress(BrokenPipeError):
                        stream.close()
            if proc.poll() is None:
                _kill_group(proc)


class BackgroundTool:
    """A child started by :meth:`Tool.background`."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], tail: _StderrTail) -> None:
        self.name = name
        self._proc = proc
        self._tail = tail

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._proc.pid

    def exited(self) -> ToolResult | None:
        """The result if the child has exited, else None."""
        code = self._proc.poll()
        if code is None:
            return None
        return ToolResult(self.name, code, b"", self._tail.text(), tuple(self._tail.errors))

    def stop(self, timeout: float = 10) -> ToolResult:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; returns how it ended."""
        if self._proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(self._proc)
        result = self.exited()
        assert result is not None
        return result


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (someone else's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: alive, someone else's; else unsure: keep it
        return True
    return True


def _read_boot_tag() -> str:
    """This boot of this machine's kernel (shared by its containers): a pid recorded under
    another boot (or by another machine sharing the folder) means nothing here."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip().replace("-", "")[:12]
    except OSError:
        return "unknown"


#: Put into the names of work files and folders, with the owner's pid (see owner_state).
BOOT_TAG = _read_boot_tag()


def owner_state(
    path: str, boot: str, pid: int, *, dir_fd: int | None = None
) -> Literal["alive", "gone", "unknown"]:
    """Whether the process that made ``path`` (and holds a flock on it while it works) lives.

    Alive: the lock is held (by any process of this kernel). Gone: made in this boot, lock
    free, and no process has its pid. Unknown otherwise (another boot or machine, no lock
    support, or the pid is in use again): callers judge by age, or keep it.
    """
    if boot != BOOT_TAG or boot == "unknown":
        return "unknown"
    try:
        fd = os.open(
            path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return "unknown"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "alive"
    except OSError:
        return "unknown"
    finally:
        os.close(fd)  # also drops the lock we may just have taken
    return "unknown" if pid_alive(pid) else "gone"


def _widen_pipe(fd: int) -> None:
    """Give a pipe PIPE_SIZE of buffer; where the system refuses, the default is fine."""
    with suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the parent thread exits."""
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
