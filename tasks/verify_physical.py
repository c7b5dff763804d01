"""Physical backup verification: prove a chain restores, replays and holds sound data.

1. Pick the backup (newest of the cluster, or a given id) and plan its chain (full first,
   then the incrementals) plus every stored WAL file after it, across timeline switches
   as PostgreSQL follows them (``recovery_target_timeline = latest``): the restore replays
   to the end of the newest timeline, the newest state the storage can give; a missing
   segment on that route fails the verification, naming the segments.
2. In a throwaway work directory: unpack and combine the chain, fetch the WAL, configure
   recovery. The sandbox is made safe and reachable without the source's passwords:
   ``pg_hba.conf`` is replaced by ``local all all trust``, TCP is off and the only socket
   lives in a private 0700 directory of the server's OS user; settings that could reach
   outside the sandbox (preload libraries, pid files, recovery commands, …) are neutralised.
3. Start the server, wait until recovery ends and it is promoted.
4. Run ``pg_amcheck`` (heap and B-tree checks) over a deterministic sample or all
   relations of every database; corruption makes the verification fail, it is not an error.
5. Count every table's rows in every database.
6. Stop the server and delete the work directory, whatever happened (also on cancellation).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import psycopg

from pgbackflow.tasks.budget import disk_budget_from_environment
from pgbackflow.tasks.cluster import resolve_os_user
from pgbackflow.tasks.errors import (
    DatabaseError,
    ObjectNotFoundError,
    PgBackflowError,
)
from pgbackflow.tasks.inventory import take_inventory
from pgbackflow.tasks.keys import Keyring
from pgbackflow.tasks.manifest import check_id
from pgbackflow.tasks.pgconf import append_settings
from pgbackflow.tasks.physical import (
    PhysicalManifest,
    chain_of,
    resolve_db_id,
    scan_physical_backups,
    usable_backups,
)
from pgbackflow.tasks.pitr import (
    DirectoryDestination,
    PitrPlan,
    WalRoute,
    check_reachable,
    free_port,
    local_runtime,
    plan_wal_route,
    restore_to,
)
from pgbackflow.tasks.process import OsUser, Tool, ToolResult, remove_tree
from pgbackflow.tasks.runtime import (
    LocalRuntime,
    Recovery,
    StageRunner,
    run_directly,
    watch_owner,
)
from pgbackflow.tasks.sandbox import require_free_disk
from pgbackflow.tasks.storage import Storage
from pgbackflow.tasks.toolsets import Toolset, find_toolset
from pgbackflow.tasks.transfer import ProgressCallback
from pgbackflow.tasks.wal import read_wal_inventory

logger = logging.getLogger("pgbackflow.verify_physical")
T = TypeVar("T")

AmcheckMode = Literal["all", "sample"]
Status = Literal["passed", "failed"]

#: Largest user tables per database that "sample" mode checks (plus the system catalogs).
SAMPLE_TABLES_PER_DATABASE = 20
#: Free disk kept on top of the chain, the combined directory and the WAL.
HEADROOM_BYTES = 1024**3
#: Seconds the replay may take before the verification gives up.
REPLAY_TIMEOUT_S = 6 * 3600.0
#: Lines of pg_amcheck output (corruption reports, errors) kept in the report.
AMCHECK_PROBLEM_LINES = 20
MAX_AMCHECK_JOBS = 4
# sun_path holds 108 bytes with the terminating NUL.
_MAX_SOCKET_PATH = 107
_SOCKET_FILE = ".s.PGSQL.{port}"
_PROGRESS = re.compile(r"(\d+)/(\d+) relations")
_SINGLE_USER_ROW = re.compile(r'superuser = "([0-9a-f]*)"')
# The bootstrap superuser has OID 10 in every cluster; hex keeps any name parseable.
_SUPERUSER_SQL = "SELECT rolname FROM pg_roles WHERE oid = 10"
_SINGLE_USER_SQL = (
    "SELECT encode(convert_to(rolname::text, 'UTF8'), 'hex') AS superuser "
    "FROM pg_authid WHERE oid = 10;"
)
# Databases one can connect to; template0 refuses connections, -2 marks a half-dropped one.
_DATABASES_SQL = """
SELECT datname FROM pg_database
WHERE datallowconn AND datname <> 'template0' AND datconnlimit <> -2
ORDER BY datname
"""
_LARGEST_TABLES_SQL = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
ORDER BY pg_relation_size(c.oid) DESC, n.nspname, c.relname
LIMIT %s
"""
_TRUST_HBA = "# Written by pgbackflow's physical verification: local trust only.\n" \
    "local all all trust\n"


