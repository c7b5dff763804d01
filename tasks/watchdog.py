"""Watchdog of a throwaway PostgreSQL server: ``python -m pgbackflow.tasks.watchdog DATA_DIR
REMOVE``, started by :func:`tasks.runtime.watch_owner` with a pipe from the owner as stdin.

It waits until the pipe ends: the owner closed it after stopping the server itself, or the
owner died (a killed test run, a SIGKILLed verification). Then it stops the server of
``DATA_DIR`` if it still runs (immediate shutdown, then SIGKILL) and deletes ``REMOVE``,
so a killed owner leaves no server and no files behind.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

from pgbackflow.tasks.runtime import kill_postmaster


def main(argv: list[str]) -> int:
    """Wait for the owner's end, then clean up after it."""
    data_dir, remove = Path(argv[0]), Path(argv[1])
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # only the pipe's end sets it off
    while sys.stdin.buffer.read(4096):
        pass
    # SIGQUIT is PostgreSQL's immediate shutdown (its children go too); SIGKILL if ignored.
    if kill_postmaster(data_dir, signal.SIGQUIT):
        kill_postmaster(data_dir, signal.SIGKILL)
    shutil.rmtree(remove, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
