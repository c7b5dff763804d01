#!/usr/bin/env python3
"""The production stack (docker/compose.yaml): build, bring up, deploy a config, check, stop.

    python3 docker/stack.py up                      # secrets (first time), images, containers
    python3 docker/stack.py deploy pgbackflow.toml  # `pgbackflow deploy --config` against it
    python3 docker/stack.py doctor                  # `pgbackflow doctor` where the server runs
    python3 docker/stack.py down [--volumes]        # stop (--volumes: also drop its data)

Needs only Python 3.11+, Docker and `docker compose` or `docker-compose` on the host; `build`
also needs a checkout of this repository (it builds the pgbackflow wheel from it). Settings are
environment variables, all optional (docker/README.md lists them): the compose project
(PGBACKFLOW_STACK_PROJECT), ports, the secrets folder (PGBACKFLOW_STACK_SECRETS).

Without a registry (as on CI) the public base image ``python:3.11-slim-bookworm`` is made
locally once: Debian bookworm by debootstrap with Debian's Python 3.11, tagged under the public
name (see ``build_base_image``). ``postgres:<major>`` images for the verification sandboxes
come from docker/build_images.py there.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
COMPOSE_FILE = HERE / "compose.yaml"
CONTEXT = HERE / "build" / "context"
BASE_IMAGE = "python:3.11-slim-bookworm"
BASE_LABEL = "org.pgbackflow.builder=docker/stack.py"
BASE_CACHE = Path(os.environ.get("PGBACKFLOW_IMAGE_CACHE", "/var/cache/pgbackflow/images"))
#: Debian's Python 3.11 with venv/ensurepip, the official slim image's runtime libraries and
#: those the PostgreSQL toolsets link against (the Dockerfile then needs no package index).
BASE_PACKAGES = (
    "python3", "python3-venv", "python3.11-venv", "python3-distutils", "python3-pip-whl",
    "python3-setuptools-whl", "ca-certificates", "tzdata", "netbase", "libzstd1", "liblz4-1",
    "libxml2", "libssl3", "libgssapi-krb5-2", "zlib1g", "libsqlite3-0", "libffi8",
)
DEBIAN_MIRROR = os.environ.get("PGBACKFLOW_DEBIAN_MIRROR", "http://deb.debian.org/debian")
#: The image's pgbackflow user (docker/Dockerfile): owner of the secret files it reads.
IMAGE_UID = 10001
#: Files of the secrets folder; ``*.key`` so a folder inside a checkout is git-ignored.
SECRET_FILES = ("encryption.key", "api-auth.key", "prefect-db-password.key", "master.key")
DEFAULTS = {
    "PGBACKFLOW_STACK_PROJECT": "pgbackflow",
    "PGBACKFLOW_IMAGE": "pgbackflow:0.1.0",
    "PGBACKFLOW_PREFECT_PORT": "4200",
    "PGBACKFLOW_PREFECT_HOST": "localhost",
    "PGBACKFLOW_PREFECT_DB_PORT": "54329",
    "PGBACKFLOW_STACK_SECRETS": str(HERE / "secrets"),
    # The agent's sandbox work dirs: a host folder, mounted into the agent at the same path.
    "PGBACKFLOW_SANDBOX_DIR": "/var/lib/pgbackflow/sandboxes",
}


class StackError(Exception):
    """A one-line error for the user."""


def setting(name: str) -> str:
    return os.environ.get(name) or DEFAULTS[name]


def run(args: list[str], *, env: dict[str, str] | None = None, capture: bool = False,
        check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise StackError with the last lines of its output."""
    result = subprocess.run(args, env=env, text=True, check=False, timeout=timeout,
                            capture_output=capture)
    if check and result.returncode != 0:
        detail = " | ".join(((result.stderr or "") + (result.stdout or "")).strip()
                            .splitlines()[-5:]) if capture else "see its output above"
        raise StackError(f"`{' '.join(args[:5])}` exited with {result.returncode}: {detail}")
    return result


# --------------------------------------------------------------------------------------------
# Compose
# --------------------------------------------------------------------------------------------


def compose_command() -> list[str]:
    """``docker compose`` (v2 plugin) when it exists, else Debian's ``docker-compose`` 1.29;
    PGBACKFLOW_COMPOSE names one of the two explicitly."""
    chosen = os.environ.get("PGBACKFLOW_COMPOSE")
    if chosen:
        if chosen not in ("docker compose", "docker-compose"):
            raise StackError(f"PGBACKFLOW_COMPOSE={chosen!r}: give 'docker compose' or "
                             "'docker-compose'")
        return chosen.split()
    if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False
    ).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise StackError("neither `docker compose` nor `docker-compose` is installed: "
                     "apt-get install docker-compose (or the compose plugin)")


