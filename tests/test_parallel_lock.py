"""The lock that keeps exclusive tests away from the others (tests/fixtures/parallel.py).

Real processes contend for it as xdist workers do; each records when it held its turn.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.fixtures import parallel

ROOT = Path(__file__).resolve().parent.parent

HOLD_S = 0.4
#: One lock holder: a fresh interpreter (a fork of a pytest worker inherits whatever other
#: tests left in it), ready when it has imported the lock, starting when told.
HOLDER = """
import json, sys, time, traceback
from pathlib import Path
folder, kind, record = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
delay, hold = float(sys.argv[4]), float(sys.argv[5])
try:
    from tests.fixtures import parallel
    Path(str(record) + ".ready").touch()
    while not (folder / "go").exists():
        time.sleep(0.01)
    time.sleep(delay)
    with parallel.turn_of(folder, kind):
        entered = time.time()
        time.sleep(hold)
        left = time.time()
    record.write_text(json.dumps([kind, entered, left]))
except BaseException:
    record.write_text(json.dumps({"error": traceback.format_exc()}))
    raise
"""


def _run(tmp_path: Path, plan: list[tuple[bool | str, float]],
         slots: int = parallel.EXCLUSIVE_SLOTS) -> list[tuple[bool, float, float]]:
    """Start one holder per (exclusive or kind, delay), all at once; their turns as
    (exclusive, in, out), with the kind's name instead of True for a ``solo`` holder."""
    env = {**os.environ, "PGBACKFLOW_TEST_EXCLUSIVE_SLOTS": str(slots)}
    holders = []
    for index, (exclusive, delay) in enumerate(plan):
        record = tmp_path / f"turn-{index}.json"
        kind = exclusive if isinstance(exclusive, str) else \
            "exclusive" if exclusive else "parallel"
        holders.append((subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(tmp_path), kind,
             str(record), str(delay), str(HOLD_S)], env=env, cwd=ROOT), record))
    deadline = time.monotonic() + 120
    while not all(Path(f"{record}.ready").exists() for _, record in holders):
        assert all(p.poll() is None for p, _ in holders), "a lock holder exited before ready"
        assert time.monotonic() < deadline, "lock holders not ready within 120 s"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    turns = []
    for process, record in holders:
        code = process.wait(timeout=60)
        outcome = json.loads(record.read_text()) if record.exists() else None
        assert code == 0, f"a lock holder exited {code}: {outcome}"
        kind, entered, left = outcome
        turns.append((kind if kind == "solo" else kind == "exclusive", float(entered),
                      float(left)))
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


def test_one_slot_runs_exclusive_tests_one_at_a_time(tmp_path: Path) -> None:
    turns = _run(tmp_path, [(True, 0.0)] * 3 + [(False, 0.05)], slots=1)
    exclusive = [t for t in turns if t[0]]
    assert _most_at_once(exclusive) == 1, f"exclusive tests at once: {exclusive}"
    assert not any(_overlap(a, b) for a in exclusive for b in turns if not b[0])


def test_a_solo_test_runs_beside_no_test_and_goes_before_later_exclusive_ones(
        tmp_path: Path) -> None:
    # Two exclusive tests wait for the parallel ones; a solo test comes while they wait, and
    # two more exclusive tests come after it.
    plan: list[tuple[bool | str, float]] = (
        [(False, 0.0)] * 2 + [(True, 0.05)] * 2 + [("solo", 0.15)] + [(True, 0.3)] * 2)
    turns = _run(tmp_path, plan)
    (solo,) = [t for t in turns if t[0] == "solo"]
    clashes = [t for t in turns if t is not solo and _overlap(solo, t)]
    assert not clashes, f"the solo test ran beside others: {solo} {clashes}"
    exclusive = [t for t in turns if t[0] is True]
    assert _most_at_once(exclusive) == 2, f"exclusive tests at once: {exclusive}"
    early, late = exclusive[:2], exclusive[2:]
    assert all(t[2] <= solo[1] for t in early), f"the solo test overtook running ones: {turns}"
    assert all(t[1] >= solo[2] for t in late), f"later exclusive tests overtook it: {turns}"
