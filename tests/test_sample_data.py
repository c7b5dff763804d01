"""The sample databases and the fingerprint helper, against real servers."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.errors import ConfigError, DatabaseError
from pgbackflow.tasks.sample_data import (
    EDGE_CASE_LARGE_OBJECTS,
    demo_row_counts,
    load_demo_database,
    load_edge_case_database,
)
from tests.dbcompare import (
    RelationContent,
    SequenceState,
    database_fingerprint,
    diff_fingerprints,
    table_row_counts,
)
from tests.fixtures.postgres import PgDatabase, PgServers

MIXED = '"Ünïcødé Schema"."Mixed Case Table"'
DEMO_MAJOR = 18
DEMO_PARTITIONS = [f"analytics.events_2024_{month:02d}" for month in range(1, 7)] + [
    "analytics.events_default"
]


@contextmanager
def scratch_database(server: EphemeralCluster) -> Iterator[psycopg.Connection[Any]]:
    """A second fresh database on ``server``, dropped afterwards."""
    name = f"test_{secrets.token_hex(6)}"
    with server.connect() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with server.connect(name) as conn:
            yield conn
    finally:
        with server.connect() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def scalar(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


# -- edge-case database ------------------------------------------------------------------


def test_edge_case_database_fingerprint(pg_database: PgDatabase) -> None:
    with pg_database.connect() as conn:
        load_edge_case_database(conn)
        first = database_fingerprint(conn)
        second = database_fingerprint(conn)
        counts = table_row_counts(conn)

    assert first == second
    assert diff_fingerprints(first, second) == []
    assert counts == {key: content.rows for key, content in first.tables.items()}

    assert {"edge", "Ünïcødé Schema", "CamelSchema", "ext", "public"} <= set(first.schemas)
    assert "citext" in first.extensions
    assert first.tables[MIXED].rows == 4
    assert first.tables["edge.types_zoo"].rows == 4
    assert first.tables['edge."it\'s a ""quoted"" table"'].rows == 2
    assert first.tables["edge.empty_table"] == RelationContent(0, None)
    # Inheritance: FROM ONLY keeps the parent's rows apart from the child's.
    assert (first.tables["edge.vehicles"].rows, first.tables["edge.cars"].rows) == (2, 3)
    assert "edge.measurements" not in first.tables  # partitioned parent: rows live in leaves
    leaves = ["eu", "us_2023", "us_2024", "other"]
    assert all(first.tables[f"edge.measurements_{leaf}"].rows > 0 for leaf in leaves)
    assert sum(first.tables[f"edge.measurements_{leaf}"].rows for leaf in leaves) == 300
    assert first.unlogged_tables == {"edge.session_cache"}
    assert first.materialized_views["edge.never_refreshed"] is None
    totals = first.materialized_views["edge.measurement_totals"]
    assert totals is not None and totals.rows == 3

    assert first.sequences["edge.counter_seq"] == SequenceState(1_000_000, True)
    assert first.sequences["edge.fresh_seq"] == SequenceState(42, False)
    assert first.sequences["edge.countdown_seq"] == SequenceState(-500, True)
    assert first.sequences['"Ünïcødé Schema"."Sëquence"'] == SequenceState(7, True)
    assert first.sequences["edge.types_zoo_id_seq"] == SequenceState(4, True)

    big = b"".join(hashlib.md5(str(i).encode()).digest() for i in range(1, 100_001))
    assert len(big) > 1_000_000
    assert first.large_objects == {
        EDGE_CASE_LARGE_OBJECTS[0]: hashlib.md5(b"hello large object").hexdigest(),
        EDGE_CASE_LARGE_OBJECTS[1]: hashlib.md5(big).hexdigest(),
        EDGE_CASE_LARGE_OBJECTS[2]: hashlib.md5(b"").hexdigest(),
        EDGE_CASE_LARGE_OBJECTS[3]: hashlib.md5(bytes(range(256)) * 2).hexdigest(),
    }
    assert first.large_object_owners[EDGE_CASE_LARGE_OBJECTS[0]] == "pgbf_owner"
    assert first.large_object_privileges[EDGE_CASE_LARGE_OBJECTS[1]] == (
        "+pgbf_reader=SELECT/postgres"
    )
    assert first.large_object_privileges[EDGE_CASE_LARGE_OBJECTS[3]] == ""

    assert first.comments["schema edge"] == "Edge cases for backup round trips"
    assert first.comments[f'table column {MIXED}."Ключ"'] == "ключ = key"
    assert first.comments[f"large object {EDGE_CASE_LARGE_OBJECTS[2]}"] == ("an empty large object")
    assert first.comments["extension citext"]  # extension comment kept, members' left out
    assert not any("ext.citext" in key for key in first.comments)

    assert first.owners["edge.owned_elsewhere"] == "pgbf_owner"
    assert first.owners["edge.types_zoo"] == "postgres"
    assert first.privileges["edge.types_zoo"] == "+pgbf_reader=SELECT/postgres"
    assert first.privileges["edge.empty_table"] == ""
    assert first.privileges[MIXED] == (
        "+pgbf_reader=INSERT/postgres, +pgbf_reader=SELECT/postgres, +pgbf_reader=UPDATE/postgres"
    )
    # Granted by a superuser, so recorded as granted by the owner.
    assert first.privileges["edge.owned_elsewhere"] == "+pgbf_reader=SELECT/pgbf_owner"
    assert first.column_privileges[f'{MIXED}."Ключ"'] == "+PUBLIC=SELECT/postgres"
    assert first.column_privileges[f'{MIXED}."UPPER"'] == "+PUBLIC=SELECT/postgres"
    assert first.schema_privileges["edge"] == "+pgbf_reader=USAGE/postgres"
    assert first.schema_privileges["ext"] == ""


def test_edge_case_database_is_deterministic(pg_database: PgDatabase) -> None:
    with pg_database.connect() as conn:
        load_edge_case_database(conn)
        first = database_fingerprint(conn)
    # The second load also finds the cluster-wide roles already there.
    with scratch_database(pg_database.server) as conn:
        load_edge_case_database(conn)
        second = database_fingerprint(conn)
    assert diff_fingerprints(first, second) == []


@pytest.mark.parametrize(
    ("change", "expected", "count"),
    [
        pytest.param(
            f"""UPDATE {MIXED} SET "UPPER" = 'Z' WHERE "Ключ" = 4""",
            f"table {MIXED}: 4 rows, md5 ",
            1,
            id="row",
        ),
        pytest.param(
            "SELECT setval('edge.fresh_seq', 43)",
            "sequence edge.fresh_seq: last_value 42, is_called False -> "
            "last_value 43, is_called True",
            1,
            id="setval",
        ),
        pytest.param(
            f"SELECT lo_put({EDGE_CASE_LARGE_OBJECTS[1]}, 1000, '\\xff')",
            f"large object {EDGE_CASE_LARGE_OBJECTS[1]}: ",
            1,
            id="lo_put",
        ),
        pytest.param(
            "COMMENT ON TABLE edge.types_zoo IS 'changed'",
            "comment on table edge.types_zoo: 'One column per interesting type' -> 'changed'",
            1,
            id="comment",
        ),
        pytest.param(
            "COMMENT ON COLUMN edge.types_zoo.doubled IS NULL",
            "comment on table column edge.types_zoo.doubled: only in a",
            1,
            id="comment-dropped",
        ),
        pytest.param(
            "REVOKE SELECT ON edge.types_zoo FROM pgbf_reader",
            "privileges of edge.types_zoo: '+pgbf_reader=SELECT/postgres' -> (default)",
            1,
            id="revoke",
        ),
        pytest.param(
            "REVOKE TRUNCATE ON edge.empty_table FROM postgres",
            "privileges of edge.empty_table: (default) -> '-postgres=TRUNCATE/postgres'",
            1,
            id="revoke-default",
        ),
        pytest.param(
            'REVOKE SELECT ("UPPER") ON "Ünïcødé Schema"."Mixed Case Table" FROM PUBLIC',
            f'privileges of column {MIXED}."UPPER": only in a',
            1,
            id="column-revoke",
        ),
        pytest.param(
            "ALTER TABLE edge.empty_table OWNER TO pgbf_owner",
            "owner of edge.empty_table: 'postgres' -> 'pgbf_owner'",
            1,
            id="owner",
        ),
        pytest.param(
            "DROP TABLE edge.empty_table",
            "table edge.empty_table: only in a",
            3,
            id="drop",
        ),
        pytest.param(
            "CREATE SCHEMA extra",
            "schema extra: only in b",
            2,
            id="schema",
        ),
        pytest.param(
            "CREATE EXTENSION hstore SCHEMA ext",
            "extension hstore: only in b",
            2,
            id="extension",
        ),
        pytest.param(
            "REFRESH MATERIALIZED VIEW edge.never_refreshed",
            "materialized view edge.never_refreshed: not populated -> 5 rows, md5 ",
            1,
            id="matview",
        ),
    ],
)
def test_change_shows_in_diff(
    pg_database: PgDatabase, change: str, expected: str, count: int
) -> None:
    with pg_database.connect() as conn:
        load_edge_case_database(conn)
        before = database_fingerprint(conn)
        conn.execute(change)
        after = database_fingerprint(conn)
    problems = diff_fingerprints(before, after)
    assert [p for p in problems if p.startswith(expected)] != [], problems
    assert len(problems) == count, problems


def test_diff_options_for_physical_restores(pg_database: PgDatabase) -> None:
    with pg_database.connect() as conn:
        load_edge_case_database(conn)
        before = database_fingerprint(conn)
        conn.execute("UPDATE edge.session_cache SET value = '{}' WHERE key = 'session:1'")
        conn.execute("SELECT nextval('edge.counter_seq')")
        after = database_fingerprint(conn)

    assert diff_fingerprints(before, after) == [
        f"table edge.session_cache: {before.tables['edge.session_cache']} -> "
        f"{after.tables['edge.session_cache']}",
        "sequence edge.counter_seq: last_value 1000000, is_called True -> "
        "last_value 1000001, is_called True",
    ]
    assert diff_fingerprints(before, after, ignore_unlogged_data=True, sequence_slack=32) == []
    # The options relax contents only: a missing table is still reported.
    trimmed = dataclasses.replace(
        after, tables={k: v for k, v in after.tables.items() if k != "edge.session_cache"}
    )
    assert diff_fingerprints(before, trimmed, ignore_unlogged_data=True, sequence_slack=32) == [
        f"table edge.session_cache: only in a ({before.tables['edge.session_cache']})"
    ]


def test_edge_case_load_refuses_a_non_empty_database(pg_database: PgDatabase) -> None:
    with pg_database.connect() as conn:
        conn.execute('CREATE SCHEMA "CamelSchema"')
        with pytest.raises(DatabaseError, match=r"already has schema\(s\) CamelSchema;"):
            load_edge_case_database(conn)
        # One transaction: nothing of the failed load stays behind.
        assert scalar(conn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'edge'") == 0


# -- demo database -----------------------------------------------------------------------


def test_small_demo_database_loads(pg_database: PgDatabase) -> None:
    with pg_database.connect() as conn:
        load_demo_database(conn, scale=0.02)
        counts = table_row_counts(conn)
        events = scalar(conn, "SELECT count(*) FROM analytics.events")
        orders = scalar(conn, "SELECT count(*) FROM shop.orders")
        next_order = scalar(conn, "SELECT nextval(pg_get_serial_sequence('shop.orders', 'id'))")
    expected = demo_row_counts(0.02)
    assert {k: v for k, v in counts.items() if not k.startswith("analytics.")} == {
        k: v for k, v in expected.items() if k != "analytics.events"
    }
    assert sum(counts[p] for p in DEMO_PARTITIONS) == events == expected["analytics.events"]
    # Identity sequences continue after the explicitly inserted ids.
    assert next_order == orders + 1


def test_demo_load_rejects_bad_scale_and_used_database(pg_database: PgDatabase) -> None:
    with pg_database.connect() as conn:
        with pytest.raises(ConfigError, match="scale 0 must be a positive number"):
            load_demo_database(conn, scale=0)
        conn.execute("CREATE SCHEMA billing")
        with pytest.raises(DatabaseError, match=r"already has schema\(s\) billing;"):
            load_demo_database(conn, scale=0.01)


@pytest.fixture(scope="module")
def demo_server(pg_servers: PgServers) -> EphemeralCluster:
    return pg_servers(DEMO_MAJOR)


def timed(load: Callable[[], None]) -> float:
    started = time.monotonic()
    load()
    return time.monotonic() - started


def test_demo_database_full_scale(demo_server: EphemeralCluster) -> None:
    with scratch_database(demo_server) as one, scratch_database(demo_server) as two:
        seconds = timed(lambda: load_demo_database(one))
        print(f"\ndemo database load on PostgreSQL {DEMO_MAJOR}: {seconds:.2f} s")
        load_demo_database(two)
        first = database_fingerprint(one)
        second = database_fingerprint(two)
        by_month = one.execute(
            "SELECT tableoid::regclass::text, min(occurred_at), max(occurred_at), count(*) "
            "FROM analytics.events GROUP BY 1 ORDER BY 1"
        ).fetchall()
        foreign_keys = scalar(
            one, "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conparentid = 0"
        )
        views = scalar(
            one, "SELECT count(*) FROM pg_views WHERE schemaname IN ('shop', 'analytics')"
        )
        revenue = scalar(one, "SELECT sum(revenue) FROM analytics.daily_revenue")
        paid = scalar(one, "SELECT sum(amount) FROM billing.payments")
        unpaid = scalar(
            one,
            "SELECT sum(total) FROM billing.invoices v "
            "WHERE NOT EXISTS (SELECT FROM billing.payments p WHERE p.invoice_id = v.id)",
        )

    expected = demo_row_counts()
    assert expected == {
        "shop.customers": 20_000,
        "shop.products": 500,
        "shop.orders": 100_000,
        "shop.order_items": 250_000,
        "billing.invoices": 60_000,
        "billing.payments": 55_200,
        "analytics.events": 150_000,
    }
    for key, rows in expected.items():
        if key != "analytics.events":
            assert first.tables[key].rows == rows, key
    assert sum(first.tables[p].rows for p in DEMO_PARTITIONS) == expected["analytics.events"]
    # Spread: every month partition and the default get a fair share.
    assert [row[0] for row in by_month] == DEMO_PARTITIONS
    assert all(15_000 < row[3] < 30_000 for row in by_month[:6])
    assert 5_000 < by_month[6][3] < 15_000
    # Only July, beyond the monthly ranges, is in DEFAULT.
    assert by_month[6][1] >= datetime(2024, 7, 1, tzinfo=UTC)
    assert (foreign_keys, views) == (6, 2)
    # Payments, split ones included, add up to what was invoiced minus the unpaid invoices.
    assert paid == revenue - unpaid
    assert diff_fingerprints(first, second) == []
