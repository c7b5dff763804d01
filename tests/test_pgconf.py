"""The one server-settings writer: values PostgreSQL reads back exactly as written."""

from __future__ import annotations

import pytest

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.pgconf import append_settings, quote_setting
from pgbackflow.tasks.toolsets import find_toolset

# A data directory or restore_command path may hold both (a Windows-made share name, a
# quote in a folder name): the old PITR writer doubled quotes but left backslashes alone.
AWKWARD = "C:\\restore\\it's \\n here"


def test_quote_setting_escapes_backslashes_and_quotes() -> None:
    assert quote_setting("plain") == "'plain'"
    assert quote_setting("a'b") == "'a''b'"
    assert quote_setting("a\\b") == "'a\\\\b'"
    with pytest.raises(ConfigError, match="line break"):
        quote_setting("two\nlines")


@pytest.mark.pg
def test_the_server_reads_back_what_was_written() -> None:
    cluster = EphemeralCluster(find_toolset(17), settings={"cluster_name": AWKWARD}).start()
    try:
        with cluster.connect() as conn:
            assert conn.execute("SHOW cluster_name").fetchone() == (AWKWARD,)
        # The writer of restores and sandboxes: appended settings win after a restart.
        cluster.halt()
        append_settings(cluster.data_dir, "test", {"cluster_name": AWKWARD[::-1]})
        cluster.resume()
        with cluster.connect() as conn:
            assert conn.execute("SHOW cluster_name").fetchone() == (AWKWARD[::-1],)
    finally:
        cluster.stop()
