"""Sample databases: a realistic demo shop and a catalogue of backup edge cases.

Both loaders expect an EMPTY database (a fresh ``CREATE DATABASE``): they create fixed
schema names and fail on the first one that already exists, and they create nothing if
they fail, since each load runs in one transaction. Content is deterministic (derived from
series indexes, never ``random()``), so two loads give identical data; only object ids of
rows in the system catalogs differ. The SQL sticks to PostgreSQL 14 syntax.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from pgbackflow.tasks.errors import ConfigError, DatabaseError

__all__ = [
    "DEMO_SCHEMAS",
    "EDGE_CASE_LARGE_OBJECTS",
    "EDGE_CASE_ROLES",
    "EDGE_CASE_SCHEMAS",
    "demo_row_counts",
    "load_demo_database",
    "load_edge_case_database",
]

DEMO_SCHEMAS = ("shop", "billing", "analytics")
EDGE_CASE_SCHEMAS = ("edge", "Ünïcødé Schema", "CamelSchema", "ext")
# Cluster-wide roles the edge-case database grants to and hands ownership to.
EDGE_CASE_ROLES = ("pgbf_reader", "pgbf_owner")
# Fixed ids, so two loads have the same large objects (pg_dump keeps the ids too).
EDGE_CASE_LARGE_OBJECTS = (424201, 424202, 424203, 424204)

_CUSTOMERS = 20_000
_PRODUCTS = 500
_ORDERS = 100_000
_EVENTS = 150_000
# Events span 2024-01-01 .. 2024-07-14: Jan-Jun get a partition each, July lands in DEFAULT.
_EVENT_SPAN_S = 196 * 86_400


def demo_row_counts(scale: float = 1.0) -> dict[str, int]:
    """Rows per table that :func:`load_demo_database` creates at ``scale``.

    Keys use the ``schema.table`` form of ``format('%I.%I', ...)``; the partitioned
    ``analytics.events`` is listed as a whole (its partitions hold the rows).
    """
    customers, products, orders, events = _demo_sizes(scale)
    # Order o has 1 + o % 4 lines.
    items = sum(1 + o % 4 for o in range(1, orders + 1))
    # Orders with status index 0 (pending) or 4 (cancelled) get no invoice; see _DEMO_DATA.
    invoiced = sum(1 for o in range(1, orders + 1) if (o * 7) % 5 not in (0, 4))
    # Every invoice but each tenth is paid; those with id % 50 == 7 in two instalments.
    payments = sum(1 + (i % 50 == 7) for i in range(1, invoiced + 1) if i % 10 != 0)
    return {
        "shop.customers": customers,
        "shop.products": products,
        "shop.orders": orders,
        "shop.order_items": items,
        "billing.invoices": invoiced,
        "billing.payments": payments,
        "analytics.events": events,
    }


def load_demo_database(conn: psycopg.Connection[Any], *, scale: float = 1.0) -> None:
    """Create the demo shop (schemas ``shop``, ``billing``, ``analytics``) in an empty database.

    At scale 1: 20k customers, 100k orders, 250k order items, 60k invoices, 55k payments
    and 150k events in a monthly range-partitioned table, plus an enum, jsonb columns,
    foreign keys, indexes and views. Loads in one transaction.

    Args:
        conn: Connection to the empty target database, as a role that may create schemas.
        scale: Multiplies the row counts (at least one row per table).

    Raises:
        ConfigError: ``scale`` is not positive.
        DatabaseError: The database is not empty or the server refused a statement.
    """
    if not scale > 0:
        raise ConfigError(f"demo data scale {scale!r} must be a positive number, e.g. 1 or 0.1")
    customers, products, orders, events = _demo_sizes(scale)
    params = {
        "customers": customers,
        "products": products,
        "orders": orders,
        "events": events,
        "event_span_s": _EVENT_SPAN_S,
    }
    with _loading(conn, "demo", DEMO_SCHEMAS) as cur:
        # Index builds and FK validation after the bulk insert are faster with more memory.
        cur.execute("SET LOCAL maintenance_work_mem = '128MB'")
        cur.execute(_DEMO_DDL)
        sizes = {name: sql.Literal(value) for name, value in params.items()}
        for statement in _DEMO_DATA:
            cur.execute(sql.SQL(statement).format(**sizes))
        cur.execute(_DEMO_CONSTRAINTS)


def load_edge_case_database(conn: psycopg.Connection[Any]) -> None:
    """Create, in an empty database, the objects a backup round trip must preserve.

    Schemas with quoted, mixed-case and unicode names; large objects (one > 1 MB, one
    empty); sequences at advanced values (one with ``is_called = false``); identity and
    generated columns; a domain; the ``citext`` extension in its own schema; populated and
    unpopulated materialized views; list partitions with a sub-partitioned partition and a
    default; table inheritance; an unlogged table; comments; grants to ``pgbf_reader``; a
    table owned by ``pgbf_owner``; views; an empty table; NULLs, bytea, long text, precise
    numerics, special float/timestamp values and arrays.

    The two roles are cluster-wide: they are created only if missing and never dropped.

    Args:
        conn: Superuser connection to the empty target database.

    Raises:
        DatabaseError: The database is not empty or the server refused a statement.
    """
    with _loading(conn, "edge-case", EDGE_CASE_SCHEMAS) as cur:
        cur.execute(_EDGE_ROLES)
        cur.execute(_EDGE_DDL)
        cur.execute(_EDGE_DATA)
        for loid, data_sql in zip(EDGE_CASE_LARGE_OBJECTS, _EDGE_LARGE_OBJECT_DATA, strict=True):
            cur.execute(
                sql.SQL("SELECT lo_from_bytea({}, {})").format(sql.Literal(loid), sql.SQL(data_sql))
            )
        cur.execute(
            sql.SQL(_EDGE_FINISH).format(
                lo_owned=sql.Literal(EDGE_CASE_LARGE_OBJECTS[0]),
                lo_granted=sql.Literal(EDGE_CASE_LARGE_OBJECTS[1]),
                lo_commented=sql.Literal(EDGE_CASE_LARGE_OBJECTS[2]),
            )
        )


# -- internals -----------------------------------------------------------------------


def _demo_sizes(scale: float) -> tuple[int, int, int, int]:
    def scaled(n: int) -> int:
        return max(1, round(n * scale))

    return scaled(_CUSTOMERS), scaled(_PRODUCTS), scaled(_ORDERS), scaled(_EVENTS)


@contextmanager
def _loading(
    conn: psycopg.Connection[Any], what: str, schemas: Sequence[str]
) -> Iterator[psycopg.Cursor[tuple[Any, ...]]]:
    """One transaction around a load: refuse a non-empty database, make errors one-liners."""
    dbname = conn.info.dbname
    try:
        with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            cur.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s) ORDER BY 1",
                [list(schemas)],
            )
            taken = [str(row[0]) for row in cur.fetchall()]
            if taken:
                raise DatabaseError(
                    f"database {dbname!r} already has schema(s) {', '.join(taken)}; "
                    f"load the {what} data into a new, empty database"
                )
            yield cur
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseError(
            f"loading the {what} data into database {dbname!r} failed ({reason}); nothing was "
            "created: check that the database is empty and the role may create schemas"
        ) from exc


_DEMO_DDL = """
CREATE SCHEMA shop;
CREATE SCHEMA billing;
CREATE SCHEMA analytics;
COMMENT ON SCHEMA shop IS 'Customers, products and orders of the demo shop';

