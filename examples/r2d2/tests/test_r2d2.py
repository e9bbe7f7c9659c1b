"""The example plugin end to end as a user installs it: found through its entry point, its rules
validated in a policy file, traced, and enforced by its parser (fed whole and byte by byte)."""

from __future__ import annotations

from cilia.l7parsers.base import ProtocolError
from cilia.l7parsers.policycheck import policy_check
from cilia.l7parsers.registry import connection_factory
from cilia.policy import Endpoint, LabelSet, PolicyEngine, Protocol, default_registry, parse_text
from cilia_r2d2 import R2D2Connection
import ipaddress
from pathlib import Path
import pytest

POLICY = (Path(__file__).parent.parent / "droid.yaml").read_text(encoding="utf-8")


def _connection() -> R2D2Connection:
    loaded = parse_text(POLICY, "droid.yaml")
    assert loaded.ok, loaded.problems
    engine = PolicyEngine()
    engine.upsert_endpoint(Endpoint("c3po", LabelSet.parse(["app=c3po"]), (ipaddress.ip_address("10.0.0.1"),)))
    engine.upsert_endpoint(Endpoint("r2d2", LabelSet.parse(["app=r2d2"]), (ipaddress.ip_address("10.0.0.2"),)))
    engine.apply(loaded.policies)
    hit = engine.endpoint_policy("r2d2").map_state.ingress.lookup(engine.identity_of("c3po").id, Protocol.TCP, 4242)
    assert hit is not None
    factory = connection_factory("r2d2")
    assert factory is R2D2Connection  # found through the installed entry point
    conn = factory(policy_check(hit[2]))
    assert isinstance(conn, R2D2Connection)
    return conn


def test_the_plugin_is_registered_and_validates_its_rules() -> None:
    assert "r2d2" in default_registry().names()
    bad = parse_text(POLICY.replace("cmd: HALT", "cmd: FLY"), "bad.yaml")
    assert not bad.ok and any("unknown command 'FLY'" in str(p) and "bad.yaml:" in str(p) for p in bad.problems)


@pytest.mark.parametrize("chunk", [0, 1])
def test_allowed_commands_pass_and_denied_ones_are_answered_in_order(chunk: int) -> None:
    conn = _connection()
    stream = b"READ /public/a\r\nWRITE /public/a\r\nHALT\r\n"
    to_server = to_client = b""
    records = []
    pieces = [stream] if not chunk else [stream[i:i + 1] for i in range(len(stream))]
    for piece in pieces:
        out = conn.receive_client(piece)
        to_server += out.to_server
        to_client += out.to_client
        records += out.records
    assert to_server == b"READ /public/a\r\nHALT\r\n"  # WRITE never reaches the server
    assert to_client == b""  # its denial waits for the reply to the READ before it
    assert [(r.summary["cmd"], r.decision.allowed) for r in records] == [("READ", True), ("WRITE", False),
                                                                           ("HALT", True)]
    assert "droid.yaml:" in records[0].decision.rule and records[1].decision.rule.startswith("default deny")
    assert conn.receive_server(b"OK\r\n").to_client == b"OK\r\nERROR access denied\r\n"
    assert conn.receive_server(b"OK\r\n").to_client == b"OK\r\n"


def test_junk_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        _connection().receive_client(b"FLY away\r\n")
