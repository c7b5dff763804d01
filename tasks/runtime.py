"""Where a restored PostgreSQL server runs: a local process or a Docker container.

PITR into a directory (``--start``), PITR into a Docker volume and physical verification all
start a server on a restored data directory and wait until recovery ends and it is promoted,
restarting it once without the target when no transaction followed the target time. That
loop is :func:`recover`, written once; what differs per place is a :class:`PostgresRuntime`:
how the server is started, asked whether it is promoted, read (its log) and stopped.
:class:`LocalRuntime` runs ``pg_ctl`` as the server's OS user; the container runtime lives
with the Docker volume code (tasks/pitr_docker.py), which owns the container's settings.
The Docker SDK and its client are in tasks/docker_engine.py, imported only where a container
is used.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from pgbackflow.tasks.errors import DatabaseError
from pgbackflow.tasks.process import OsUser, Tool, ToolResult, child_environment, pid_alive
from pgbackflow.tasks.toolsets import Toolset

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: PostgreSQL's log line when replay ended before a recovery_target_time was reached.
TARGET_NOT_REACHED = "recovery ended before configured recovery target was reached"
#: The log line naming the last transaction replayed ("… at log time <timestamp>").
LAST_TRANSACTION = "last completed transaction was at log time"
#: How long a pg_ctl stop (each of fast and immediate) may take.
STOP_TIMEOUT_S = 60
#: A server that has not written postmaster.pid after this long did not start.
POSTMASTER_START_GRACE_S = 30.0


def log_tail(text: str, lines: int = 3) -> str:
    """A log's gist on one line: the ``lines`` lines that end with its last FATAL, PANIC or
    ERROR line (what led to it, e.g. the setting a FATAL "contains errors" is about), else
    its last ``lines`` lines."""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(kept)
              if any(word in line for word in ("FATAL", "PANIC", "ERROR"))]
    end = errors[-1] + 1 if errors else len(kept)
    return " | ".join(kept[max(0, end - lines):end]) or "no log output"


def last_transaction(log: str) -> str | None:
    """The time of the last transaction a recovery replayed, from the server's log."""
    last = None
    for line in log.splitlines():
        if LAST_TRANSACTION in line:
            last = line.split("log time", 1)[1].strip()
    return last


class StageRunner(Protocol):
    """Runs one named stage of a restore (``work``) and returns its result: directly, or as
    a Prefect task run of that name (flows/common.py), so each stage shows in the UI with
    its own state and timing while the restore's logic stays in plain functions."""

    def __call__(self, stage: str, work: Callable[[], T]) -> T: ...


def run_directly(stage: str, work: Callable[[], T]) -> T:
    """The :class:`StageRunner` outside Prefect: just run ``work``."""
    return work()


@dataclass(frozen=True)
class Recovery:
    """How a recovery ended.

    Attributes:
        last_transaction: "last completed transaction was at log time …" from the log.
        reached_target: False when no transaction followed the target time, so replay ran
            to the end of the WAL (the same data the target asks for).
        ended_at: ``(timeline, LSN)`` where replay ended, from the history file of the
            timeline the promotion began; None when the server wrote none.
    """

    last_transaction: str | None
    reached_target: bool
    ended_at: tuple[int, int] | None = None


class PostgresRuntime(ABC):
    """One restored server: how to start it, see it promoted, read its log, stop it."""

    @property
    @abstractmethod
    def description(self) -> str:
        """What the server is, for messages ("restored server in /srv/pg")."""

    @abstractmethod
    def log_offset(self) -> int:
        """Where the log ends now: :meth:`log_since` reads from there."""

    @abstractmethod
    def log_since(self, offset: int) -> str:
        """The server's log from ``offset`` on."""

    @abstractmethod
    def start(self) -> None:
        """Start the server (recovery begins); returns once it was launched."""

    @abstractmethod
    def wait_promoted(self, deadline: float) -> bool:
        """True once recovery ended and the server is promoted; False when it stopped
        first. Raises DatabaseError at ``deadline`` (``time.monotonic()``)."""

    @abstractmethod
    def newest_history(self) -> bytes | None:
        """The newest timeline history file in the server's ``pg_wal`` (the promotion
        writes one for the timeline it begins), or None when there is none."""

    @abstractmethod
    def drop_recovery_target(self) -> None:
        """Remove recovery_target_time (the server is stopped)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the server if it runs; idempotent."""


