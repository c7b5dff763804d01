"""Point-in-time restore into a Docker volume, against real backups, WAL and containers.

One source cluster per major (17 with full + incremental, 15 with a full) streams its WAL
into a local storage while rows are written; restores then target a moment between two
commits, the end of the WAL, and a moment after the last commit. Containers run from the
local ``postgres:<major>`` images (docker/build_images.py). This engine has no default bridge
(``--bridge=none``), so the default path is host networking; a user-defined bridge network
covers the published-port path. Every volume, container and network is removed afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgbackflow.tasks import physical as ph
from pgbackflow.tasks import pitr, wal
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.errors import ConfigError, DatabaseError
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.manifest import new_backup_id
from pgbackflow.tasks.pitr_docker import (
    PITR_LABEL,
    _tar_chunks,
    configure_container_recovery,
    restore_into_docker_volume,
)
from pgbackflow.tasks.storage import LocalFolderStorage
from pgbackflow.tasks.toolsets import find_toolset
from tests.fixtures.docker import volumes_mounted

pytestmark = pytest.mark.pg

REPO = Path(__file__).resolve().parent.parent
BASE_ROWS = 1000
TEST_LABEL = "pgbackflow.test"
#: The label's value: this test process, so parallel pytest processes on one engine leave
#: each other's containers alone.
OWNER = str(os.getpid())


@dataclass(frozen=True)
class Source:
    """Backups and WAL of a cluster that is gone, and what a restore must bring back.

    Attributes:
        major: Its PostgreSQL major.
        storage: Where its backups and WAL are.
        keyring: Their key.
        db_id: The cluster id.
        between: A moment after row 60001's commit and before row 60002's.
        after_last: A moment after the last commit (70001), inside the recoverable window.
        superuser: Login of the source (kept by the restore).
        password: Its password.
        chain: Modes of the chain a latest restore uses.
    """

    major: int
    storage: LocalFolderStorage
    keyring: Keyring
    db_id: str
    between: datetime
    after_last: datetime
    superuser: str
    password: str
    chain: tuple[str, ...]


def _backup(
    settings: ConnectionSettings, storage: LocalFolderStorage, key: MasterKey, ring: Keyring,
    major: int, *, incremental: bool,
) -> None:
    """A physical backup and its manifest, as the backup flow writes them."""
    toolset = find_toolset(major)
    facts = ph.read_cluster_facts(settings)
    plan = ph.plan_backup(facts, ph.list_physical_backups(storage, facts.db_id),
                          incremental=incremental)
    backup_id = new_backup_id()
    started = datetime.now(UTC)
    prefix = ph.backup_prefix(facts.db_id, backup_id)
    if plan.parent:
        with ph.parent_manifest_file(storage, plan.parent, ring) as parent_manifest:
            result = ph.take_base_backup(settings, toolset, [storage], key, prefix,
                                         incremental_from=parent_manifest)
    else:
        result = ph.take_base_backup(settings, toolset, [storage], key, prefix)
    ph.write_manifest(storage, ph.PhysicalManifest(
        backup_id=backup_id, db_id=facts.db_id, mode=plan.mode,
        parent_id=plan.parent.backup_id if plan.parent else None,
        full_id=plan.parent.full_id if plan.parent else backup_id,
        full_reason=plan.full_reason, system_identifier=result.system_identifier,
        timeline=result.timeline, start_lsn=result.start_lsn, end_lsn=result.end_lsn,
        wal_segment_size=facts.wal_segment_size, source=settings.display,
        server_version=facts.version, server_version_num=facts.version_num,
        pg_basebackup_version=toolset.version, started_at=started,
        finished_at=datetime.now(UTC), base=result.base.info,
        backup_manifest=result.backup_manifest.info, key_id=key.key_id_hex,
        cluster_size=facts.cluster_size, tool_version="test",
    ), key)


def _clock(conn: psycopg.Connection[Any]) -> datetime:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def _make_source(major: int, root: Path) -> Source:
    toolset = find_toolset(major)
    key = MasterKey.generate()
    ring = Keyring([key])
    storage = LocalFolderStorage(root / "store")
    with EphemeralCluster(toolset, settings={"fsync": "off"}) as cluster:
        settings = ConnectionSettings(host=cluster.host, port=cluster.port,
                                      user=cluster.superuser, password=cluster.password)
        facts = ph.read_cluster_facts(settings)
        shipper = wal.WalShipper(root / "spool", [storage], key, facts.db_id,
                                 partial_interval=1)
        streamer = wal.WalStreamer(settings, toolset, shipper, slot="pgbackflow_test")
        stop = threading.Event()
        errors: list[BaseException] = []

        def stream() -> None:
            try:
                streamer.run(stop)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=stream, name="test-wal-stream")
        thread.start()
        try:
            with cluster.connect() as conn:
                conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
                conn.execute("INSERT INTO t SELECT g, 'base' FROM generate_series(1, %s) g",
                             (BASE_ROWS,))
            _backup(settings, storage, key, ring, major, incremental=False)
            with cluster.connect() as conn:
                conn.execute("INSERT INTO t VALUES (50001, 'between backups')")
            if major >= ph.INCREMENTAL_MIN_MAJOR:
                _backup(settings, storage, key, ring, major, incremental=True)
            with cluster.connect() as conn:
                conn.execute("INSERT INTO t VALUES (60001, 'before target')")
                time.sleep(1.1)
                between = _clock(conn)
                time.sleep(1.1)
                conn.execute("INSERT INTO t VALUES (60002, 'after target')")
                conn.execute("INSERT INTO t VALUES (70001, 'last')")
                time.sleep(0.5)
                after_last = _clock(conn)
                # WAL without a commit, uploaded after after_last: the window reaches past it.
                conn.execute("SELECT pg_switch_wal()")
            time.sleep(1.5)
        finally:
            stop.set()
            thread.join()
        assert errors == []
        chain = tuple(b.mode for b in pitr.plan_pitr(storage, facts.db_id, None).chain)
        return Source(major, storage, ring, facts.db_id, between, after_last,
                      cluster.superuser, cluster.password, chain)


@pytest.fixture(scope="module")
def engine(docker_engine: Any) -> Any:
    return docker_engine


@pytest.fixture(scope="module")
def sources(engine: Any, pg_majors: tuple[int, ...]) -> Iterator[Callable[[int], Source]]:
    """Sources built on first use, one per major, shared by the module's tests."""
    built: dict[int, Source] = {}
    roots: list[Path] = []

    def get(major: int) -> Source:
        if major not in pg_majors:
            pytest.skip(f"PostgreSQL {major} is not selected (--pg-majors)")
        if major not in built:
            _ensure_image(engine, major)
            root = Path(tempfile.mkdtemp(prefix=f"pgbackflow-test-pitr-docker-{major}-"))
            roots.append(root)
            root.chmod(0o755)  # the cluster's OS user reaches its data below
            built[major] = _make_source(major, root)
        return built[major]

    try:
        yield get
    finally:
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=[17, 15], ids=["pg17", "pg15"])
def source(request: pytest.FixtureRequest, sources: Callable[[int], Source]) -> Source:
    """17 (full + incremental) and 15 (full only)."""
    return sources(int(request.param))


