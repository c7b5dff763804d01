"""``pgbackflow worker``: a Prefect process worker that stops within seconds of SIGTERM.

Prefect 3.8's ``prefect worker start`` turns SIGTERM into SIGINT for itself, stops polling and
exits in 1-3 s, but the flow-run processes it started run on, orphaned: each is a session
leader of its own (``start_new_session``), so neither that SIGTERM nor a process-group signal
reaches it. A backup then keeps running with no worker, or (its host going down next) dies
with its run left *Running* until the heartbeat automation notices, minutes later; a service
manager waiting for the unit to stop waits for it or kills it half-way.

This supervisor runs the Prefect worker as its child and, being a Linux child subreaper
(``PR_SET_CHILD_SUBREAPER``), keeps every flow-run process and its tools (pg_dump, ...) as
descendants even after the worker exits. On SIGTERM or SIGINT it:

1. freezes the Prefect worker (SIGSTOP: no new runs are taken, and it cannot kill its runs
   half-way, which it does when it stops, leaving their pg_dump behind);
2. sends SIGTERM to each flow-run process: Prefect's engine raises in the flow, pgbackflow's
   tool runner kills its children and storage writers drop their temporaries;
3. after :data:`GRACE_S`, SIGKILLs what is still there (tools included: they are ours now).
   A killed writer's temporary is removed by the next backup's sweep (dead pid, lock free);
4. stops the Prefect worker (SIGTERM, SIGCONT; SIGKILL if it is still there);
5. marks each of those runs *Crashed* where the engine could not say so itself, so no run
   stays *Running* and the deployment's concurrency slot is free for another worker.

All of it within :data:`STOP_S` of the signal.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from uuid import UUID

# Imported now, not after a signal: at load 25 the import alone took seconds of the 10.
from prefect.client.orchestration import get_client
from prefect.states import Crashed

#: Seconds flow-run processes get after SIGTERM before they are killed.
GRACE_S = 5.0
#: Seconds from the signal to this process's exit (what a service manager should allow).
STOP_S = 10.0
_PR_SET_CHILD_SUBREAPER = 36
_RUN_MARKER = b"PREFECT__FLOW_RUN_ID="


@dataclass
class _Stop:
    """The stop request a signal handler sets (handlers must not do the work themselves)."""

    event: threading.Event = field(default_factory=threading.Event)
    signum: int | None = None

    def request(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        self.event.set()


def worker_command(pool: str, name: str, limit: int | None) -> list[str]:
    """The ``prefect worker start`` command this supervisor runs (our own interpreter)."""
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
               "--type", "process"]
    if limit is not None:
        command += ["--limit", str(limit)]
    return [*command, "--name", name]


def supervise(command: Sequence[str], env: Mapping[str, str],
              say: Callable[[str], None] = lambda line: None) -> int:
    """Run the worker ``command`` until it exits or a SIGTERM/SIGINT arrives; its exit code.

    After a signal the return is 0 once every flow-run process is gone and its run is in a
    final state (within :data:`STOP_S`).
    """
    _become_subreaper()
    stop = _Stop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop.request)
    # Its own session: a signal to our process group (a terminal's Ctrl-C, a service
    # manager's group-wide SIGTERM) reaches it only through us, once (a second SIGTERM makes
    # Prefect's worker SIGKILL itself). Our interpreter and an argv list we built: no shell.
    worker = subprocess.Popen(list(command), env=dict(env),  # nosec B603
                              start_new_session=True)
    while worker.poll() is None and not stop.event.wait(0.5):
        _reap_orphans(worker.pid)
    started = time.monotonic()
    signalled = stop.signum is not None
    if stop.signum is not None:
        say(f"received {signal.Signals(stop.signum).name}: stopping the worker and its runs "
            f"(at most {STOP_S:.0f} s)")
        # Frozen, the worker takes no new run while its runs end, and it cannot kill them
        # half-way: stopping, Prefect's worker ends its flow-run processes at once, before
        # they can clean up, and leaves their pg_dump running.
        with suppress(ProcessLookupError):
            worker.send_signal(signal.SIGSTOP)
    runs = end_flow_runs(started, worker.pid, say)
    if signalled:
        with suppress(ProcessLookupError):
            worker.send_signal(signal.SIGTERM)
            worker.send_signal(signal.SIGCONT)
    with suppress(subprocess.TimeoutExpired):
        worker.wait(timeout=max(0.5, started + STOP_S - 3 - time.monotonic()))
    if worker.poll() is None:
        worker.kill()
        worker.wait()
    _kill_descendants(worker.pid)
    mark_crashed(runs, say)
    if stop.signum is not None:
        say(f"stopped after {time.monotonic() - started:.1f} s ({len(runs)} run(s) ended)")
        return 0
    return worker.returncode


def end_flow_runs(started: float, worker_pid: int,
                  say: Callable[[str], None]) -> dict[UUID, int]:
    """SIGTERM every flow-run process below us, SIGKILL what remains after the grace time.

    Returns the runs (id → pid) that were running.
    """
    runs = {run_id: pid for pid, run_id in _flow_run_processes()}
    for run_id, pid in runs.items():
        say(f"flow run {run_id}: SIGTERM to its process {pid}")
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    # The warm daemons the runs started are ours too (subreaper): asked to stop, a daemon
    # removes its socket and logs why; killed with the rest below, it left both undone.
    for pid in _daemons():
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = started + GRACE_S
    while runs and time.monotonic() < deadline:
        _reap_orphans(worker_pid)
        # Until every process of the runs is gone: their tools too (own sessions).
        if not _flow_run_processes():
            break
        time.sleep(0.1)
    for run_id, pid in runs.items():
        if _alive(pid):
            say(f"flow run {run_id}: still running after {GRACE_S:.0f} s, killed")
    _kill_descendants(worker_pid, spare_worker=True)
    return runs


def mark_crashed(runs: Iterable[UUID], say: Callable[[str], None]) -> None:
    """Set runs that are not in a final state to Crashed (their process is gone)."""
    run_ids = list(runs)
    if not run_ids:
        return
    with get_client(sync_client=True) as client:
        for run_id in run_ids:
            try:
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    say(f"flow run {run_id}: {state.type.value.lower()}")
                    continue
                client.set_flow_run_state(run_id, Crashed(
                    message="The worker was stopped (SIGTERM) while this run ran; its "
                            "process was ended."), force=True)
                say(f"flow run {run_id}: marked crashed")
            except Exception as exc:  # the API may be down: the heartbeat automation remains
                say(f"flow run {run_id}: could not mark it crashed ({exc}); the heartbeat "
                    f"automation will")


def _become_subreaper() -> None:
    """Orphaned descendants (flow runs after the worker exits, their tools) become ours."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _parents() -> dict[int, int]:
    """pid → parent pid of every live (not zombie) process."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError, ValueError, IndexError):
            # The command name may hold spaces and parentheses: fields start after the last ')'.
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    return parents


def _descendants() -> list[int]:
    """Live processes below this one."""
    parents = _parents()
    found: list[int] = []
    frontier = {os.getpid()}
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = set(children)
    return found


def _flow_run_processes() -> list[tuple[int, UUID]]:
    """(pid, flow run id) of each flow-run engine below us (the worker passes the id in the
    environment; tools started by the engine inherit it, so only the topmost counts)."""
    found: dict[UUID, int] = {}
    for pid in _descendants():
        with suppress(OSError, ValueError):
            for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if item.startswith(_RUN_MARKER):
                    run_id = UUID(item[len(_RUN_MARKER):].decode())
                    found[run_id] = min(pid, found.get(run_id, pid))
    return [(pid, run_id) for run_id, pid in found.items()]


def _daemons() -> list[int]:
    """The warm daemons (``python -m pgbackflow.daemon``) below us."""
    found = []
    for pid in _descendants():
        with suppress(OSError):
            if b"pgbackflow.daemon" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3]:
                found.append(pid)
    return found


def _kill_descendants(worker_pid: int, spare_worker: bool = False) -> None:
    """SIGKILL every process below us (but the worker itself when ``spare_worker``)."""
    for _ in range(50):
        targets = [pid for pid in _descendants() if not (spare_worker and pid == worker_pid)]
        if not targets:
            return
        for pid in targets:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
        _reap_orphans(worker_pid)


def _alive(pid: int) -> bool:
    return pid in _parents()


def _reap_orphans(keep: int) -> None:
    """Collect exited orphans that were reparented to us (never the worker: Popen waits)."""
    parents = _parents()
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == keep or pid in parents:
            continue
        with suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            if fields[0] == "Z" and int(fields[1]) == me:
                os.waitpid(pid, os.WNOHANG)