def compose_env() -> dict[str, str]:
    """The environment compose interpolates compose.yaml with: every setting, resolved."""
    env = dict(os.environ)
    for name in DEFAULTS:
        env[name] = setting(name)
    env["PGBACKFLOW_STACK_SECRETS"] = str(Path(env["PGBACKFLOW_STACK_SECRETS"]).resolve())
    if "PGBACKFLOW_DOCKER_GID" not in env:
        socket = Path("/var/run/docker.sock")
        env["PGBACKFLOW_DOCKER_GID"] = str(socket.stat().st_gid) if socket.exists() else "0"
    return env


def compose(*args: str, capture: bool = False, check: bool = True,
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    # docker-compose 1.29 checks the image's build context exists on every command (down and
    # ps included), and a checkout whose image is already built (by an earlier checkout, or
    # loaded) never made one: an empty folder is enough for all but `build`.
    CONTEXT.mkdir(parents=True, exist_ok=True)
    command = [*compose_command(), "--project-name", setting("PGBACKFLOW_STACK_PROJECT"),
               "--file", str(COMPOSE_FILE), *args]
    return run(command, env=compose_env(), capture=capture, check=check, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(value + "\n")
    if os.geteuid() == 0:
        # The containers run as the image's pgbackflow user; a key file must be its own, 0600.
        os.chown(path, IMAGE_UID, IMAGE_UID)


def init_secrets(folder: Path, image: str) -> None:
    """Create the secret files that are missing; never overwrite one (the master key!)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    made = []
    makers: dict[str, Callable[[], str]] = {
        # A Fernet key: 32 random bytes, url-safe base64.
        "encryption.key": lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        "api-auth.key": lambda: f"pgbackflow:{secrets.token_urlsafe(24)}",
        "prefect-db-password.key": lambda: secrets.token_urlsafe(24),
    }
    for name, make in makers.items():
        if not (folder / name).exists():
            _write_secret(folder / name, make())
            made.append(name)
    if not (folder / "master.key").exists():
        # pgbackflow's own key format, made by the image's pgbackflow (one way to make keys).
        text = run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3",
                    image, "-c", "from pgbackflow.tasks.keys import MasterKey; "
                    "print(MasterKey.generate().to_text())"], capture=True).stdout.strip()
        _write_secret(folder / "master.key", text)
        made.append("master.key")
        print(f"NEW MASTER KEY in {folder / 'master.key'}: copy it somewhere safe NOW, away "
              "from the backups; without it no backup can be decrypted", file=sys.stderr)
    if made:
        print(f"secrets created in {folder}: {', '.join(made)}")


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def image_exists(ref: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True,
                          check=False).returncode == 0


def build_base_image() -> None:
    """Make ``python:3.11-slim-bookworm`` when no registry provides it.

    A pull is tried first. Without a registry: Debian bookworm (debootstrap, minbase, from the
    Debian mirror) with Debian's Python 3.11 and ``BASE_PACKAGES``, imported as one layer
    under the public name and labelled as ours. Its rootfs tarball is cached in
    ``BASE_CACHE``: debootstrap takes minutes, an import seconds. Debian's python3 is
    3.11 like the public image's, so the same wheels (cp311) install on both.
    """
    if image_exists(BASE_IMAGE):
        return
    if run(["docker", "pull", BASE_IMAGE], capture=True, check=False, timeout=120).returncode == 0:
        return
    tarball = BASE_CACHE / "python-3.11-slim-bookworm.tar"
    if not tarball.exists():
        _debootstrap(tarball)
    changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "ENV LANG=C.UTF-8", 'CMD ["python3"]', f"LABEL {BASE_LABEL}"]
    args = ["docker", "import"]
    for change in changes:
        args += ["--change", change]
    run([*args, str(tarball), BASE_IMAGE], capture=True)
    print(f"built {BASE_IMAGE} locally (Debian bookworm + Debian's python3.11)")


def _debootstrap(tarball: Path) -> None:
    if shutil.which("debootstrap") is None:
        if os.geteuid() != 0:
            raise StackError("no registry and no debootstrap: apt-get install debootstrap")
        run(["apt-get", "install", "-y", "-qq", "debootstrap"], capture=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    tarball.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pgbackflow-base-") as tmp:
        root = Path(tmp) / "rootfs"
        print(f"debootstrap bookworm into {root} (a few minutes, once)", flush=True)
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             "bookworm", str(root), DEBIAN_MIRROR], capture=True)
        # As slim as the public image: no package lists, no downloaded .debs, no docs.
        for junk in ("var/lib/apt/lists", "var/cache/apt/archives", "usr/share/doc",
                     "usr/share/man", "usr/share/info", "debootstrap"):
            shutil.rmtree(root / junk, ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True)
        partial = tarball.with_suffix(".part")
        run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."], capture=True)
        partial.rename(tarball)
    print(f"base rootfs cached in {tarball} ({time.monotonic() - started:.0f} s)")


def build_context() -> None:
    """docker/build/context/: Dockerfile inputs, the wheelhouse and the host's toolsets."""
    if not (REPO / "pyproject.toml").exists():
        raise StackError(f"{REPO} is not a pgbackflow checkout: build needs one (the wheel)")
    shutil.rmtree(CONTEXT, ignore_errors=True)
    wheelhouse = CONTEXT / "wheelhouse"
    wheelhouse.mkdir(parents=True)
    started = time.monotonic()
    # The locked dependency set the tests ran with; pip's cache serves repeated builds.
    # async-timeout: redis needs it on Python < 3.11.3, which Debian's python3.11 (3.11.2, the
    # local base) is and the host's (the resolver's) may not be.
    with tempfile.TemporaryDirectory(prefix="pgbackflow-wheel-src-") as source:
        copy_package_source(Path(source))
        run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
             "-c", str(REPO / "constraints.txt"), "-w", str(wheelhouse), source,
             "async-timeout>=4.0.3"], capture=True)
    print(f"wheelhouse: {len(list(wheelhouse.glob('*.whl')))} wheels "
          f"({time.monotonic() - started:.0f} s)")
    toolsets = CONTEXT / "toolsets"
    toolsets.mkdir()
    home = _toolsets_home()
    for major in ("14", "15", "16", "17", "18"):
        if (home / major / "bin" / "pg_dump").exists():
            # Hard links: no copy of ~180 MB (falls back to a copy across filesystems).
            try:
                shutil.copytree(home / major, toolsets / major, copy_function=os.link,
                                symlinks=True)
            except OSError:
                shutil.rmtree(toolsets / major, ignore_errors=True)
                shutil.copytree(home / major, toolsets / major, symlinks=True)
    shutil.copy2(HERE / "Dockerfile", CONTEXT / "Dockerfile")
    shutil.copy2(HERE / "stack-env.sh", CONTEXT / "stack-env.sh")


