"""`pgbackflow demo`, run as the README tells users to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.manifest import list_backups
from tasks.sample_data import demo_row_counts
from tasks.storage import LocalFolderStorage


def postgres_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.pg
def test_demo_backs_up_restores_and_cleans_up(prefect_api: str, tmp_path: Path) -> None:
    before = postgres_pids()
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("pgbackflow")), "demo", "--json", "--scale", "0.2",
         "--keep", str(tmp_path / "kept")],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["matches"] is True
    expected = demo_row_counts(0.2)
    restored = result["restore"]["tables"]
    # The partitioned parent's rows live in its partitions.
    events = sum(rows for name, rows in restored.items() if name.startswith("analytics.events_"))
    assert events == expected.pop("analytics.events")
    assert {name: restored[name] for name in expected} == expected
    assert result["backup"]["tables"] == restored
    # The backup really is in the kept folder, encrypted, and listed.
    backups = list_backups(LocalFolderStorage(tmp_path / "kept" / "backups"))
    assert [b.backup_id for b in backups] == [result["backup"]["backup_id"]]
    # The throwaway server is gone.
    assert postgres_pids() - before == set()
