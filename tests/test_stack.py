"""The production stack (docker/compose.yaml) as a user brings it up: ``docker/stack.py up``.

Real Docker engine, brought up once with the ``docker compose`` v2 plugin and once with Debian's
docker-compose 1.29 (``.ci/run`` installs both), the images built
here (``docker/stack.py build``: no registry), a PostgreSQL server of the newest selected major
on loopback as the database to back up. One module-scoped stack: the API refuses requests
without the auth string, ``pgbackflow doctor`` in the server's container warns of nothing, a
deployed backup completes on the worker container with the backup in its storage, its deployed
verification completes on the agent container (sandbox on the host's engine), the master
key is nowhere in the Prefect server's database, ``docker stop`` of the worker container with
a backup mid-dump ends the run and the container within 10 s and publishes no backup, and
``down --volumes`` leaves no container, volume or network of the project behind.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.fernet import Fernet

from pgbackflow.tasks.keys import MasterKey
from tests.fixtures.postgres import PgServers, make_database

# The first build on a fresh machine: debootstrap of the base (~5 min), wheelhouse, image.
pytestmark = [pytest.mark.slow, pytest.mark.pg, pytest.mark.timeout(3000)]

REPO = Path(__file__).resolve().parent.parent
STACK = REPO / "docker" / "stack.py"
DB_ID = "stackshop"
#: First build of the image (base by debootstrap, wheelhouse, toolsets) on 2 loaded cores.
UP_TIMEOUT = 2400


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Stack:
    """One brought-up stack: its project name, ports, secrets and compose command."""

    env: dict[str, str]
    secrets: Path

    @property
    def project(self) -> str:
        return self.env["PGBACKFLOW_STACK_PROJECT"]

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.env['PGBACKFLOW_PREFECT_PORT']}/api"

    @property
    def auth(self) -> tuple[str, str]:
        user, _, password = (self.secrets / "api-auth.key").read_text().strip().partition(":")
        return user, password

    def script(self, *args: str, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(STACK), *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, check=False)

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        # The compose this stack was brought up with (PGBACKFLOW_COMPOSE for stack.py too).
        return subprocess.run(
            [*self.env["PGBACKFLOW_COMPOSE"].split(), "--project-name", self.project, "--file",
             str(REPO / "docker" / "compose.yaml"), *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def http(self, *, auth: bool = True) -> httpx.Client:
        # 90 s: the stack's server, just up beside a loaded test run, once took more than
        # 30 s to answer its first authenticated request (CI run of e82c3bd, a slow host).
        return httpx.Client(base_url=self.api + "/", timeout=90,
                            auth=self.auth if auth else None)

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in ("container", "volume", "network"):
            listed = subprocess.run(
                ["docker", kind, "ls", *(["--all"] if kind == "container" else []), "--quiet",
                 "--filter", label], capture_output=True, text=True, check=True).stdout.split()
            found += [f"{kind} {name}" for name in listed]
        return found


def _failed(what: str, result: subprocess.CompletedProcess[str]) -> str:
    return (f"{what} exited with {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


#: Both composes the stack promises to work with: the v2 plugin and Debian's 1.29.
COMPOSES = ("docker compose", "docker-compose")


@pytest.fixture(scope="module", params=COMPOSES)
def stack(docker_engine: Any, request: pytest.FixtureRequest) -> Iterator[Stack]:
    compose: str = request.param
    installed = subprocess.run([*compose.split(), "version"], capture_output=True,
                               check=False) if shutil.which(compose.split()[0]) else None
    if installed is None or installed.returncode != 0:
        pytest.fail(f"{compose} is not installed (.ci/run installs docker-compose 1.29 and the "
                    "v2 plugin)", pytrace=False)
    secrets_dir = Path(tempfile.mkdtemp(prefix="pgbackflow-test-stack-", dir="/var/tmp"))
    env = {
        **os.environ,
        "PGBACKFLOW_STACK_PROJECT": f"pgbackflow-test-{os.getpid()}-"
                                    f"{'v2' if compose == 'docker compose' else 'v1'}",
        "PGBACKFLOW_PREFECT_PORT": str(_free_port()),
        "PGBACKFLOW_PREFECT_DB_PORT": str(_free_port()),
        "PGBACKFLOW_PREFECT_BIND": "127.0.0.1",
        "PGBACKFLOW_STACK_SECRETS": str(secrets_dir / "secrets"),
        "PGBACKFLOW_SANDBOX_DIR": str(secrets_dir / "sandboxes"),
        "PGBACKFLOW_COMPOSE": compose,
    }
    stack = Stack(env=env, secrets=secrets_dir / "secrets")
    try:
        started = time.monotonic()
        # Builds the image when this checkout's sources differ from the image's label.
        result = stack.script("up", timeout=UP_TIMEOUT)
        assert result.returncode == 0, _failed("docker/stack.py up", result)
        print(f"stack up (build included) in {time.monotonic() - started:.0f} s")
        yield stack
    finally:
        down = stack.script("down", "--volumes")
        shutil.rmtree(secrets_dir, ignore_errors=True)
        assert down.returncode == 0, _failed("docker/stack.py down --volumes", down)
        assert stack.leftovers() == [], "the stack left these behind"


@pytest.mark.parametrize("compose", COMPOSES)
def test_down_works_in_a_checkout_that_never_built_the_image(
    docker_engine: Any, compose: str, tmp_path: Path
) -> None:
    """A checkout whose image was built elsewhere has no docker/build/context/, and 1.29
    refuses every command of a compose file whose build context is missing (CI: ``down``)."""
    copy = tmp_path / "docker"
    copy.mkdir()
    for name in ("stack.py", "compose.yaml"):
        shutil.copy2(REPO / "docker" / name, copy / name)
    env = {**os.environ, "PGBACKFLOW_COMPOSE": compose,
           "PGBACKFLOW_STACK_PROJECT": f"pgbackflow-test-{os.getpid()}-never-built",
           "PGBACKFLOW_STACK_SECRETS": str(tmp_path / "secrets")}
    down = subprocess.run([sys.executable, str(copy / "stack.py"), "down", "--volumes"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert down.returncode == 0, _failed(f"docker/stack.py down with {compose}", down)


def test_api_needs_the_auth_string_and_the_ui_calls_its_port(stack: Stack) -> None:
    with stack.http(auth=False) as anonymous:
        assert anonymous.get("health").status_code == 200  # probes need no credentials
        refused = anonymous.get("admin/version")
        assert refused.status_code == 401, refused.text
        assert anonymous.post("flows/filter", json={}).status_code == 401
    with httpx.Client(timeout=30, auth=("pgbackflow", "wrong")) as wrong:
        assert wrong.get(stack.api + "/admin/version").status_code == 401
    with stack.http() as http:
        assert http.get("admin/version").json().startswith("3.8.")
    ui = httpx.get(stack.api.removesuffix("/api") + "/ui-settings", timeout=30).json()
    assert ui["api_url"] == f"http://localhost:{stack.env['PGBACKFLOW_PREFECT_PORT']}/api"


def test_doctor_in_the_server_container_warns_of_nothing(stack: Stack) -> None:
    result = stack.script("doctor", timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 0, _failed("docker/stack.py doctor", result)
    assert "warning" not in output, output
    oks = [line for line in output.splitlines() if line.startswith("ok:")]
    assert len(oks) == 3, output


def test_deployed_backup_runs_on_the_worker_and_the_key_stays_out(
    stack: Stack, pg_servers: PgServers, pg_majors: tuple[int, ...], tmp_path: Path
) -> None:
    cluster = pg_servers(max(pg_majors))
    database = make_database(cluster, "stack",
                             "CREATE TABLE t AS SELECT g FROM generate_series(1, 500) g")
    config = tmp_path / "pgbackflow.toml"
    config.write_text(_config(cluster.port, cluster.superuser, DB_ID, database))
    deploy = stack.script("deploy", str(config), env={"STACK_PG_PASSWORD": cluster.password})
    assert deploy.returncode == 0, _failed("docker/stack.py deploy", deploy)
    assert cluster.password not in deploy.stdout + deploy.stderr
    assert "warning" not in deploy.stdout + deploy.stderr, deploy.stderr

    run = _run_deployment(stack, f"logical-backup/logical-{DB_ID}", "worker")
    assert run["work_pool_name"] == "backups"

    # The backup is in the worker container's storage volume (the host has no /srv/backups).
    listing = stack.compose("exec", "-T", "worker", "/opt/pgbackflow/bin/pgbackflow-stack-env",
                            "pgbackflow", "list", "--from", "/srv/backups", "--json")
    assert listing.returncode == 0, _failed("pgbackflow list in the worker", listing)
    assert [backup["db_id"] for backup in json.loads(listing.stdout)] == [DB_ID]

    # The agent restores it into a sandbox container on the host's engine (through the
    # mounted socket), counts the rows, and removes the sandbox.
    before = _sandbox_containers()
    verification = _run_deployment(stack, f"restore-verification/verify-{DB_ID}", "agent")
    assert verification["work_pool_name"] == "verify"
    with stack.http() as http:
        artifacts = http.post("artifacts/filter", json={
            "artifacts": {"key": {"any_": [f"verification-{DB_ID}"]}}}).json()
    assert artifacts and "Successful" in artifacts[0]["data"], artifacts
    assert _sandbox_containers() == before, "the verification left its sandbox behind"
    assert list(Path(stack.env["PGBACKFLOW_SANDBOX_DIR"]).iterdir()) == [], \
        "the verification left its work dir behind"

    _assert_key_not_in_prefect_database(stack)


#: The promise of ``pgbackflow worker`` (README "Scale-out"): runs and the worker end within
#: this many seconds of SIGTERM (compose's stop_grace_period of 15 s leaves it a margin).
STOP_LIMIT_S = 10.0
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


# The stop is Docker's SIGTERM to the container whichever compose sends it: the v2 plugin's
# stack only (the same module-scoped stack as the other tests'); on 1.29's too would add a
# deploy, a locked dump and a stop (~1 min) for no other code path.
@pytest.mark.parametrize("stack", ["docker compose"], indirect=True)
def test_docker_stop_of_the_worker_mid_dump_ends_the_run_within_10_s(
    stack: Stack, pg_servers: PgServers, pg_majors: tuple[int, ...], tmp_path: Path
) -> None:
    """``compose stop worker`` (SIGTERM to the container's pgbackflow worker) while a deployed
    backup's pg_dump waits for a table lock held here: the container exits (code 0, not
    SIGKILLed at the grace period's end) and the run is in a final state within 10 s of the
    stop, and storage lists no backup of that database."""
    cluster = pg_servers(max(pg_majors))
    database = make_database(cluster, "stackstop",
                             "CREATE TABLE t AS SELECT g FROM generate_series(1, 500) g")
    config = tmp_path / "pgbackflow.toml"
    config.write_text(_config(cluster.port, cluster.superuser, STOP_DB_ID, database))
    deploy = stack.script("deploy", str(config), env={"STACK_PG_PASSWORD": cluster.password})
    assert deploy.returncode == 0, _failed("docker/stack.py deploy", deploy)

    container = stack.compose("ps", "--quiet", "worker").stdout.strip()
    assert container, "no worker container"
    locker = cluster.connect(database)
    watcher = cluster.connect()
    try:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")  # held: pg_dump waits
        with stack.http() as http:
            deployment = http.get(f"deployments/name/logical-backup/logical-{STOP_DB_ID}").json()
            run_id = http.post(f"deployments/{deployment['id']}/create_flow_run",
                               json={}).json()["id"]
        _wait_for(lambda: _dump_waiting(watcher, database), 300,
                  lambda: f"no pg_dump of {database} waiting for its lock:\n"
                          + stack.compose("logs", "--tail", "60", "worker").stdout[-4000:])
        with stack.http() as http:
            running = http.get(f"flow_runs/{run_id}").json()["state"]["type"]
        assert running == "RUNNING", running
        stopped_at = datetime.now(UTC)
        started = time.monotonic()
        stop = stack.compose("stop", "worker", timeout=120)
        took = time.monotonic() - started
        assert stop.returncode == 0, _failed("compose stop worker", stop)
    finally:
        locker.close()
        watcher.close()
    inspected = json.loads(subprocess.run(
        ["docker", "inspect", "--format", "{{json .State}}", container],
        capture_output=True, text=True, check=True).stdout)
    exited_after = (_at(inspected["FinishedAt"]) - stopped_at).total_seconds()
    with stack.http() as http:
        run: dict[str, Any] = http.get(f"flow_runs/{run_id}").json()
    ended_after = (_at(run["state"]["timestamp"]) - stopped_at).total_seconds()
    logs = stack.compose("logs", "--tail", "40", "worker").stdout[-4000:]
    print(f"compose stop worker took {took:.1f} s; the container exited {exited_after:.1f} s "
          f"after the stop (code {inspected['ExitCode']}), the run was "
          f"{run['state']['type']} {ended_after:.1f} s after it")
    assert inspected["ExitCode"] == 0, f"exit code {inspected['ExitCode']}:\n{logs}"
    assert exited_after <= STOP_LIMIT_S, logs
    assert run["state"]["type"] in FINAL, (run["state"], logs)
    assert ended_after <= STOP_LIMIT_S, (run["state"], logs)

    # The storage volume, read by a one-off container (the worker is stopped): no backup of
    # the stopped run, and the worker's next start serves the pool again.
    listing = stack.compose("run", "--rm", "-T", "cli", "/opt/pgbackflow/bin/pgbackflow-stack-env",
                            "pgbackflow", "list", "--from", "/srv/backups", "--json")
    assert listing.returncode == 0, _failed("pgbackflow list in a cli container", listing)
    assert STOP_DB_ID not in {b["db_id"] for b in json.loads(listing.stdout)}, listing.stdout
    start = stack.compose("start", "worker")
    assert start.returncode == 0, _failed("compose start worker", start)


STOP_DB_ID = "stackstop"


def _config(port: int, user: str, db_id: str, database: str) -> str:
    return textwrap.dedent(f"""
        [prefect]
        work_pool = "backups"
        verification_pool = "verify"
        [key]
        file = "/run/secrets/master_key"
        [storages.volume]
        url = "/srv/backups"
        maintenance = ""
        [servers.pg]
        host = "127.0.0.1"
        port = {port}
        user = "{user}"
        password_env = "STACK_PG_PASSWORD"
        [databases.{db_id}]
        server = "pg"
        database = "{database}"
        storages = ["volume"]
        backup = "0 0 1 1 *"
        verify = "0 0 1 1 *"
    """)


def _at(text: str) -> datetime:
    """A timestamp of Docker (nanoseconds) or of the Prefect API, as an aware datetime."""
    text = text.replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # Python parses at most microseconds
        digits = rest[:len(rest) - len(rest.lstrip("0123456789"))]
        text = f"{head}.{digits[:6]}{rest[len(digits):]}"
    return datetime.fromisoformat(text)


def _dump_waiting(conn: psycopg.Connection[Any], dbname: str) -> bool:
    """A pg_dump of ``dbname`` is connected and waits for its table lock (mid-backup)."""
    rows = conn.execute(
        "SELECT 1 FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
        "AND query LIKE 'LOCK TABLE%%ACCESS SHARE MODE'", (dbname,)).fetchall()
    return bool(rows)


def _wait_for(condition: Callable[[], bool], timeout: float,
              message: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(message(), pytrace=False)
        time.sleep(0.5)


def _run_deployment(stack: Stack, name: str, service: str) -> dict[str, Any]:
    """Start a run of deployment ``name`` over the REST API and wait for it to complete; fail
    with the tail of ``service``'s log otherwise."""
    with stack.http() as http:
        deployment = http.get(f"deployments/name/{name}").json()
        run_id = http.post(f"deployments/{deployment['id']}/create_flow_run", json={}).json()["id"]
        deadline = time.monotonic() + 600
        while True:
            run: dict[str, Any] = http.get(f"flow_runs/{run_id}").json()
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.monotonic() < deadline, f"the {name} run is still {run['state']['type']}"
            time.sleep(3)
    if run["state"]["type"] != "COMPLETED":
        logs = stack.compose("logs", "--tail", "60", service)
        pytest.fail(f"{name} run {run['state']}:\n{logs.stdout[-4000:]}")
    return run


def _sandbox_containers() -> list[str]:
    """Every container on the engine whose image is a ``postgres:<major>`` sandbox image."""
    listed = subprocess.run(["docker", "ps", "--all", "--format", "{{.Names}} {{.Image}}"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return sorted(line.split()[0] for line in listed if " postgres:" in line)


def _key_forms(key: MasterKey) -> list[str]:
    material = key.material
    return [material.hex(), base64.b64encode(material).decode(),
            base64.urlsafe_b64encode(material).decode(), key.to_text()]


def _assert_key_not_in_prefect_database(stack: Stack) -> None:
    key = MasterKey.from_text((stack.secrets / "master.key").read_text())
    port = stack.env["PGBACKFLOW_PREFECT_DB_PORT"]
    dump = stack.compose("exec", "-T", "prefect-db", "pg_dump", "-h", "127.0.0.1", "-p", port,
                         "-U", "prefect", "prefect")
    assert dump.returncode == 0, _failed("pg_dump of the Prefect database", dump)
    assert "block_document" in dump.stdout, "the dump holds no Prefect tables"
    for form in _key_forms(key):
        assert form not in dump.stdout, "the master key is in the Prefect server's database"

    # Block secrets are encrypted with the stack's key file, which the database does not hold.
    fernet = Fernet((stack.secrets / "encryption.key").read_text().strip().encode())
    password = (stack.secrets / "prefect-db-password.key").read_text().strip()
    with psycopg.connect(host="127.0.0.1", port=int(port), user="prefect", dbname="prefect",
                         password=password) as db:
        stored = db.execute("SELECT count(*) FROM configuration WHERE key = 'ENCRYPTION_KEY'")
        assert stored.fetchone() == (0,), "the server keeps its Fernet key in its database"
        documents = [fernet.decrypt(str(data).strip('"').encode()).decode()
                     for (data,) in db.execute("SELECT data FROM block_document")]
    assert any("127.0.0.1" in document for document in documents), "no database block found"
    for form in _key_forms(key):
        assert not any(form in document for document in documents), "the master key is in a block"
