"""Which parser reads a protocol's connections: the built-ins, and plugins' ``connection``.

A plugin is the class registered under the entry-point group ``cilia.l7parsers`` (see
``cilia.policy.l7.registry``); besides validating and matching its rules it has a ``connection``
attribute: an ``L7Connection`` subclass (or any callable taking a ``Check``) that parses one TCP
connection. Built-in parsers are imported only when a port needs them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from cilia.policy.l7.registry import L7Registry, default_registry

from .base import Check, L7Connection

ConnectionFactory = Callable[[Check], L7Connection]

BUILTIN = {
    "kafka": "cilia.l7parsers.kafka:KafkaConnection",
    "memcache": "cilia.l7parsers.memcache:MemcacheConnection",
    "cassandra": "cilia.l7parsers.cassandra:CassandraConnection",
}


def connection_factory(protocol: str, registry: L7Registry | None = None) -> ConnectionFactory | None:
    """The parser for ``protocol``'s connections, or None if none is installed (then the
    connection is closed: fail closed)."""
    target = BUILTIN.get(protocol)
    if target is not None:
        module, _, name = target.partition(":")
        factory: ConnectionFactory = getattr(importlib.import_module(module), name)
        return factory
    proto = (registry or default_registry()).get(protocol)
    plugin = getattr(proto, "connection", None)
    return plugin if callable(plugin) else None
