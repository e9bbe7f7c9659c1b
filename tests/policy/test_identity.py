"""Security identities: reserved numbers, allocation, CIDR identities, persistence."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest

from cilia.policy import (
    Endpoint,
    FileAllocator,
    Identity,
    IdentityKind,
    LabelSet,
    MemoryAllocator,
    PolicyEngine,
)

CIDR_BIT = 1 << 24


def labels(text: str) -> LabelSet:
    return LabelSet.parse(text)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


# --- reserved identities ------------------------------------------------------------


@pytest.mark.parametrize(("number", "names"), [
    (1, ["reserved:host"]),
    (2, ["reserved:world"]),
    (3, ["reserved:unmanaged"]),
    (4, ["reserved:health"]),
    (5, ["reserved:init"]),
    (6, ["reserved:remote-node"]),
    (7, ["reserved:kube-apiserver"]),
    (8, ["reserved:ingress"]),
    (9, ["reserved:world", "reserved:world-ipv4"]),
    (10, ["reserved:world", "reserved:world-ipv6"]),
])
def test_reserved_identities(number: int, names: list[str]) -> None:
    alloc = MemoryAllocator()
    ident = alloc.get(number)
    assert ident is not None
    assert ident.kind is IdentityKind.RESERVED
    assert ident.labels.to_list() == names
    assert alloc.lookup(ident.labels) == ident
    assert alloc.allocate(ident.labels) == ident  # asking again names the same identity


def test_reserved_identities_are_exactly_1_to_10() -> None:
    assert [i.id for i in MemoryAllocator()] == list(range(1, 11))


def test_world_family_identities_carry_their_prefix() -> None:
    alloc = MemoryAllocator()
    assert alloc.get(9).prefix == net("0.0.0.0/0")  # type: ignore[union-attr]
    assert alloc.get(10).prefix == net("::/0")  # type: ignore[union-attr]
    assert alloc.get(2).prefix is None  # type: ignore[union-attr]
    assert alloc.lookup(labels("reserved:world-ipv4")).id == 9  # type: ignore[union-attr]


def test_reserved_labels_that_name_no_identity_are_refused() -> None:
    with pytest.raises(ValueError, match="reserved identity that does not exist"):
        MemoryAllocator().allocate(labels("reserved:nonsense"))


def test_releasing_a_reserved_identity_does_nothing() -> None:
    alloc = MemoryAllocator()
    alloc.release(1)
    assert alloc.get(1) is not None and alloc.get(1).labels.to_list() == ["reserved:host"]  # type: ignore[union-attr]


# --- allocation -----------------------------------------------------------------------


def test_allocation_starts_at_256_and_same_labels_get_the_same_identity() -> None:
    alloc = MemoryAllocator()
    web = alloc.allocate(labels("app=web,env=prod"))
    db = alloc.allocate(labels("app=db"))
    assert (web.id, db.id) == (256, 257)
    assert web.kind is IdentityKind.ENDPOINT
    assert alloc.allocate(labels("env=prod,app=web")) is web  # order does not matter
    assert alloc.allocate(labels("k8s:app=web,k8s:env=prod")) is web  # k8s is the default source
    assert alloc.allocate(labels("container:app=web,env=prod")).id == 258  # another source, another identity
    assert alloc.get(256) is web
    assert alloc.lookup(labels("app=db")) is db
    assert alloc.lookup(labels("app=nothing")) is None


def test_release_forgets_the_labels_and_the_number() -> None:
    alloc = MemoryAllocator()
    web = alloc.allocate(labels("app=web"))
    alloc.release(web.id)
    assert alloc.get(web.id) is None
    assert alloc.lookup(labels("app=web")) is None
    assert web.id not in [i.id for i in alloc]
    again = alloc.allocate(labels("app=web"))
    assert again.labels == web.labels
    alloc.release(12345)  # unknown: nothing happens


def test_released_numbers_are_reused_once_the_range_wraps() -> None:
    alloc = MemoryAllocator()
    for i in range(256, 65536):
        alloc.allocate(labels(f"n={i}"))
    with pytest.raises(RuntimeError, match="exhausted"):
        alloc.allocate(labels("n=one-too-many"))
    alloc.release(300)
    reused = alloc.allocate(labels("n=late"))
    assert reused.id == 300
    assert alloc.lookup(labels("n=300")) is None


def test_cidr_identities_have_bit_24_set() -> None:
    alloc = MemoryAllocator()
    v4 = alloc.allocate_cidr(net("10.0.0.0/8"))
    v6 = alloc.allocate_cidr(net("2001:db8::/32"))
    for ident in (v4, v6):
        assert ident.id & CIDR_BIT and CIDR_BIT < ident.id < 2 * CIDR_BIT
        assert ident.kind is IdentityKind.CIDR
        assert ident.is_world()
    assert v4.id != v6.id
    assert v4.prefix == net("10.0.0.0/8")
    assert v4.labels.to_list() == ["cidr:10.0.0.0/8", "reserved:world", "reserved:world-ipv4"]
    assert v6.labels.to_list() == ["cidr:2001:db8::/32", "reserved:world", "reserved:world-ipv6"]
    assert alloc.allocate_cidr(net("10.0.0.0/8")) is v4
    # CIDR identities do not use the endpoint range
    assert alloc.allocate(labels("app=web")).id == 256


def test_an_allocator_is_iterable_in_number_order() -> None:
    alloc = MemoryAllocator()
    alloc.allocate_cidr(net("10.0.0.0/8"))
    alloc.allocate(labels("app=b"))
    alloc.allocate(labels("app=a"))
    ids = [i.id for i in alloc]
    assert ids == sorted(ids)
    assert ids[-3:] == [256, 257, CIDR_BIT + 1]


# --- FileAllocator --------------------------------------------------------------------


def test_file_allocator_keeps_numbers_across_restarts(tmp_path: Path) -> None:
    first = FileAllocator(tmp_path)
    web = first.allocate(labels("app=web"))
    db = first.allocate(labels("app=db,env=prod"))
    cidr = first.allocate_cidr(net("10.0.0.0/8"))
    assert (tmp_path / "identities.json").exists()

    second = FileAllocator(tmp_path)  # the agent restarted
    assert second.lookup(labels("app=web")) == web
    assert second.lookup(labels("env=prod,app=db")) == db
    assert second.allocate_cidr(net("10.0.0.0/8")) == cidr
    assert second.get(cidr.id) == cidr
    # new allocations do not collide with the restored ones
    assert second.allocate(labels("app=new")).id == 258
    assert second.allocate_cidr(net("192.168.0.0/16")).id == CIDR_BIT + 2
    # reserved identities are still there and are not stored in the file
    assert second.get(1) is not None
    stored = json.loads((tmp_path / "identities.json").read_text())
    assert all(item["id"] >= 256 for item in stored["identities"])


def test_file_allocator_persists_releases(tmp_path: Path) -> None:
    first = FileAllocator(tmp_path)
    web = first.allocate(labels("app=web"))
    first.allocate(labels("app=db"))
    first.release(web.id)
    second = FileAllocator(tmp_path)
    assert second.lookup(labels("app=web")) is None
    assert second.get(web.id) is None
    assert second.lookup(labels("app=db")) is not None
    # the released number is not handed out again right away
    assert second.allocate(labels("app=other")).id == 258


def test_file_allocator_writes_once_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[str] = []
    real_replace = os.replace

    def counting_replace(src: str, dst: str) -> None:
        writes.append(str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", counting_replace)
    alloc = FileAllocator(tmp_path)
    assert writes == []  # opening writes nothing
    with alloc.batch():
        for i in range(50):
            alloc.allocate(labels(f"n={i}"))
        with alloc.batch():  # nested batches end with the outer one
            alloc.allocate_cidr(net("10.0.0.0/8"))
        assert writes == []
        assert not (tmp_path / "identities.json").exists()
    assert writes == [str(tmp_path / "identities.json")]
    with alloc.batch():
        alloc.allocate(labels("n=0"))  # already allocated: nothing changes
        alloc.lookup(labels("n=1"))
    assert len(writes) == 1
    alloc.allocate(labels("n=new"))  # outside a batch, every change is written
    assert len(writes) == 2
    assert len(list(FileAllocator(tmp_path))) == 10 + 52


def test_file_allocator_creates_its_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "a" / "b"
    FileAllocator(state).allocate(labels("app=web"))
    assert FileAllocator(state).lookup(labels("app=web")) is not None


def test_an_engine_on_a_file_allocator_gives_endpoints_the_same_identity_after_restart(tmp_path: Path) -> None:
    engine = PolicyEngine(FileAllocator(tmp_path))
    with engine.batch():
        for name in ("web", "db", "cache"):
            engine.upsert_endpoint(Endpoint(name, labels(f"app={name}")))
    before: dict[str, Identity] = {name: engine.identity_of(name) for name in ("web", "db", "cache")}

    restarted = PolicyEngine(FileAllocator(tmp_path))
    for name in ("cache", "db", "web"):  # another order
        restarted.upsert_endpoint(Endpoint(name, labels(f"app={name}")))
        assert restarted.identity_of(name) == before[name]
