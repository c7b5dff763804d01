"""The one writer of PostgreSQL server settings (postgresql.conf, postgresql.auto.conf).

Every place that configures a server it starts (test clusters, point-in-time restores into a
directory or a Docker volume, verification sandboxes) writes its settings through here, so
values are quoted one way: PostgreSQL reads backslash escapes inside quoted values, so a
path or command with a backslash or a quote must have both escaped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pgbackflow.tasks.errors import ConfigError

AUTO_CONF = "postgresql.auto.conf"


def quote_setting(value: str) -> str:
    """``value`` quoted for a configuration file; a quoted value suits every setting type."""
    if "\n" in value or "\r" in value or "\x00" in value:
        raise ConfigError(
            f"server setting value {value!r} has a line break or NUL, which a configuration "
            "file cannot hold: use a path or value without one"
        )
    escaped = value.replace("\\", "\\\\").replace("'", "''")
    return f"'{escaped}'"


def settings_block(heading: str, settings: Mapping[str, str]) -> str:
    """Lines ``key = 'value'`` under a ``# heading`` comment (a blank line before it)."""
    lines = "".join(f"{key} = {quote_setting(value)}\n" for key, value in settings.items())
    return f"\n# {heading}\n{lines}"


def append_settings(
    data_dir: Path, heading: str, settings: Mapping[str, str], *, file: str = AUTO_CONF
) -> None:
    """Append ``settings`` to a configuration file of ``data_dir``: later lines win, so
    these override what the file (a restored backup's own settings) said before."""
    path = data_dir / file
    existing = path.read_text() if path.exists() else ""
    path.write_text(existing + settings_block(heading, settings))


def request_recovery(data_dir: Path) -> None:
    """Start the server in targeted recovery (``recovery.signal``), never as a standby."""
    (data_dir / "standby.signal").unlink(missing_ok=True)
    (data_dir / "recovery.signal").write_text("")
