"""Helpers for the translation tests: a real Envoy fed translated resources over xDS."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cilia.envoy.loopback import LoopbackEnvoy
from cilia.netutil import free_port
from cilia.envoy.translate import ProxyResources

__all__ = ["LoopbackEnvoy", "envoy_serving", "free_port"]


@contextmanager
def envoy_serving(res: ProxyResources) -> Iterator[LoopbackEnvoy]:
    """An xDS server holding ``res`` and a real Envoy that acked it; both stopped on exit."""
    with LoopbackEnvoy("sidecar") as envoy:
        envoy.start(res)
        yield envoy
