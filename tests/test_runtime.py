"""The restore core's log reading (tasks/runtime.py): what a failed start or recovery says.

The runtimes themselves run for real in tests/test_physical.py (local PITR, the restart
without the target), tests/test_pitr_docker.py (containers) and
tests/test_physical_verification.py.
"""

from __future__ import annotations

from pgbackflow.tasks.runtime import last_transaction, log_tail

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