class PhysicalVerificationError(PgBackflowError):
    """The chain could not be restored, started or examined."""


# ---------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class AmcheckResult:
    """What pg_amcheck found.

    Attributes:
        mode: "all" relations, or a "sample" (largest tables and the system catalogs).
        heapallindexed: Whether every heap tuple was looked up in its indexes.
        exit_code: pg_amcheck's exit status (0: no corruption found).
        relations_checked: Relations checked (tables, indexes, TOAST), from its progress.
        databases: Databases checked.
        problems: First lines of corruption reports and errors.
    """

    mode: AmcheckMode
    heapallindexed: bool
    exit_code: int
    relations_checked: int | None
    databases: tuple[str, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether pg_amcheck found nothing wrong."""
        return self.exit_code == 0


@dataclass(frozen=True)
class DatabaseCounts:
    """Rows of every table of one restored database.

    Attributes:
        name: Database name.
        rows: ``{schema.table: rows}`` (names quoted as ``format('%I.%I')`` does).
        schema_count: Non-system schemas.
        size_bytes: ``pg_database_size``.
    """

    name: str
    rows: Mapping[str, int]
    schema_count: int
    size_bytes: int

    @property
    def table_count(self) -> int:
        """Tables counted."""
        return len(self.rows)

    @property
    def total_rows(self) -> int:
        """Rows over all tables."""
        return sum(self.rows.values())


@dataclass(frozen=True)
class Durations:
    """Seconds spent per stage (None: the stage was not reached).

    Attributes:
        restore_s: Unpacking and combining the chain, fetching the WAL.
        replay_s: Starting the server, WAL replay until promotion, finding the superuser.
        amcheck_s: pg_amcheck.
        counts_s: Counting rows.
        total_s: Everything, teardown included.
    """

    restore_s: float | None = None
    replay_s: float | None = None
    amcheck_s: float | None = None
    counts_s: float | None = None
    total_s: float = 0.0


@dataclass(frozen=True)
class PhysicalVerificationReport:
    """Everything a physical verification found.

    Attributes:
        status: "passed" or "failed".
        db_id: The cluster.
        backup_id: The verified backup (the chain's last link).
        chain: Backup ids, full first.
        server_major: Major version of the cluster.
        server_version: Version of the binaries the sandbox ran.
        timeline: Timeline of the backup.
        wal_files: WAL files fetched for replay after the backup.
        wal_timeline: Timeline replay ended on: the newest one whose history follows the
            backup's (a promoted copy streaming into the same storage switches timelines),
            the backup's own when no switch followed.
        wal_end: The newest WAL segment replayed (None: none after the backup's own).
        recovered_to: "last completed transaction" time replay reached, from the server log.
        superuser: The bootstrap superuser the checks ran as.
        durations: Seconds per stage.
        stored_bytes: Stored bytes of the chain's backups.
        restored_bytes: Bytes of the combined data directory (before replay).
        databases: Row counts, one entry per database.
        amcheck: pg_amcheck's outcome (None when not reached).
        problems: Everything that went wrong, one line each.
        error: Why the verification failed, in one line (None when it passed).
        work_dir: The work directory used (deleted when this report exists).
    """

    status: Status
    db_id: str
    backup_id: str
    chain: tuple[str, ...]
    server_major: int
    server_version: str | None
    timeline: int
    wal_files: int
    wal_timeline: int
    wal_end: str | None
    recovered_to: str | None
    superuser: str | None
    durations: Durations
    stored_bytes: int
    restored_bytes: int | None
    databases: tuple[DatabaseCounts, ...]
    amcheck: AmcheckResult | None
    problems: tuple[str, ...]
    error: str | None
    work_dir: str

    @property
    def passed(self) -> bool:
        """Whether the chain restored, amcheck found nothing and every table was counted."""
        return self.status == "passed"

    @property
    def table_count(self) -> int:
        """Tables counted over all databases."""
        return sum(d.table_count for d in self.databases)

    @property
    def schema_count(self) -> int:
        """Non-system schemas over all databases."""
        return sum(d.schema_count for d in self.databases)

    def rows_by_database(self) -> dict[str, dict[str, int]]:
        """``{database: {schema.table: rows}}``."""
        return {d.name: dict(d.rows) for d in self.databases}

    def markdown(self) -> str:
        """Summary for the Prefect UI: the failure first when there is one."""
        lines = [f"# Physical backup verification: {self.status}", ""]
        if self.error:
            lines += [f"**{self.error}**", ""]
        amcheck = "-"
        if self.amcheck is not None:
            amcheck = (
                f"{self.amcheck.mode}, {self.amcheck.relations_checked} relations, "
                f"exit code {self.amcheck.exit_code}"
            )
        restored = "-" if self.restored_bytes is None else f"{self.restored_bytes / 1e6:.1f} MB"
        lines += [
            "| | |",
            "|---|---|",
            f"| backup | `{self.backup_id}` of `{self.db_id}` (PostgreSQL {self.server_major}) |",
            f"| chain | {' → '.join(f'`{b}`' for b in self.chain)} |",
            f"| WAL files replayed after it | {self.wal_files} |",
            f"| replayed to | {self.wal_end or 'the backup end'}, timeline {self.wal_timeline}"
            f"{'' if self.wal_timeline == self.timeline else f' (from timeline {self.timeline})'}"
            " |",
            f"| recovered to | {self.recovered_to or '-'} |",
            f"| stored / restored | {self.stored_bytes / 1e6:.1f} MB / {restored} |",
            f"| pg_amcheck | {amcheck} |",
            f"| databases / schemas / tables | {len(self.databases)} / {self.schema_count} / "
            f"{self.table_count} |",
            "",
            "| database | tables | rows |",
            "|---|---|---|",
            *[f"| {d.name} | {d.table_count} | {d.total_rows} |" for d in self.databases],
        ]
        if self.problems:
            lines += ["", "## Problems", *[f"- {p}" for p in self.problems[:50]]]
        return "\n".join(lines)


@dataclass
class _Findings:
    """What the run learned so far; frozen into the report at the end."""

    restored_bytes: int | None = None
    wal_files: int = 0
    server_version: str | None = None
    recovered_to: str | None = None
    superuser: str | None = None
    databases: list[DatabaseCounts] = field(default_factory=list)
    amcheck: AmcheckResult | None = None
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    durations: dict[str, float] = field(default_factory=dict)

    def fail(self, message: str) -> None:
        """Record a problem; the first one becomes the report's error."""
        self.problems.append(message)
        if self.error is None:
            self.error = message


# ---------------------------------------------------------------------------------------
# Picking and planning


def pick_backup(
    storage: Storage, db_id: str, backup_id: str | None, keyring: Keyring | None = None
) -> PhysicalManifest:
    """The given backup, or the newest physical backup of the cluster.

    With ``keyring`` only manifests whose MAC verifies are considered; the newest is refused
    while a manifest that may be newer is refused (never a silent fall back to an older one).

    Raises:
        ObjectNotFoundError: no physical backups, or none with that id.
        ManifestError: the requested (or the newest) backup's manifest is refused.
    """
    catalog = scan_physical_backups(storage, db_id, keyring)
    if not catalog.records:
        raise ObjectNotFoundError(
            f"no physical backups of {db_id} in {storage.location}: run pgbackflow "
            "physical-backup first"
        )
    if backup_id is None:
        newest = catalog.newest(f"picking the newest backup of {db_id}")
        if newest is None:
            raise ObjectNotFoundError(f"no usable physical backups of {db_id} in "
                                      f"{storage.location}: run pgbackflow physical-backup")
        return newest
    found = catalog.select(check_id(backup_id, "backup id"))
    if found is not None:
        return found
    raise ObjectNotFoundError(
        f"physical backup {backup_id} of {db_id} is not in {storage.location}: list the "
        "backups with pgbackflow physical-list"
    )


def plan_chain_end(
    storage: Storage, backup: PhysicalManifest, keyring: Keyring | None = None
) -> tuple[PitrPlan, WalRoute]:
    """Plan a restore of ``backup``'s chain replayed to the end of the stored WAL.

    Unlike :func:`tasks.pitr.plan_pitr`, a broken chain is not replaced by an older
    complete one: verification must say that *this* backup cannot be restored. The WAL
    follows timeline switches as replay does (:func:`tasks.pitr.plan_wal_route`): after a
    promoted copy streamed into the same storage, replay ends on the newest timeline.

    Raises:
        ObjectNotFoundError: a backup of the chain, or a WAL segment on the route after it,
            is missing (the message names the segments and LSNs).
    """
    backups, refused = usable_backups(storage, backup.db_id, keyring, newest=False)
    chain = chain_of(backup, backups, refused)
    inventory = read_wal_inventory(storage, backup.db_id, backup.wal_segment_size)
    route = plan_wal_route(
        storage, inventory, backup, keyring,
        advice="this backup cannot be restored to the end of the stored WAL; find the "
        "missing segments or take a new full backup",
    )
    latest = max([backup.finished_at] + ([inventory.newest] if inventory.newest else []))
    plan = PitrPlan(backup.db_id, tuple(chain), None, route.files, chain[0].finished_at,
                    latest, route.begins, route.must_reach)
    return plan, route


def disk_needed(plan: PitrPlan) -> int:
    """Bytes a verification of ``plan`` may write: chain, combined copy, WAL, headroom."""
    unpacked = sum(b.base.raw_size for b in plan.chain)
    combined = plan.newest.cluster_size if len(plan.chain) > 1 else 0
    wal = len(plan.wal_segments) * plan.newest.wal_segment_size
    return unpacked + combined + wal + HEADROOM_BYTES


def check_free_disk(plan: PitrPlan, where: Path, budget_bytes: int | None = None) -> None:
    """Refuse to start without room for the chain, its combined copy and the WAL."""
    require_free_disk(f"verifying physical backup {plan.newest.backup_id}", disk_needed(plan),
                      where, budget_bytes, advice="free space or pass another work directory")


# ---------------------------------------------------------------------------------------
# The sandbox's directories and configuration


def make_work_root(parent: Path | None) -> Path:
    """A fresh work directory (the pid in its name tells whose a leftover was)."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    root = Path(
        tempfile.mkdtemp(prefix=f"pgbackflow-verify-physical-{os.getpid()}-", dir=parent)
    )
    # o+x only: the server's OS user walks through to the data directory, lists nothing.
    root.chmod(0o711)
    return root


def make_socket_dir(root: Path, port: int, user: OsUser) -> tuple[Path, bool]:
    """A private 0700 socket directory owned by the server's user.

    Returns:
        The directory, and whether it lies outside ``root`` (then removed separately):
        a deep work directory would exceed the length limit of socket paths.
    """
    candidate = root / "socket"
    outside = len(f"{candidate}/{_SOCKET_FILE.format(port=port)}") > _MAX_SOCKET_PATH
    if outside:
        # mkdtemp: a new 0700 folder with a random name; /tmp keeps the socket path short.
        candidate = Path(tempfile.mkdtemp(prefix="pgbf-sock-", dir="/tmp"))  # nosec B108
    else:
        candidate.mkdir(mode=0o700)
    candidate.chmod(0o700)
    if os.geteuid() == 0:
        os.chown(candidate, user.uid, user.gid)
    return candidate, outside


def sandbox_settings(data_dir: Path, socket_dir: Path, major: int) -> dict[str, str]:
    """Settings that keep the restored server inside the sandbox and reachable by us.

    The source's configuration comes with the backup: anything that reaches outside the
    data directory (pid files, preload libraries that may be missing here or start the
    source's background jobs, recovery hooks, TCP, SSL files) is switched off, and the
    log must stay in the file :func:`tasks.pitr.start_and_wait` reads, in English.
    """
    settings = {
        "listen_addresses": "",
        "unix_socket_directories": str(socket_dir),
        "unix_socket_permissions": "0700",
        "unix_socket_group": "",
        "hba_file": str(data_dir / "pg_hba.conf"),
        "ident_file": str(data_dir / "pg_ident.conf"),
        "external_pid_file": "",
        "ssl": "off",
        "shared_preload_libraries": "",
        "session_preload_libraries": "",
        "local_preload_libraries": "",
        "logging_collector": "off",
        "log_destination": "stderr",
        "lc_messages": "C",
        "log_min_messages": "warning",
        "recovery_end_command": "",
        "archive_cleanup_command": "",
        "primary_conninfo": "",
        "primary_slot_name": "",
        # No connections during replay: the standby parameter checks cannot refuse a
        # sandbox that is smaller than the source.
        "hot_standby": "off",
        "shared_buffers": "128MB",
        "huge_pages": "try",
        "fsync": "off",
        "synchronous_commit": "off",
        "autovacuum": "off",
        "zero_damaged_pages": "off",
        "cluster_name": "pgbackflow-verify",
    }
    if major >= 17:
        settings["summarize_wal"] = "off"
        settings["event_triggers"] = "off"  # login triggers must not judge our sessions
    if major <= 14:
        settings["stats_temp_directory"] = "pg_stat_tmp"
    return settings


_DATA_DIRECTORY_LINE = re.compile(r"^(\s*data_directory\s*=)", re.MULTILINE)


def prepare_sandbox(data_dir: Path, socket_dir: Path, major: int) -> None:
    """Trust-only local access and :func:`sandbox_settings`, written after the recovery ones."""
    conf = data_dir / "postgresql.conf"
    if conf.exists():
        # A data_directory setting would point the server at the source's real directory.
        text = conf.read_text()
        conf.write_text(_DATA_DIRECTORY_LINE.sub(r"# disabled by pgbackflow: \1", text))
    else:
        # Clusters configured outside the data directory (Debian) bring no postgresql.conf.
        conf.write_text("")
    (data_dir / "pg_hba.conf").write_text(_TRUST_HBA)
    (data_dir / "pg_ident.conf").write_text("")
    append_settings(data_dir, "Verification sandbox by pgbackflow.",
                    sandbox_settings(data_dir, socket_dir, major))


def directory_bytes(root: Path) -> int:
    """Bytes of the files under ``root`` (symlinks not followed)."""
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


# ---------------------------------------------------------------------------------------
# The running server


@dataclass(frozen=True)
class _Server:
    """How to reach the sandbox server."""

    data_dir: Path
    socket_dir: Path
    port: int
    toolset: Toolset
    user: OsUser

    @property
    def runtime(self) -> LocalRuntime:
        return local_runtime(self.data_dir, self.toolset, self.user,
                             what="verification server")


def session_options(major: int) -> str:
    """``-c`` options for our sessions: the source's role/database settings must not cut
    counts short, forbid installing amcheck, or redirect names."""
    options = [
        "statement_timeout=0",
        "lock_timeout=0",
        "idle_in_transaction_session_timeout=0",
        "default_transaction_read_only=off",
        "search_path=pg_catalog,pg_temp",
    ]
    if major >= 17:
        options.append("transaction_timeout=0")
    return " ".join(f"-c {option}" for option in options)


def _connect(server: _Server, user: str, dbname: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=str(server.socket_dir), port=server.port, user=user, dbname=dbname,
        autocommit=True, connect_timeout=30, application_name="pgbackflow-verify",
        options=session_options(server.toolset.major),
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def superuser_candidates(manifest: PhysicalManifest, user: OsUser) -> list[str]:
    """Roles likely to exist: the backup's role, ``postgres``, the server's OS user."""
    source_user = manifest.source.rsplit("@", 1)[0] if "@" in manifest.source else ""
    names: list[str] = []
    for name in (source_user, "postgres", user.name):
        if name and name not in names:
            names.append(name)
    return names


def find_superuser(server: _Server, candidates: Sequence[str]) -> str:
    """The bootstrap superuser's name (the role with OID 10).

    Trust authentication still needs an existing role that may log in. Any role can read
    ``pg_roles``, so the likely candidates are tried first; when none exists (the backup
    role was dropped or renamed), the server is stopped and asked in single-user mode,
    which always runs as the bootstrap superuser, and started again.
    """
    for name in candidates:
        try:
            with _connect(server, name, "template1") as conn:
                row = conn.execute(_SUPERUSER_SQL).fetchone()
        except psycopg.OperationalError as exc:
            if "FATAL:" in str(exc):
                # The server refused this role (missing, NOLOGIN, no CONNECT): try the next.
                continue
            raise DatabaseError(
                f"verification server in {server.data_dir} refuses connections: "
                f"{_first_line(exc)}"
            ) from None
        if row is not None:
            return str(row[0])
    logger.info("none of the roles %s exist; asking in single-user mode", candidates)
    server.runtime.stop()
    name = superuser_single_user(server)
    server.runtime.start_ready()
    return name


def superuser_single_user(server: _Server) -> str:
    """Read the bootstrap superuser's name with ``postgres --single`` (server stopped)."""
    # Single-user mode reads its commands from stdin only, and Tool.run gives children
    # none: a shell (run as the server's user, like postgres itself must) pipes the query.
    script = 'printf "%s\\n" "$3" | "$0" --single -D "$1" "$2"'
    result = Tool(Path("/bin/sh"), name="postgres --single").run(
        ["-c", script, server.toolset.binary("postgres"), server.data_dir, "template1",
         _SINGLE_USER_SQL],
        user=server.user, cwd=server.data_dir, timeout=300, check=False,
    )
    match = _SINGLE_USER_ROW.search(result.stdout.decode("utf-8", "replace"))
    if match is None:
        detail = (result.stderr_tail.strip().splitlines() or ["no output"])[-1]
        raise PhysicalVerificationError(
            f"could not read the bootstrap superuser of the restored cluster in "
            f"{server.data_dir} (postgres --single exit {result.returncode}: {detail})"
        )
    return bytes.fromhex(match.group(1)).decode("utf-8", "replace")


@contextmanager
def _timed(findings: _Findings, stage: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        findings.durations[stage] = time.monotonic() - started


# ---------------------------------------------------------------------------------------
# Checks


def list_databases(server: _Server, superuser: str) -> list[str]:
    """Databases that accept connections (template0 excluded)."""
    with _connect(server, superuser, "template1") as conn:
        return [str(row[0]) for row in conn.execute(_DATABASES_SQL).fetchall()]


def pattern_part(name: str) -> str:
    """One part of a pg_amcheck pattern matching exactly ``name`` (quoted: no wildcards)."""
    return '"' + name.replace('"', '""') + '"'


def sample_patterns(
    server: _Server, superuser: str, databases: Sequence[str], tables_per_database: int
) -> list[str]:
    """``--table`` patterns: each database's largest tables and its system catalogs.

    Largest first (ties by name), so the sample is deterministic and covers most of the
    data; the catalogs are small and everything else depends on them.
    """
    patterns: list[str] = []
    for database in databases:
        with _connect(server, superuser, database) as conn:
            rows = conn.execute(_LARGEST_TABLES_SQL, (tables_per_database,)).fetchall()
        db = pattern_part(database)
        patterns.append(f"{db}.{pattern_part('pg_catalog')}.*")
        patterns += [f"{db}.{pattern_part(s)}.{pattern_part(t)}" for s, t in rows]
    return patterns


def run_amcheck(
    server: _Server,
    superuser: str,
    databases: Sequence[str],
    *,
    mode: AmcheckMode,
    heapallindexed: bool,
    tables_per_database: int = SAMPLE_TABLES_PER_DATABASE,
) -> AmcheckResult:
    """pg_amcheck over every database (sample or all relations); corruption is a result.

    Missing amcheck extensions are installed (into pg_catalog, so no schema appears).
    """
    args: list[str | Path] = [
        "--host", server.socket_dir, "--port", str(server.port), "--username", superuser,
        "--no-password", "--maintenance-db", "template1", "--all", "--install-missing",
        "--progress", f"--jobs={min(MAX_AMCHECK_JOBS, os.cpu_count() or 1)}",
    ]
    if heapallindexed:
        args.append("--heapallindexed")
    if mode == "sample":
        for pattern in sample_patterns(server, superuser, databases, tables_per_database):
            args += ["--table", pattern]
    result = Tool(server.toolset.binary("pg_amcheck")).run(
        args, env={"PGOPTIONS": session_options(server.toolset.major)},
        user=server.user, cwd=server.data_dir, timeout=None, check=False,
    )
    return AmcheckResult(
        mode=mode,
        heapallindexed=heapallindexed,
        exit_code=result.returncode,
        relations_checked=_relations_checked(result),
        databases=tuple(databases),
        problems=_amcheck_problems(result),
    )


def _relations_checked(result: ToolResult) -> int | None:
    found = _PROGRESS.findall(result.stderr_tail)
    return int(found[-1][0]) if found else None


def _amcheck_problems(result: ToolResult) -> tuple[str, ...]:
    """Corruption reports (stdout) first, then errors (stderr), progress lines left out."""
    lines = [line.rstrip() for line in result.stdout.decode("utf-8", "replace").splitlines()]
    lines += list(result.stderr_errors)
    if result.returncode != 0 and not lines:
        lines = [ln for ln in result.stderr_tail.splitlines() if not _PROGRESS.search(ln)]
    return tuple(line for line in lines if line.strip())[:AMCHECK_PROBLEM_LINES]


def _headline(result: AmcheckResult) -> str:
    """The first problem in one line: a report's "relation, block, offset:" and its detail."""
    if not result.problems:
        return "no output"
    first = result.problems[0].strip()
    if first.endswith(":") and len(result.problems) > 1:
        first = f"{first} {result.problems[1].strip()}"
    return first


def count_rows(
    server: _Server, superuser: str, databases: Sequence[str], findings: _Findings,
    step: Callable[[str], None],
) -> None:
    """Count every table of every database; a database that cannot be counted fails."""
    for database in databases:
        step(f"counting rows in database {database}")
        try:
            with _connect(server, superuser, database) as conn:
                inventory = take_inventory(conn)
        except psycopg.Error as exc:
            findings.fail(f"counting the tables of database {database} failed: "
                          f"{_first_line(exc)}")
            continue
        findings.databases.append(DatabaseCounts(
            name=database, rows=inventory.rows_by_table(),
            schema_count=inventory.schema_count, size_bytes=inventory.database_size,
        ))


# ---------------------------------------------------------------------------------------
# The whole verification


def verify_physical_backup(
    storage: Storage,
    keyring: Keyring,
    *,
    db_id: str | None,
    backup_id: str | None = None,
    amcheck: AmcheckMode = "sample",
    heapallindexed: bool = False,
    sample_tables: int = SAMPLE_TABLES_PER_DATABASE,
    work_dir: Path | None = None,
    os_user: str | None = None,
    replay_timeout_s: float = REPLAY_TIMEOUT_S,
    on_step: Callable[[str], None] | None = None,
    run_stage: StageRunner = run_directly,
) -> PhysicalVerificationReport:
    """Restore a physical chain to the end of the stored WAL in a sandbox and examine it.

    Args:
        storage: Where the backups and WAL are.
        keyring: Keys that decrypt them.
        db_id: The cluster (``cluster-<system identifier>``); None: the only one stored.
        backup_id: The backup to verify; None: the newest.
        amcheck: "sample" (the largest tables per database and the catalogs) or "all".
        heapallindexed: Also check that every heap tuple has its index entries (slower).
        sample_tables: Tables per database in "sample" mode.
        work_dir: Parent of the throwaway work directory (default: the temp dir); the
            server's OS user must be able to enter it.
        os_user: OS user that runs the server (see :func:`tasks.cluster.resolve_os_user`).
        replay_timeout_s: Seconds replay may take until the server is promoted.
        on_step: Called with a line per stage, for progress logs.
        run_stage: Runs each stage (plan-chain, build-data-dir, start-restored-server, amcheck,
            count-rows): the flow makes each one a task run.

    Returns:
        The report. A chain that cannot be restored, started or counted, or data that
        pg_amcheck finds corrupt, gives a "failed" report, not an exception.

    Raises:
        ObjectNotFoundError: there is no such cluster or backup (nothing was verified).
        ConfigError: several clusters are stored and ``db_id`` is None.
        KeyboardInterrupt: cancelled (the server is stopped and the work directory
            deleted first).
    """
    started = time.monotonic()
    step = on_step or (lambda _message: None)
    cluster = resolve_db_id(storage, db_id)
    backup = pick_backup(storage, cluster, backup_id, keyring)
    findings = _Findings()
    chain: tuple[PhysicalManifest, ...] = (backup,)
    route: WalRoute | None = None
    root: Path | None = None
    owner_fd: int | None = None
    try:
        try:
            plan, route = run_stage("plan-chain", lambda: plan_chain_end(storage, backup, keyring))
            chain = plan.chain
            if route.end_timeline != backup.timeline:
                step(f"replaying WAL across timeline switches: timeline {backup.timeline} to "
                     f"{route.end_timeline} ({route.end_segment})")
            root = make_work_root(work_dir)
            # A verification killed with SIGKILL leaves no server and no files either.
            owner_fd = watch_owner(root / "data", root)
            _verify_in(root, storage, keyring, plan, findings, step, amcheck=amcheck,
                       heapallindexed=heapallindexed, sample_tables=sample_tables,
                       os_user=os_user, replay_timeout_s=replay_timeout_s,
                       run_stage=run_stage)
        except PgBackflowError as exc:
            findings.fail(str(exc))
    finally:
        if root is not None:
            remove_tree(root)
        if owner_fd is not None:
            os.close(owner_fd)
    stages = findings.durations
    return PhysicalVerificationReport(
        status="passed" if findings.error is None else "failed",
        db_id=cluster,
        backup_id=backup.backup_id,
        chain=tuple(b.backup_id for b in chain),
        server_major=backup.server_major,
        server_version=findings.server_version,
        timeline=backup.timeline,
        wal_files=findings.wal_files,
        wal_timeline=route.end_timeline if route is not None else backup.timeline,
        wal_end=route.end_segment if route is not None else None,
        recovered_to=findings.recovered_to,
        superuser=findings.superuser,
        durations=Durations(
            restore_s=stages.get("restore"), replay_s=stages.get("replay"),
            amcheck_s=stages.get("amcheck"), counts_s=stages.get("counts"),
            total_s=time.monotonic() - started,
        ),
        stored_bytes=sum(b.stored_size for b in chain),
        restored_bytes=findings.restored_bytes,
        databases=tuple(findings.databases),
        amcheck=findings.amcheck,
        problems=tuple(findings.problems),
        error=findings.error,
        work_dir=str(root) if root is not None else "",
    )


class _SandboxDestination(DirectoryDestination):
    """The throwaway data directory of a verification: no script, no marker, settings of a
    sandbox (its own socket folder, no archiving) on top of the recovery settings."""

    def __init__(self, data_dir: Path, socket_dir: Path, port: int, user: OsUser,
                 step: Callable[[str], None], version: str) -> None:
        super().__init__(data_dir, port=port, user=user, mark_incomplete=False)
        self.socket_dir = socket_dir
        self.step = step
        self.restored_bytes = 0
        self.wal_files = 0
        self.version = version

    def build(
        self, storage: Storage, plan: PitrPlan, keyring: Keyring, toolset: Toolset | None,
        step: Callable[[str], None], progress: ProgressCallback | None,
    ) -> list[str]:
        """Build as a restore does, recording the report's figures."""
        fetched = super().build(storage, plan, keyring, toolset, step, progress)
        self.wal_files = len(fetched)
        return fetched

    def configure(self, plan: PitrPlan) -> None:
        """Recovery to the end of the WAL, then the sandbox's settings."""
        super().configure(plan)
        self.restored_bytes = directory_bytes(self.directory)
        prepare_sandbox(self.directory, self.socket_dir, plan.newest.server_major)

    def start(self, timeout: float, plan: PitrPlan) -> Recovery:
        """Replay until the promotion."""
        self.step(f"starting PostgreSQL {self.version}: replaying WAL until promotion")
        return super().start(timeout, plan)


def _verify_in(
    root: Path,
    storage: Storage,
    keyring: Keyring,
    plan: PitrPlan,
    findings: _Findings,
    step: Callable[[str], None],
    *,
    amcheck: AmcheckMode,
    heapallindexed: bool,
    sample_tables: int,
    os_user: str | None,
    replay_timeout_s: float,
    run_stage: StageRunner,
) -> None:
    """Restore, start, check and count inside ``root``; the server is stopped on leaving."""
    backup = plan.newest
    toolset = find_toolset(backup.server_major)
    findings.server_version = toolset.version
    user = resolve_os_user(os_user)
    check_reachable(root, user, "the verification server")
    check_free_disk(plan, root, disk_budget_from_environment())
    data_dir = root / "data"
    port = free_port()
    socket_dir, socket_outside = make_socket_dir(root, port, user)
    server = _Server(data_dir, socket_dir, port, toolset, user)
    destination = _SandboxDestination(data_dir, socket_dir, port, user, step, toolset.version)
    # The stages of a point-in-time restore to the end of the WAL, timed for the report.
    durations = {"build-data-dir": "restore", "start-restored-server": "replay"}

    def timed_stage(stage: str, work: Callable[[], T]) -> T:
        with _timed(findings, durations.get(stage, stage)):
            return run_stage(stage, work)

    try:
        try:
            outcome = restore_to(storage, plan, keyring, destination, toolset=toolset,
                                 start=True, timeout=replay_timeout_s, on_step=step,
                                 run_stage=timed_stage)
        finally:
            findings.restored_bytes = destination.restored_bytes
            findings.wal_files = destination.wal_files
        assert outcome.recovery is not None  # started
        findings.recovered_to = outcome.recovery.last_transaction
        findings.superuser = find_superuser(server, superuser_candidates(backup, user))
        _check_and_count(server, findings.superuser, findings, step, amcheck=amcheck,
                         heapallindexed=heapallindexed, sample_tables=sample_tables,
                         run_stage=run_stage)
    finally:
        step("stopping the verification server")
        try:
            server.runtime.stop()
        finally:
            if socket_outside:
                remove_tree(socket_dir)


def _check_and_count(
    server: _Server,
    superuser: str,
    findings: _Findings,
    step: Callable[[str], None],
    *,
    amcheck: AmcheckMode,
    heapallindexed: bool,
    sample_tables: int,
    run_stage: StageRunner,
) -> None:
    try:
        databases = list_databases(server, superuser)
    except psycopg.Error as exc:
        raise PhysicalVerificationError(
            f"listing the databases of the restored cluster failed: {_first_line(exc)}"
        ) from None
    # pg_amcheck first: it is built to read damaged pages safely, a count(*) is not.
    step(f"checking {amcheck} relations of {len(databases)} databases with pg_amcheck")

    def check() -> AmcheckResult:
        try:
            return run_amcheck(server, superuser, databases, mode=amcheck,
                               heapallindexed=heapallindexed, tables_per_database=sample_tables)
        except psycopg.Error as exc:
            raise PhysicalVerificationError(
                f"choosing the relations to check failed: {_first_line(exc)}"
            ) from None

    with _timed(findings, "amcheck"):
        result = run_stage("amcheck", check)
    findings.amcheck = result
    if not result.ok:
        findings.fail(
            f"pg_amcheck found problems (exit code {result.exit_code}): {_headline(result)}"
        )
    with _timed(findings, "counts"):
        run_stage("count-rows", lambda: count_rows(server, superuser, databases, findings, step))


__all__ = [
    "AmcheckMode",
    "AmcheckResult",
    "DatabaseCounts",
    "Durations",
    "PhysicalVerificationError",
    "PhysicalVerificationReport",
    "check_free_disk",
    "disk_needed",
    "pick_backup",
    "plan_chain_end",
    "prepare_sandbox",
    "sandbox_settings",
    "verify_physical_backup",
]
