"""Fingerprints of a database's user-visible state, to prove a backup round trip lossless.

``database_fingerprint`` captures, for every non-system schema: table and materialized view
contents (row count + md5 of the sorted row texts), sequence positions, large objects,
comments, privileges, owners, extensions and the schema list. ``diff_fingerprints`` lists
the differences in words.

Design choices:
    * Row texts are rendered with pinned output settings (UTC, ISO dates, hex bytea, ...)
      and sorted with ``COLLATE "C"``, so servers with other defaults hash alike.
    * Privileges are compared relative to the object's default ACL (``acldefault``):
      ``+role=PRIV/grantor`` is an extra grant, ``-role=PRIV/grantor`` a revoked default.
      That keeps a NULL ACL equal to an explicit default one, and absorbs privileges a
      newer major adds to the defaults (e.g. MAINTAIN in 17).
    * The ``public`` schema's own ACL and owner differ between majors by design
      (PostgreSQL 15 changed them), so they are left out.
    * Comments on built-in objects (oid < 16384) and on extension members are left out:
      ``CREATE EXTENSION`` recreates those.

Physical backups do not restore the data of unlogged tables, and WAL replay may leave a
sequence up to 32 values ahead of the last ``nextval``; see the ``ignore_unlogged_data``
and ``sequence_slack`` options of :func:`diff_fingerprints`. Meant for test-sized
databases: each table's rows are aggregated into one string in the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

__all__ = [
    "DatabaseFingerprint",
    "RelationContent",
    "SequenceState",
    "database_fingerprint",
    "diff_fingerprints",
    "table_row_counts",
]

# OIDs below this belong to objects initdb created.
_FIRST_NORMAL_OID = 16384
_USER_SCHEMA = "n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'"
# Output settings that change how values print; pinned so fingerprints compare across servers.
_PINNED_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "bytea_output": "hex",
    "extra_float_digits": "1",
    "search_path": "pg_catalog",
}


@dataclass(frozen=True)
class RelationContent:
    """Row count and md5 of the sorted row texts (None when empty)."""

    rows: int
    md5: str | None

    def __str__(self) -> str:
        return f"{self.rows} rows, md5 {self.md5}"


@dataclass(frozen=True)
class SequenceState:
    """A sequence's position: what ``SELECT last_value, is_called FROM seq`` shows."""

    last_value: int
    is_called: bool

    def __str__(self) -> str:
        return f"last_value {self.last_value}, is_called {self.is_called}"


def _label(text: str) -> Any:
    return field(metadata={"label": text})


@dataclass(frozen=True)
class DatabaseFingerprint:
    """A database's user-visible state; compare two with :func:`diff_fingerprints`.

    Relation keys are ``format('%I.%I', schema, name)``, column keys add ``.%I`` for the
    column, comment keys are ``"<object type> <identity>"`` as ``pg_identify_object`` names
    them (e.g. ``table column edge.t.c``), privilege values are described in the module
    docstring (empty string: the default ACL).
    """

    schemas: tuple[str, ...] = _label("schema")
    extensions: tuple[str, ...] = _label("extension")
    tables: Mapping[str, RelationContent] = _label("table")
    unlogged_tables: frozenset[str] = _label("unlogged table")
    # None: the materialized view is not populated (created WITH NO DATA).
    materialized_views: Mapping[str, RelationContent | None] = _label("materialized view")
    sequences: Mapping[str, SequenceState] = _label("sequence")
    large_objects: Mapping[int, str] = _label("large object")
    comments: Mapping[str, str] = _label("comment on")
    owners: Mapping[str, str] = _label("owner of")
    privileges: Mapping[str, str] = _label("privileges of")
    column_privileges: Mapping[str, str] = _label("privileges of column")
    schema_privileges: Mapping[str, str] = _label("privileges of schema")
    large_object_owners: Mapping[int, str] = _label("owner of large object")
    large_object_privileges: Mapping[int, str] = _label("privileges of large object")


def database_fingerprint(conn: psycopg.Connection[Any]) -> DatabaseFingerprint:
    """Capture the state of the database ``conn`` is connected to.

    Reads in one transaction (a read-only repeatable-read snapshot when ``conn`` is idle
    at the start) with output settings pinned by ``SET LOCAL``. Needs a role that can read
    everything, normally a superuser.
    """
    snapshot = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        if snapshot:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        for name, value in _PINNED_SETTINGS.items():
            cur.execute("SELECT set_config(%s, %s, true)", [name, value])
        return _capture(cur)


