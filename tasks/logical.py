"""Logical backup and restore: pg_dump → (zstd) → encryption → storages, and back.

The dump streams from pg_dump's stdout through the encryptor into every storage at once:
no temp file, memory flat whatever the database size. Row counts are taken in the very
snapshot pg_dump uses, concurrently with the dump.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import psycopg
from psycopg import sql

from pgbackflow.tasks.database import (
    ConnectionSettings,
    connect,
    libpq_conninfo,
    libpq_password_env,
    lost_session_error,
    query_error,
)
from pgbackflow.tasks.errors import ConfigError, DatabaseError, TransientDatabaseError
from pgbackflow.tasks.inventory import (
    Inventory,
    compare_counts,
    exported_snapshot,
    take_inventory,
    take_inventory_of_idle_database,
)
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.manifest import LogicalManifest
from pgbackflow.tasks.pipeline import ObjectWrite, decrypted_chunks, stream_tool_into_storages
from pgbackflow.tasks.process import Tool, ToolFailedError, ToolResult
from pgbackflow.tasks.storage import Storage
from pgbackflow.tasks.toolsets import Toolset
from pgbackflow.tasks.transfer import (
    ProgressCallback,
)

DUMP_NAME = "dump.pgbf"
GLOBALS_NAME = "globals.pgbf"
ZSTD_LEVEL = 5


@dataclass(frozen=True)
class DumpCompression:
    """Who compresses the dump.

    Attributes:
        pg_dump_arg: The ``--compress`` argument for pg_dump.
        ours: Whether pgbackflow compresses (zstd) before encrypting.
        description: For the manifest, e.g. "pg_dump zstd:5".
    """

    pg_dump_arg: str
    ours: bool
    description: str


def choose_compression(toolset: Toolset) -> DumpCompression:
    """zstd inside pg_dump where it has it (16+), else an uncompressed dump we compress.

    Either way the decrypted object is a plain custom-format archive that the stock
    pg_restore of that version reads.
    """
    if toolset.supports_zstd:
        return DumpCompression(f"--compress=zstd:{ZSTD_LEVEL}", False, f"pg_dump zstd:{ZSTD_LEVEL}")
    return DumpCompression("--compress=0", True, f"pgbackflow zstd:{ZSTD_LEVEL}")


@dataclass(frozen=True)
class DumpResult:
    """The dump object plus what was read from the source alongside it.

    Attributes:
        write: The encrypted dump as written.
        inventory: Tables and row counts in the dump's snapshot.
        snapshot: The exported snapshot id pg_dump used.
        compression: How the dump was compressed.
        globals_script: pg_dumpall's globals (roles, memberships, tablespaces), not yet stored.
    """

    write: ObjectWrite
    inventory: Inventory
    snapshot: str
    compression: DumpCompression
    globals_script: bytes = field(repr=False)


def dump_database(
    settings: ConnectionSettings,
    toolset: Toolset,
    storages: Sequence[Storage],
    master_key: MasterKey,
    key: str,
    *,
    progress: ProgressCallback | None = None,
) -> DumpResult:
    """Dump one database into ``key`` of every storage, counting rows in the same snapshot.

    While pg_dump streams, two more readers run: the row count (in pg_dump's snapshot) and
    pg_dumpall's globals (kept in memory, stored by the caller after the dump).

    Args:
        settings: The source database.
        toolset: Whose pg_dump to run (same major as the server, or newer).
        storages: Destinations; the dump is produced once and written to all.
        master_key: Wraps the archive's data key.
        key: Object key of the dump.
        progress: Called with the bytes pg_dump produced so far.
    """
    compression = choose_compression(toolset)
    try:
        return _dump_in_snapshot(settings, toolset, storages, master_key, key, compression,
                                 progress)
    except psycopg.Error as exc:
        # Opening or closing the snapshot's session (a server that went away mid-dump).
        raise query_error(settings, "the dump", exc) from None


def _dump_in_snapshot(
    settings: ConnectionSettings,
    toolset: Toolset,
    storages: Sequence[Storage],
    master_key: MasterKey,
    key: str,
    compression: DumpCompression,
    progress: ProgressCallback | None,
) -> DumpResult:
    pg_dump = Tool(toolset.binary("pg_dump"))
    with (
        libpq_password_env(settings) as env,
        exported_snapshot(settings) as (snapshot, conn),
        ThreadPoolExecutor(2, thread_name_prefix="pgbackflow-alongside") as alongside,
    ):

        def count_rows() -> Inventory:
            # The count has the whole dump's duration to finish: leave the server's
            # parallel workers to the application.
            conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
            return take_inventory(conn)

        counting = alongside.submit(count_rows)
        globals_capture = alongside.submit(capture_globals, settings, toolset)
        args = [
            "--format=custom",
            compression.pg_dump_arg,
            f"--snapshot={snapshot}",
            "--no-password",
            f"--dbname={libpq_conninfo(settings)}",
        ]
        dump_error: BaseException | None = None
        try:
            write = stream_tool_into_storages(
                pg_dump, args, env, storages, key, master_key,
                compress=compression.ours, progress=progress,
            )
        except BaseException as exc:
            dump_error = exc
            if not isinstance(exc, Exception):
                # Interrupted (Ctrl-C, SIGTERM in a flow run): the count may wait on a table
                # lock as long as pg_dump did; cancelled, the command ends now, not then.
                conn.cancel_safe()
        count_error = counting.exception()  # waits for both while the snapshot is open
        globals_capture.exception()
    if dump_error is not None and not isinstance(dump_error, Exception):
        raise dump_error  # the interruption, not the cancelled count's error
    # A server that shut down or restarted fails all three readers: that is the cause, and
    # it may pass (the task retries it), whichever reader noticed first.
    for error in (dump_error, count_error, globals_capture.exception()):
        lost = _lost_session(settings, error)
        if lost is not None:
            raise lost from None
    if count_error is not None:
        # A failed count aborts the snapshot's transaction, so pg_dump then fails too, with
        # a misleading "could not import the requested snapshot": the count error is the cause.
        error = count_error
        if isinstance(error, psycopg.errors.InsufficientPrivilege):
            raise DatabaseError(
                f"database {settings.display}: counting rows failed "
                f"({str(error).strip().splitlines()[0]}): grant the backup role SELECT on every "
                "table (e.g. pg_read_all_data)"
            ) from None
        if isinstance(error, psycopg.Error):
            raise query_error(settings, "counting rows", error) from None
        raise error
    if dump_error is not None:
        raise dump_error
    return DumpResult(
        write, counting.result(), snapshot, compression, globals_capture.result()
    )


def _lost_session(
    settings: ConnectionSettings, error: BaseException | None
) -> TransientDatabaseError | None:
    """The transient error for a reader that failed because its session was refused or lost."""
    if isinstance(error, ToolFailedError):
        # pg_dump's last lines: "...: error: ... server closed the connection unexpectedly".
        text = "\n".join([error.result.stderr_tail, *error.result.stderr_errors])
        return lost_session_error(settings, "the dump", text, reader=error.result.tool)
    if isinstance(error, psycopg.Error):
        return lost_session_error(settings, "the dump", str(error), reader="row count")
    return None


def capture_globals(settings: ConnectionSettings, toolset: Toolset) -> bytes:
    """Roles, memberships and tablespaces (no passwords), as pg_dumpall's SQL script.

    Small (kilobytes), so it is held in memory: taken while the dump runs and stored after
    it, so a killed backup never leaves a globals object without its dump.
    """
    pg_dumpall = Tool(toolset.binary("pg_dumpall"))
    args = [
        "--globals-only",
        "--no-role-passwords",
        "--no-password",
        # pg_dumpall ignores the dbname of --dbname; -l names the database it connects to.
        f"--database={settings.dbname}",
        f"--dbname={libpq_conninfo(settings)}",
    ]
    with libpq_password_env(settings) as env:
        return pg_dumpall.run(args, env=env).stdout


# ---------------------------------------------------------------------------------------
# Restore


@dataclass(frozen=True)
class RestoreOptions:
    """How to restore.

    Attributes:
        jobs: pg_restore parallel jobs (>1 spools the decrypted archive to a temp file).
        clean: Drop existing objects first (allows a non-empty target).
        create: Create the backed-up database (target DSN names the maintenance database).
        no_owner: Do not set object ownership.
        with_globals: Replay the backup's roles first (existing roles are kept as they are).
    """

    jobs: int = 1
    clean: bool = False
    create: bool = False
    no_owner: bool = False
    with_globals: bool = False

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ConfigError(f"--jobs {self.jobs} is invalid: use 1 or more")


#: Counts a database's own tables, views, sequences (not catalogs, not extensions' objects).
USER_RELATIONS_SQL = """
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
"""


def restore_target_database(
    target: ConnectionSettings, manifest: LogicalManifest, options: RestoreOptions
) -> ConnectionSettings:
    """The database the data ends up in: the target's, or the backup's name with --create.

    With --create that name is also the one inside the archive: `check_archive_database`
    refuses a restore where they differ.
    """
    return target.with_dbname(manifest.database.name) if options.create else target


_TOC_DBNAME = re.compile(r"^;\s+dbname: (.*)$")
_TOC_DATABASE = re.compile(r"^\d+; \d+ \d+ DATABASE - (.*)$")


@dataclass(frozen=True)
class ArchiveDatabase:
    """What a dump says about the database ``pg_restore --create`` makes from it.

    Attributes:
        header: The archive header's ``dbname`` (the whole rest of its line).
        entries: Each DATABASE entry of the table of contents: ``"<name> <owner>"``.
    """

    header: str | None
    entries: tuple[str, ...]

    def creates(self, name: str) -> bool:
        """Whether pg_restore --create makes exactly the database ``name``.

        Entry names and owners are unquoted, so the header (the same name, alone on its
        line) is needed to tell where the name ends.
        """
        return (
            self.header == name and len(self.entries) == 1
            and self.entries[0].startswith(name + " ")
        )

    @property
    def name(self) -> str | None:
        """The name the archive creates, for messages (None: no DATABASE entry)."""
        if not self.entries:
            return None
        entry = self.entries[0]
        if self.header is not None and entry.startswith(self.header + " "):
            return self.header
        return entry.rsplit(" ", 1)[0]


def archive_database(
    storage: Storage, manifest: LogicalManifest, keyring: Keyring, toolset: Toolset
) -> ArchiveDatabase:
    """The dump's own word on its database, from ``pg_restore --create --list``.

    Only the head of the dump (the table of contents) is decrypted.

    Raises:
        ArchiveError: The dump does not decrypt (wrong key, damaged).
        DatabaseError: pg_restore cannot read the table of contents.
    """
    chunks = decrypted_chunks(storage, manifest.dump, keyring)
    try:
        result = Tool(toolset.binary("pg_restore")).stream_in(
            ["--create", "--list"], chunks, check=False
        )
    finally:
        chunks.close()  # pg_restore stops after the table of contents: read no further
    if result.returncode != 0:
        lines = [line for line in result.stderr_tail.splitlines() if line.strip()]
        raise DatabaseError(
            f"backup {manifest.backup_id}: pg_restore cannot read the dump's table of contents "
            f"({lines[-1] if lines else f'exit code {result.returncode}'}): check the backup "
            "with pgbackflow verify"
        )
    header: str | None = None
    entries: list[str] = []
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        if header is None and (match := _TOC_DBNAME.match(line)):
            header = match.group(1)
        elif match := _TOC_DATABASE.match(line):
            entries.append(match.group(1))
    return ArchiveDatabase(header, tuple(entries))


def check_archive_database(
    storage: Storage, manifest: LogicalManifest, keyring: Keyring, toolset: Toolset
) -> None:
    """Refuse ``--create`` unless the dump creates exactly the database the manifest names.

    pg_restore --create takes the name from the dump, not from our manifest: where they
    differ, the existence check looked at another database than the one restored into,
    which could be a live one.

    Raises:
        ConfigError: No DATABASE entry, or another name than the manifest's.
    """
    expected = manifest.database.name
    found = archive_database(storage, manifest, keyring, toolset)
    if found.creates(expected):
        return
    if found.name is None:
        raise ConfigError(
            f"backup {manifest.backup_id}: the dump has no DATABASE entry, so --create cannot "
            "tell which database it makes: create one yourself and restore into it without "
            "--create (nothing was written)"
        )
    raise ConfigError(
        f"backup {manifest.backup_id}: the manifest names database '{expected}' but the dump "
        f"creates '{found.name}': the manifest does not belong to this dump; restore without "
        "--create into a database you name (nothing was written)"
    )


#: Seconds the drop of an unfinished restore's database may take before it is left to the user.
DROP_TIMEOUT_S = 30


def _maintenance(target: ConnectionSettings) -> ConnectionSettings:
    """The same server through its ``postgres`` database (``template1`` for postgres)."""
    return replace(target, dbname="template1" if target.dbname == "postgres" else "postgres")


def drop_unfinished_database(server: ConnectionSettings, dbname: str) -> str | None:
    """Drop a database a restore made and did not finish, with its sessions (a killed
    pg_restore's may linger); None when done, else why not (never raises: the restore's
    own error is what the user must see)."""
    maintenance = _maintenance(server)
    try:
        with connect(maintenance) as conn:
            # Bounded: a drop waits until every session of the server has taken note of it,
            # and an interrupted command must end even if one never does.
            conn.execute(f"SET statement_timeout = '{DROP_TIMEOUT_S}s'")
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(dbname)))
    except (DatabaseError, psycopg.Error) as exc:
        return " ".join(str(exc).split())[:200]
    return None


def create_missing_target(target: ConnectionSettings) -> bool:
    """Create the target database when it does not exist yet; whether it did.

    ``restore --target postgresql://host/shop_copy`` into a new name is what users expect
    to work; pg_restore itself needs the database to exist. Asked through the server's
    ``postgres`` database (``template1`` for a target named postgres) as the same role.

    Raises:
        ConfigError: it does not exist and the role may not create it.
    """
    maintenance = _maintenance(target)
    try:
        conn = connect(maintenance)
    except DatabaseError:
        return False  # the target's own connection will say what is wrong
    with conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                        (target.dbname,)).fetchone():
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.dbname)))
        except psycopg.errors.InsufficientPrivilege:
            raise ConfigError(
                f"target database {target.display} does not exist and role '{target.user}' may "
                "not create it: create it first (createdb), or restore with --create"
            ) from None
    return True


def check_restore_target(
    target: ConnectionSettings, manifest: LogicalManifest, options: RestoreOptions
) -> int:
    """Refuse targets that would lose data or cannot read the archive; return the target major.

    Raises:
        ConfigError: older major than the source, or a non-empty target without --clean.
    """
    with connect(target) as conn:
        row = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
        assert row is not None
        target_major = int(row[0]) // 10000
        if target_major < manifest.server_major:
            raise ConfigError(
                f"target {target.display} runs PostgreSQL {target_major}, older than the "
                f"backup's source ({manifest.server_major}): restore into PostgreSQL "
                f"{manifest.server_major} or newer"
            )
        if options.create:
            if target.dbname == manifest.database.name:
                raise ConfigError(
                    f"target {target.display} is the database --create would make: name a "
                    "maintenance database in --target (e.g. postgres) to restore with --create"
                )
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (manifest.database.name,)
            ).fetchone()
            if exists and not options.clean:
                raise ConfigError(
                    f"target {target.display}: database '{manifest.database.name}' already exists:"
                    " use --clean to replace it, or restore without --create into an empty "
                    "database"
                )
            return target_major
        count_row = conn.execute(USER_RELATIONS_SQL).fetchone()
    relations = int(count_row[0]) if count_row else 0
    if relations and not options.clean:
        raise ConfigError(
            f"target database {target.display} is not empty ({relations} tables, views or "
            "sequences): use --clean to replace its contents, or restore into an empty database"
        )
    return target_major


_ROLE_MISSING = re.compile(r'role "((?:[^"]|"")+)" does not exist')
_CREATE_ROLE = re.compile(r'^CREATE ROLE ("(?:[^"]|"")+"|[^\s;]+);$')
_ROLE_STATEMENT = re.compile(r'^(?:ALTER|COMMENT ON) ROLE ("(?:[^"]|"")+"|[^\s;]+)[\s;]')


def _unquote(identifier: str) -> str:
    if identifier.startswith('"'):
        return identifier[1:-1].replace('""', '"')
    return identifier


def replay_globals(
    storage: Storage, manifest: LogicalManifest, keyring: Keyring, target: ConnectionSettings
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Recreate the backup's roles, memberships and tablespaces on the target server.

    Roles that already exist are kept exactly as they are (no ALTER). Statements that fail
    (a tablespace directory missing on this host, a membership already granted) are
    reported, not fatal.

    Returns:
        (roles created, roles kept, warnings)
    """
    script = b"".join(decrypted_chunks(storage, manifest.globals, keyring)).decode("utf-8")
    created: list[str] = []
    kept: list[str] = []
    warnings: list[str] = []
    with connect(target) as conn:
        existing = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles").fetchall()}
        for line in script.splitlines():
            statement = line.strip()
            if not statement or statement.startswith("--") or statement.startswith("\\"):
                continue
            if statement.startswith("SET "):
                continue
            if match := _CREATE_ROLE.match(statement):
                role = _unquote(match.group(1))
                if role in existing:
                    kept.append(role)
                    continue
                created.append(role)
            elif (match := _ROLE_STATEMENT.match(statement)) and _unquote(match.group(1)) in kept:
                continue
            try:
                conn.execute(statement.encode())
            except psycopg.Error as exc:
                message = str(exc).strip().splitlines()[0]
                warnings.append(f"globals: {statement[:80]}: {message}")
    return tuple(created), tuple(kept), tuple(warnings)


class PgRestoreRunner(Protocol):
    """Where a restore's pg_restore runs: this host's toolset against a server (the restore
    flow, a local sandbox), or inside the server's container (a Docker sandbox)."""

    def pg_restore(
        self, dbname: str, args: Sequence[str], dump: Path | Iterable[bytes]
    ) -> ToolResult:
        """Run pg_restore with ``args`` (options only, no connection) into database
        ``dbname`` from ``dump``: a file, or the archive's bytes on stdin (one job only).
        A non-zero exit is returned, not raised: callers judge the errors."""
        ...


@dataclass(frozen=True)
class HostPgRestore:
    """pg_restore of ``toolset`` on this host, connecting to ``server`` (password through a
    passfile, never in argv)."""

    toolset: Toolset
    server: ConnectionSettings

    def pg_restore(
        self, dbname: str, args: Sequence[str], dump: Path | Iterable[bytes]
    ) -> ToolResult:
        """See :class:`PgRestoreRunner`."""
        target = self.server.with_dbname(dbname)
        tool = Tool(self.toolset.binary("pg_restore"))
        command = ["--no-password", f"--dbname={libpq_conninfo(target)}", *args]
        with libpq_password_env(target) as env:
            if isinstance(dump, Path):
                return tool.run([*command, str(dump)], env=env, check=False)
            return tool.stream_in(command, dump, env=env, check=False)


def pg_restore_options(options: RestoreOptions) -> list[str]:
    """pg_restore's flags for ``options`` (the connection is the runner's)."""
    args: list[str] = []
    if options.clean:
        args += ["--clean", "--if-exists"]
    if options.create:
        args.append("--create")
    if options.no_owner:
        args.append("--no-owner")
    if options.jobs > 1:
        args.append(f"--jobs={options.jobs}")
    return args


def run_pg_restore(
    storage: Storage,
    manifest: LogicalManifest,
    keyring: Keyring,
    runner: PgRestoreRunner,
    dbname: str,
    args: Sequence[str],
    *,
    jobs: int,
    spooled: Path | None = None,
) -> ToolResult:
    """The one way a logical backup is fed to pg_restore (restore and verification).

    Every chunk and the dump's sha256 are checked as it is decrypted. A dump the caller
    already decrypted into ``spooled`` is restored from there; else one job reads it on
    stdin, and parallel jobs (which need a seekable file) from a temporary spool that is
    removed afterwards.
    """
    if spooled is not None:
        return runner.pg_restore(dbname, args, spooled)
    chunks = decrypted_chunks(storage, manifest.dump, keyring)
    if jobs == 1:
        return runner.pg_restore(dbname, args, chunks)
    with tempfile.TemporaryDirectory(prefix="pgbackflow-restore-") as spool_dir:
        spool = Path(spool_dir) / "dump.custom"
        with spool.open("wb") as out:
            for chunk in chunks:
                out.write(chunk)
        return runner.pg_restore(dbname, args, spool)


def _judge_pg_restore(result: ToolResult) -> tuple[str, ...]:
    """Accept pg_restore errors that only concern missing roles; fail on anything else."""
    if result.returncode == 0:
        return ()
    missing: set[str] = set()
    other: list[str] = []
    for line in result.stderr_errors:
        if "errors ignored on restore" in line:
            continue
        if match := _ROLE_MISSING.search(line):
            missing.add(match.group(1).replace('""', '"'))
        elif "error:" in line.lower():
            other.append(line)
    if other or not missing:
        raise ToolFailedError(
            ToolResult(result.tool, result.returncode, result.stdout,
                       "\n".join(other[:5]) or result.stderr_tail, result.stderr_errors)
        )
    return tuple(sorted(missing))


def restore_dump(
    storage: Storage,
    manifest: LogicalManifest,
    keyring: Keyring,
    target: ConnectionSettings,
    toolset: Toolset,
    options: RestoreOptions,
) -> tuple[int, tuple[str, ...]]:
    """Decrypt the dump and feed it to this host's pg_restore, connected to ``target``.

    Returns:
        pg_restore's exit code and the roles it could not find (owners/grants skipped).
    """
    if options.create:
        make_room_for_create(target, manifest.database.name, clean=options.clean)
    result = run_pg_restore(
        storage, manifest, keyring, HostPgRestore(toolset, target), target.dbname,
        pg_restore_options(options), jobs=options.jobs,
    )
    return result.returncode, _judge_pg_restore(result)


def make_room_for_create(target: ConnectionSettings, name: str, *, clean: bool) -> None:
    """Right before ``pg_restore --create``: the database must not exist.

    pg_restore goes on after a failed CREATE DATABASE (or a failed DROP DATABASE of --clean,
    e.g. while sessions are open) and restores into the database that is there. So with
    --clean an existing one is dropped here first, and a drop that fails stops the restore.

    Raises:
        ConfigError: It exists and ``clean`` is off, it is the database ``target`` names,
            or it cannot be dropped.
    """
    if target.dbname == name:
        raise ConfigError(
            f"target {target.display} is the database --create would make: name a maintenance "
            "database in --target (e.g. postgres) to restore with --create"
        )
    with connect(target) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            return
        if not clean:
            raise ConfigError(
                f"target {target.display}: database '{name}' already exists: use --clean to "
                "replace it, or restore without --create into an empty database"
            )
        try:
            conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            raise ConfigError(
                f"target {target.display}: database '{name}' cannot be replaced "
                f"({str(exc).strip().splitlines()[0]}): close its sessions and retry "
                "(nothing was restored)"
            ) from None


def count_restored(
    database: ConnectionSettings, manifest: LogicalManifest, jobs: int = 1
) -> tuple[Inventory, tuple[str, ...], tuple[str, ...]]:
    """Count the restored tables and compare them with the manifest's counts.

    Returns:
        The inventory, the differences for the backup's tables, and the tables the target
        holds that are not in the backup (kept by a --clean restore; not an error here).
    """
    inventory = take_inventory_of_idle_database(database, jobs)
    restored = inventory.rows_by_table()
    expected = manifest.rows_by_table()
    ours = {name: rows for name, rows in restored.items() if name in expected}
    extra = tuple(sorted(restored.keys() - expected.keys()))
    return inventory, tuple(compare_counts(expected, ours)), extra


__all__ = [
    "DUMP_NAME",
    "GLOBALS_NAME",
    "USER_RELATIONS_SQL",
    "ArchiveDatabase",
    "DumpCompression",
    "DumpResult",
    "HostPgRestore",
    "ObjectWrite",
    "PgRestoreRunner",
    "RestoreOptions",
    "archive_database",
    "capture_globals",
    "check_archive_database",
    "check_restore_target",
    "choose_compression",
    "count_restored",
    "dump_database",
    "make_room_for_create",
    "pg_restore_options",
    "replay_globals",
    "restore_dump",
    "restore_target_database",
    "run_pg_restore",
]

