"""The stack image's pgbackflow wheel is built from the package's sources only.

setuptools reuses what an earlier build left in ``build/lib`` of the folder it builds in: a
module deleted or renamed since still lands in the wheel, then in the image. docker/stack.py
builds from a clean copy of the sources instead (``copy_package_source``).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
STALE = "pgbackflow/stale_leftover.py"


def _stack_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stack_script", REPO / "docker" / "stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel_names(source: Path, out: Path) -> set[str]:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
         "-w", str(out), str(source)], capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("pgbackflow-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_image_wheel_leaves_a_checkouts_old_build_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = _stack_module()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in stack.PACKAGE_SOURCES:  # a working checkout ...
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, checkout / name)
    stale = checkout / "build" / "lib" / STALE  # ... with an earlier build's leftover
    stale.parent.mkdir(parents=True)
    stale.write_text("LEFT_OVER = True\n")

    # Built in the checkout itself, the leftover ships (what the copy avoids).
    assert STALE in _wheel_names(checkout, tmp_path / "direct")

    monkeypatch.setattr(stack, "REPO", checkout)
    clean = tmp_path / "clean"
    stack.copy_package_source(clean)
    names = _wheel_names(clean, tmp_path / "from-copy")
    assert STALE not in names
    assert "pgbackflow/tasks/pitr.py" in names and "pgbackflow/cli/__init__.py" in names
