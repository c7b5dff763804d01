"""The local ``postgres:<major>`` images honour the official image's contract.

Real Docker engine (``bash .ci/docker-engine.sh``); images from ``docker/build_images.py``, run
here for the majors under test (a second when they are up to date). Tested with the smallest
and the largest major of ``--pg-majors``, hardened as pgbackflow runs its sandboxes: no network,
every capability dropped but the ones the entrypoint needs, no-new-privileges, pid, memory and
CPU limits.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_LABEL = "pgbackflow.test"
#: The label's value: this test process, so parallel pytest processes on one engine leave
#: each other's containers alone.
OWNER = str(os.getpid())
#: Capabilities the entrypoint needs when started as root with the image's own PGDATA: switch
#: to uid/gid 999 (su-exec). A PGDATA mount owned by someone else (tmpfs) also needs CHOWN.
ROOT_CAPS = ("SETUID", "SETGID")
READY_TIMEOUT = 90.0

Container = Any  # docker.models.containers.Container (the SDK has no type hints)
StartFn = Callable[..., Container]




def _remove_test_containers(client: Any) -> None:
    for container in client.containers.list(all=True,
                                             filters={"label": f"{TEST_LABEL}={OWNER}"}):
        container.remove(force=True, v=True)


@pytest.fixture(scope="module")
def docker_client(docker_engine: Any) -> Iterator[Any]:
    """The engine's client (see tests/fixtures/docker.py); removes leftover test containers."""
    client = docker_engine
    _remove_test_containers(client)
    try:
        yield client
    finally:
        _remove_test_containers(client)
        client.close()


@pytest.fixture(scope="module")
def images(docker_client: Any, pg_majors: tuple[int, ...]) -> dict[int, str]:
    """``postgres:<major>`` for the smallest and largest selected majors, built if needed."""
    majors = sorted({min(pg_majors), max(pg_majors)})
    result = subprocess.run(
        [sys.executable, str(REPO / "docker" / "build_images.py"), *map(str, majors)],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"docker/build_images.py {' '.join(map(str, majors))} failed:\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}",
            pytrace=False,
        )
    return {major: f"postgres:{major}" for major in majors}


@pytest.fixture(params=["smallest", "largest"])
def major(request: pytest.FixtureRequest, pg_majors: tuple[int, ...]) -> int:
    """The smallest and the largest selected major."""
    if request.param == "largest" and min(pg_majors) == max(pg_majors):
        pytest.skip(f"only PostgreSQL {pg_majors[0]} is selected")
    return min(pg_majors) if request.param == "smallest" else max(pg_majors)


@pytest.fixture
def start(docker_client: Any, images: dict[int, str]) -> Iterator[StartFn]:
    """Start a hardened container of a major's image; removed after the test."""
    started: list[Container] = []

    def run(major: int, *, command: list[str] | None = None, **options: Any) -> Container:
        kwargs: dict[str, Any] = {
            "network_mode": "none",
            "cap_drop": ["ALL"],
            "cap_add": list(ROOT_CAPS),
            "security_opt": ["no-new-privileges"],
            "pids_limit": 256,
            "mem_limit": "512m",
            "nano_cpus": 1_000_000_000,
            "labels": {TEST_LABEL: OWNER},
            **options,
        }
        container = docker_client.containers.run(images[major], command, detach=True, **kwargs)
        started.append(container)
        return container

    yield run
    not_found = importlib.import_module("docker.errors").NotFound
    for container in started:
        with contextlib.suppress(not_found):
            container.remove(force=True, v=True)


def _logs(container: Container) -> str:
    return bytes(container.logs()).decode("utf-8", "replace")


def _exec(container: Container, cmd: list[str], **kwargs: Any) -> tuple[int, str]:
    result = container.exec_run(cmd, **kwargs)
    return int(result.exit_code), bytes(result.output).decode("utf-8", "replace")


def wait_ready(
    container: Container, user: str = "postgres", timeout: float = READY_TIMEOUT
) -> float:
    """Wait until the final server answers over TCP; return the seconds waited.

    TCP, not the socket: during initialisation the entrypoint runs a socket-only temporary
    server (as the official image does), which must not count as ready.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        container.reload()
        if container.status in {"exited", "dead"}:
            pytest.fail(f"container stopped while starting:\n{_logs(container)}", pytrace=False)
        code, _ = _exec(container, ["pg_isready", "-q", "-h", "127.0.0.1", "-U", user])
        if code == 0:
            return time.monotonic() - started
        time.sleep(0.1)
    pytest.fail(f"server not ready after {timeout:.0f} s:\n{_logs(container)}", pytrace=False)


def psql(container: Container, sql: str, *, user: str = "postgres", db: str = "postgres") -> str:
    """Run ``sql`` with the container's psql over its socket; return the unaligned output."""
    code, out = _exec(
        container, ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-At", "-U", user, "-d", db, "-c", sql]
    )
    assert code == 0, f"psql failed ({code}): {out}"
    return out.strip()


def process_table(container: Container) -> list[tuple[int, int, str]]:
    """(pid, uid, cmdline) of every process in the container, from /proc (no ps needed)."""
    script = (
        "for d in /proc/[0-9]*; do "
        "u=$(awk '/^Uid:/{print $2}' \"$d/status\" 2>/dev/null) || continue; "
        'printf "%s %s " "${d#/proc/}" "$u"; tr "\\0" " " < "$d/cmdline" 2>/dev/null; echo; done'
    )
    code, out = _exec(container, ["sh", "-c", script])
    assert code == 0, out
    table = []
    for line in out.splitlines():
        pid, uid, *cmdline = line.split(" ", 2)
        if pid.isdigit() and uid.isdigit():
            table.append((int(pid), int(uid), cmdline[0].strip() if cmdline else ""))
    return table