#: What the pgbackflow wheel is built from: the package and its top-level folders (which
#: ``pgbackflow/<name>`` links to), pyproject.toml and its readme.
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "pgbackflow", "blocks", "deployments",
                   "flows", "tasks")


def copy_package_source(target: Path) -> None:
    """Copy the wheel's sources into ``target``: only those, so what else lies in a working
    checkout (an old ``build/lib`` that setuptools would reuse, caches) never reaches the
    image."""
    target.mkdir(parents=True, exist_ok=True)
    for name in PACKAGE_SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / name)


def _toolsets_home() -> Path:
    override = os.environ.get("PGBACKFLOW_TOOLSETS")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/pgbackflow/toolsets")
    return Path.home() / ".cache/pgbackflow/toolsets"


#: What the image is made of: a change to any of these rebuilds it (``up``).
SOURCE_GLOBS = ("pyproject.toml", "constraints.txt", "docker/Dockerfile", "docker/stack-env.sh",
                "pgbackflow/**/*.py", "blocks/**/*.py", "deployments/**/*.py", "flows/**/*.py",
                "tasks/**/*.py")


def source_hash() -> str:
    """A hash of the image's inputs in this checkout."""
    digest = hashlib.sha256()
    for pattern in SOURCE_GLOBS:
        for path in sorted(REPO.glob(pattern)):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def image_hash(ref: str) -> str | None:
    result = run(["docker", "image", "inspect", "--format",
                  '{{index .Config.Labels "org.pgbackflow.source-hash"}}', ref],
                 capture=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def build() -> None:
    started = time.monotonic()
    build_base_image()
    build_context()
    os.environ["PGBACKFLOW_SOURCE_HASH"] = source_hash()
    compose("build", "--force-rm", "worker")
    # The image this build replaced (and its stages) would stay as dangling full copies.
    run(["docker", "image", "prune", "--force", "--filter", "label=org.pgbackflow.image=stack"],
        capture=True, check=False)
    print(f"image {setting('PGBACKFLOW_IMAGE')} built ({time.monotonic() - started:.0f} s)")


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def init_sandbox_dir(folder: Path) -> None:
    """The agent's sandbox folder on the host, the image's user's own (0700): the engine
    would create a missing bind-mount source as root, where the agent cannot write."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.geteuid() == 0:
        os.chown(folder, IMAGE_UID, IMAGE_UID)
    elif folder.stat().st_uid != IMAGE_UID:
        raise StackError(f"{folder} (PGBACKFLOW_SANDBOX_DIR) must belong to uid {IMAGE_UID}, "
                         f"the image's pgbackflow user: sudo chown {IMAGE_UID} {folder}")


def secrets_folder() -> Path:
    return Path(compose_env()["PGBACKFLOW_STACK_SECRETS"])


def api_url() -> str:
    return f"http://127.0.0.1:{setting('PGBACKFLOW_PREFECT_PORT')}/api"


def wait_healthy(timeout: float = 240.0) -> None:
    """Until the Prefect API answers /health (it needs no credentials)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(api_url() + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            compose("logs", "--tail", "30", "prefect-server", check=False)
            raise StackError(f"the Prefect API at {api_url()} did not answer within "
                             f"{timeout:.0f} s: see the server's log above")
        time.sleep(2)


def up(*, rebuild: bool) -> None:
    if rebuild or image_hash(setting("PGBACKFLOW_IMAGE")) != source_hash():
        build()
    init_secrets(secrets_folder(), setting("PGBACKFLOW_IMAGE"))
    init_sandbox_dir(Path(setting("PGBACKFLOW_SANDBOX_DIR")))
    started = time.monotonic()
    compose("up", "-d")
    wait_healthy()
    print(f"Prefect UI: http://{setting('PGBACKFLOW_PREFECT_HOST')}:"
          f"{setting('PGBACKFLOW_PREFECT_PORT')} (user:password in "
          f"{secrets_folder() / 'api-auth.key'}); up in {time.monotonic() - started:.0f} s")


def _secret_env_names(config: Path) -> list[str]:
    """The variables a config names for its secrets (``*_env`` keys): passed to the deploy."""
    names: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_env") and isinstance(value, str):
                    names.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    try:
        walk(tomllib.loads(config.read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StackError(f"config '{config}' cannot be read: {exc}") from None
    return names


def deploy(config: Path, extra: list[str]) -> int:
    """``pgbackflow deploy --config`` in a one-off container of the worker's image, with the
    workers' API URL, auth string and key file: what the config names must exist there."""
    config = config.resolve()
    env_args: list[str] = []
    for name in _secret_env_names(config):
        if name not in os.environ:
            raise StackError(f"config '{config}' names ${name} for a secret, and it is not "
                             "set here: export it and run deploy again")
        env_args += ["-e", name]  # the value comes from this environment, never from argv
    result = compose("run", "--rm", "-T", "-v",
                     f"{config}:/etc/pgbackflow/pgbackflow.toml:ro", *env_args, "cli",
                     "pgbackflow", "deploy", "--config", "/etc/pgbackflow/pgbackflow.toml",
                     *extra, check=False)
    return result.returncode


def doctor() -> int:
    """``pgbackflow doctor`` inside the server's container: its environment is the server's."""
    return compose("exec", "-T", "prefect-server", "/opt/pgbackflow/bin/pgbackflow-stack-env",
                   "pgbackflow", "doctor", check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="docker/stack.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the base (if no registry) and the pgbackflow image")
    up_parser = commands.add_parser("up", help="secrets, images (if missing), containers")
    up_parser.add_argument("--build", action="store_true", help="rebuild the image first")
    deploy_parser = commands.add_parser("deploy", help="pgbackflow deploy --config against it")
    deploy_parser.add_argument("config", type=Path)
    deploy_parser.add_argument("options", nargs=argparse.REMAINDER,
                               help="more deploy options, e.g. --dry-run")
    commands.add_parser("doctor", help="pgbackflow doctor where the server runs")
    down_parser = commands.add_parser("down", help="stop and remove the containers")
    down_parser.add_argument("--volumes", action="store_true",
                             help="also remove the volumes: the server's database and spool")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build()
        elif args.command == "up":
            up(rebuild=args.build)
        elif args.command == "deploy":
            return deploy(args.config, args.options)
        elif args.command == "doctor":
            return doctor()
        else:
            compose("down", *(["--volumes"] if args.volumes else []))
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
