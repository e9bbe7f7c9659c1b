"""Node records as other nodes read them: the router address travels with the node (other nodes
make it remote-node), a record from an agent that does not announce one still reads, and a bad
address is refused naming the key (the watcher skips it)."""

from __future__ import annotations

import json

import pytest

from cilia.cluster import keys
from cilia.cluster.nodes import NodeRecord


def test_round_trip_with_the_router_address() -> None:
    record = NodeRecord("n1", "10.223.0.1", "10.224.1.0/24", None, "10.224.1.1")
    assert NodeRecord.decode(keys.node_key("n1"), record.encode()) == record


def test_a_record_without_a_router_address_reads() -> None:
    old = json.dumps({"name": "n1", "ip": "10.223.0.1", "podCIDR": "10.224.1.0/24", "healthIP": None}).encode()
    assert NodeRecord.decode(keys.node_key("n1"), old).router_ip is None


def test_a_bad_router_address_names_the_key() -> None:
    bad = json.dumps({"name": "n1", "ip": "10.223.0.1", "routerIP": "10.224.1.300"}).encode()
    with pytest.raises(ValueError, match="n1"):
        NodeRecord.decode(keys.node_key("n1"), bad)