CREATE TYPE shop.order_status AS ENUM ('pending', 'paid', 'shipped', 'delivered', 'cancelled');

CREATE TABLE shop.customers (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    email       text NOT NULL,
    full_name   text NOT NULL,
    country     char(2) NOT NULL,
    created_at  timestamptz NOT NULL,
    profile     jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE shop.products (
    id          integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    sku         text NOT NULL,
    name        text NOT NULL,
    category    text NOT NULL,
    price       numeric(10,2) NOT NULL CHECK (price > 0),
    attributes  jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE shop.orders (
    id               bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    customer_id      bigint NOT NULL,
    status           shop.order_status NOT NULL,
    ordered_at       timestamptz NOT NULL,
    shipping_address jsonb
);
CREATE TABLE shop.order_items (
    order_id    bigint NOT NULL,
    line_no     integer NOT NULL,
    product_id  integer NOT NULL,
    quantity    integer NOT NULL CHECK (quantity > 0),
    unit_price  numeric(10,2) NOT NULL,
    PRIMARY KEY (order_id, line_no)
);
CREATE TABLE billing.invoices (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    order_id    bigint NOT NULL,
    issued_at   timestamptz NOT NULL,
    total       numeric(12,2) NOT NULL,
    currency    char(3) NOT NULL DEFAULT 'EUR'
);
CREATE TABLE billing.payments (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    invoice_id  bigint NOT NULL,
    paid_at     timestamptz NOT NULL,
    amount      numeric(12,2) NOT NULL,
    method      text NOT NULL
);
CREATE TABLE analytics.events (
    event_id     bigint NOT NULL,
    occurred_at  timestamptz NOT NULL,
    customer_id  bigint,
    kind         text NOT NULL,
    payload      jsonb NOT NULL,
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE TABLE analytics.events_2024_01 PARTITION OF analytics.events
    FOR VALUES FROM ('2024-01-01 00:00:00+00') TO ('2024-02-01 00:00:00+00');
CREATE TABLE analytics.events_2024_02 PARTITION OF analytics.events
    FOR VALUES FROM ('2024-02-01 00:00:00+00') TO ('2024-03-01 00:00:00+00');
CREATE TABLE analytics.events_2024_03 PARTITION OF analytics.events
    FOR VALUES FROM ('2024-03-01 00:00:00+00') TO ('2024-04-01 00:00:00+00');
CREATE TABLE analytics.events_2024_04 PARTITION OF analytics.events
    FOR VALUES FROM ('2024-04-01 00:00:00+00') TO ('2024-05-01 00:00:00+00');
CREATE TABLE analytics.events_2024_05 PARTITION OF analytics.events
    FOR VALUES FROM ('2024-05-01 00:00:00+00') TO ('2024-06-01 00:00:00+00');
CREATE TABLE analytics.events_2024_06 PARTITION OF analytics.events
    FOR VALUES FROM ('2024-06-01 00:00:00+00') TO ('2024-07-01 00:00:00+00');
CREATE TABLE analytics.events_default PARTITION OF analytics.events DEFAULT;
"""

# Every value derives from the series index; timestamps carry explicit UTC offsets so the
# session time zone cannot change them.
_DEMO_DATA = (
    """
    INSERT INTO shop.customers (id, email, full_name, country, created_at, profile)
    SELECT i,
           format('customer%s@example.%s', i, (ARRAY['com','org','net','de','fr'])[1 + i % 5]),
           (ARRAY['Ada','Alan','Barbara','Edsger','Grace','Ken','Linus','Margaret','Niklaus',
                  'Radia'])[1 + i % 10]
             || ' ' ||
           (ARRAY['Lovelace','Turing','Liskov','Dijkstra','Hopper','Thompson','Torvalds',
                  'Hamilton','Wirth','Perlman','Knuth','Ritchie','Stonebraker'])[1 + (i / 10) % 13],
           (ARRAY['DE','FR','US','GB','NL','SE','JP','BR','IN','PL'])[1 + (i * 7) % 10],
           timestamptz '2022-01-01 00:00:00+00' + (i * 3917) * interval '1 second',
           jsonb_build_object(
               'newsletter', i % 3 = 0,
               'tier', (ARRAY['bronze','silver','gold'])[1 + i % 3],
               'tags', to_jsonb(ARRAY['t' || (i % 17), 't' || (i % 29)]),
               'visits', i % 211)
    FROM generate_series(1, {customers}) AS i
    """,
    """
    INSERT INTO shop.products (id, sku, name, category, price, attributes)
    SELECT i,
           format('SKU-%s', lpad(i::text, 6, '0')),
           initcap((ARRAY['red','blue','green','black','white','silver'])[1 + i % 6]) || ' '
             || (ARRAY['mug','lamp','chair','desk','shelf','kettle','clock','rug'])[1 + i % 8]
             || ' #' || i,
           (ARRAY['kitchen','lighting','furniture','office','decor'])[1 + i % 5],
           round((4.99 + (i * 37 % 1000) / 3.0)::numeric, 2),
           jsonb_build_object('weight_g', 100 + i * 13 % 5000, 'fragile', i % 4 = 0)
    FROM generate_series(1, {products}) AS i
    """,
    """
    INSERT INTO shop.orders (id, customer_id, status, ordered_at, shipping_address)
    SELECT i,
           1 + (i::bigint * 7919) % {customers},
           (enum_range(NULL::shop.order_status))[1 + (i * 7) % 5],
           timestamptz '2023-01-01 00:00:00+00' + (i * 571) * interval '1 second',
           CASE WHEN i % 9 = 0 THEN NULL ELSE jsonb_build_object(
               'street', (i % 400 + 1) || ' Main Street',
               'city', (ARRAY['Berlin','Paris','Austin','Leeds','Osaka','Lyon'])[1 + i % 6],
               'zip', lpad((i * 31 % 100000)::text, 5, '0'))
           END
    FROM generate_series(1, {orders}) AS i
    """,
    """
    INSERT INTO shop.order_items (order_id, line_no, product_id, quantity, unit_price)
    SELECT o.i, l, p.id, 1 + (o.i + l) % 5, p.price
    FROM generate_series(1, {orders}) AS o(i)
    CROSS JOIN LATERAL generate_series(1, 1 + o.i % 4) AS l
    JOIN shop.products p ON p.id = 1 + (o.i * 31 + l * 17) % {products}
    """,
    # Pending (index 1) and cancelled (index 5) orders are not invoiced.
    """
    INSERT INTO billing.invoices (id, order_id, issued_at, total, currency)
    SELECT row_number() OVER (ORDER BY o.id), o.id, o.ordered_at + interval '1 hour',
           t.total, CASE WHEN o.id % 11 = 0 THEN 'USD' ELSE 'EUR' END
    FROM shop.orders o
    JOIN (SELECT order_id, sum(quantity * unit_price) AS total
          FROM shop.order_items GROUP BY order_id) t ON t.order_id = o.id
    WHERE o.status NOT IN ('pending', 'cancelled')
    """,
    # Each tenth invoice is unpaid; those with id % 50 = 7 are paid in two instalments.
    """
    INSERT INTO billing.payments (id, invoice_id, paid_at, amount, method)
    SELECT row_number() OVER (ORDER BY v.id, part), v.id,
           v.issued_at + part * interval '2 days',
           CASE WHEN v.id % 50 = 7 THEN round(v.total / 2, 2) + (part - 1)
                                        * (v.total - 2 * round(v.total / 2, 2))
                ELSE v.total END,
           (ARRAY['card','transfer','paypal','invoice'])[1 + v.id % 4]
    FROM billing.invoices v
    CROSS JOIN LATERAL generate_series(1, CASE WHEN v.id % 50 = 7 THEN 2 ELSE 1 END) AS part
    WHERE v.id % 10 <> 0
    """,
    """
    INSERT INTO analytics.events (event_id, occurred_at, customer_id, kind, payload)
    SELECT i,
           timestamptz '2024-01-01 00:00:00+00'
             + ((i - 1)::bigint * {event_span_s} / {events}) * interval '1 second',
           CASE WHEN i % 13 = 0 THEN NULL ELSE 1 + (i::bigint * 104729) % {customers} END,
           (ARRAY['page_view','search','add_to_cart','checkout','login'])[1 + (i * 3) % 5],
           jsonb_build_object(
               'path', '/p/' || (i % 500),
               'ms', i % 997,
               'ua', (ARRAY['firefox','chrome','safari'])[1 + i % 3],
               'ab', jsonb_build_array(i % 2, i % 3))
    FROM generate_series(1, {events}) AS i
    """,
)

_DEMO_CONSTRAINTS = """
SELECT setval(pg_get_serial_sequence('shop.customers', 'id'), max(id)) FROM shop.customers;
SELECT setval(pg_get_serial_sequence('shop.products', 'id'), max(id)) FROM shop.products;
SELECT setval(pg_get_serial_sequence('shop.orders', 'id'), max(id)) FROM shop.orders;
SELECT setval(pg_get_serial_sequence('billing.invoices', 'id'), max(id)) FROM billing.invoices;
SELECT setval(pg_get_serial_sequence('billing.payments', 'id'), max(id)) FROM billing.payments;

CREATE UNIQUE INDEX customers_email_key ON shop.customers (lower(email));
CREATE INDEX customers_profile_idx ON shop.customers USING gin (profile jsonb_path_ops);
CREATE UNIQUE INDEX products_sku_key ON shop.products (sku);
CREATE INDEX orders_customer_idx ON shop.orders (customer_id);
CREATE INDEX orders_ordered_at_idx ON shop.orders (ordered_at);
CREATE INDEX order_items_product_idx ON shop.order_items (product_id);
CREATE UNIQUE INDEX invoices_order_key ON billing.invoices (order_id);
CREATE INDEX payments_invoice_idx ON billing.payments (invoice_id);
CREATE INDEX events_customer_idx ON analytics.events (customer_id);
CREATE INDEX events_kind_time_idx ON analytics.events (kind, occurred_at);

ALTER TABLE shop.orders ADD CONSTRAINT orders_customer_fk
    FOREIGN KEY (customer_id) REFERENCES shop.customers (id);
ALTER TABLE shop.order_items ADD CONSTRAINT order_items_order_fk
    FOREIGN KEY (order_id) REFERENCES shop.orders (id) ON DELETE CASCADE;
ALTER TABLE shop.order_items ADD CONSTRAINT order_items_product_fk
    FOREIGN KEY (product_id) REFERENCES shop.products (id);
ALTER TABLE billing.invoices ADD CONSTRAINT invoices_order_fk
    FOREIGN KEY (order_id) REFERENCES shop.orders (id);
ALTER TABLE billing.payments ADD CONSTRAINT payments_invoice_fk
    FOREIGN KEY (invoice_id) REFERENCES billing.invoices (id);
ALTER TABLE analytics.events ADD CONSTRAINT events_customer_fk
    FOREIGN KEY (customer_id) REFERENCES shop.customers (id);

CREATE VIEW shop.customer_orders AS
SELECT c.id AS customer_id, c.email, count(o.id) AS orders, max(o.ordered_at) AS last_order
FROM shop.customers c LEFT JOIN shop.orders o ON o.customer_id = c.id
GROUP BY c.id, c.email;

CREATE VIEW analytics.daily_revenue AS
SELECT date_trunc('day', v.issued_at AT TIME ZONE 'UTC') AS day, v.currency,
       count(*) AS invoices, sum(v.total) AS revenue
FROM billing.invoices v
GROUP BY 1, 2;

COMMENT ON TABLE analytics.events IS 'Click stream, one partition per month';
COMMENT ON COLUMN shop.orders.shipping_address IS 'NULL for digital goods';
"""

# Concurrent loads on one server may race to create the roles; losing the race is fine.
_EDGE_ROLES = """
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['pgbf_reader', 'pgbf_owner'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$roles$;
"""

_EDGE_DDL = """
CREATE SCHEMA edge;
CREATE SCHEMA "Ünïcødé Schema";
CREATE SCHEMA "CamelSchema";
CREATE SCHEMA ext;
CREATE EXTENSION citext SCHEMA ext;

CREATE DOMAIN edge.positive_amount AS numeric(12,2) CHECK (VALUE > 0);
CREATE TYPE edge.mood AS ENUM ('sad', 'ok', 'happy');

CREATE TABLE "Ünïcødé Schema"."Mixed Case Table" (
    "Ключ"                          integer PRIMARY KEY,
    "col with space and ""quote"" in it" text,
    "UPPER"                         text NOT NULL
);

CREATE TABLE edge.types_zoo (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ref         integer REFERENCES "Ünïcødé Schema"."Mixed Case Table" ("Ключ"),
    qty         numeric(20,6),
    unbounded   numeric,
    doubled     numeric GENERATED ALWAYS AS (qty * 2) STORED,
    amount      edge.positive_amount,
    ratio       double precision,
    at          timestamptz,
    day         date,
    span        interval,
    ints        integer[],
    words       text[],
    grid        integer[][],
    blob        bytea,
    doc         jsonb,
    email       ext.citext,
    mood        edge.mood,
    addr        inet,
    uid         uuid,
    flag        boolean,
    note        text
);
CREATE INDEX types_zoo_email_idx ON edge.types_zoo (email);

CREATE TABLE edge."it's a ""quoted"" table" (id integer PRIMARY KEY, "select" text);

CREATE TABLE "CamelSchema"."OrderLines" ("LineId" bigserial PRIMARY KEY, "Qty" smallint);

CREATE SEQUENCE edge.counter_seq;
CREATE SEQUENCE edge.fresh_seq;
CREATE SEQUENCE edge.countdown_seq INCREMENT BY -5 MINVALUE -1000 MAXVALUE 0 START 0;
CREATE SEQUENCE "Ünïcødé Schema"."Sëquence" START 7;

CREATE TABLE edge.measurements (
    region    text NOT NULL,
    taken_on  date NOT NULL,
    value     numeric(8,3)
) PARTITION BY LIST (region);
CREATE TABLE edge.measurements_eu PARTITION OF edge.measurements FOR VALUES IN ('eu');
CREATE TABLE edge.measurements_us PARTITION OF edge.measurements FOR VALUES IN ('us')
    PARTITION BY RANGE (taken_on);
CREATE TABLE edge.measurements_us_2023 PARTITION OF edge.measurements_us
    FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE edge.measurements_us_2024 PARTITION OF edge.measurements_us
    FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE edge.measurements_other PARTITION OF edge.measurements DEFAULT;

CREATE TABLE edge.vehicles (id integer PRIMARY KEY, wheels smallint NOT NULL);
CREATE TABLE edge.cars (doors smallint NOT NULL) INHERITS (edge.vehicles);

CREATE UNLOGGED TABLE edge.session_cache (key text PRIMARY KEY, value jsonb);

CREATE TABLE edge.empty_table (id integer PRIMARY KEY, payload text);

CREATE TABLE edge.owned_elsewhere (
    id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    label text
);
"""

_EDGE_DATA = r"""
INSERT INTO "Ünïcødé Schema"."Mixed Case Table" VALUES
    (1, 'plain', 'A'),
    (2, E'tab\there, newline\nthere, backslash \\ and ''quote''', 'B'),
    (3, NULL, 'C'),
    (4, 'émoji 🐘 and 日本語', 'D');

INSERT INTO edge.types_zoo (ref, qty, unbounded, amount, ratio, at, day, span, ints, words,
                            grid, blob, doc, email, mood, addr, uid, flag, note)
VALUES
    (1, 12345678901234.123456, 3.14159265358979323846264338327950288419716939937510,
     0.01, 1e-300, '2024-02-29 23:59:59.999999+00', '2024-02-29', '1 year 2 mons 3 days 04:05:06',
     '{1,2,3}', '{"a","b c","d\"e",NULL}', '{{1,2},{3,4}}', '\x00ff10',
     '{"k": [1, 2, {"n": null}]}',
     'Mixed@Example.COM', 'happy', '192.168.0.1/24', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', true,
     'short'),
    (NULL, -0.000001, 'NaN', 99999999.99, 'NaN', 'infinity', '-infinity', '-1 day', '{}', '{}',
     NULL, '', '[]', NULL, 'sad', '::1', NULL, false, ''),
    (3, NULL, NULL, NULL, '-Infinity', '-infinity', 'infinity', NULL, NULL, NULL, NULL, NULL,
     'null', NULL, NULL, NULL, NULL, NULL, NULL),
    (4, 1, 1e100, 1, -0.0, '1999-12-31 23:00:00-05', '0001-01-01', '0', '{-2147483648}',
     '{"ünï"}', NULL, (SELECT string_agg(decode(md5(i::text), 'hex'), '' ORDER BY i)
                       FROM generate_series(1, 2000) AS i),
     '{"deep": {"deeper": {"deepest": "🐘"}}}', 'ÜNÏ@example.org', 'ok', '10.0.0.0/8',
     md5('edge')::uuid, NULL,
     (SELECT string_agg(md5(i::text), ' ' ORDER BY i) FROM generate_series(1, 8000) AS i));

INSERT INTO edge."it's a ""quoted"" table" VALUES (1, 'reserved word column'), (2, NULL);
INSERT INTO "CamelSchema"."OrderLines" ("Qty") SELECT i FROM generate_series(1, 25) AS i;

SELECT setval('edge.counter_seq', 1000000);
SELECT setval('edge.fresh_seq', 42, false);
SELECT setval('edge.countdown_seq', -500);
SELECT nextval('"Ünïcødé Schema"."Sëquence"');

INSERT INTO edge.measurements
SELECT (ARRAY['eu', 'us', 'apac'])[1 + i % 3], date '2023-03-01' + i * 2, i * 1.125
FROM generate_series(1, 300) AS i;

INSERT INTO edge.vehicles VALUES (1, 2), (2, 18);
INSERT INTO edge.cars VALUES (10, 4, 5), (11, 4, 3), (12, 3, 2);

INSERT INTO edge.session_cache
SELECT 'session:' || i, jsonb_build_object('n', i) FROM generate_series(1, 50) AS i;

INSERT INTO edge.owned_elsewhere (label) VALUES ('first'), ('second'), (NULL);
ALTER TABLE edge.owned_elsewhere OWNER TO pgbf_owner;

CREATE VIEW edge.zoo_view AS
SELECT z.id, z.qty, m."UPPER" AS upper_label
FROM edge.types_zoo z LEFT JOIN "Ünïcødé Schema"."Mixed Case Table" m ON m."Ключ" = z.ref;

CREATE MATERIALIZED VIEW edge.measurement_totals AS
SELECT region, count(*) AS n, sum(value) AS total FROM edge.measurements GROUP BY region
WITH DATA;
CREATE MATERIALIZED VIEW edge.never_refreshed AS SELECT id FROM edge.vehicles WITH NO DATA;
"""

# Contents for EDGE_CASE_LARGE_OBJECTS, in order: small text, 1.6 MB of md5 bytes (poorly
# compressible, so it spans many pg_largeobject pages), empty, binary with every byte value.
_EDGE_LARGE_OBJECT_DATA = (
    "convert_to('hello large object', 'UTF8')",
    "(SELECT string_agg(decode(md5(i::text), 'hex'), '' ORDER BY i)"
    " FROM generate_series(1, 100000) AS i)",
    "''::bytea",
    "(SELECT string_agg(set_byte('\\x00'::bytea, 0, i % 256), '' ORDER BY i)"
    " FROM generate_series(0, 511) AS i)",
)

_EDGE_FINISH = """
ALTER LARGE OBJECT {lo_owned} OWNER TO pgbf_owner;
GRANT SELECT ON LARGE OBJECT {lo_granted} TO pgbf_reader;
COMMENT ON LARGE OBJECT {lo_commented} IS 'an empty large object';

GRANT USAGE ON SCHEMA edge, "Ünïcødé Schema" TO pgbf_reader;
GRANT SELECT ON edge.types_zoo, edge.zoo_view, edge.measurement_totals TO pgbf_reader;
GRANT SELECT, INSERT, UPDATE ON "Ünïcødé Schema"."Mixed Case Table" TO pgbf_reader;
GRANT SELECT ("Ключ", "UPPER") ON "Ünïcødé Schema"."Mixed Case Table" TO PUBLIC;
GRANT USAGE ON SEQUENCE edge.counter_seq TO pgbf_reader;
GRANT SELECT ON edge.owned_elsewhere TO pgbf_reader;

COMMENT ON SCHEMA edge IS 'Edge cases for backup round trips';
COMMENT ON SCHEMA "Ünïcødé Schema" IS 'Ünïcødé schema comment 🐘';
COMMENT ON TABLE edge.types_zoo IS 'One column per interesting type';
COMMENT ON COLUMN edge.types_zoo.doubled IS 'generated: qty * 2';
COMMENT ON COLUMN "Ünïcødé Schema"."Mixed Case Table"."Ключ" IS 'ключ = key';
COMMENT ON SEQUENCE edge.fresh_seq IS 'setval(42, false): next value is 42';
COMMENT ON MATERIALIZED VIEW edge.measurement_totals IS 'populated';
COMMENT ON DOMAIN edge.positive_amount IS 'strictly positive money';
"""
