"""Databases in closed networks, reached through an SSH bastion (tasks/tunnel.py).

A real OpenSSH ``sshd`` and a real PostgreSQL 17 that only the sshd can reach: the server runs
in a network namespace of its own (only its loopback), and the sshd that serves each
connection is started inside that namespace (inetd mode, ``sshd -i``) by a listener on this
namespace's 127.0.0.1. Connecting to the database's address from here is refused, so every
backup, restore, pg_basebackup and pg_receivewal that works went through the tunnel.
"""

from __future__ import annotations

import base64
import ctypes
import getpass
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from pgbackflow.blocks import BackupEncryptionKey, LocalStorage, PostgresDatabase
from pgbackflow.flows.logical_backup import logical_backup
from pgbackflow.flows.logical_restore import logical_restore
from pgbackflow.flows.physical_backup import full_backup
from pgbackflow.flows.wal_stream import wal_stream
from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.database import UnreachableDatabaseError
from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.keys import MasterKey, write_key_file
from pgbackflow.tasks.toolsets import find_toolset
from pgbackflow.tasks.tunnel import TunnelError
from tests.fixtures.deploy_config import config_head
from tests.fixtures.prefect_server import PrefectServer, running_prefect_server

# One worker builds the closed network once for the module.
pytestmark = [pytest.mark.pg, pytest.mark.usefixtures("prefect_api"),
              pytest.mark.xdist_group("ssh-tunnel")]

