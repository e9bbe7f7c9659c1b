"""CQL statement classification: query_action and query_table as Cilium's cassandra rules see them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cilia.l7parsers.cql_statement import Statement, StatementError, classify
from cilia.policy.l7.cassandra import QUERY_ACTIONS, TABLELESS_ACTIONS

# (statement, [(query_action, query_table)] with session keyspace "ks")
CASES = [
    # select / insert / update / delete
    ("SELECT * FROM system.local WHERE key='local'", [("select", "system.local")]),
    ("select * from t", [("select", "ks.t")]),
    ("SeLeCt a, b FROM Shop.Orders;", [("select", "shop.orders")]),
    ('SELECT "From" FROM "Shop"."Orders"', [("select", "Shop.Orders")]),
    ('SELECT * FROM "we""ird"', [("select", 'ks.we"ird')]),
    ("SELECT JSON * FROM ks2.t", [("select", "ks2.t")]),
    ("SELECT DISTINCT k FROM t WHERE k IN (1, 2)", [("select", "ks.t")]),
    ("SELECT count(*), writetime(v), CAST(x AS text) FROM a.b LIMIT 1", [("select", "a.b")]),
    ("SELECT 'FROM secret.t' FROM public.t", [("select", "public.t")]),
    ("SELECT $$ FROM secret.t $$ FROM public.t", [("select", "public.t")]),
    ("SELECT * FROM ks . t", [("select", "ks.t")]),
    ("SELECT * /* FROM secret.t */ FROM public.t", [("select", "public.t")]),
    ("-- FROM secret.t\nSELECT * FROM public.t", [("select", "public.t")]),
    ("// a comment\r\nSELECT * FROM public.t -- trailing", [("select", "public.t")]),
    ("SELECT * FROM t WHERE v = 'it''s' AND w = 0xCAFE AND u = 123e4567-e89b-12d3-a456-426614174000",
     [("select", "ks.t")]),
    ("SELECT * FROM t;;", [("select", "ks.t")]),
    ("INSERT INTO attendance.daily_records (a, b) VALUES (?, :b) IF NOT EXISTS",
     [("insert", "attendance.daily_records")]),
    ("insert into T JSON '{\"a\": 1}'", [("insert", "ks.t")]),
    ("UPDATE t USING TTL 10 SET m['k'] = 'v', l = l + [1] WHERE k = 1 IF EXISTS", [("update", "ks.t")]),
    ("UPDATE other.t SET c = c + 1 WHERE k = 1", [("update", "other.t")]),
    ("DELETE FROM ks2.t WHERE k = 1", [("delete", "ks2.t")]),
    ("DELETE m['from'], l[0] FROM t USING TIMESTAMP 5 WHERE k = 1", [("delete", "ks.t")]),
    # tables
    ("CREATE TABLE t (k int PRIMARY KEY)", [("create-table", "ks.t")]),
    ("CREATE TABLE IF NOT EXISTS shop.orders (k int PRIMARY KEY)", [("create-table", "shop.orders")]),
    ("create columnfamily cf (k int PRIMARY KEY)", [("create-table", "ks.cf")]),
    ("ALTER TABLE shop.orders ADD c text", [("alter-table", "shop.orders")]),
    ("ALTER TABLE IF EXISTS t WITH comment = 'x'", [("alter-table", "ks.t")]),
    ("DROP TABLE shop.orders", [("drop-table", "shop.orders")]),
    ("DROP TABLE IF EXISTS t", [("drop-table", "ks.t")]),
    ("DROP COLUMNFAMILY t", [("drop-table", "ks.t")]),
    ("TRUNCATE shop.orders", [("truncate-table", "shop.orders")]),
    ("TRUNCATE TABLE t", [("truncate-table", "ks.t")]),
    ("TRUNCATE COLUMNFAMILY a.b", [("truncate-table", "a.b")]),
    # keyspaces
    ("USE shop", [("use", "shop")]),
    ('USE "Shop";', [("use", "Shop")]),
    ("CREATE KEYSPACE k2 WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
     [("create-keyspace", "k2")]),
    ("CREATE KEYSPACE IF NOT EXISTS K2 WITH durable_writes = false", [("create-keyspace", "k2")]),
    ("CREATE SCHEMA k3 WITH x = 1", [("create-keyspace", "k3")]),
    ("ALTER KEYSPACE k2 WITH durable_writes = true", [("alter-keyspace", "k2")]),
    ("DROP KEYSPACE IF EXISTS k2", [("drop-keyspace", "k2")]),
    # no table in policy
    ("CREATE INDEX ON t (v)", [("create-index", "")]),
    ("CREATE INDEX IF NOT EXISTS i ON t (v)", [("create-index", "")]),
    ("CREATE CUSTOM INDEX i ON t (v) USING 'org.x.Y'", [("create-index", "")]),
    ("DROP INDEX IF EXISTS ks.i", [("drop-index", "")]),
    ("CREATE MATERIALIZED VIEW v AS SELECT * FROM t WHERE k IS NOT NULL PRIMARY KEY (k)",
     [("create-materialized-view", "")]),
    ("DROP MATERIALIZED VIEW v", [("drop-materialized-view", "")]),
    ("CREATE ROLE IF NOT EXISTS r WITH PASSWORD = 'p'", [("create-role", "")]),
    ("ALTER ROLE r WITH LOGIN = true", [("alter-role", "")]),
    ("DROP ROLE r", [("drop-role", "")]),
    ("GRANT r1 TO r2", [("grant-role", "")]),
    ("REVOKE r1 FROM r2", [("revoke-role", "")]),
    ("GRANT SELECT ON ALL KEYSPACES TO r", [("grant-permission", "")]),
    ("REVOKE MODIFY ON KEYSPACE ks FROM r", [("revoke-permission", "")]),
    ("LIST ROLES OF r NORECURSIVE", [("list-roles", "")]),
    ("LIST ALL PERMISSIONS OF r", [("list-permissions", "")]),
    ("LIST SELECT PERMISSION ON TABLE t", [("list-permissions", "")]),
    ("CREATE USER u WITH PASSWORD 'p' SUPERUSER", [("create-user", "")]),
    ("ALTER USER u WITH PASSWORD 'q'", [("alter-user", "")]),
    ("DROP USER u", [("drop-user", "")]),
    ("LIST USERS", [("list-users", "")]),
    ("CREATE OR REPLACE FUNCTION f (a int) CALLED ON NULL INPUT RETURNS int LANGUAGE java AS $$ return a; $$",
     [("create-function", "")]),
    ("CREATE FUNCTION IF NOT EXISTS f (a int) RETURNS NULL ON NULL INPUT RETURNS int LANGUAGE java AS 'return a;'",
     [("create-function", "")]),
    ("DROP FUNCTION f", [("drop-function", "")]),
    ("CREATE OR REPLACE AGGREGATE a (int) SFUNC f STYPE int", [("create-aggregate", "")]),
    ("DROP AGGREGATE a", [("drop-aggregate", "")]),
    ("CREATE TYPE address (street text)", [("create-type", "")]),
    ("ALTER TYPE address ADD zip text", [("alter-type", "")]),
    ("DROP TYPE address", [("drop-type", "")]),
    ("CREATE TRIGGER tr ON t USING 'org.x.T'", [("create-trigger", "")]),
    ("DROP TRIGGER tr ON t", [("drop-trigger", "")]),
    # batches in one query string
    ("BEGIN BATCH INSERT INTO a (k) VALUES (1); UPDATE b.c SET v = 1 WHERE k = 1; APPLY BATCH",
     [("insert", "ks.a"), ("update", "b.c")]),
    ("begin unlogged batch using timestamp 5 insert into a (k) values (1) delete from b where k = 2 apply batch;",
     [("insert", "ks.a"), ("delete", "ks.b")]),
    ("BEGIN COUNTER BATCH UPDATE c SET n = n + 1 WHERE k = 'apply batch' APPLY BATCH", [("update", "ks.c")]),
    ("BEGIN BATCH APPLY BATCH", []),
    # without a policy action name: only rules without query_action allow these
    ("DESCRIBE KEYSPACES", [("describe", "")]),
    ("ALTER MATERIALIZED VIEW v WITH comment = 'x'", [("alter-materialized-view", "")]),
]

UNCLASSIFIABLE = [
    "",
    "   ;",
    "-- only a comment",
    "FROBNICATE t",
    "SELECT * FROM",
    "SELECT now()",
    "SELECT * FROM t; DROP TABLE t",
    "SELECT * FROM t; SELECT * FROM u",
    "INSERT t (a) VALUES (1)",
    "SELECT * FROM 'secret'",
    "SELECT * FROM where",
    "SELECT * FROM 1t",
    'SELECT * FROM ""',
    "SELECT * FROM t WHERE a = 'unterminated",
    'SELECT * FROM "unterminated',
    "SELECT * FROM t /* unterminated",
    "SELECT $$ FROM t",
    "SELECT * FROM t WHERE a = \u00e9",
    "SELECT * FROM t WHERE a = `x`",
    "SELECT * FROM t WHERE a = $x",
    "CREATE TABLE IF EXISTS t (k int PRIMARY KEY)",
    "DROP TABLE IF NOT EXISTS t",
    "CREATE WIDGET w",
    "ALTER INDEX i",
    "CREATE OR REPLACE TABLE t (k int)",
    "LIST THINGS",
    "BEGIN BATCH INSERT INTO a (k) VALUES (1)",
    "BEGIN BATCH SELECT * FROM t APPLY BATCH",
    "BEGIN BATCH TRUNCATE t APPLY BATCH",
    "BEGIN BATCH INSERT INTO a (k) VALUES (1) APPLY BATCH; DROP TABLE a",
    "BEGIN LOGGED BATCH INSERT INTO a (k) VALUES (1) APPLY BATCH",
    "USE 'shop'",
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0][:60] for c in CASES])
def test_classify(text: str, expected: list[tuple[str, str]]) -> None:
    got = [(s.action, s.query_table("ks")) for s in classify(text)]
    assert got == expected


@pytest.mark.parametrize("text", UNCLASSIFIABLE)
def test_unclassifiable(text: str) -> None:
    with pytest.raises(StatementError):
        classify(text)


def test_actions_are_policy_actions() -> None:
    """Every action but two is one a rule can name; the two (DESCRIBE, ALTER MATERIALIZED VIEW)
    have no name in Cilium, so only a rule without query_action allows them."""
    actions = {s.action for text, _ in CASES for s in classify(text)}
    assert actions - QUERY_ACTIONS == {"describe", "alter-materialized-view"}
    for text, expected in CASES:
        for action, table in expected:
            if action in TABLELESS_ACTIONS:
                assert table == "", text


def test_query_table_without_session_keyspace() -> None:
    (st_,) = classify("SELECT * FROM t")
    assert st_ == Statement("select", None, "t") and st_.needs_keyspace
    assert st_.query_table(None) == ".t"  # as Cilium writes it
    (qualified,) = classify("SELECT * FROM a.t")
    assert not qualified.needs_keyspace and qualified.query_table("other") == "a.t"
    (use,) = classify("USE a")
    assert not use.needs_keyspace and use.query_table("other") == "a"


@given(st.text(max_size=200))
def test_any_text_classifies_or_raises_statement_error(text: str) -> None:
    try:
        statements = classify(text)
    except StatementError:
        return
    for s in statements:
        assert s.action


_WORDS = ["SELECT", "FROM", "INSERT", "INTO", "UPDATE", "DELETE", "BEGIN", "BATCH", "APPLY", "CREATE", "TABLE",
          "IF", "NOT", "EXISTS", "USE", "ks", "t", '"Q"', "'s'", "$$x$$", ".", ";", ",", "(", ")", "*", "=", "?",
          "--c\n", "/*c*/", "DROP", "KEYSPACE", "GRANT", "ON", "TO", "LIST", "ROLES"]


@given(st.lists(st.sampled_from(_WORDS), max_size=30))
def test_token_soup_classifies_or_raises_statement_error(words: list[str]) -> None:
    try:
        classify(" ".join(words))
    except StatementError:
        pass
