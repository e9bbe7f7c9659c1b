"""Envoy's gRPC access logs reach the AccessLogReceiver: real Envoy, real requests."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.envoy.als_support import ALLOW_RULE, DENY_POLICY, LOG_NAME, als_envoy, request
from tests.helpers import wait_until

from cilia.envoy.accesslog import AccessLogReceiver, AccessRecord, Verdict


def test_forwarded_and_denied_requests_are_recorded(tmp_path: Path) -> None:
    receiver = AccessLogReceiver()
    with als_envoy(tmp_path, receiver) as env:
        assert request(env.listener_port, "GET", "/ok", host="deathstar.test") == 200
        assert request(env.listener_port, "POST", "/forbidden", host="deathstar.test:8080") == 403
        assert request(env.listener_port, "PUT", "/missing") == 404
        wait_until(lambda: receiver.last_seq() >= 3, timeout=10, what="three access log records")
    records = receiver.records()
    by_path = {r.path: r for r in records}
    assert set(by_path) == {"/ok", "/forbidden", "/missing"}

    ok, forbidden, missing = by_path["/ok"], by_path["/forbidden"], by_path["/missing"]
    assert (ok.method, ok.authority, ok.status, ok.verdict) == ("GET", "deathstar.test", 200, Verdict.FORWARDED)
    assert (forbidden.method, forbidden.authority, forbidden.status) == ("POST", "deathstar.test:8080", 403)
    assert forbidden.verdict is Verdict.DENIED and forbidden.denied
    assert forbidden.response_code_details == f"rbac_access_denied_matched_policy[{DENY_POLICY}]"
    # a 4xx from the route is Envoy forwarding (here: answering) the request, not a policy denial
    assert (missing.method, missing.status, missing.verdict) == ("PUT", 404, Verdict.FORWARDED)

    # the deciding rule: RBAC's policy for the denial, cilia's dynamic metadata for the others
    assert forbidden.rule == DENY_POLICY
    assert ok.rule == missing.rule == ALLOW_RULE
    for r in records:
        assert r.kind == "http" and r.protocol == "HTTP/1.1"
        assert r.source_address == "127.0.0.1" and r.source_port > 0
        assert (r.destination_address, r.destination_port) == ("127.0.0.1", env.listener_port)
        assert r.log_name == LOG_NAME and r.node_id == "als-test"
        assert r.time.tzinfo is not None
    assert ok.route_name == "ok-route"
    assert [r.seq for r in records] == [1, 2, 3]


def test_ring_keeps_only_the_last_n(tmp_path: Path) -> None:
    receiver = AccessLogReceiver(maxlen=3)
    with als_envoy(tmp_path, receiver) as env:
        for i in range(5):
            assert request(env.listener_port, "GET", f"/ok?n={i}") == 200
        wait_until(lambda: receiver.last_seq() >= 5, timeout=10, what="five access log records")
    records = receiver.records()
    assert [r.seq for r in records] == [3, 4, 5]
    assert [r.path for r in records] == ["/ok?n=2", "/ok?n=3", "/ok?n=4"]  # one worker: request order
    assert [r.seq for r in receiver.records(since=3)] == [4, 5]
    assert [r.seq for r in receiver.records(limit=2)] == [4, 5]
    assert receiver.records(since=5) == [] and receiver.records(limit=0) == []


def test_subscriber_sees_each_record_and_a_failing_one_loses_nothing(tmp_path: Path) -> None:
    seen: list[AccessRecord] = []
    got_two = threading.Event()

    def subscriber(record: AccessRecord) -> None:
        seen.append(record)
        if len(seen) == 2:
            got_two.set()
        if len(seen) == 1:
            raise RuntimeError("subscriber bug")  # logged; the receiver carries on

    receiver = AccessLogReceiver(subscriber=subscriber)
    with als_envoy(tmp_path, receiver) as env:
        assert request(env.listener_port, "GET", "/ok") == 200
        wait_until(lambda: len(seen) >= 1, timeout=10, what="first record at the subscriber")
        assert request(env.listener_port, "DELETE", "/forbidden") == 403
        assert got_two.wait(10)
    assert [(r.method, r.verdict) for r in seen] == [("GET", Verdict.FORWARDED), ("DELETE", Verdict.DENIED)]
    assert receiver.records() == seen