def recover(runtime: PostgresRuntime, timeout: float) -> Recovery:
    """Start ``runtime`` and wait until recovery ends and it is promoted.

    When no transaction followed the target, PostgreSQL stops ("recovery ended before
    configured recovery target was reached"): everything up to the target is replayed, so
    the target is dropped and the server started again, replaying to the end of the WAL.

    Raises:
        DatabaseError: the server stopped during recovery (the log's gist says why), or was
            not promoted within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    reached = True
    for attempt in (1, 2):
        offset = runtime.log_offset()
        runtime.start()
        if runtime.wait_promoted(deadline):
            break
        log = runtime.log_since(offset)
        if attempt == 1 and TARGET_NOT_REACHED in log:
            runtime.drop_recovery_target()
            reached = False
            continue
        raise DatabaseError(f"{runtime.description} stopped during recovery: {log_tail(log)}")
    return Recovery(last_transaction(runtime.log_since(0)), reached,
                    replay_end(runtime.newest_history()))


def replay_end(history: bytes | None) -> tuple[int, int] | None:
    """``(timeline, LSN)`` where replay ended: the last entry of the history file the
    promotion wrote (the timeline it left and the switch point)."""
    from pgbackflow.tasks.wal import parse_history

    entries = parse_history(history) if history is not None else []
    return entries[-1] if entries else None


def newest_history_file(wal_dir: Path) -> Path | None:
    """The newest ``<timeline>.history`` in a ``pg_wal`` folder."""
    names = sorted(path.name for path in wal_dir.glob("*.history")
                   if re.fullmatch(r"[0-9A-F]{8}\.history", path.name))
    return wal_dir / names[-1] if names else None


def drop_recovery_target_setting(auto_conf: Path) -> None:
    """``postgresql.auto.conf`` without its recovery_target_time line."""
    kept = [line for line in auto_conf.read_text().splitlines()
            if not line.startswith("recovery_target_time")]
    auto_conf.write_text("\n".join(kept) + "\n")


class LocalRuntime(PostgresRuntime):
    """A server of a local toolset on ``data_dir``, run by ``pg_ctl`` as ``user``.

    Promotion is judged from pg_control, not from log text (the source's configuration may
    send the log elsewhere or in another language).
    """

    def __init__(
        self, data_dir: Path, toolset: Toolset, user: OsUser, log_path: Path,
        *, what: str = "restored server",
    ) -> None:
        self.data_dir = data_dir
        self.toolset = toolset
        self.user = user
        self.log_path = log_path
        self._what = what

    @property
    def description(self) -> str:
        return f"{self._what} in {self.data_dir}"

    def log_offset(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def start(self) -> None:
        # -W: recovery may take hours; wait_promoted watches it.
        self._pg_ctl(["-l", self.log_path, "-W", "start"], timeout=120, check=True)

    def start_ready(self) -> None:
        """Start the (promoted) server again and wait until it accepts connections."""
        offset = self.log_offset()
        result = self._pg_ctl(["-l", self.log_path, "-w", "-t", "300", "start"], timeout=360,
                              check=False)
        if result.returncode != 0:
            raise DatabaseError(f"{self.description} did not start again: "
                                f"{log_tail(self.log_since(offset) or result.stderr_tail)}")

    def wait_promoted(self, deadline: float) -> bool:
        pg_controldata = Tool(self.toolset.binary("pg_controldata"))
        began = time.monotonic()
        seen_running = False
        while time.monotonic() < deadline:
            if not (self.data_dir / "recovery.signal").exists():
                state = pg_controldata.run([str(self.data_dir)], check=False, timeout=30).stdout
                if b"in production" in state:
                    return True
            if (self.data_dir / "postmaster.pid").exists():
                seen_running = True
            elif seen_running or time.monotonic() - began > POSTMASTER_START_GRACE_S:
                return False
            time.sleep(0.2)
        raise DatabaseError(
            f"{self.description} did not finish recovery in time: see {self.log_path}, or "
            "allow a longer timeout"
        )

    def newest_history(self) -> bytes | None:
        newest = newest_history_file(self.data_dir / "pg_wal")
        return None if newest is None else newest.read_bytes()

    def drop_recovery_target(self) -> None:
        drop_recovery_target_setting(self.data_dir / "postgresql.auto.conf")

    def stop(self) -> None:
        stop_local_server(Tool(self.toolset.binary("pg_ctl")), self.data_dir, self.user)

    def _pg_ctl(self, args: list[str | Path], *, timeout: float, check: bool) -> ToolResult:
        return Tool(self.toolset.binary("pg_ctl")).run(
            ["-D", self.data_dir, *args], user=self.user, cwd=self.data_dir, timeout=timeout,
            check=check,
        )


def stop_local_server(pg_ctl: Tool, data_dir: Path, user: OsUser, cwd: Path | None = None) -> None:
    """Stop the server of ``data_dir`` if it runs: fast, then immediate, then SIGKILL to its
    postmaster (only if that process really serves ``data_dir``)."""
    pid_file = data_dir / "postmaster.pid"
    for mode in ("fast", "immediate"):
        if not pid_file.exists():
            return
        pg_ctl.run(
            ["-D", data_dir, "-m", mode, "-w", "-t", str(STOP_TIMEOUT_S), "stop"],
            user=user, cwd=cwd or data_dir, timeout=STOP_TIMEOUT_S + 30, check=False,
        )
    if kill_postmaster(data_dir, signal.SIGKILL):
        logger.warning("the postmaster of %s ignored pg_ctl stop: killed it", data_dir)


def kill_postmaster(data_dir: Path, signum: int, wait_s: float = 10) -> bool:
    """Send ``signum`` to the postmaster of ``data_dir`` (only if that process really serves
    ``data_dir``) and wait up to ``wait_s`` for it to end; False when none was running."""
    pid = _postmaster_pid(data_dir / "postmaster.pid")
    if pid is None or not _runs_in(pid, data_dir):
        return False
    with suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    return True


def watch_owner(data_dir: Path, remove: Path) -> int:
    """Tie a throwaway server to this process: returns the write end of a pipe whose other
    end a watchdog process (its own session, so a signal to our process group spares it)
    reads. When this process ends (even by SIGKILL) or closes the fd, the watchdog stops the
    server of ``data_dir`` if it still runs and deletes ``remove`` (see tasks/watchdog.py).
    """
    read_end, write_end = os.pipe()
    try:
        subprocess.Popen(  # nosec B603: our interpreter and module, fixed arguments
            [sys.executable, "-m", "pgbackflow.tasks.watchdog", str(data_dir.absolute()),
             str(remove.absolute())],
            stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True, env=child_environment(),
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return write_end


def _postmaster_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        return None


def _runs_in(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is a server of ``data_dir`` (they chdir there): a stale pid file's
    number may belong to an unrelated process by now."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == data_dir.absolute()
    except OSError:
        return False


__all__ = [
    "LAST_TRANSACTION",
    "TARGET_NOT_REACHED",
    "LocalRuntime",
    "PostgresRuntime",
    "Recovery",
    "StageRunner",
    "drop_recovery_target_setting",
    "kill_postmaster",
    "last_transaction",
    "log_tail",
    "recover",
    "run_directly",
    "stop_local_server",
    "watch_owner",
]