@pytest.fixture
def source17(sources: Callable[[int], Source]) -> Source:
    """The PostgreSQL 17 source, for the tests that need one major."""
    return sources(17)


def _ensure_image(engine: Any, major: int) -> None:
    errors = importlib.import_module("docker.errors")
    try:
        engine.images.get(f"postgres:{major}")
    except errors.ImageNotFound:
        result = subprocess.run(
            [sys.executable, str(REPO / "docker" / "build_images.py"), str(major)],
            capture_output=True, text=True, timeout=1200, check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"docker/build_images.py {major} failed:\n{result.stderr[-2000:]}")


NameFn = Callable[[], str]


@pytest.fixture
def new_name(engine: Any) -> Iterator[NameFn]:
    """Unique volume names; their volumes and same-named containers go after the test."""
    names: list[str] = []
    started = time.time()

    def make() -> str:
        names.append(f"pgbackflow-test-{secrets.token_hex(4)}")
        return names[-1]

    yield make
    errors = importlib.import_module("docker.errors")
    for name in names:
        with contextlib.suppress(errors.NotFound):
            engine.containers.get(name).remove(force=True, v=True)
    for container in engine.containers.list(all=True,
                                            filters={"label": f"{TEST_LABEL}={OWNER}"}):
        container.remove(force=True, v=True)
    for name in names:
        with contextlib.suppress(errors.NotFound):
            engine.volumes.get(name).remove(force=True)
    # Nothing left behind, anonymous volumes (the image's VOLUME) included: every volume a
    # container on one of our volumes mounted (other test processes use the engine meanwhile).
    mounted = volumes_mounted(engine, started, label=f"{TEST_LABEL}={OWNER}", names=names)
    assert mounted & {v.name for v in engine.volumes.list()} == set()


