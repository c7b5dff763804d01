"""The restore core's log reading (tasks/runtime.py): what a failed start or recovery says.

The runtimes themselves run for real in tests/test_physical.py (local PITR, the restart
without the target), tests/test_pitr_docker.py (containers) and
tests/test_physical_verification.py.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from pgbackflow.tasks.cluster import check_port_free
from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.process import remove_tree, signal_handler, uninterrupted
from pgbackflow.tasks.runtime import (
    last_transaction,
    log_tail,
    newest_history_file,
    replay_end,
)

FAILED_START = """\
2026-11-30 12:48:59.700 UTC [15704] LOG:  starting PostgreSQL 18.6
2026-11-30 12:48:59.701 UTC [15704] LOG:  invalid value for parameter "shared_buffers": "lots"
2026-11-30 12:48:59.701 UTC [15704] FATAL:  configuration file "/x/postgresql.conf" contains errors

2026-11-30 12:48:59.702 UTC [15704] LOG:  database system is shut down
"""


def test_the_gist_ends_with_the_last_error_and_keeps_what_led_to_it() -> None:
    gist = log_tail(FAILED_START, lines=2)
    assert gist.startswith("2026-11-30 12:48:59.701 UTC [15704] LOG:  invalid value for "
                           'parameter "shared_buffers"')
    assert gist.endswith('"/x/postgresql.conf" contains errors')
    assert "\n" not in gist and "shut down" not in gist


def test_without_an_error_the_gist_is_the_last_lines() -> None:
    assert log_tail("one\n\ntwo\nthree\nfour\n") == "two | three | four"
    assert log_tail("") == "no log output"


def test_the_last_replayed_transaction_is_read_from_the_log() -> None:
    log = ("LOG:  redo done at 0/3000028\n"
           "LOG:  last completed transaction was at log time 2026-11-30 10:00:01.5+00\n"
           "LOG:  last completed transaction was at log time 2026-11-30 10:00:02.25+00\n")
    assert last_transaction(log) == "2026-11-30 10:00:02.25+00"
    assert last_transaction("LOG:  redo done\n") is None


def test_a_port_whose_connections_linger_is_free_but_a_listening_one_is_not() -> None:
    """Right after a server on the port stopped, its closed connections sit in TIME_WAIT:
    PostgreSQL binds it (SO_REUSEADDR), so `pitr --start --port` must not refuse it."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port} is in use"):
            check_port_free(port)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server's side closes first: its end goes to TIME_WAIT
        client.close()
    assert check_port_free(port) == port
    for bad in (0, 65536):
        with pytest.raises(ConfigError, match=f"--port {bad} is not a TCP port"):
            check_port_free(bad)


def test_a_signal_handler_block_lets_its_errors_through() -> None:
    """Whether or not the handler was installed (an ignored signal stays ignored), an
    exception of the block is the block's, not the helper's."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        for ignored in (True, False):
            signal.signal(signal.SIGTERM, signal.SIG_IGN if ignored else signal.SIG_DFL)
            with pytest.raises(ValueError, match="the block's own"), signal_handler(
                signal.SIGTERM, lambda *_: None, unless_ignored=True
            ) as installed:
                assert installed is not ignored
                raise ValueError("the block's own")
            assert signal.getsignal(signal.SIGTERM) == (
                signal.SIG_IGN if ignored else signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_where_replay_ended_is_the_last_entry_of_the_newest_history_file(tmp_path: Path) -> None:
    """The promotion writes the history of the timeline it begins: its last entry is the
    timeline replay ended on and the LSN (checked against the WAL the restore was given)."""
    (tmp_path / "00000002.history").write_text("1\t0/8000120\tno recovery target specified\n")
    newest = tmp_path / "00000003.history"
    newest.write_text("1\t0/8000120\tno recovery target specified\n\n"
                      "2\t1/9000000\tno recovery target specified\n")
    (tmp_path / "0000000A.history.tmp").write_text("9\t0/1\tx\n")  # not a history file name
    assert newest_history_file(tmp_path) == newest
    assert replay_end(newest.read_bytes()) == (2, (1 << 32) | 0x9000000)
    assert replay_end(b"# nothing\n") is None and replay_end(None) is None
    assert newest_history_file(tmp_path / "missing") is None


def test_a_clean_up_runs_to_its_end_through_an_interruption(tmp_path: Path) -> None:
    """Ctrl-C (or a stop) landing in a clean-up cut it short and left work folders and
    half-deleted directories behind: it now finishes, then the interruption goes on."""
    calls: list[int] = []

    def cleanup() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise KeyboardInterrupt("signal 2")

    with pytest.raises(KeyboardInterrupt, match="signal 2"):
        uninterrupted(cleanup)
    assert calls == [0, 1]
    uninterrupted(cleanup)  # nothing to re-raise
    assert calls == [0, 1, 2]

    def fails_after_an_interruption() -> None:
        calls.append(len(calls))
        raise KeyboardInterrupt("signal 2") if len(calls) == 4 else OSError("pg_ctl timed out")

    with pytest.raises(KeyboardInterrupt) as still:  # not the OSError alone
        uninterrupted(fails_after_an_interruption)
    assert isinstance(still.value.__cause__, OSError)

    folder = tmp_path / "work"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a" / "b" / "f").write_bytes(b"x")
    real_rmtree = __import__("shutil").rmtree
    interrupted = []

    def rmtree_cut_once(path: Path, ignore_errors: bool = False) -> None:
        if not interrupted:
            interrupted.append(path)
            (Path(path) / "a" / "b" / "f").unlink()  # part of the work was done
            raise KeyboardInterrupt("signal 15")
        real_rmtree(path, ignore_errors=ignore_errors)

    import pgbackflow.tasks.process as process

    original = process.shutil.rmtree
    process.shutil.rmtree = rmtree_cut_once  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            remove_tree(folder)
    finally:
        process.shutil.rmtree = original
    assert interrupted and not folder.exists()
