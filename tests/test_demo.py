"""`pgbackflow demo`, run as the README tells users to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pgbackflow.tasks.manifest import list_backups
from pgbackflow.tasks.sample_data import demo_row_counts
from pgbackflow.tasks.storage import LocalFolderStorage


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(cmdline)
    return found


@pytest.mark.pg
def test_demo_backs_up_restores_and_cleans_up(prefect_api: str, tmp_path: Path) -> None:
    # The demo's server lives below TMPDIR (which the postgres OS user must be able to enter).
    scratch = Path(tempfile.mkdtemp(prefix="pgbackflow-demo-test-"))
    scratch.chmod(0o1777)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "TMPDIR": str(scratch)}
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
    # The throwaway server is gone, and so is its data directory.
    assert processes_mentioning(str(scratch)) == []
    assert list(scratch.iterdir()) == []
    scratch.rmdir()