def table_row_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Rows per ordinary table and partition (``FROM ONLY``) in non-system schemas.

    Keys are ``format('%I.%I', schema, table)``; partitioned parents are not listed.
    """
    with conn.cursor(row_factory=tuple_row) as cur:
        counts: dict[str, int] = {}
        for rel in _relations(cur, "r"):
            query = sql.SQL("SELECT count(*) FROM ONLY {}").format(rel.identifier)
            counts[rel.key] = int(_one(cur, query)[0])
        return counts


def diff_fingerprints(
    a: DatabaseFingerprint,
    b: DatabaseFingerprint,
    *,
    ignore_unlogged_data: bool = False,
    sequence_slack: int = 0,
) -> list[str]:
    """Describe how ``b`` differs from ``a``, one line per difference; empty when equal.

    Args:
        a: The reference, e.g. the source database.
        b: The candidate, e.g. the restored database.
        ignore_unlogged_data: Skip the contents (not the presence) of ``a``'s unlogged
            tables, which physical backups do not carry.
        sequence_slack: Accept ``b``'s sequences this far from ``a``'s, whatever
            ``is_called`` says (WAL replay may put a sequence up to 32 ahead).
    """
    problems: list[str] = []
    for spec in dataclasses.fields(DatabaseFingerprint):
        label = str(spec.metadata["label"])
        left, right = getattr(a, spec.name), getattr(b, spec.name)
        if not isinstance(left, Mapping):
            problems += [f"{label} {item}: only in a" for item in sorted(set(left) - set(right))]
            problems += [f"{label} {item}: only in b" for item in sorted(set(right) - set(left))]
            continue
        for key in sorted(set(left) | set(right), key=str):
            if key not in right:
                problems.append(f"{label} {key}: only in a ({_show(left[key])})")
            elif key not in left:
                problems.append(f"{label} {key}: only in b ({_show(right[key])})")
            elif left[key] != right[key]:
                if spec.name == "tables" and ignore_unlogged_data and key in a.unlogged_tables:
                    continue
                if spec.name == "sequences" and _within(left[key], right[key], sequence_slack):
                    continue
                problems.append(f"{label} {key}: {_show(left[key])} -> {_show(right[key])}")
    return problems


# -- internals -----------------------------------------------------------------------


def _capture(cur: psycopg.Cursor[tuple[Any, ...]]) -> DatabaseFingerprint:
    # Sorted in Python: code point order, like COLLATE "C", whatever the database collation.
    cur.execute(f"SELECT n.nspname FROM pg_namespace n WHERE {_USER_SCHEMA}")
    schemas = tuple(sorted(str(row[0]) for row in cur.fetchall()))
    cur.execute("SELECT extname FROM pg_extension")
    extensions = tuple(sorted(str(row[0]) for row in cur.fetchall()))

    tables: dict[str, RelationContent] = {}
    unlogged: set[str] = set()
    for rel in _relations(cur, "r"):
        tables[rel.key] = _content(cur, rel)
        if rel.unlogged:
            unlogged.add(rel.key)

    matviews = {
        rel.key: _content(cur, rel) if rel.populated else None for rel in _relations(cur, "m")
    }

    sequences: dict[str, SequenceState] = {}
    for rel in _relations(cur, "S"):
        query = sql.SQL("SELECT last_value, is_called FROM {}").format(rel.identifier)
        last_value, is_called = _one(cur, query)
        sequences[rel.key] = SequenceState(int(last_value), bool(is_called))

    cur.execute(
        "SELECT m.oid::bigint, md5(lo_get(m.oid)), pg_get_userbyid(m.lomowner) "
        "FROM pg_largeobject_metadata m ORDER BY 1"
    )
    lo_rows = cur.fetchall()

    cur.execute(
        "SELECT format('%%s %%s', i.type, i.identity), d.description "
        "FROM pg_description d "
        "CROSS JOIN LATERAL pg_identify_object(d.classoid, d.objoid, d.objsubid) i "
        "WHERE d.objoid >= %s AND NOT EXISTS ("
        "  SELECT FROM pg_depend e"
        "  WHERE e.classid = d.classoid AND e.objid = d.objoid AND e.deptype = 'e')",
        [_FIRST_NORMAL_OID],
    )
    comments = {str(key): str(text) for key, text in cur.fetchall()}

    cur.execute(
        "SELECT format('%I.%I', n.nspname, c.relname), pg_get_userbyid(c.relowner) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {_USER_SCHEMA}"
    )
    owners = {str(key): str(owner) for key, owner in cur.fetchall()}

    return DatabaseFingerprint(
        schemas=schemas,
        extensions=extensions,
        tables=tables,
        unlogged_tables=frozenset(unlogged),
        materialized_views=matviews,
        sequences=sequences,
        large_objects={int(oid): str(digest) for oid, digest, _owner in lo_rows},
        comments=comments,
        owners=owners,
        privileges=_acl_changes(cur, _RELATION_ACLS),
        column_privileges=_acl_changes(cur, _COLUMN_ACLS),
        schema_privileges=_acl_changes(cur, _SCHEMA_ACLS),
        large_object_owners={int(oid): str(owner) for oid, _digest, owner in lo_rows},
        large_object_privileges={
            int(key): value for key, value in _acl_changes(cur, _LARGE_OBJECT_ACLS).items()
        },
    )


class _Relation(NamedTuple):
    key: str
    identifier: sql.Identifier
    unlogged: bool
    populated: bool


def _relations(cur: psycopg.Cursor[tuple[Any, ...]], relkind: str) -> list[_Relation]:
    """User relations of one kind, sorted by key."""
    cur.execute(
        "SELECT format('%%I.%%I', n.nspname, c.relname), n.nspname, c.relname, "
        "c.relpersistence = 'u', c.relispopulated "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE c.relkind = %s AND {_USER_SCHEMA}",
        [relkind],
    )
    return sorted(
        _Relation(str(key), sql.Identifier(schema, name), bool(unlogged), bool(populated))
        for key, schema, name, unlogged, populated in cur.fetchall()
    )


def _content(cur: psycopg.Cursor[tuple[Any, ...]], rel: _Relation) -> RelationContent:
    query = sql.SQL(
        "SELECT count(*), md5(string_agg(t::text, E'\\n' ORDER BY t::text COLLATE \"C\")) "
        "FROM ONLY {} t"
    ).format(rel.identifier)
    rows, digest = _one(cur, query)
    return RelationContent(int(rows), None if digest is None else str(digest))


def _one(cur: psycopg.Cursor[tuple[Any, ...]], query: sql.Composed) -> tuple[Any, ...]:
    cur.execute(query)
    return _fetch_one(cur)


def _fetch_one(cur: psycopg.Cursor[tuple[Any, ...]]) -> tuple[Any, ...]:
    row = cur.fetchone()
    assert row is not None, "query returned no row"
    return row


# Each yields (key, acl, default acl) for one kind of object; _acl_changes compares them.
_RELATION_ACLS = (
    "SELECT format('%I.%I', n.nspname, c.relname), c.relacl, "
    "acldefault(CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::\"char\", c.relowner) "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    f"WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {_USER_SCHEMA}"
)
_COLUMN_ACLS = (
    "SELECT format('%I.%I.%I', n.nspname, c.relname, a.attname), a.attacl, "
    "acldefault('c', c.relowner) "
    "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    f"WHERE a.attacl IS NOT NULL AND NOT a.attisdropped AND {_USER_SCHEMA}"
)
_SCHEMA_ACLS = (
    "SELECT format('%I', n.nspname), n.nspacl, acldefault('n', n.nspowner) "
    f"FROM pg_namespace n WHERE {_USER_SCHEMA} AND n.nspname <> 'public'"
)
_LARGE_OBJECT_ACLS = (
    "SELECT m.oid::text, m.lomacl, acldefault('L', m.lomowner) FROM pg_largeobject_metadata m"
)
_ACL_ENTRIES = """
WITH objects(key, acl, dflt) AS ({objects})
SELECT o.key, s.actual,
       CASE WHEN e.privilege_type IS NOT NULL THEN format('%s=%s%s/%s',
           CASE e.grantee WHEN 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(e.grantee)) END,
           e.privilege_type,
           CASE WHEN e.is_grantable THEN '*' ELSE '' END,
           quote_ident(pg_get_userbyid(e.grantor))) END
