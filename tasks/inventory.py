"""What is in a database: schemas, tables and their exact row counts.

Counted inside the backup's exported snapshot, the numbers describe exactly the data in the
dump, so a restore (or a verification) can be checked table by table.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgbackflow.tasks.database import ConnectionSettings, connect

# Leaf tables only: a partitioned parent ('p') has no rows of its own, its partitions are
# 'r' and counted one by one; FROM ONLY keeps inheritance parents from counting children.
_TABLES_SQL = """
SELECT n.nspname, c.relname, format('%I.%I', n.nspname, c.relname), c.relpages
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
ORDER BY n.nspname, c.relname
"""
_SCHEMA_COUNT_SQL = """
SELECT count(*) FROM pg_namespace
WHERE nspname NOT IN ('pg_catalog', 'information_schema')
  AND nspname !~ '^pg_(toast|temp_|toast_temp_)'
"""


@dataclass(frozen=True)
class TableCount:
    """Exact row count of one table.

    Attributes:
        schema: Schema name.
        table: Table name.
        rows: Rows in the table itself (FROM ONLY).
        key: ``schema.table`` quoted by the server's ``format('%I.%I')``: the name used
            to match tables between a manifest and a restored database.
    """

    schema: str
    table: str
    rows: int
    key: str


@dataclass(frozen=True)
class Inventory:
    """Schemas, tables and row counts of one database at one moment.

    Attributes:
        tables: One entry per leaf table, sorted by schema and name.
        schema_count: Non-system schemas.
        database_size: ``pg_database_size`` in bytes.
    """

    tables: tuple[TableCount, ...]
    schema_count: int
    database_size: int

    @property
    def table_count(self) -> int:
        """Number of leaf tables."""
        return len(self.tables)

    @property
    def total_rows(self) -> int:
        """Rows over all tables."""
        return sum(t.rows for t in self.tables)

    def rows_by_table(self) -> dict[str, int]:
        """``{schema.table: rows}``."""
        return {t.key: t.rows for t in self.tables}


def _count_rows(conn: psycopg.Connection[Any], schema: str, table: str) -> int:
    query = sql.SQL("SELECT count(*) FROM ONLY {}.{}").format(
        sql.Identifier(schema), sql.Identifier(table)
    )
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def _inventory(
    conn: psycopg.Connection[Any], tables: list[tuple[str, str, str, int]], rows: list[int]
) -> Inventory:
    schema_row = conn.execute(_SCHEMA_COUNT_SQL).fetchone()
    size_row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return Inventory(
        tables=tuple(
            TableCount(schema, table, count, key)
            for (schema, table, key, _), count in zip(tables, rows, strict=True)
        ),
        schema_count=int(schema_row[0]) if schema_row else 0,
        database_size=int(size_row[0]) if size_row else 0,
    )


def take_inventory(conn: psycopg.Connection[Any]) -> Inventory:
    """Count every table's rows in the connection's current transaction/snapshot."""
    tables = conn.execute(_TABLES_SQL).fetchall()
    rows = [_count_rows(conn, schema, table) for schema, table, _, _ in tables]
    return _inventory(conn, tables, rows)


def take_inventory_of_idle_database(settings: ConnectionSettings, jobs: int) -> Inventory:
    """Count every table's rows over ``jobs`` connections, largest tables first.

    For a database nothing writes to (a restore target, a verification sandbox): the
    connections do not share a snapshot.
    """
    with connect(settings) as conn:
        if jobs <= 1:
            return take_inventory(conn)
        tables = conn.execute(_TABLES_SQL).fetchall()
        # Largest first, so no connection is left with a big table at the end.
        pending = sorted(range(len(tables)), key=lambda i: -tables[i][3])
        rows_by_index: dict[int, int] = {}
        take = threading.Lock()

        def count_some() -> None:
            with connect(settings) as worker:
                while True:
                    with take:
                        if not pending:
                            return
                        index = pending.pop(0)
                    schema, table, _, _ = tables[index]
                    rows_by_index[index] = _count_rows(worker, schema, table)

        workers = min(jobs, len(tables))
        if workers:
            with ThreadPoolExecutor(workers, "pgbackflow-count") as pool:
                for done in [pool.submit(count_some) for _ in range(workers)]:
                    done.result()
        return _inventory(conn, tables, [rows_by_index[i] for i in range(len(tables))])


def compare_counts(expected: Mapping[str, int], actual: Mapping[str, int]) -> list[str]:
    """Differences between two ``{schema.table: rows}`` maps, one readable line each."""
    problems = [f"table {name} is missing" for name in sorted(expected.keys() - actual.keys())]
    problems += [f"table {name} is unexpected" for name in sorted(actual.keys() - expected.keys())]
    problems += [
        f"table {name}: {actual[name]} rows, expected {expected[name]}"
        for name in sorted(expected.keys() & actual.keys())
        if expected[name] != actual[name]
    ]
    return problems


@dataclass(frozen=True)
class SourceIdentity:
    """Who the source database is.

    Attributes:
        dbname: Database name.
        host: Host it was reached at.
        port: Port it was reached at.
        system_identifier: Cluster system identifier, when the role may read it.
        database_oid: OID of the database in its cluster.
        server_version: Human server version ("17.11").
        server_version_num: Numeric server version (170011).
    """

    dbname: str
    host: str
    port: int
    system_identifier: str | None
    database_oid: int
    server_version: str
    server_version_num: int

    @property
    def major(self) -> int:
        """Server major version."""
        return self.server_version_num // 10000

    @property
    def db_id(self) -> str:
        """A stable, path-safe id for this database's backups: ``<name>-<8 hex>``."""
        cluster = self.system_identifier or f"{self.host}:{self.port}"
        digest = hashlib.sha256(f"{cluster}/{self.dbname}".encode()).hexdigest()[:8]
        name = re.sub(r"[^a-z0-9_.-]+", "-", self.dbname.lower()).strip("-.") or "db"
        return f"{name[:40]}-{digest}"


def read_identity(settings: ConnectionSettings) -> SourceIdentity:
    """Connect and read the database's identity and server version."""
    with connect(settings) as conn:
        row = conn.execute(
            "SELECT d.oid, current_setting('server_version'),"
            " current_setting('server_version_num')::int"
            " FROM pg_database d WHERE d.datname = current_database()"
        ).fetchone()
        assert row is not None  # current_database() always exists
        try:
            # Readable by superusers and pg_monitor-like roles only; optional.
            ident_row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
            system_identifier = str(ident_row[0]) if ident_row else None
        except psycopg.errors.InsufficientPrivilege:
            system_identifier = None
    return SourceIdentity(
        dbname=settings.dbname,
        host=settings.host,
        port=settings.port,
        system_identifier=system_identifier,
        database_oid=int(row[0]),
        server_version=str(row[1]).split()[0],
        server_version_num=int(row[2]),
    )


@contextmanager
def exported_snapshot(
    settings: ConnectionSettings,
) -> Iterator[tuple[str, psycopg.Connection[Any]]]:
    """A REPEATABLE READ, READ ONLY transaction whose snapshot other sessions can import.

    Yields:
        The snapshot id (for ``pg_dump --snapshot``) and the connection holding it. The
        snapshot lives as long as the block: keep it open until pg_dump has finished.
    """
    conn = connect(settings, autocommit=False)
    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        yield str(row[0]), conn
    finally:
        conn.rollback()
        conn.close()
