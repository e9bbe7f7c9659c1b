"""Real Apache Cassandra 1.2.0 (CQL v1) and the real cassandra-driver through the parser, under
Cilium's example policy examples/cilium/cass-sw-security-policy.yaml, unchanged: empire-hq may
do anything; empire-outpost may read system tables and insert into attendance.daily_records."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from cassandra import ConsistencyLevel, Unauthorized
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import RoundRobinPolicy
from tests.l7parsers.cassandra_support import Cassandra12, running_cassandra
from tests.helpers import cilium_examples_dir
from tests.l7parsers.policy_support import check_from_policy
from tests.l7parsers.relay import Relay

from cilia.l7parsers.base import Check
from cilia.l7parsers.cassandra import CassandraConnection

POLICY = (cilium_examples_dir() / "cass-sw-security-policy.yaml").read_text()
HQ = check_from_policy(POLICY, "app=empire-hq", "app=cass-server", 9042)
OUTPOST = check_from_policy(POLICY, "app=empire-outpost", "app=cass-server", 9042)


@pytest.fixture(scope="module")
def cassandra() -> Iterator[Cassandra12]:
    yield from running_cassandra()


@contextlib.contextmanager
def relay_to(server: Cassandra12, check: Check, chunk: int = 0) -> Iterator[Relay]:
    relay = Relay(server.address, lambda: CassandraConnection(check), chunk=chunk).start()
    try:
        yield relay
    finally:
        relay.stop()
    assert relay.errors == []


@contextlib.contextmanager
def session_on(port: int) -> Iterator[tuple[Cluster, Session]]:
    # Cassandra 1.2.0 does not know the driver's default consistency LOCAL_ONE.
    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy(), consistency_level=ConsistencyLevel.ONE)
    c = Cluster(["127.0.0.1"], port=port, execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    try:
        yield c, c.connect()
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def attendance(cassandra: Cassandra12) -> Cassandra12:
    """The schema, made by empire-hq through the parser (its rule {} allows everything)."""
    with relay_to(cassandra, HQ) as relay, session_on(relay.port) as (_, hq):
        hq.execute("CREATE KEYSPACE attendance WITH replication = {'class': 'SimpleStrategy', "
                   "'replication_factor': 1}")
        hq.execute("CREATE TABLE attendance.daily_records (loc text PRIMARY KEY, creds text)")
    actions = {r.summary["query_action"] for r in relay.records}
    assert {"create-keyspace", "create-table"} <= actions
    return cassandra


def test_outpost_through_the_parser_byte_by_byte(attendance: Cassandra12) -> None:
    with relay_to(attendance, OUTPOST, chunk=1) as relay, session_on(relay.port) as (c, outpost):
        assert c.protocol_version == 1
        outpost.execute("INSERT INTO attendance.daily_records (loc, creds) VALUES ('hoth', 'vader')")
        with pytest.raises(Unauthorized, match="Request Unauthorized"):
            outpost.execute("SELECT * FROM attendance.daily_records")
        with pytest.raises(Unauthorized):
            outpost.execute("DROP TABLE attendance.daily_records")
        # the session keeps working
        assert outpost.execute("SELECT cluster_name FROM system.local WHERE key = 'local'").one()

        insert = outpost.prepare("INSERT INTO attendance.daily_records (loc, creds) VALUES (?, ?)")
        for loc in ("endor", "bespin", "dagobah"):  # over the pool's two connections
            outpost.execute(insert, [loc, "tarkin"])
        with pytest.raises(Unauthorized):
            outpost.prepare("SELECT * FROM attendance.daily_records WHERE loc = ?")

        outpost.execute("USE attendance")
        outpost.execute("INSERT INTO daily_records (loc, creds) VALUES ('yavin', 'krennic')")
        with pytest.raises(Unauthorized):
            outpost.execute("SELECT * FROM daily_records")

    refused = [r.decision.reason.split(" is ")[0] for r in relay.records if "refused" in r.decision.reason]
    assert refused[:3] == ["protocol version 66", "protocol version 65", "protocol version 5"]
    denied = {(r.summary["opcode"], r.summary["query_action"], r.summary["query_table"])
              for r in relay.records if not r.decision.allowed and r.summary["query_action"]}
    table = "attendance.daily_records"
    assert denied == {("QUERY", "select", table), ("QUERY", "drop-table", table), ("PREPARE", "select", table)}
    inserts = [r for r in relay.records if r.summary["query_action"] == "insert" and r.decision.allowed]
    assert {r.summary["query_table"] for r in inserts} == {"attendance.daily_records"}
    assert {r.summary["opcode"] for r in inserts} >= {"QUERY", "PREPARE", "EXECUTE"}

    with relay_to(attendance, HQ) as relay, session_on(relay.port) as (_, hq):
        rows = {r.loc: r.creds for r in hq.execute("SELECT * FROM attendance.daily_records")}
    assert rows == {"hoth": "vader", "endor": "tarkin", "bespin": "tarkin", "dagobah": "tarkin", "yavin": "krennic"}


def test_hq_reads_and_prepares_through_the_parser(attendance: Cassandra12) -> None:
    with relay_to(attendance, HQ) as relay, session_on(relay.port) as (_, hq):
        hq.execute("INSERT INTO attendance.daily_records (loc, creds) VALUES ('scarif', 'orson')")
        select = hq.prepare("SELECT creds FROM attendance.daily_records WHERE loc = ?")
        for _ in range(3):
            assert hq.execute(select, ["scarif"]).one().creds == "orson"
        hq.execute("USE attendance")
        assert hq.execute("SELECT creds FROM daily_records WHERE loc = 'scarif'").one().creds == "orson"
    executes = [r for r in relay.records if r.summary["opcode"] == "EXECUTE" and r.decision.allowed]
    assert len(executes) == 3 and all(r.summary["query_table"] == "attendance.daily_records" for r in executes)
    assert all(r.decision.allowed for r in relay.records if r.summary["query_action"])