def _rows(port: int, source: Source) -> list[int]:
    with psycopg.connect(host="127.0.0.1", port=port, user=source.superuser,
                         password=source.password, dbname="postgres",
                         connect_timeout=10) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        assert row == (False,), "the restored server must be promoted"
        rows = conn.execute("SELECT id FROM t WHERE id > %s ORDER BY id", (BASE_ROWS,))
        return [r[0] for r in rows]


def _in_volume(engine: Any, volume: str, script: str) -> str:
    """Output of ``script`` run as root in a throwaway container with the volume at /v."""
    # Not run(remove=True): that removes the container without its anonymous volume.
    container = engine.containers.create(
        "postgres:17", entrypoint=["sh", "-c"], command=[script],
        network_mode="none", volumes={volume: {"bind": "/v", "mode": "rw"}},
        labels={TEST_LABEL: OWNER},
    )
    try:
        container.start()
        assert container.wait()["StatusCode"] == 0, container.logs().decode()
        return bytes(container.logs(stdout=True, stderr=False)).decode().strip()
    finally:
        container.remove(force=True, v=True)


def _leftover_helpers(engine: Any, volume: str) -> list[str]:
    """Helper containers left on this test's volume (other tests restore meanwhile)."""
    return [c.name for c in engine.containers.list(
                all=True, filters={"label": PITR_LABEL, "volume": volume})
            if c.labels.get(PITR_LABEL) == "helper"]


def test_restores_to_a_time_between_commits_and_starts(
    source: Source, engine: Any, new_name: NameFn, tmp_path: Path
) -> None:
    """Only the rows committed before the target come back, in a promoted container."""
    volume = new_name()
    plan = pitr.plan_pitr(source.storage, source.db_id, source.between)
    assert [b.mode for b in plan.chain] == list(source.chain)
    steps: list[str] = []
    result = restore_into_docker_volume(
        source.storage, plan, source.keyring, volume=volume, start=True, on_step=steps.append,
        work_dir=tmp_path,
    )
    assert _rows(result.port, source) == [50001, 60001]
    assert result.reached_target is True
    assert result.last_transaction is not None
    assert result.created_volume and result.volume == volume
    assert result.image == f"postgres:{source.major}"
    container = engine.containers.get(result.container_id)
    assert container.status == "running" and container.name == volume
    assert container.labels[PITR_LABEL] == source.db_id
    code, out = container.exec_run(
        ["sh", "-c", f'stat -c "%u:%g %a" {result.pgdata}; ls {result.pgdata}/pgbackflow_restore']
    )
    assert code == 0, out
    owner, *rest = bytes(out).decode().split()
    assert owner == "999:999" and rest[0] == "700", out  # the image's postgres, mode 0700
    assert "wal" not in rest  # the WAL cache is dropped after the promotion
    assert any(s.startswith("combining ") for s in steps) == (len(plan.chain) > 1)
    assert _leftover_helpers(engine, volume) == []
    assert list(tmp_path.iterdir()) == []  # the host copy of the data directory is gone


