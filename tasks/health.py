"""Health of a database: one probe, and the up/down state that survives between checks.

The probe connects, runs ``select 1``, reads the server version and, for a cluster streamed
by pgbackflow, its replication slot (active?, WAL it retains, how far it lags the server's
WAL). :func:`next_state` turns the previous state and a probe into the new state and the
transitions worth a notification: *down* once after ``down_after`` failed checks in a row,
*up* once when a check passes again, a WAL *problem* once when one starts and *recovered*
once when it is over — never one per check, so a flapping database is no storm.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from pgbackflow.tasks.database import ConnectionSettings, connect
from pgbackflow.tasks.errors import PgBackflowError
from pgbackflow.tasks.units import human_duration

#: A check fails when the server has not answered within this many seconds.
PROBE_TIMEOUT_S = 10
#: Failed checks in a row before a database counts as down.
DOWN_AFTER = 3


@dataclass(frozen=True)
class SlotState:
    """A physical replication slot as the server reports it."""

    name: str
    exists: bool
    active: bool = False
    wal_status: str | None = None
    #: Bytes of WAL the slot keeps on the server (current WAL position - restart_lsn).
    retained_bytes: int | None = None
    #: The slot's restart_lsn, as a number (advances as the streamer confirms WAL).
    restart_lsn: int | None = None
    #: The server's current WAL position, as a number.
    server_lsn: int | None = None


@dataclass(frozen=True)
class Probe:
    """One health check of one database."""

    ok: bool
    checked_at: datetime
    latency_ms: float | None = None
    version: str | None = None
    error: str | None = None
    slot: SlotState | None = None


def probe(settings: ConnectionSettings, slot: str | None = None) -> Probe:
    """Connect, ``select 1``, read the version (and the slot); never raises."""
    started = time.monotonic()
    checked_at = datetime.now(UTC)
    try:
        with connect(settings) as conn:
            conn.execute(f"SET statement_timeout = '{PROBE_TIMEOUT_S}s'")
            row = conn.execute("SELECT 1, current_setting('server_version')").fetchone()
            if row is None or row[0] != 1:
                return Probe(False, checked_at, error="select 1 returned nothing")
            slot_state = read_slot(conn, slot) if slot else None
    except PgBackflowError as exc:
        return Probe(False, checked_at, error=_first_line(str(exc)))
    except Exception as exc:  # psycopg errors after connecting: a failed check, not a crash
        return Probe(False, checked_at, error=_first_line(f"{type(exc).__name__}: {exc}"))
    return Probe(True, checked_at, latency_ms=round((time.monotonic() - started) * 1000, 1),
                 version=str(row[1]).split()[0], slot=slot_state)


def read_slot(conn: Any, slot: str) -> SlotState:
    """The slot's state (``exists=False`` when the server has no such slot)."""
    row = conn.execute(
        "SELECT s.active, s.wal_status, "
        "       (pg_current_wal_lsn() - s.restart_lsn)::bigint, "
        "       (s.restart_lsn - '0/0'::pg_lsn)::bigint, "
        "       (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint "
        "FROM pg_replication_slots s WHERE s.slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return SlotState(slot, exists=False)
    return SlotState(slot, True, bool(row[0]), row[1], row[2], row[3], row[4])


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "unknown error"


@dataclass(frozen=True)
class WalLimits:
    """When a slot is a problem: it retains more than ``retained_bytes``, or the server
    wrote more than a segment that the slot did not confirm for ``stalled_s``."""

    retained_bytes: int
    stalled_s: float
    segment_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class HealthState:
    """What the checks of one database remember (stored as a Prefect Variable)."""

    db_id: str
    state: Literal["up", "down"] = "up"
    since: str | None = None
    failures: int = 0
    last_check: str | None = None
    last_ok: str | None = None
    error: str | None = None
    version: str | None = None
    latency_ms: float | None = None
    slot: dict[str, Any] | None = None
    #: restart_lsn of the slot and since when it has not moved (stall detection).
    slot_lsn: int | None = None
    slot_lsn_since: str | None = None
    wal_problem: str | None = None
    last_backup: str | None = None
    last_verification: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)

    @staticmethod
    def from_json(value: Any, db_id: str) -> HealthState:
        """Read back (anything unreadable: a fresh state)."""
        if not isinstance(value, dict):
            return HealthState(db_id)
        known = {k: v for k, v in value.items() if k in HealthState.__dataclass_fields__}
        try:
            return HealthState(**{**known, "db_id": db_id})
        except TypeError:
            return HealthState(db_id)


