"""CQL v4 through the parser: the real cassandra-driver 3.30.1 behind the test relay, in front of
the CQL v4 TEST SERVER (cql_v4_server.py; no real v4 server can run here), under a real policy.

The test server speaks v4 only and does not negotiate, so the driver, which opens with DSE v2,
DSE v1 and v5, reaches v4 only because the parser refuses those versions for it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from cassandra import ConsistencyLevel, Unauthorized
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.policies import RoundRobinPolicy
from cassandra.query import BatchStatement, SimpleStatement
from tests.l7parsers.cassandra_support import SHOP_POLICY
from tests.l7parsers.cql_v4_server import CQLv4TestServer
from tests.l7parsers.policy_support import check_from_policy
from tests.l7parsers.relay import Relay

from cilia.l7parsers.cassandra import CassandraConnection

CHECK = check_from_policy(SHOP_POLICY, "app=shop-frontend", "app=shop-db", 9042)


@pytest.fixture
def server() -> Iterator[CQLv4TestServer]:
    s = CQLv4TestServer().start()
    yield s
    s.stop()


def stop_relay(relay: Relay) -> None:
    relay.stop()


@contextlib.contextmanager
def relay_to(server: CQLv4TestServer, chunk: int = 0) -> Iterator[Relay]:
    relay = Relay(server.address, lambda: CassandraConnection(CHECK), chunk=chunk).start()
    try:
        yield relay
    finally:
        stop_relay(relay)
    assert relay.errors == []


def cluster(port: int, connect_timeout: float = 5) -> Cluster:
    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy(), consistency_level=ConsistencyLevel.ONE)
    return Cluster(["127.0.0.1"], port=port, execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                   connect_timeout=connect_timeout)


@contextlib.contextmanager
def connected(port: int) -> Iterator[tuple[Cluster, Session]]:
    c = cluster(port)
    try:
        yield c, c.connect()
    finally:
        c.shutdown()


def test_the_test_server_alone_does_not_negotiate(server: CQLv4TestServer) -> None:
    c = cluster(server.port, connect_timeout=0.5)  # the server hangs up unanswered: the driver waits this long
    with pytest.raises(NoHostAvailable):
        c.connect()
    c.shutdown()
    assert server.other_versions and server.other_versions[0] == 0x42


@pytest.mark.parametrize("chunk", [0, 1])
def test_driver_negotiates_v4_through_the_parser(server: CQLv4TestServer, chunk: int) -> None:
    with relay_to(server, chunk) as relay, connected(relay.port) as (c, session):
        assert c.protocol_version == 4
        assert session.execute("SELECT release_version FROM system.local").one().release_version == "3.11.16"
    assert server.other_versions == []  # the parser answered DSE v2, DSE v1 and v5 itself
    refused = [r for r in relay.records if not r.decision.allowed]
    assert [r.decision.reason.split(" is ")[0] for r in refused] == [
        "protocol version 66", "protocol version 65", "protocol version 5"]
    opcodes = [r.summary["opcode"] for r in relay.records if r.decision.allowed]
    assert opcodes[:3] == ["OPTIONS", "STARTUP", "REGISTER"]
    assert {"select"} == {r.summary["query_action"] for r in relay.records if r.summary["opcode"] == "QUERY"}


@pytest.mark.parametrize("chunk", [0, 1])
def test_queries_prepared_statements_batches_and_use(server: CQLv4TestServer, chunk: int) -> None:
    with relay_to(server, chunk) as relay, connected(relay.port) as (_, session):
        session.execute("CREATE TABLE shop.orders (id text PRIMARY KEY, item text)")
        session.execute("INSERT INTO shop.orders (id, item) VALUES ('1', 'apple')")
        with pytest.raises(Unauthorized, match="Request Unauthorized"):
            session.execute("INSERT INTO shop.secrets (id, item) VALUES ('1', 'plans')")
        with pytest.raises(Unauthorized):
            session.execute("DROP TABLE shop.orders")
        assert [r.item for r in session.execute("SELECT * FROM shop.orders")] == ["apple"]  # still usable

        insert = session.prepare("INSERT INTO shop.orders (id, item) VALUES (?, ?)")
        session.execute(insert, ["2", "pear"])
        select = session.prepare("SELECT * FROM shop.orders WHERE id = ?")
        assert session.execute(select, ["2"]).one().item == "pear"
        with pytest.raises(Unauthorized):
            session.prepare("SELECT * FROM shop.secrets WHERE id = ?")

        ok = BatchStatement()
        ok.add(insert, ["3", "plum"])
        ok.add(SimpleStatement("INSERT INTO shop.orders (id, item) VALUES ('4', 'fig')"))
        session.execute(ok)
        bad = BatchStatement()
        bad.add(insert, ["5", "kiwi"])
        bad.add(SimpleStatement("INSERT INTO shop.secrets (id, item) VALUES ('5', 'codes')"))
        with pytest.raises(Unauthorized):
            session.execute(bad)

        session.execute("USE shop")
        session.execute("INSERT INTO orders (id, item) VALUES ('6', 'lime')")
        with pytest.raises(Unauthorized):
            session.execute("SELECT * FROM secrets")
        unqualified = session.prepare("SELECT * FROM orders WHERE id = ?")
        assert session.execute(unqualified, ["6"]).one().item == "lime"
        items = sorted(r.item for r in session.execute("SELECT * FROM orders"))
        assert items == ["apple", "fig", "lime", "pear", "plum"]

    executed = server.statements()
    assert not [s for s in executed if "secrets" in s or "DROP" in s or "kiwi" in s]
    batches = [r for r in relay.records if r.summary["opcode"] == "BATCH"]
    assert [(r.summary["query_table"], r.decision.allowed) for r in batches] == [
        ("shop.orders,shop.orders", True), ("shop.orders,shop.secrets", False)]
    denied = {(r.summary["opcode"], r.summary["query_action"], r.summary["query_table"])
              for r in relay.records if not r.decision.allowed and r.summary["query_action"]}
    assert denied == {("QUERY", "insert", "shop.secrets"), ("QUERY", "drop-table", "shop.orders"),
                      ("PREPARE", "select", "shop.secrets"), ("BATCH", "insert,insert", "shop.orders,shop.secrets"),
                      ("QUERY", "select", "shop.secrets")}


def test_unknown_prepared_id_makes_the_driver_prepare_again(server: CQLv4TestServer) -> None:
    """A second session has connections (and parsers) of its own: its EXECUTE of a statement
    prepared elsewhere gets Unprepared, and the driver prepares it on that connection."""
    with relay_to(server) as relay, connected(relay.port) as (c, first):
        first.execute("CREATE TABLE shop.orders (id text PRIMARY KEY, item text)")
        insert = first.prepare("INSERT INTO shop.orders (id, item) VALUES (?, ?)")
        second = c.connect()
        second.execute(insert, ["1", "apple"])
        assert second.execute("SELECT * FROM shop.orders").one().item == "apple"
    assert server.statements().count("INSERT INTO shop.orders (id, item) VALUES (?, ?)") == 3  # 2 PREPARE, 1 EXECUTE
    unprepared = [r for r in relay.records if r.summary["opcode"] == "EXECUTE" and not r.decision.allowed]
    assert len(unprepared) == 1 and "unknown on this connection" in unprepared[0].decision.reason