def test_bridge_network_publishes_the_port_on_loopback(
    source17: Source, engine: Any, new_name: NameFn
) -> None:
    """On a bridge the port is published to 127.0.0.1 and the gateway may log in."""
    errors = importlib.import_module("docker.errors")
    name = new_name()
    try:
        network = engine.networks.create(name, driver="bridge", labels={TEST_LABEL: OWNER})
    except errors.APIError as exc:
        pytest.fail(f"this engine cannot create a bridge network: {exc}", pytrace=False)
    try:
        plan = pitr.plan_pitr(source17.storage, source17.db_id, None)
        result = restore_into_docker_volume(
            source17.storage, plan, source17.keyring, volume=name, start=True, network=name,
        )
        assert result.network == name
        assert f"-p 127.0.0.1:{result.port}:5432" in result.run_command
        assert _rows(result.port, source17) == [50001, 60001, 60002, 70001]  # latest
        with psycopg.connect(host="127.0.0.1", port=result.port, user=source17.superuser,
                             password=source17.password, dbname="postgres") as conn:
            client = conn.execute("SELECT host(inet_client_addr())").fetchone()
        gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]
        assert client == (gateway,)
    finally:
        with contextlib.suppress(errors.NotFound):
            engine.containers.get(name).remove(force=True, v=True)
        network.remove()


def test_no_commit_after_the_target_replays_to_the_end(
    source17: Source, new_name: NameFn
) -> None:
    """PostgreSQL stops when no transaction follows the target; the restore still succeeds."""
    plan = pitr.plan_pitr(source17.storage, source17.db_id, source17.after_last)
    result = restore_into_docker_volume(
        source17.storage, plan, source17.keyring, volume=new_name(), start=True,
    )
    assert result.reached_target is False
    assert _rows(result.port, source17) == [50001, 60001, 60002, 70001]


