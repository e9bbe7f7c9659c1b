"""Real clients (kafka-python 3.0.12, aiokafka 0.14) and a real broker (Tansu) with the Kafka
parser between them, enforcing Cilium's example policies and a consumer policy of our own.

What each client raises on a denial is asserted as observed:

* denied Produce: kafka-python and aiokafka raise their TopicAuthorizationFailedError;
* denied OffsetFetch (a consumer's first request naming its topic): kafka-python raises
  TopicAuthorizationFailedError, aiokafka a KafkaError whose text names it;
* denied CreateTopics: kafka-python's admin raises TopicAuthorizationFailedError;
* denied InitProducerId (kafka-python's idempotent producer): KafkaError naming
  ClusterAuthorizationFailedError;
* denied Metadata: the denial carries no brokers, so kafka-python fails to bootstrap
  (KafkaTimeoutError) and aiokafka ignores it, then gives up on the topic with
  UnknownTopicOrPartitionError.
"""

from __future__ import annotations

import asyncio
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.l7parsers.kafka_support import Broker, start_broker, tansu_binary
from tests.l7parsers.policy_support import check_from_policy

import aiokafka.errors
import kafka.errors
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition as AioTopicPartition
from cilia.l7parsers.base import Check, allow_all
from cilia.l7parsers.kafka import KafkaConnection
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cilium"
BROKER_LABELS = "app=kafka"
PORT = 9092  # the policies' port; the broker itself listens on a free one
GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}  # Tansu holds JoinGroup ~ timeout/2

OUTPOST_POLICY = textwrap.dedent("""\
    apiVersion: "cilium.io/v2"
    kind: CiliumNetworkPolicy
    metadata:
      name: "outpost-consumer"
    spec:
      description: "empire-outpost consumes empire-announce; Metadata without topics for bootstrap"
      endpointSelector:
        matchLabels:
          app: kafka
      ingress:
      - fromEndpoints:
        - matchLabels:
            app: empire-outpost
        toPorts:
        - ports:
          - port: "9092"
            protocol: TCP
          rules:
            kafka:
            - apiKey: "metadata"
            - role: "consume"
              topic: "empire-announce"
    """)


def example_check(name: str, client_labels: str) -> Check:
    return check_from_policy((EXAMPLES / name).read_text(), client_labels, BROKER_LABELS, PORT, name)


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = start_broker(lambda: KafkaConnection(allow_all))
    try:
        yield b
    finally:
        b.stop()


def create_topics(b: Broker, *names: str) -> None:
    for name in names:
        subprocess.run([str(tansu_binary()), "topic", "create", name, "--broker", f"tcp://127.0.0.1:{b.port}",
                        "--partitions", "1"], check=True, timeout=10, capture_output=True)


def enforce(b: Broker, check: Check, chunk: int = 0) -> None:
    """From now on, new connections through the relay get a parser with ``check``."""
    factory: Callable[[], KafkaConnection] = lambda: KafkaConnection(check)  # noqa: E731
    b.relay.factory = factory
    b.relay.chunk = chunk
    b.relay.records.clear()


def seed(b: Broker, topic: str, *values: bytes) -> None:
    """Messages written while the relay still allows everything."""
    p = KafkaProducer(bootstrap_servers=b.bootstrap)
    for v in values:
        p.send(topic, v)
    p.flush(10)
    p.close()


def denied(b: Broker) -> list[dict[str, str]]:
    return [dict(r.summary) for r in b.relay.records if not r.decision.allowed]


def poll_values(c: KafkaConsumer, n: int, timeout: float = 20.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for records in c.poll(300).values():
            got += [r.value for r in records]
    return got


# --- producers: Cilium's kafka-apikey.yaml ------------------------------------


def test_kafka_python_producer_with_cilium_policy_byte_by_byte(broker: Broker) -> None:
    create_topics(broker, "deathstar-plans", "secret")
    enforce(broker, example_check("kafka-apikey.yaml", "app=empire-hq"), chunk=1)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False, max_block_ms=5000)
    try:
        assert p.send("deathstar-plans", b"plan 1").get(10).offset == 0
        with pytest.raises(kafka.errors.TopicAuthorizationFailedError):
            p.send("secret", b"leak").get(10)
        assert p.send("deathstar-plans", b"plan 2").get(10).offset == 1  # the connection still works
    finally:
        p.close()
    assert [(d["api_key"], d["topic"]) for d in denied(broker)] == [("produce", "secret")]
    assert broker.relay.errors == []


