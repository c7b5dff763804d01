"""Sizes and durations as people read them (messages, tables)."""

from __future__ import annotations


def human_size(size: int | None) -> str:
    """``123.4 MB`` (decimal units, as pgbackflow prints sizes everywhere)."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    """``2 h 03 min``, ``4 min 05 s``, ``12.3 s``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