FROM objects o
CROSS JOIN LATERAL (VALUES (true, coalesce(o.acl, o.dflt)), (false, o.dflt)) AS s(actual, acl)
LEFT JOIN LATERAL aclexplode(s.acl) AS e ON true
"""


def _acl_changes(cur: psycopg.Cursor[tuple[Any, ...]], objects: str) -> dict[str, str]:
    """Per object: grants beyond its default ACL (``+``) and revoked defaults (``-``)."""
    cur.execute(sql.SQL(_ACL_ENTRIES).format(objects=sql.SQL(objects)))
    actual: dict[str, set[str]] = {}
    default: dict[str, set[str]] = {}
    for key, is_actual, entry in cur.fetchall():
        target = actual if is_actual else default
        entries = target.setdefault(str(key), set())
        if entry is not None:
            entries.add(str(entry))
    changes: dict[str, str] = {}
    for key in actual:
        added = sorted(actual[key] - default.get(key, set()))
        removed = sorted(default.get(key, set()) - actual[key])
        changes[key] = ", ".join([f"+{e}" for e in added] + [f"-{e}" for e in removed])
    return changes


def _within(a: object, b: object, slack: int) -> bool:
    if not (slack and isinstance(a, SequenceState) and isinstance(b, SequenceState)):
        return False
    return abs(a.last_value - b.last_value) <= slack


def _show(value: object) -> str:
    if value is None:
        return "not populated"
    if isinstance(value, str):
        return repr(value) if value else "(default)"
    return str(value)