def test_kafka_python_idempotent_producer_needs_init_producer_id(broker: Broker) -> None:
    """kafka-python 3 is idempotent by default: InitProducerId (22) is not part of Cilium's produce
    role, so it is denied (31) and the client says so."""
    create_topics(broker, "deathstar-plans")
    enforce(broker, example_check("kafka-apikey.yaml", "app=empire-hq"))
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, max_block_ms=5000)
    try:
        with pytest.raises(kafka.errors.KafkaError, match="ClusterAuthorizationFailed"):
            p.send("deathstar-plans", b"x").get(10)
    finally:
        p.close(timeout=2)
    assert "initproducerid" in {d["api_key"] for d in denied(broker)}


def test_aiokafka_producer_with_cilium_policy(broker: Broker) -> None:
    create_topics(broker, "empire-announce", "secret")
    enforce(broker, example_check("kafka-apikey.yaml", "app=empire-hq"))

    async def produce() -> None:
        p = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, request_timeout_ms=5000)
        await p.start()
        try:
            assert (await p.send_and_wait("empire-announce", b"hello")).offset == 0
            with pytest.raises(aiokafka.errors.TopicAuthorizationFailedError):
                await p.send_and_wait("secret", b"leak")
            assert (await p.send_and_wait("empire-announce", b"again")).offset == 1
        finally:
            await p.stop()

    asyncio.run(produce())
    assert [(d["api_key"], d["api_version"], d["topic"]) for d in denied(broker)] == [("produce", "7", "secret")]
    assert broker.relay.errors == []


def test_admin_create_topics_denied(broker: Broker) -> None:
    enforce(broker, example_check("kafka-apikey.yaml", "app=empire-hq"))
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        assert "new-topic" not in admin.list_topics()  # Metadata is allowed
        with pytest.raises(kafka.errors.TopicAuthorizationFailedError):
            admin.create_topics([NewTopic("new-topic", 1, 1)])
    finally:
        admin.close()
    assert [(d["api_key"], d["topic"]) for d in denied(broker)] == [("createtopics", "new-topic")]


# --- consumers in a group: a policy of our own --------------------------------


def test_kafka_python_consumer_group_byte_by_byte(broker: Broker) -> None:
    create_topics(broker, "empire-announce", "deathstar-plans")
    seed(broker, "empire-announce", b"a0", b"a1", b"a2")
    seed(broker, "deathstar-plans", b"secret")
    enforce(broker, check_from_policy(OUTPOST_POLICY, "app=empire-outpost", BROKER_LABELS, PORT), chunk=1)
    c = KafkaConsumer("empire-announce", bootstrap_servers=broker.bootstrap, group_id="outpost-kp",
                      auto_offset_reset="earliest", enable_auto_commit=False, **GROUP)
    try:
        assert poll_values(c, 3) == [b"a0", b"a1", b"a2"]
        c.commit()
        assert c.committed(TopicPartition("empire-announce", 0)) == 3
        c.unsubscribe()
        c.assign([TopicPartition("deathstar-plans", 0)])
        with pytest.raises(kafka.errors.TopicAuthorizationFailedError):
            c.poll(2000)
        c.assign([TopicPartition("empire-announce", 0)])  # the same connections keep working
        c.seek_to_beginning()
        assert poll_values(c, 3) == [b"a0", b"a1", b"a2"]
    finally:
        c.close()
    assert {(d["api_key"], d["topic"]) for d in denied(broker)} == {("offsetfetch", "deathstar-plans")}
    allowed = {r.summary["api_key"] for r in broker.relay.records if r.decision.allowed}
    assert {"joingroup", "syncgroup", "offsetfetch", "offsetcommit", "fetch", "findcoordinator"} <= allowed
    assert broker.relay.errors == []


