"""Kafka, Cassandra and Memcached policy the way Cilium's guides run them, with everything real:
the agent with the BPF datapath, Envoy, the L7 parsers (inside Envoy through the cilia_l7 module,
and behind network ext_proc: every test runs in both modes), real servers in one endpoint's
namespace and real clients in others, and Cilium's example policies unchanged.

Each client runs as a Python process inside its endpoint's namespace (``nsenter --net``), so its
connections really leave that endpoint, are redirected by the kernel to Envoy, and reach the
parser with the endpoint's identity. Allowed operations succeed; denied ones raise the client's
own error; the connection keeps working; every request shows in `cilia observe`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.agent.agent_support import simple
from tests.agent.bpf_agent_support import BpfAgentNode, bpf_agent
from tests.helpers import in_netns

from cilia.envoy.inproc import build

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cilium"
SERVER_IP = "10.212.0.20"


def run_client(node: BpfAgentNode, ship: str, code: str, timeout: float = 60) -> Any:
    """Run ``code`` (which prints one JSON line last) with Python in ``ship``'s namespace."""
    res = subprocess.run(["nsenter", f"--net=/run/netns/{node.netns(ship)}", sys.executable, "-c",
                          textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def add(node: BpfAgentNode, name: str, ip: str, labels: str, port: str | None = None) -> None:
    node.ok("endpoint", "add", "--name", name, "--labels", labels, "--ip", ip, "--create-netns",
            "--netns", node.netns(name), *(["--port", port] if port else []))


def l7_flows(node: BpfAgentNode, protocol: str, want: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        out = node.ok("observe", "--last", "1000", "--protocol", protocol, "-o", "json").out
        flows = [simple(json.loads(line)) for line in out.splitlines()]
        if len(flows) >= want or time.monotonic() > deadline:
            return flows
        time.sleep(0.2)


def assert_connection_addresses(node: BpfAgentNode, flows: list[dict[str, Any]]) -> None:
    """L7 flows carry the connection's addresses, as HTTP flows do (client address and port, the
    server's address and port), in both modes: behind ext_proc Envoy expands them into the
    stream's metadata; inside Envoy the module asks the connection for them."""
    assert flows
    for f in flows:
        assert f["source"]["address"] and f["source"]["port"] > 0, f
        assert f["destination"]["address"] == SERVER_IP and f["destination"]["port"] > 0, f


@pytest.fixture(params=["inproc", "extproc"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BpfAgentNode]:
    """The agent with the parsers inside Envoy (the cilia_l7 module, built as setup builds it)
    or behind network ext_proc; ``cilia status`` says which."""
    if request.param == "inproc":
        build.build()
    with bpf_agent(tmp_path, "--l7-mode", request.param) as n:
        assert n.ok("status", "-o", "json").json()["l7"]["mode"] == request.param
        yield n


def _serve(node: BpfAgentNode, name: str, *cmd: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["nsenter", f"--net=/run/netns/{node.netns(name)}", *cmd],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_port(node: BpfAgentNode, name: str, port: int) -> None:
    deadline = time.monotonic() + 30
    while in_netns(f"/run/netns/{node.netns(name)}", "bash", "-c", f"exec 3<>/dev/tcp/{SERVER_IP}/{port}",
                   check=False).returncode != 0:
        assert time.monotonic() < deadline, f"{name} did not open port {port}"
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- Memcached: Cilium's memcached guide (examples/kubernetes-memcached) --------------------------

MEMCACHE_CLIENTS = """
import json, bmemcached
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError
out = {}
text = Client(("%(ip)s", 11211), default_noreply=False, connect_timeout=5, timeout=5)
out["set_own"] = text.set("%(own)s", "1,2")
out["get_own"] = text.get("%(own)s").decode()
try:
    text.get("%(other)s")
    out["get_other"] = "allowed"
except MemcacheClientError as e:
    out["get_other"] = "MemcacheClientError: " + str(e)
out["get_own_again"] = text.get("%(own)s").decode()
binary = bmemcached.Client(["%(ip)s:11211"])
try:
    binary.get("%(other)s")
    out["binary_other"] = "allowed"
except Exception as e:
    out["binary_other"] = type(e).__name__ + " " + str(getattr(e, "code", ""))
out["binary_own"] = binary.get("%(own)s")
print(json.dumps(out))
"""


def test_memcached_guide(node: BpfAgentNode) -> None:
    add(node, "memcd-server", SERVER_IP, "app=memcd-server", "11211")
    add(node, "a-wing", "10.212.0.21", "app=a-wing")
    add(node, "x-wing", "10.212.0.22", "app=x-wing")
    server = _serve(node, "memcd-server", "memcached", "-u", "root", "-l", "0.0.0.0", "-p", "11211", "-U", "0")
    try:
        _wait_port(node, "memcd-server", 11211)
        node.import_policy(EXAMPLES / "memcd-sw-security-policy.yaml")
        a = run_client(node, "a-wing", MEMCACHE_CLIENTS % {"ip": SERVER_IP, "own": "awing-coord",
                                                          "other": "xwing-coord"})
        assert a == {"set_own": True, "get_own": "1,2", "get_other": "MemcacheClientError: b'access denied'",
                     "get_own_again": "1,2", "binary_other": "MemcachedException 8", "binary_own": "1,2"}
        x = run_client(node, "x-wing", MEMCACHE_CLIENTS % {"ip": SERVER_IP, "own": "xwing-coord",
                                                          "other": "awing-coord"})
        assert x["set_own"] is True and x["get_other"].startswith("MemcacheClientError")
    finally:
        _stop(server)
    flows = l7_flows(node, "memcache", 8)
    denied = [f for f in flows if f["verdict"] == "DROPPED"]
    assert {(f["source"]["endpoint"], f["l7"]["key"]) for f in denied} >= {("a-wing", "xwing-coord"),
                                                                             ("x-wing", "awing-coord")}
    assert all("memcd-sw-security-policy.yaml" in f["rule"] for f in flows)
    assert any(f["verdict"] == "FORWARDED" and f["l7"]["command"] == "set" for f in flows)
    l7 = node.ok("status", "-o", "json").json()["l7"]
    if l7["mode"] == "inproc":  # the requests were judged inside Envoy, and its interpreter reports
        assert [i["connections"] >= 4 and not i["stale"] for i in l7["interpreters"]] == [True]
    assert_connection_addresses(node, flows)


# --- Cassandra: Cilium's Cassandra guide (examples/kubernetes-cassandra), on real Cassandra 1.2 ----

CASSANDRA_CLIENT = """
import json
from cassandra import ConsistencyLevel, Unauthorized
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import RoundRobinPolicy
profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy(), consistency_level=ConsistencyLevel.ONE)
cluster = Cluster(["%(ip)s"], port=9042, execution_profiles={EXEC_PROFILE_DEFAULT: profile}, connect_timeout=10,
                  compression=False)
session = cluster.connect()
out = {"protocol": cluster.protocol_version}
def attempt(name, cql):
    try:
        session.execute(cql)
        out[name] = "ok"
    except Unauthorized as e:
        out[name] = "Unauthorized"
%(body)s
cluster.shutdown()
print(json.dumps(out))
"""

HQ_BODY = """
attempt("create_keyspace", "CREATE KEYSPACE attendance WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}")
attempt("create_table", "CREATE TABLE attendance.daily_records (loc text PRIMARY KEY, creds text)")
attempt("insert", "INSERT INTO attendance.daily_records (loc, creds) VALUES ('hq', 'tarkin')")
"""

OUTPOST_BODY = """
attempt("insert", "INSERT INTO attendance.daily_records (loc, creds) VALUES ('hoth', 'vader')")
attempt("select", "SELECT * FROM attendance.daily_records")
attempt("insert_again", "INSERT INTO attendance.daily_records (loc, creds) VALUES ('endor', 'vader')")
attempt("drop", "DROP TABLE attendance.daily_records")
"""


def test_cassandra_guide_on_real_cassandra(node: BpfAgentNode) -> None:
    from tests.l7parsers.cassandra_support import start_cassandra

    add(node, "cass-server", SERVER_IP, "app=cass-server", "9042")
    add(node, "empire-hq", "10.212.0.23", "app=empire-hq")
    add(node, "empire-outpost", "10.212.0.24", "app=empire-outpost")
    wrapper = ("nsenter", f"--net=/run/netns/{node.netns('cass-server')}")

    def reachable(address: tuple[str, int]) -> bool:
        return in_netns(f"/run/netns/{node.netns('cass-server')}", "bash", "-c",
                        f"exec 3<>/dev/tcp/{address[0]}/{address[1]}", check=False).returncode == 0

    cassandra = start_cassandra(host=SERVER_IP, native=9042, wrapper=wrapper, reachable=reachable)
    try:
        node.import_policy(EXAMPLES / "cass-sw-security-policy.yaml")
        hq = run_client(node, "empire-hq", CASSANDRA_CLIENT % {"ip": SERVER_IP, "body": HQ_BODY})
        assert hq == {"protocol": 1, "create_keyspace": "ok", "create_table": "ok", "insert": "ok"}
        outpost = run_client(node, "empire-outpost", CASSANDRA_CLIENT % {"ip": SERVER_IP, "body": OUTPOST_BODY})
        assert outpost == {"protocol": 1, "insert": "ok", "select": "Unauthorized", "insert_again": "ok",
                           "drop": "Unauthorized"}
    finally:
        cassandra.stop()
    flows = l7_flows(node, "cassandra", 6)
    # (the parser also refuses the driver's DSE and v5 handshakes so it falls back: no query in those)
    denied = {(f["source"]["endpoint"], f["l7"]["query_action"], f["l7"]["query_table"])
              for f in flows if f["verdict"] == "DROPPED" and f["l7"].get("query_action")}
    assert denied == {("empire-outpost", "select", "attendance.daily_records"),
                      ("empire-outpost", "drop-table", "attendance.daily_records")}
    assert any(f["source"]["endpoint"] == "empire-hq" and f["l7"]["query_action"] == "create-keyspace"
               and f["verdict"] == "FORWARDED" for f in flows)
    # the version fallback is a negotiation (TRACED), never a DROPPED flow without a rule
    assert any(f["verdict"] == "TRACED" and "protocol version" in f["l7"]["negotiation"] for f in flows)
    assert all(f["rule"] for f in flows if f["verdict"] == "DROPPED")
    assert_connection_addresses(node, flows)


# --- Kafka: Cilium's Kafka guide (examples/kubernetes-kafka), on the Tansu broker -------------------

KAFKA_ADMIN = """
import json
from kafka.admin import KafkaAdminClient, NewTopic
admin = KafkaAdminClient(bootstrap_servers="%(ip)s:9092", request_timeout_ms=10000)
admin.create_topics([NewTopic(t, 1, 1) for t in ("deathstar-plans", "empire-announce", "secret")])
admin.close()
print(json.dumps({"created": True}))
"""

KAFKA_PRODUCER = """
import json
from kafka import KafkaProducer
out = {}
p = KafkaProducer(bootstrap_servers="%(ip)s:9092", enable_idempotence=False, max_block_ms=4000,
                  request_timeout_ms=4000)
for topic in %(topics)r:
    try:
        out[topic] = p.send(topic, b"from %(who)s").get(10).offset
    except Exception as e:
        out[topic] = type(e).__name__
p.close(timeout=2)
print(json.dumps(out))
"""

KAFKA_CONSUMER = """
import json, time
from kafka import KafkaConsumer
from kafka.errors import KafkaError
out = {}
for topic in %(topics)r:
    c = KafkaConsumer(topic, bootstrap_servers="%(ip)s:9092", group_id="%(who)s-" + topic,
                      auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000)
    got = []
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not got:
            for records in c.poll(timeout_ms=500).values():
                got += [r.value.decode() for r in records]
        out[topic] = got
    except KafkaError as e:
        out[topic] = type(e).__name__
    finally:
        c.close()
print(json.dumps(out))
"""


AIOKAFKA_CONSUMER = """
import asyncio, json
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
async def main():
    c = AIOKafkaConsumer("%(topic)s", bootstrap_servers="%(ip)s:9092", group_id="aio-%(topic)s",
                         auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000)
    try:
        await c.start()
        got = await c.getmany(timeout_ms=8000)
        return [m.value.decode() for ms in got.values() for m in ms]
    except KafkaError as e:
        return type(e).__name__
    finally:
        await c.stop()
print(json.dumps({"%(topic)s": asyncio.run(main())}))
"""


def test_kafka_guide_on_tansu(node: BpfAgentNode) -> None:
    from tests.l7parsers.kafka_support import tansu_binary

    add(node, "kafka", SERVER_IP, "app=kafka", "9092")
    add(node, "empire-hq", "10.212.0.23", "app=empire-hq")
    add(node, "empire-outpost", "10.212.0.24", "app=empire-outpost")
    add(node, "empire-backup", "10.212.0.25", "app=empire-backup")
    broker = _serve(node, "kafka", str(tansu_binary()), "broker", "--listener-url", f"tcp://{SERVER_IP}:9092",
                    "--advertised-listener-url", f"tcp://{SERVER_IP}:9092", "--storage-engine", "memory://tansu/")
    try:
        _wait_port(node, "kafka", 9092)
        # the broker's own admin makes the topics (inside its namespace: not redirected)
        assert run_client(node, "kafka", KAFKA_ADMIN % {"ip": SERVER_IP}) == {"created": True}
        node.import_policy(EXAMPLES / "kafka-sw-security-policy.yaml")
        hq = run_client(node, "empire-hq", KAFKA_PRODUCER % {"ip": SERVER_IP, "who": "hq", "topics": [
            "deathstar-plans", "empire-announce", "secret"]})
        assert hq["deathstar-plans"] == 0 and hq["empire-announce"] == 0
        assert isinstance(hq["secret"], str)  # not an offset: its metadata and produce are refused
        outpost = run_client(node, "empire-outpost", KAFKA_CONSUMER % {
            "ip": SERVER_IP, "who": "outpost", "topics": ["empire-announce", "deathstar-plans"]})
        # kafka-python's consumer gets the plans' metadata errored (29) and so never a partition:
        # nothing leaks, and it keeps waiting; aiokafka raises its own authorization error
        assert outpost == {"empire-announce": ["from hq"], "deathstar-plans": []}
        aio = run_client(node, "empire-outpost", AIOKAFKA_CONSUMER % {"ip": SERVER_IP, "topic": "deathstar-plans"})
        assert aio == {"deathstar-plans": "TopicAuthorizationFailedError"}
        backup = run_client(node, "empire-backup", KAFKA_CONSUMER % {
            "ip": SERVER_IP, "who": "backup", "topics": ["deathstar-plans"]})
        assert backup == {"deathstar-plans": ["from hq"]}
        # the outpost may not produce at all
        outpost_produce = run_client(node, "empire-outpost", KAFKA_PRODUCER % {
            "ip": SERVER_IP, "who": "outpost", "topics": ["empire-announce"]})
        assert isinstance(outpost_produce["empire-announce"], str)
    finally:
        _stop(broker)
    flows = l7_flows(node, "kafka", 10)
    denied = {(f["source"]["endpoint"], f["l7"]["api_key"]) for f in flows if f["verdict"] == "DROPPED"}
    assert ("empire-outpost", "produce") in denied or ("empire-outpost", "metadata") in denied
    assert any(f["source"]["endpoint"] == "empire-hq" and f["l7"]["api_key"] == "produce"
               and f["verdict"] == "FORWARDED" and "kafka-sw-security-policy.yaml" in f["rule"] for f in flows)
    assert_connection_addresses(node, flows)
