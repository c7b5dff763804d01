"""Exact row counts, over one connection and over several, against a real server."""

from __future__ import annotations

from pgbackflow.tasks.database import ConnectionSettings
from pgbackflow.tasks.inventory import take_inventory, take_inventory_of_idle_database
from pgbackflow.tasks.sample_data import demo_row_counts, load_demo_database
from tests.fixtures.postgres import PgDatabase


def test_parallel_count_equals_the_single_connection_count(pg_database: PgDatabase) -> None:
    server = pg_database.server
    settings = ConnectionSettings(
        host=server.host, port=server.port, dbname=pg_database.name, user=server.superuser,
        password=server.password, sslmode="disable",
    )
    with pg_database.connect() as conn:
        load_demo_database(conn, scale=0.02)
        conn.execute('CREATE TABLE public."Empty ünïcode" (id int)')
        single = take_inventory(conn)
    expected = demo_row_counts(0.02)
    rows = single.rows_by_table()
    assert rows['public."Empty ünïcode"'] == 0
    # Partitions are counted one by one; their sum is the partitioned table's count.
    events = sum(n for name, n in rows.items() if name.startswith("analytics.events_"))
    assert events == expected["analytics.events"]
    for jobs in (1, 3):
        parallel = take_inventory_of_idle_database(settings, jobs)
        # The size is not: autovacuum's visibility and free-space maps of the new tables
        # grew the database between the two looks (seen on a slow host: +150 kB).
        assert (parallel.tables, parallel.schema_count) == (single.tables,
                                                            single.schema_count), jobs
        assert parallel.database_size > 0
        assert [t.key for t in parallel.tables] == [t.key for t in single.tables]
