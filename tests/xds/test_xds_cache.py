"""The versioned cache: versions move only on real change, carry an epoch, per-node views, watchers."""

from __future__ import annotations

import threading

from envoy.config.listener.v3 import listener_pb2

from cilia.xds.cache import Cache, version_key
from cilia.xds.types import CLUSTER, LISTENER


def lst(name: str, port: int = 1) -> listener_pb2.Listener:
    msg = listener_pb2.Listener(name=name)
    msg.address.socket_address.port_value = port
    return msg


def test_version_moves_only_when_content_changes() -> None:
    cache = Cache(epoch="e")
    assert cache.version(LISTENER) == "e-0"
    assert cache.upsert(LISTENER, "a", lst("a")) == "e-1"
    assert cache.upsert(LISTENER, "a", lst("a")) == "e-1"  # equal message: no bump
    assert cache.set(LISTENER, {"a": lst("a")}) == "e-1"
    assert cache.delete(LISTENER, "missing") == "e-1"
    assert cache.upsert(LISTENER, "a", lst("a", 2)) == "e-2"
    assert cache.version(CLUSTER) == "e-0"  # one counter per type


def test_per_resource_versions_and_batch_update() -> None:
    cache = Cache(epoch="e")
    cache.update(LISTENER, {"a": lst("a"), "b": lst("b")})
    v = cache.update(LISTENER, {"b": lst("b", 2)}, delete=["a"])
    assert v == "e-2"
    view = cache.view(LISTENER)
    assert {n: r.version for n, r in view.resources.items()} == {"b": "e-2"}
    cache.upsert(LISTENER, "c", lst("c"))
    assert {n: r.version for n, r in cache.view(LISTENER).resources.items()} == {"b": "e-2", "c": "e-3"}
    assert cache.set(LISTENER, {"c": lst("c")}) == "e-4"  # set() drops b
    assert set(cache.view(LISTENER).resources) == {"c"}


def test_epochs_differ_between_caches() -> None:
    a, b = Cache(), Cache()
    assert a.epoch != b.epoch
    assert a.upsert(LISTENER, "x", lst("x")) != b.upsert(LISTENER, "x", lst("x"))
    assert version_key("abc-12") == ("abc", 12)
    assert version_key("12") is None


def test_node_views() -> None:
    cache = Cache(epoch="e")
    cache.set(LISTENER, {"a": lst("a"), "b": lst("b")})
    cache.set_node_view("n1", LISTENER, ["a"])
    assert set(cache.view(LISTENER, "n1").resources) == {"a"}
    assert set(cache.view(LISTENER, "n2").resources) == {"a", "b"}
    cache.set_node_view("n1", LISTENER, None)
    assert set(cache.view(LISTENER, "n1").resources) == {"a", "b"}


def test_watchers_run_outside_the_lock_and_only_on_change() -> None:
    cache = Cache()
    seen: list[str] = []

    def watcher(type_url: str) -> None:
        # Reading the cache from a watcher would deadlock if the lock were held.
        done = threading.Event()
        threading.Thread(target=lambda: (cache.version(type_url), done.set())).start()
        assert done.wait(5)
        seen.append(type_url)

    cancel = cache.watch(watcher)
    cache.upsert(LISTENER, "a", lst("a"))
    cache.upsert(LISTENER, "a", lst("a"))
    cache.upsert(CLUSTER, "c", lst("c"))
    cancel()
    cache.upsert(LISTENER, "b", lst("b"))
    assert seen == [LISTENER, CLUSTER]