def pgdata_of(container: Container) -> str:
    """PGDATA of the container (version-specific from 18 on, as in the official image)."""
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    return str(env["PGDATA"])


def files_containing(container: Container, needle: str) -> list[str]:
    """Files under /tmp, the socket directory and PGDATA that contain ``needle``."""
    code, out = _exec(
        container,
        [
            "sh",
            "-c",
            'find /tmp /var/run/postgresql "$PGDATA" -type f -exec grep -lF -e "$NEEDLE" {} + '
            "|| true",
        ],
        environment={"NEEDLE": needle},
        user="postgres",
    )
    assert code == 0, out
    return out.split()


def test_server_initialises_from_environment_and_drops_root(start: StartFn, major: int) -> None:
    password = secrets.token_urlsafe(24)
    container = start(
        major,
        command=["-c", "fsync=off"],
        environment={
            "POSTGRES_PASSWORD": password,
            "POSTGRES_USER": "verifier",
            "POSTGRES_DB": "restore_check",
        },
    )
    waited = wait_ready(container, user="verifier")
    print(f"PostgreSQL {major}: ready {waited:.1f} s after start")

    version_num = psql(container, "select current_setting('server_version_num')", user="verifier")
    assert int(version_num) // 10000 == major
    # POSTGRES_DB exists; POSTGRES_USER is the superuser; the password is stored as SCRAM.
    assert psql(container, "select current_database()", user="verifier", db="restore_check") == (
        "restore_check"
    )
    assert (
        psql(
            container,
            "select rolsuper, rolpassword like 'SCRAM-SHA-256$%' from pg_authid "
            "where rolname = current_user",
            user="verifier",
        )
        == "t|t"
    )
    # Extra arguments reach the server; host connections use scram-sha-256 (the default).
    assert psql(container, "show fsync", user="verifier") == "off"
    rules = psql(
        container,
        "select auth_method from pg_hba_file_rules where type = 'host' and address = 'all'",
        user="verifier",
    )
    assert rules.splitlines() == ["scram-sha-256"]

    # Every server process runs as postgres (uid 999); the postmaster is PID 1.
    table = process_table(container)
    servers = [(pid, uid, cmd) for pid, uid, cmd in table if cmd.startswith("postgres")]
    assert servers, table
    assert {uid for _, uid, _ in servers} == {999}, table
    assert (1, 999) in {(pid, uid) for pid, uid, _ in servers}, table

    # The password is in the environment (the contract) but on no command line.
    assert all(password not in cmd for _, _, cmd in table), table
    container.reload()
    attrs = container.attrs
    visible = [
        attrs.get("Path", ""),
        *(attrs.get("Args") or []),
        *(attrs["Config"].get("Cmd") or []),
    ]
    visible += attrs["Config"].get("Entrypoint") or []
    assert all(password not in str(part) for part in visible), visible
    assert f"POSTGRES_PASSWORD={password}" in attrs["Config"]["Env"]
    # ... nor in a leftover file (initdb's pwfile is removed; PGDATA holds only the verifier).
    assert files_containing(container, password) == []
    assert f"{pgdata_of(container)}/PG_VERSION" in files_containing(container, f"{major}\n")

    # docker stop (STOPSIGNAL SIGINT: fast shutdown) ends the server cleanly even with a
    # session open, well before the engine's kill timeout.
    container.exec_run(["psql", "-X", "-U", "verifier", "-c", "select pg_sleep(120)"], detach=True)
    time.sleep(0.5)
    stopped = time.monotonic()
    container.stop(timeout=30)
    assert time.monotonic() - stopped < 15
    assert container.wait(timeout=30)["StatusCode"] == 0
    assert "database system is shut down" in _logs(container)
    container.remove(v=True)


def test_refuses_to_start_without_password(start: StartFn, major: int) -> None:
    container = start(major)
    status = container.wait(timeout=60)
    logs = _logs(container)
    assert status["StatusCode"] != 0, logs
    assert "superuser password is not specified" in logs
    assert "POSTGRES_HOST_AUTH_METHOD" in logs


def test_trust_auth_method_needs_no_password(start: StartFn, pg_majors: tuple[int, ...]) -> None:
    container = start(max(pg_majors), environment={"POSTGRES_HOST_AUTH_METHOD": "trust"})
    wait_ready(container)
    assert psql(container, "select count(*) from pg_hba_file_rules where auth_method = 'trust'")


def test_runs_as_postgres_user_without_any_capability(
    start: StartFn, pg_majors: tuple[int, ...]
) -> None:
    major = max(pg_majors)
    container = start(major, user="999", cap_add=[], environment={"POSTGRES_PASSWORD": "x"})
    wait_ready(container)
    assert int(psql(container, "show server_version_num")) // 10000 == major
    assert {uid for _, uid, cmd in process_table(container) if cmd.startswith("postgres")} == {999}


def test_tmpfs_data_directory_with_chown(start: StartFn, pg_majors: tuple[int, ...]) -> None:
    # A throwaway PGDATA in memory: root-owned tmpfs, handed to postgres (needs CHOWN).
    major = min(pg_majors)
    client_pgdata = (
        "/var/lib/postgresql/data" if major < 18 else f"/var/lib/postgresql/{major}/docker"
    )
    container = start(
        major,
        cap_add=[*ROOT_CAPS, "CHOWN"],
        tmpfs={client_pgdata: "rw,size=512m"},
        environment={"POSTGRES_PASSWORD": "x"},
    )
    wait_ready(container)
    assert psql(container, "show data_directory") == client_pgdata
    code, out = _exec(container, ["stat", "-c", "%u %a", client_pgdata])
    assert (code, out.strip()) == (0, "999 700")
