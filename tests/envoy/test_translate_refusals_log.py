"""Connections the network RBAC refuses reach the gRPC access log as TCP records (real Envoy).

Star Wars on loopback: xwing (127.0.0.12) may not talk to deathstar at all, so Envoy closes its
connection on the first byte; with an access log target, the listener's own log sends that
connection to cilia's receiver. Connections RBAC let through are logged per request only.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.envoy.envoy_support import deathstar_backend, envoy_serving, wait_records
from tests.envoy.test_translate_accesslog import DEATHSTAR, TIEFIGHTER, request, starwars

from cilia.envoy.accesslog import Verdict, serve
from cilia.envoy.translate import NO_RULE, AccessLogTarget
from cilia.netutil import free_port

XWING = "127.0.0.12"


@pytest.fixture
def backend_port() -> Iterator[int]:
    with deathstar_backend() as port:
        yield port


def refused(port: int) -> bytes:
    """What xwing reads back after sending a request: b"" once Envoy closed the connection."""
    with socket.create_connection((DEATHSTAR, port), timeout=5, source_address=(XWING, 0)) as s:
        s.sendall(b"POST /v1/request-landing HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 0\r\n\r\n")
        try:
            return s.recv(100)
        except ConnectionResetError:
            return b""


def test_refused_connection_is_a_denied_tcp_record(tmp_path: Path, backend_port: int) -> None:
    server, _ = serve(f"unix:{tmp_path}/als.sock")
    try:
        listen_port = free_port(DEATHSTAR)
        target = AccessLogTarget("cilia-accesslog", f"unix:{tmp_path}/als.sock")
        with envoy_serving(starwars(listen_port, backend_port, target)):
            assert refused(listen_port) == b""
            assert request(listen_port, "POST", "/v1/request-landing") == (200, "Ship landed\n")
            records = wait_records(server.receiver, 2)
    finally:
        server.stop(0)
    # Exactly one TCP record (xwing's); tiefighter's allowed connection shows only as its request.
    assert sorted((r.kind, r.source_address) for r in records) == [("http", TIEFIGHTER), ("tcp", XWING)]
    [tcp] = [r for r in records if r.kind == "tcp"]
    assert (tcp.verdict, tcp.destination_address, tcp.destination_port, tcp.log_name) == \
        (Verdict.DENIED, DEATHSTAR, listen_port, "deathstar-ingress-80")
    assert tcp.termination_details.startswith("rbac_access_denied")
    # Envoy's termination details replace the name's spaces; cilia.envoy.accesslog may restore them.
    assert tcp.rule == NO_RULE