def test_aiokafka_consumer_group(broker: Broker) -> None:
    create_topics(broker, "empire-announce", "deathstar-plans")
    seed(broker, "empire-announce", b"b0", b"b1")
    enforce(broker, check_from_policy(OUTPOST_POLICY, "app=empire-outpost", BROKER_LABELS, PORT))

    async def consume() -> None:
        c = AIOKafkaConsumer("empire-announce", bootstrap_servers=broker.bootstrap, group_id="outpost-aio",
                             auto_offset_reset="earliest", enable_auto_commit=False, **GROUP)
        await c.start()
        try:
            got: list[bytes] = []
            deadline = time.monotonic() + 20
            while len(got) < 2 and time.monotonic() < deadline:
                for records in (await c.getmany(timeout_ms=300)).values():
                    got += [r.value for r in records]
            assert got == [b"b0", b"b1"]
            await c.commit()
            assert await c.committed(AioTopicPartition("empire-announce", 0)) == 2
            with pytest.raises(aiokafka.errors.KafkaError, match="TopicAuthorizationFailedError"):
                await c.committed(AioTopicPartition("deathstar-plans", 0))
            assert await c.committed(AioTopicPartition("empire-announce", 0)) == 2  # still working
        finally:
            await c.stop()

    asyncio.run(consume())
    assert {(d["api_key"], d["topic"]) for d in denied(broker)} == {("offsetfetch", "deathstar-plans")}
    assert broker.relay.errors == []


# --- kafka-sw-security-policy.yaml ------------------------------------------------


def test_sw_policy_lets_brokers_talk_freely(broker: Broker) -> None:
    """Its third rule admits app=kafka peers at L3: every request passes, idempotent producers
    and admin calls included."""
    enforce(broker, example_check("kafka-sw-security-policy.yaml", "app=kafka"))
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        admin.create_topics([NewTopic("replication", 1, 1)])
    finally:
        admin.close()
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    try:
        assert p.send("replication", b"x").get(10).offset == 0
    finally:
        p.close()
    assert denied(broker) == []


def test_sw_policy_lets_kafka_python_bootstrap_and_produce(broker: Broker) -> None:
    """kafka-python bootstraps with Metadata v12 ``topics: []``, which asks about no topic (v1+):
    Cilium's topic-bound produce role admits it, and the producer reaches its own topic only."""
    create_topics(broker, "deathstar-plans", "secret")
    enforce(broker, example_check("kafka-sw-security-policy.yaml", "app=empire-hq"))
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False, max_block_ms=3000)
    try:
        assert p.send("deathstar-plans", b"plan").get(10).offset == 0
        with pytest.raises(kafka.errors.KafkaError):
            p.send("secret", b"leak").get(5)
    finally:
        p.close()
    assert "produce" not in {d["api_key"] for d in denied(broker)}
    assert all("secret" in d["topic"] for d in denied(broker))


def test_sw_policy_with_aiokafka(broker: Broker) -> None:
    """aiokafka's bootstrap Metadata asks about no topic and passes; producing to deathstar-plans
    works. For a denied topic its Metadata request goes on without it and the answer errors it
    with 29: aiokafka raises its own TopicAuthorizationFailedError."""
    create_topics(broker, "deathstar-plans", "secret")
    enforce(broker, example_check("kafka-sw-security-policy.yaml", "app=empire-hq"))

    async def produce() -> None:
        p = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, request_timeout_ms=1500)
        await p.start()
        try:
            assert (await p.send_and_wait("deathstar-plans", b"plan")).offset == 0
            with pytest.raises(aiokafka.errors.TopicAuthorizationFailedError):
                await p.send_and_wait("secret", b"leak")
        finally:
            await p.stop()

    asyncio.run(produce())
    topics = {frozenset(d["topic"].split(",")) for d in denied(broker) if d["api_key"] == "metadata"}
    assert topics == {frozenset({"secret"})}
    assert "produce" not in {d["api_key"] for d in denied(broker)}