MAJOR = 17
SSHD = Path("/usr/sbin/sshd")
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class Namespace:
    """A network namespace of our own (only a loopback), entered by one worker thread.

    ``run(fn)`` runs ``fn`` on that thread: sockets it opens and processes it starts live in
    the namespace. The namespace goes when its last process and this thread are gone.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, initializer=self._enter)
        self.run(lambda: None)

    @staticmethod
    def _enter() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            pytest.fail(f"cannot create a network namespace: {os.strerror(ctypes.get_errno())}"
                        " (the tests need root or CAP_SYS_ADMIN)", pytrace=False)
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    def run(self, fn: Callable[[], T]) -> T:
        return self._pool.submit(fn).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class Bastion:
    """``sshd -i`` inside the database's namespace, reached on this namespace's loopback."""

    namespace: Namespace
    root: Path
    user: str = field(default_factory=getpass.getuser)
    port: int = 0
    sessions: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not SSHD.exists():
            pytest.fail(f"{SSHD} is missing: apt-get install openssh-server", pytrace=False)
        self.root.mkdir(parents=True, exist_ok=True)
        keygen = ["ssh-keygen", "-q", "-N", ""]
        subprocess.run([*keygen, "-t", "ed25519", "-f", str(self.root / "host_ed25519")],
                       check=True)
        subprocess.run([*keygen, "-t", "ed25519", "-f", str(self.root / "client")], check=True)
        shutil.copy(self.root / "client.pub", self.root / "authorized_keys")
        (self.root / "sshd_config").write_text(textwrap.dedent(f"""\
            HostKey {self.root}/host_ed25519
            AuthorizedKeysFile {self.root}/authorized_keys
            StrictModes no
            UsePAM no
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PermitRootLogin prohibit-password
            AllowTcpForwarding local
            AllowStreamLocalForwarding no
            PermitTTY no
            X11Forwarding no
            PidFile none
            LogLevel VERBOSE
            """))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def host_key(self) -> str:
        return (self.root / "host_ed25519.pub").read_text()

    @property
    def private_key(self) -> str:
        return (self.root / "client").read_text()

    @property
    def log(self) -> str:
        path = self.root / "sshd.log"
        return path.read_text() if path.exists() else ""

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            with conn:
                self.sessions.append(self.namespace.run(partial(self._session, conn.fileno())))

    def _session(self, fd: int) -> subprocess.Popen[bytes]:
        """One ``sshd -i`` for one connection (run on the namespace's thread)."""
        return subprocess.Popen(
            [str(SSHD), "-i", "-f", str(self.root / "sshd_config"), "-E",
             str(self.root / "sshd.log")],
            stdin=fd, stdout=fd, stderr=subprocess.DEVNULL,
        )

    def close(self) -> None:
        self._listener.close()
        for session in self.sessions:
            if session.poll() is None:
                session.kill()
            session.wait()


@dataclass
class ClosedNetwork:
    namespace: Namespace
    cluster: EphemeralCluster
    bastion: Bastion

    def block(self, dbname: str = "shop", **changes: Any) -> PostgresDatabase:
        """The database as a deploy would describe it: its address as the bastion sees it."""
        fields: dict[str, Any] = dict(
            host="127.0.0.1", port=self.cluster.port, database=dbname,
            user=self.cluster.superuser, password=SecretStr(self.cluster.password),
            sslmode="disable", ssh_host="127.0.0.1", ssh_port=self.bastion.port,
            ssh_user=self.bastion.user, ssh_private_key=SecretStr(self.bastion.private_key),
            ssh_host_key=self.bastion.host_key,
        )
        fields.update(changes)
        return PostgresDatabase(**fields)

    def sql(self, statement: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run SQL as the superuser from inside the namespace (the test's own back door)."""
        def run() -> list[tuple[Any, ...]]:
            with self.cluster.connect(dbname) as conn:
                cursor = conn.execute(statement)
                return cursor.fetchall() if cursor.description else []
        return self.namespace.run(run)


@pytest.fixture(scope="module")
def closed() -> Iterator[ClosedNetwork]:
    namespace = Namespace()
    cluster = namespace.run(
        lambda: EphemeralCluster(find_toolset(MAJOR), settings={"fsync": "off"}).start())
    bastion = Bastion(namespace, Path(tempfile.mkdtemp(prefix="pgbackflow-test-sshd-")))
    network = ClosedNetwork(namespace, cluster, bastion)
    try:
        network.sql("CREATE DATABASE shop")
        network.sql("CREATE TABLE items (id int PRIMARY KEY, note text);"
                    "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 3000) g",
                    "shop")
        yield network
    finally:
        bastion.close()
        namespace.run(cluster.stop)
        namespace.close()
        shutil.rmtree(bastion.root, ignore_errors=True)


def our_ssh_processes() -> list[int]:
    """ssh clients this test process started (tunnels), alive or zombie."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and cmdline and cmdline[0].endswith(b"ssh"):
            found.append(int(entry.name))
    return found


def no_secret_files() -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob("pgbackflow-*.sshkey"))


def test_the_database_is_unreachable_without_the_tunnel(closed: ClosedNetwork) -> None:
    direct = closed.block(ssh_host=None)
    with pytest.raises(UnreachableDatabaseError, match="connection refused"):
        direct.check()


def test_logical_backup_and_restore_through_the_tunnel(
    closed: ClosedNetwork, tmp_path: Path
) -> None:
    key = BackupEncryptionKey.generate()
    storage = LocalStorage(folder=str(tmp_path))
    report = logical_backup(closed.block(), [storage], encryption_key=key, db_id="shop")
    assert report.tables == {"public.items": 3000}
    assert report.destinations[0].status == "complete"
    assert our_ssh_processes() == [] and no_secret_files() == []

    summary = logical_restore(storage, closed.block("shop_copy"), encryption_key=key)
    assert summary.status == "restored"
    assert closed.sql("SELECT count(*) FROM items", "shop_copy") == [(3000,)]
    assert our_ssh_processes() == [] and no_secret_files() == []
    sessions = closed.bastion.log.count("Accepted publickey")
    assert sessions >= 2, closed.bastion.log


def test_physical_backup_and_wal_streaming_through_the_tunnel(
    closed: ClosedNetwork, tmp_path: Path
) -> None:
    key = BackupEncryptionKey.generate()
    storage = LocalStorage(folder=str(tmp_path / "store"))
    (tmp_path / "store").mkdir()
    block = closed.block("postgres")
    full = full_backup(block, [storage], encryption_key=key)
    assert full.status == "complete" and full.mode == "full"

    stop_writing = threading.Event()

    def write() -> None:  # WAL to stream: a few segments while the streamer runs
        while not stop_writing.wait(1.0):
            closed.sql("CREATE TABLE IF NOT EXISTS churn AS SELECT 1 AS x;"
                       "INSERT INTO churn SELECT g FROM generate_series(1, 50000) g;"
                       "SELECT pg_switch_wal()")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        report = wal_stream(block, [storage], encryption_key=key, slot="tunnel_test",
                            spool_dir=str(tmp_path / "spool"), partial_interval_s=1,
                            max_runtime_s=15)
    finally:
        stop_writing.set()
        writer.join(30)
    assert report.segments_shipped >= 2, report
    slots = closed.sql("SELECT slot_name FROM pg_replication_slots")
    assert ("tunnel_test",) in slots
    closed.sql("SELECT pg_drop_replication_slot('tunnel_test')")
    assert our_ssh_processes() == [] and no_secret_files() == []


def other_host_key(tmp_path: Path, kind: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", kind, "-f", str(tmp_path / kind)],
                   check=True)
    return (tmp_path / f"{kind}.pub").read_text()


def refused(closed: ClosedNetwork, block: PostgresDatabase) -> str:
    """The one-line error of connecting with ``block``; the bastion saw no login."""
    accepted = closed.bastion.log.count("Accepted publickey")
    with pytest.raises(TunnelError) as caught:
        block.check()
    message = str(caught.value)
    assert "\n" not in message
    assert closed.bastion.log.count("Accepted publickey") == accepted  # never logged in
    assert our_ssh_processes() == [] and no_secret_files() == []
    return message


def test_host_key_mismatch_is_one_line_and_nothing_is_sent(
    closed: ClosedNetwork, tmp_path: Path
) -> None:
    block = closed.block(ssh_host_key=other_host_key(tmp_path, "ed25519"))
    message = refused(closed, block)
    assert message.startswith(f"ssh bastion {closed.bastion.user}@127.0.0.1:"
                              f"{closed.bastion.port}: host key mismatch")
    assert "ED25519 key SHA256:" in message and "ssh-keyscan" in message

    # The same through a flow: the run fails with that line, no database session.
    with pytest.raises(TunnelError, match="host key mismatch"):
        logical_backup(block, [LocalStorage(folder=str(tmp_path))],
                       encryption_key=BackupEncryptionKey.generate(), db_id="shop")
    assert our_ssh_processes() == []


def test_unknown_host_key_is_one_line_and_nothing_is_sent(
    closed: ClosedNetwork, tmp_path: Path
) -> None:
    message = refused(closed, closed.block(ssh_host_key=other_host_key(tmp_path, "rsa")))
    assert ": unknown host key: the bastion presented ED25519 host key" in message, message


def test_no_host_key_configured_is_refused_before_connecting(closed: ClosedNetwork) -> None:
    sessions = len(closed.bastion.sessions)
    with pytest.raises(ConfigError, match=r"no host key is configured.*ssh-keyscan -p"):
        closed.block(ssh_host_key="").check()
    with pytest.raises(ConfigError, match="line 1 of ssh_host_key is not a public host key"):
        closed.block(ssh_host_key="ssh-ed25519 not-base64!").check()
    assert len(closed.bastion.sessions) == sessions


def test_wrong_login_key_is_one_line(closed: ClosedNetwork, tmp_path: Path) -> None:
    other_host_key(tmp_path, "ed25519")  # a key pair the bastion does not know
    block = closed.block(ssh_private_key=SecretStr((tmp_path / "ed25519").read_text()))
    assert ": login refused (Permission denied): check ssh_user" in refused(closed, block)


def test_the_private_key_never_shows_in_argv_or_environment(closed: ClosedNetwork) -> None:
    secret_line = closed.bastion.private_key.splitlines()[2].encode()
    with closed.block().connection_settings() as settings:
        assert settings.via is not None
        with psycopg.connect(**settings.connect_kwargs()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        pids = our_ssh_processes()
        assert len(pids) == 1
        for entry in Path("/proc").iterdir():
            for name in ("cmdline", "environ"):
                try:
                    data = (entry / name).read_bytes()
                except OSError:
                    continue
                assert secret_line not in data, f"private key in /proc/{entry.name}/{name}"
        # Nothing on disk: ssh reads the key from a memfd of this process.
        assert no_secret_files() == []
    assert our_ssh_processes() == []


KILLED_OPENER = """
import sys, time
from pydantic import SecretStr
from pgbackflow.blocks.database import PostgresDatabase
block = PostgresDatabase.model_validate_json(sys.stdin.read())
with block.connection_settings() as settings:
    print(settings.via.port, flush=True)
    time.sleep(600)
"""


def test_a_killed_process_leaves_no_tunnel(closed: ClosedNetwork) -> None:
    block = closed.block()
    document = block.model_dump_json(context={"include_secrets": True})
    assert closed.bastion.private_key.splitlines()[2] in document
    opener = subprocess.Popen([sys.executable, "-c", KILLED_OPENER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert opener.stdin is not None and opener.stdout is not None
    opener.stdin.write(document)
    opener.stdin.close()
    port = int(opener.stdout.readline())
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                and _ppid(p) == opener.pid]
    assert children, "no ssh child"
    os.kill(opener.pid, signal.SIGKILL)
    opener.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and _ppid(Path(f"/proc/{pid}")) != 0
              for pid in children):
        assert time.monotonic() < deadline, "the tunnel outlived its process"
        time.sleep(0.1)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def _ppid(proc: Path) -> int:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return 0 if fields[0] == "Z" else int(fields[1])


# ---------------------------------------------------------------------------------------
# Deployed: the config names the bastion, a worker backs up through it, and the master key
# (a key file on the workers) is nowhere in the Prefect server's database.

POOL = "tunnel-e2e"


def prefect_database(home: Path) -> tuple[bytes, list[str]]:
    """The server's SQLite files as bytes, and every block document decrypted with the
    Fernet key the server keeps in the same database (as anyone holding a copy could)."""
    raw = b"".join(path.read_bytes() for path in sorted(home.glob("prefect.db*")))
    with sqlite3.connect(f"file:{home / 'prefect.db'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT value FROM configuration WHERE key = 'ENCRYPTION_KEY'").fetchone()
        assert row is not None, "the server keeps no Fernet key: it was started with one"
        fernet = Fernet(json.loads(row[0])["fernet_key"].encode())
        documents = []
        for (data,) in db.execute("SELECT data FROM block_document"):
            token = json.loads(data) if data.startswith('"') else data
            documents.append(fernet.decrypt(token.encode()).decode())
    return raw, documents


def key_forms(key: MasterKey) -> list[bytes]:
    """Every way the master key could have been written down."""
    return [key.material, key.material.hex().encode(), base64.b64encode(key.material),
            base64.urlsafe_b64encode(key.material), key.to_text().encode()]


def test_deployed_backup_through_the_tunnel_keeps_the_key_out_of_prefect(
    closed: ClosedNetwork, tmp_path: Path
) -> None:
    work = Path(tempfile.mkdtemp(prefix="pgbackflow-test-tunnel-deploy-", dir="/var/tmp"))
    # Its own SQLite server: the scan reads the server's database files byte for byte.
    try:
        with running_prefect_server(work / "prefect-home") as prefect_server:
            deployed_backup_keeps_the_key_out(closed, prefect_server, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def deployed_backup_keeps_the_key_out(
    closed: ClosedNetwork, prefect_server: PrefectServer, work: Path
) -> None:
    """The deployed backup through the bastion; the master key nowhere in the server."""
    key = MasterKey.generate()
    write_key_file(work / "master.key", key)
    ssh_key = work / "bastion.key"
    ssh_key.write_text(closed.bastion.private_key)
    ssh_key.chmod(0o600)
    (work / "store").mkdir()
    config = work / "pgbackflow.toml"
    host_key = " ".join(closed.bastion.host_key.split()[:2])
    config.write_text(config_head(POOL, work / "master.key", work / "store",
                                  closed.cluster, "TUNNEL_PG_PASSWORD")
                      + textwrap.dedent(f"""
        sslmode = "disable"

        [servers.pg.ssh]
        host = "127.0.0.1"
        port = {closed.bastion.port}
        user = "{closed.bastion.user}"
        private_key_file = "{ssh_key}"
        host_key = "{host_key}"

        [databases.tunnelshop]
        server = "pg"
        database = "shop"
        storages = ["local"]
        backup = "0 0 1 1 *"
    """))
    env = {"TUNNEL_PG_PASSWORD": closed.cluster.password}
    prefect_server.run_cli("deploy", "--config", str(config), env=env)
    with prefect_server.http() as http:
        deployment = http.get("deployments/name/logical-backup/logical-tunnelshop").json()
        assert "ssh_private_key" not in json.dumps(deployment["parameters"])
        run_id = http.post(f"deployments/{deployment['id']}/create_flow_run",
                           json={}).json()["id"]
    worker = prefect_server.start_worker(POOL, work / "worker", name="tunnel-worker")
    try:
        def finished() -> dict[str, Any] | None:
            with prefect_server.http() as http:
                run: dict[str, Any] = http.get(f"flow_runs/{run_id}").json()
            return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") \
                else None
        run = prefect_server.wait_for("the deployed backup", finished, 300, 2)
        assert run["state"]["type"] == "COMPLETED", run["state"]
    finally:
        prefect_server.stop_worker(worker)
    listing = json.loads(prefect_server.run_cli(
        "list", "--from", str(work / "store"), "--json").stdout)
    assert [b["db_id"] for b in listing] == ["tunnelshop"]

    # A control: a key kept in a block is recoverable from a copy of the database (the
    # scan below would see it), which is why the key file is the production source.
    control = MasterKey.generate()
    with prefect_server.settings():
        BackupEncryptionKey(key=SecretStr(control.to_text())).save(
            f"tunnel-control-{os.getpid()}", overwrite=True)
    raw, documents = prefect_database(Path(prefect_server.env["PREFECT_HOME"]))
    assert any(control.to_text() in document for document in documents)
    assert any(closed.bastion.private_key.splitlines()[2] in document
               for document in documents), "the bastion key is in its block"
    for form in key_forms(key):
        assert form not in raw, "the master key is in the Prefect database"
        assert not any(form.decode("latin-1") in document for document in documents), \
            "the master key is in a block"
    assert closed.bastion.private_key.splitlines()[2].encode() not in raw


def test_health_probe_goes_through_the_tunnel(closed: ClosedNetwork, tmp_path: Path) -> None:
    from pgbackflow.flows.health import probe_task

    assert probe_task.fn(closed.block(), None, None).ok
    mismatch = closed.block(ssh_host_key=other_host_key(tmp_path, "ed25519"))
    failed = probe_task.fn(mismatch, None, None)
    assert not failed.ok and failed.error is not None and "host key mismatch" in failed.error
    assert our_ssh_processes() == []


def test_deploy_refuses_what_every_run_would_refuse(tmp_path: Path, prefect_api: str) -> None:
    """A host key cut short, a private key file with no key in it, an S3 bucket name no
    request can use: `deploy --dry-run` names the config key in one line (it used to deploy
    them, and every run failed)."""
    from tests.fixtures.prefect_server import PGBACKFLOW, as_users_run_it

    key_file = tmp_path / "master.key"
    write_key_file(key_file, MasterKey.generate())
    (tmp_path / "id_ed25519").write_text("not a key\n")
    kind, blob = other_host_key(tmp_path, "ed25519").split()[:2]
    whole = f"{kind} {blob}"
    cut = f"{kind} {blob[:24]}"  # still valid base64 (24 characters), the key cut short
    real_key = tmp_path / "ed25519"

    def deploy(tail: str) -> subprocess.CompletedProcess[str]:
        config = tmp_path / "pgbackflow.toml"
        config.write_text(textwrap.dedent(f"""
            [prefect]
            work_pool = "tunnel-checks"
            [key]
            file = "{key_file}"
            [storages.local]
            url = "{tmp_path / 'store'}"
            [servers.db1]
            host = "db1.internal"
            password_env = "DB1_PASSWORD"
            [databases.shop]
            server = "db1"
            storages = ["local"]
        """) + textwrap.dedent(tail))
        return subprocess.run(
            [str(PGBACKFLOW), "deploy", "--config", str(config), "--dry-run"],
            capture_output=True, text=True, timeout=120, check=False,
            env=as_users_run_it({**os.environ, "PREFECT_API_URL": prefect_api,
                                 "DB1_PASSWORD": "x"}),
        )

    def refused(tail: str, *words: str) -> None:
        result = deploy(tail)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert len(lines) == 1, result.stderr
        for word in words:
            assert word in lines[0], lines[0]

    ssh = '[servers.db1.ssh]\nhost = "bastion"\nuser = "tunnel"\n'
    refused(ssh + f'private_key_file = "{real_key}"\nhost_key = "{cut}"\n',
            "servers.db1.ssh:", "ssh_host_key is not a public host key")
    refused(ssh + f'private_key_file = "{tmp_path / "id_ed25519"}"\nhost_key = "{whole}"\n',
            "servers.db1.ssh:", "not a private key")
    refused('[storages.off]\nurl = "s3://Bad_Bucket!/p"\n',
            "storages.off.url:", "S3 bucket name 'Bad_Bucket!' is invalid")
    good = deploy(ssh + f'private_key_file = "{real_key}"\nhost_key = "{whole}"\n')
    assert good.returncode == 0, good.stderr


def test_deploy_config_ssh_mistakes_are_one_line(tmp_path: Path) -> None:
    from pgbackflow.deployments.config import load_config

    def error(ssh: str) -> str:
        config = tmp_path / "pgbackflow.toml"
        config.write_text(textwrap.dedent("""
            [key]
            file = "/etc/pgbackflow/master.key"
            [storages.local]
            url = "/srv/backups"
            [servers.db1]
            host = "db1.internal"
            [servers.db1.ssh]
        """) + textwrap.dedent(ssh))
        with pytest.raises(ConfigError) as caught:
            load_config(config)
        assert "\n" not in str(caught.value)
        return str(caught.value).removeprefix(f"{config}: ")

    base = 'host = "bastion"\nuser = "tunnel"\nhost_key = "ssh-ed25519 AAAA"\n'
    assert error(base) == ("servers.db1.ssh: give exactly one of private_key_file = PATH or "
                           "private_key_env = VARIABLE")
    assert error(base + 'private_key_env = "K"\nhostkey = "x"\n') == (
        "servers.db1.ssh.hostkey: unknown key; allowed: host, host_key, port, "
        "private_key_env, private_key_file, user")
    assert error('host = "bastion"\nuser = "t"\nhost_key = " "\nprivate_key_env = "K"\n') == (
        "servers.db1.ssh: host_key is empty: put the bastion's public host key there "
        "(ssh-keyscan -p 22 bastion, checked with its administrator)")
