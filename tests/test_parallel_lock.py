"""The lock that keeps exclusive tests away from the others (tests/fixtures/parallel.py).

Real processes contend for it as xdist workers do; each records when it held its turn.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from tests.fixtures import parallel

HOLD_S = 0.4


def _hold(folder: str, exclusive: bool, record: str, start_after: float) -> None:
    time.sleep(max(0.0, start_after - time.time()))
    with parallel._turn(Path(folder), exclusive):
        entered = time.time()
        time.sleep(HOLD_S)
        left = time.time()
    Path(record).write_text(json.dumps([exclusive, entered, left]))


def _run(tmp_path: Path, plan: list[tuple[bool, float]]) -> list[tuple[bool, float, float]]:
    """Start one process per (exclusive, delay) at once; their turns, as (class, in, out)."""
    context = multiprocessing.get_context("fork")
    start = time.time() + 0.3
    processes = []
    for index, (exclusive, delay) in enumerate(plan):
        record = tmp_path / f"turn-{index}.json"
        process = context.Process(
            target=_hold, args=(str(tmp_path), exclusive, str(record), start + delay))
        process.start()
        processes.append((process, record))
    turns = []
    for process, record in processes:
        process.join(30)
        assert process.exitcode == 0, f"a lock holder exited {process.exitcode}"
        exclusive, entered, left = json.loads(record.read_text())
        turns.append((bool(exclusive), float(entered), float(left)))
    return turns


def _overlap(a: tuple[bool, float, float], b: tuple[bool, float, float]) -> bool:
    return a[1] < b[2] and b[1] < a[2]


def _most_at_once(turns: list[tuple[bool, float, float]]) -> int:
    return max(sum(1 for other in turns if other[1] <= turn[1] < other[2]) for turn in turns)


def test_classes_never_overlap_and_exclusive_tests_share_only_their_slots(
        tmp_path: Path) -> None:
    assert parallel.EXCLUSIVE_SLOTS == 2, "the suite's default (PGBACKFLOW_TEST_EXCLUSIVE_SLOTS)"
    # Parallel tests first; three exclusive ones arrive while those run, then more parallel
    # ones arrive while the exclusive ones wait or run.
    plan = ([(False, 0.0)] * 3 + [(True, 0.1)] * 3 + [(False, 0.2)] * 2)
    turns = _run(tmp_path, plan)
    exclusive = [t for t in turns if t[0]]
    others = [t for t in turns if not t[0]]
    for turn in exclusive:
        clashes = [other for other in others if _overlap(turn, other)]
        assert not clashes, f"an exclusive test ran beside another test: {turn} {clashes}"
    assert _most_at_once(exclusive) == 2, f"exclusive tests at once: {exclusive}"
    assert _most_at_once(others) >= 2, f"parallel tests did not run side by side: {others}"
    # Writer preference: the parallel tests that came after the exclusive ones waited for
    # them to have started rather than overtaking them.
    first_exclusive = min(t[1] for t in exclusive)
    late = sorted(others, key=lambda t: t[1])[3:]
    assert all(t[1] >= first_exclusive for t in late), f"overtaken: {turns}"


def test_one_slot_runs_exclusive_tests_one_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "EXCLUSIVE_SLOTS", 1)
    turns = _run(tmp_path, [(True, 0.0)] * 3 + [(False, 0.05)])
    exclusive = [t for t in turns if t[0]]
    assert _most_at_once(exclusive) == 1, f"exclusive tests at once: {exclusive}"
    assert not any(_overlap(a, b) for a in exclusive for b in turns if not b[0])