Transition = Literal["down", "up", "wal-problem", "wal-recovered"]


def next_state(
    previous: HealthState, check: Probe, *, down_after: int = DOWN_AFTER,
    wal: WalLimits | None = None,
) -> tuple[HealthState, list[Transition]]:
    """The state after ``check`` and the transitions to announce (each once)."""
    now = check.checked_at.isoformat()
    transitions: list[Transition] = []
    state = replace(previous, last_check=now, latency_ms=check.latency_ms)
    if check.ok:
        state = replace(state, failures=0, last_ok=now, error=None,
                        version=check.version or state.version)
        if previous.state == "down":
            state = replace(state, state="up", since=now)
            transitions.append("up")
        elif state.since is None:
            state = replace(state, since=now)
    else:
        failures = previous.failures + 1
        state = replace(state, failures=failures, error=check.error)
        if previous.state != "down" and failures >= down_after:
            state = replace(state, state="down", since=now)
            transitions.append("down")
    if check.ok and check.slot is not None:
        state, problem = _wal_problem(state, check.slot, check.checked_at, wal)
        if problem and not previous.wal_problem:
            transitions.append("wal-problem")
        elif not problem and previous.wal_problem:
            transitions.append("wal-recovered")
        state = replace(state, wal_problem=problem)
    return state, transitions


def _wal_problem(
    state: HealthState, slot: SlotState, now: datetime, limits: WalLimits | None
) -> tuple[HealthState, str | None]:
    state = replace(state, slot={k: v for k, v in asdict(slot).items()
                                 if k not in ("restart_lsn", "server_lsn")})
    if not slot.exists:
        return state, f"replication slot {slot.name} does not exist"
    if slot.restart_lsn != state.slot_lsn or state.slot_lsn_since is None:
        state = replace(state, slot_lsn=slot.restart_lsn, slot_lsn_since=now.isoformat())
    if limits is None:
        return state, None
    retained = slot.retained_bytes or 0
    if retained > limits.retained_bytes:
        return state, (f"slot {slot.name} retains {retained / 1e9:.2f} GB of WAL "
                       f"(limit {limits.retained_bytes / 1e9:g} GB)")
    assert state.slot_lsn_since is not None
    still = (now - datetime.fromisoformat(state.slot_lsn_since)).total_seconds()
    if retained > limits.segment_bytes and still >= limits.stalled_s:
        return state, (f"no WAL received for {human_duration(still)} while the server wrote "
                       f"{retained / 1e6:.0f} MB (slot {slot.name}, active: {slot.active})")
    return state, None


def age(timestamp: str | None, now: datetime | None = None) -> str:
    """``3 h 05 min ago`` from an ISO timestamp, ``never`` for None."""
    if timestamp is None:
        return "never"
    seconds = ((now or datetime.now(UTC)) - datetime.fromisoformat(timestamp)).total_seconds()
    return f"{human_duration(max(0.0, seconds))} ago"


def fleet_rows(states: list[HealthState], now: datetime | None = None) -> list[dict[str, Any]]:
    """One row per database: the "fleet status" table (artifact and ``pgbackflow status``)."""
    rows = []
    for item in sorted(states, key=lambda s: s.db_id):
        slot = item.slot or {}
        retained = slot.get("retained_bytes")
        rows.append({
            "database": item.db_id,
            "state": item.state if item.failures == 0 or item.state == "down"
            else f"{item.state} ({item.failures} failed)",
            "since": item.since or "-",
            "version": item.version or "-",
            "last check": age(item.last_check, now),
            "last backup": age(item.last_backup, now),
            "last verification": age(item.last_verification, now),
            "slot": "-" if not slot else (
                f"{slot.get('name')} {'active' if slot.get('active') else 'inactive'}"
                if slot.get("exists") else f"{slot.get('name')} missing"),
            "retained WAL": "-" if retained is None else f"{retained / 1e6:.1f} MB",
            "problem": item.error or item.wal_problem or "",
        })
    return rows