def test_without_start_the_printed_command_starts_the_server(
    source17: Source, engine: Any, new_name: NameFn
) -> None:
    """start=False leaves a ready volume; the returned ``docker run`` command recovers it."""
    if shutil.which("docker") is None:
        pytest.fail("no docker CLI to run the printed command (bash .ci/docker-engine.sh "
                    "installs it)", pytrace=False)
    volume = new_name()
    plan = pitr.plan_pitr(source17.storage, source17.db_id, source17.between)
    result = restore_into_docker_volume(
        source17.storage, plan, source17.keyring, volume=volume, start=False,
        port=pitr.free_port(),
    )
    assert result.container_id is None and result.reached_target is None
    with pytest.raises(importlib.import_module("docker.errors").NotFound):
        engine.containers.get(volume)
    assert _in_volume(engine, volume, "cat /v/PG_VERSION; test -e /v/recovery.signal && echo y") \
        == "17\ny"
    subprocess.run(shlex.split(result.run_command), check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 120
    while True:
        try:
            assert _rows(result.port, source17) == [50001, 60001]
            break
        except (psycopg.OperationalError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_non_empty_volume_is_refused_and_left_alone(
    source17: Source, engine: Any, new_name: NameFn
) -> None:
    volume = new_name()
    engine.volumes.create(name=volume)
    _in_volume(engine, volume, "echo precious > /v/marker")
    plan = pitr.plan_pitr(source17.storage, source17.db_id, None)
    with pytest.raises(ConfigError, match=f"volume '{volume}' already holds data"):
        restore_into_docker_volume(
            source17.storage, plan, source17.keyring, volume=volume, start=True,
        )
    assert _in_volume(engine, volume, "ls -A /v; cat /v/marker") == "marker\nprecious"
    assert _leftover_helpers(engine, volume) == []


def test_missing_image_is_refused_before_anything_is_created(
    source17: Source, engine: Any, new_name: NameFn
) -> None:
    errors = importlib.import_module("docker.errors")
    volume = new_name()
    plan = pitr.plan_pitr(source17.storage, source17.db_id, None)
    with pytest.raises(ConfigError, match=r"build it with `python docker/build_images.py 17`"):
        restore_into_docker_volume(
            source17.storage, plan, source17.keyring, volume=volume,
            image="postgres:pgbackflow-missing",
        )
    with pytest.raises(ConfigError, match="holds PostgreSQL 15 but the backups are of 17"):
        restore_into_docker_volume(
            source17.storage, plan, source17.keyring, volume=volume, image="postgres:15",
        )
    with pytest.raises(errors.NotFound):
        engine.volumes.get(volume)


@pytest.mark.parametrize("existing", [False, True], ids=["new-volume", "existing-empty-volume"])
def test_failure_removes_what_the_restore_created(
    source17: Source, engine: Any, new_name: NameFn, existing: bool
) -> None:
    """A restore that fails after creating things removes them; a volume it found stays."""
    errors = importlib.import_module("docker.errors")
    volume = new_name()
    if existing:
        engine.volumes.create(name=volume)
    plan = pitr.plan_pitr(source17.storage, source17.db_id, source17.between)
    with pytest.raises(DatabaseError, match="did not finish recovery in time"):
        restore_into_docker_volume(
            source17.storage, plan, source17.keyring, volume=volume, start=True, timeout=0.0,
        )
    with pytest.raises(errors.NotFound):
        engine.containers.get(volume)
    if existing:
        assert _in_volume(engine, volume, "ls -A /v") == ""
    else:
        with pytest.raises(errors.NotFound):
            engine.volumes.get(volume)
    assert _leftover_helpers(engine, volume) == []


# ---------------------------------------------------------------------------------------
# Without an engine


def test_tar_stream_round_trips_and_stops_when_abandoned(tmp_path: Path) -> None:
    """The copy's tar stream holds the tree with its modes; a reader that quits stops it."""
    data = tmp_path / "data"
    (data / "base" / "1").mkdir(parents=True)
    data.chmod(0o700)
    (data / "PG_VERSION").write_text("17\n")
    (data / "base" / "1" / "1259").write_bytes(bytes(range(256)) * 20_000)  # several chunks
    (data / "base" / "1" / "1259").chmod(0o600)
    chunks = list(_tar_chunks(data))
    assert len(chunks) > 1
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert {"./PG_VERSION", "./base/1/1259"} <= set(members)
        assert members["."].mode == 0o700 and members["./base/1/1259"].mode == 0o600
        assert members["./PG_VERSION"].uid == 0 and members["./PG_VERSION"].uname == ""
        extracted = tar.extractfile(members["./base/1/1259"])
        assert extracted is not None and extracted.read() == bytes(range(256)) * 20_000
    abandoned = _tar_chunks(data)
    next(abandoned)
    abandoned.close()
    assert not [t for t in threading.enumerate() if t.name == "pgbackflow-tar"]
    with pytest.raises(FileNotFoundError):
        list(_tar_chunks(tmp_path / "missing"))


def test_recovery_settings_use_container_paths(tmp_path: Path) -> None:
    """Host paths of the source are replaced; missing config files are created."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "postgresql.auto.conf").write_text("port = '6000'\n")
    (data / "standby.signal").write_text("")
    target = datetime(2026, 11, 21, 10, 15, 30, 250000, tzinfo=UTC)
    configure_container_recovery(
        data, target, pgdata="/var/lib/postgresql/data", client_address="172.18.0.1"
    )
    auto = (data / "postgresql.auto.conf").read_text()
    assert "restore_command = 'cp /var/lib/postgresql/data/pgbackflow_restore/wal/%f %p'" in auto
    assert "recovery_target_time = '2026-11-21 10:15:30.250000+00:00'" in auto
    assert auto.index("port = '5432'") > auto.index("port = '6000'")  # the later one wins
    assert "unix_socket_directories = '/var/run/postgresql'" in auto
    assert "hba_file = '/var/lib/postgresql/data/pg_hba.conf'" in auto
    assert (data / "recovery.signal").exists() and not (data / "standby.signal").exists()
    assert (data / "postgresql.conf").exists() and (data / "pg_ident.conf").exists()
    hba = (data / "pg_hba.conf").read_text().splitlines()
    assert hba[-1] == "host all all 172.18.0.1/32 md5"
    assert "local all all peer" in hba
