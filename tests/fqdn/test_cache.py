"""The toFQDNs DNS cache: TTLs, --tofqdns-min-ttl, collection after expiry plus grace, open flows
keeping addresses, and the snapshot + journal on disk."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cilia.fqdn.cache import RECHECK, FqdnCache
from cilia.fqdn.store import CacheFileError, CacheStore

T0 = 1_000_000.0


def nothing_open() -> set[str]:
    return set()


def test_learn_reports_only_new_addresses() -> None:
    cache = FqdnCache(grace=0)
    first = cache.learn("API.Example.com.", ["192.0.2.1", "192.0.2.2"], 30, T0, "ep1")
    assert first == frozenset({"192.0.2.1", "192.0.2.2"})
    assert cache.learn("api.example.com", ["192.0.2.2"], 30, T0 + 1) is None  # repeated: nothing new
    third = cache.learn("api.example.com", ["192.0.2.3"], 30, T0 + 2)
    assert third == frozenset({"192.0.2.1", "192.0.2.2", "192.0.2.3"})
    assert cache.get("api.EXAMPLE.com") == {"192.0.2.1", "192.0.2.2", "192.0.2.3"}
    assert cache.learned_total == 3 and len(cache) == 1
    assert cache.learn("other.org", [], 30, T0) is None and len(cache) == 1


def test_bad_input_is_refused() -> None:
    cache = FqdnCache()
    with pytest.raises(ValueError):
        cache.learn("a.org", ["not-an-ip"], 30, T0)
    with pytest.raises(ValueError):
        cache.learn(".", ["192.0.2.1"], 30, T0)
    with pytest.raises(ValueError):
        FqdnCache(min_ttl=-1)


def test_ttl_expiry_and_grace() -> None:
    cache = FqdnCache(grace=5)
    cache.learn("a.org", ["192.0.2.1"], 10, T0)
    cache.learn("a.org", ["192.0.2.2"], 100, T0)
    assert cache.collect(T0 + 14, nothing_open) == {}  # expired at +10, grace until +15
    assert cache.collect(T0 + 15, nothing_open) == {"a.org": frozenset({"192.0.2.2"})}
    assert cache.expired_total == 1
    assert cache.collect(T0 + 105, nothing_open) == {"a.org": frozenset()}
    assert len(cache) == 0 and cache.names() == {}


def test_a_later_answer_extends_the_address() -> None:
    cache = FqdnCache(grace=0)
    cache.learn("a.org", ["192.0.2.1"], 10, T0)
    assert cache.learn("a.org", ["192.0.2.1"], 10, T0 + 8) is None
    assert cache.collect(T0 + 12, nothing_open) == {}
    assert cache.collect(T0 + 18, nothing_open) == {"a.org": frozenset()}


def test_refresh_extends_only_when_every_address_is_held() -> None:
    cache = FqdnCache(grace=0)
    assert not cache.refresh("a.org", ["192.0.2.1"], 10, T0)  # no such name
    cache.learn("a.org", ["192.0.2.1"], 10, T0)
    assert not cache.refresh("a.org", ["192.0.2.1", "192.0.2.2"], 10, T0 + 8)  # one not held: nothing moves
    assert cache.get("a.org") == {"192.0.2.1"}
    assert cache.collect(T0 + 10, nothing_open) == {"a.org": frozenset()}  # so it still expired at +10
    cache.learn("a.org", ["192.0.2.1"], 10, T0)
    assert cache.refresh("a.org", ["192.0.2.1"], 10, T0 + 8)  # held: expiry moves to +18
    assert cache.collect(T0 + 12, nothing_open) == {}
    assert cache.collect(T0 + 18, nothing_open) == {"a.org": frozenset()}


def test_min_ttl_raises_short_ttls() -> None:
    cache = FqdnCache(min_ttl=60, grace=0)
    cache.learn("a.org", ["192.0.2.1"], 1, T0)
    assert cache.collect(T0 + 59, nothing_open) == {}
    assert cache.collect(T0 + 60, nothing_open) == {"a.org": frozenset()}
    assert FqdnCache().min_ttl == 0  # Cilium's default: the server's TTL is honoured


def test_open_flow_keeps_an_expired_address() -> None:
    cache = FqdnCache(grace=0)
    cache.learn("a.org", ["192.0.2.1", "192.0.2.2"], 10, T0)
    asked = []

    def open_flows() -> set[str]:
        asked.append(1)
        return {"192.0.2.1"}

    assert cache.collect(T0 + 5, open_flows) == {} and not asked  # nothing due: conntrack not read
    assert cache.collect(T0 + 10, open_flows) == {"a.org": frozenset({"192.0.2.1"})}
    assert len(asked) == 1  # read once per collection
    assert cache.collect(T0 + 10 + RECHECK, open_flows) == {}  # still open
    assert cache.collect(T0 + 10 + 2 * RECHECK, nothing_open) == {"a.org": frozenset()}  # closed: gone


def test_clean() -> None:
    cache = FqdnCache()
    cache.learn("a.org", ["192.0.2.1"], 10, T0)
    cache.learn("b.org", ["192.0.2.2"], 10, T0)
    assert cache.clean("A.org.") == {"a.org": frozenset()}
    assert cache.clean("missing.org") == {}
    assert cache.clean() == {"b.org": frozenset()} and len(cache) == 0
    assert cache.collect(T0 + 100, nothing_open) == {}  # nothing left due


def test_entries_list() -> None:
    cache = FqdnCache(grace=0)
    cache.learn("b.org", ["192.0.2.2"], 10, T0, "ep2")
    cache.learn("a.org", ["2001:db8::1", "192.0.2.1"], 20, T0, "ep1")
    rows = [e.to_json(T0 + 5) for e in cache.entries()]
    assert [r["name"] for r in rows] == ["a.org", "b.org"]
    assert rows[0]["endpoint"] == "ep1" and rows[0]["ips"][0] == {"ip": "192.0.2.1", "expires": T0 + 20, "ttl": 15}
    assert [e.name for e in cache.entries("B.ORG")] == ["b.org"] and cache.entries("c.org") == []


def test_store_round_trip_with_snapshot_and_journal(tmp_path: Path) -> None:
    cache, store = FqdnCache(grace=0), CacheStore(tmp_path)
    cache.learn("a.org", ["192.0.2.1"], 10, T0, "ep1")
    store.append("a.org", {"192.0.2.1": T0 + 10}, "ep1")
    store.save(cache)
    assert not store.journal_path.exists()
    cache.learn("b.org", ["192.0.2.2"], 20, T0, "ep2")
    store.append("b.org", {"192.0.2.2": T0 + 20}, "ep2")
    store.close()
    for path in (store.snapshot_path, store.journal_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = FqdnCache(grace=0)
    assert CacheStore(tmp_path).load(back) == 2
    assert back.names() == cache.names()
    # expiry times come back too: collection after a restart removes what expired meanwhile
    assert back.collect(T0 + 15, nothing_open) == {"a.org": frozenset()}


def test_store_reads_a_journal_a_crashed_save_left(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    line = json.dumps({"name": "old.org", "ips": {"192.0.2.9": T0}, "endpoint": ""}) + "\n"
    store.old_journal_path.write_text(line, encoding="utf-8")  # moved aside, snapshot never written
    store.append("new.org", {"192.0.2.8": T0}, "")
    cache = FqdnCache()
    assert store.load(cache) == 2
    store.save(cache)
    assert not store.old_journal_path.exists()
    back = FqdnCache()
    assert CacheStore(tmp_path).load(back) == 2 and back.names() == cache.names()


def test_store_skips_a_cut_last_line_and_names_a_bad_one(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    good = json.dumps({"name": "a.org", "ips": {"192.0.2.1": T0}, "endpoint": ""})
    store.journal_path.write_text(good + "\n" + '{"name": "b.o', encoding="utf-8")
    cache = FqdnCache()
    assert store.load(cache) == 1
    store.journal_path.write_text("garbage\n" + good + "\n", encoding="utf-8")
    with pytest.raises(CacheFileError, match=r"fqdn-journal.jsonl:1: "):
        CacheStore(tmp_path).load(FqdnCache())
    store.journal_path.unlink()
    store.snapshot_path.write_text('{"format": 99}', encoding="utf-8")
    with pytest.raises(CacheFileError, match=r"fqdn-cache.json: ValueError: format 99"):
        CacheStore(tmp_path).load(FqdnCache())


def test_memory_for_100k_names_is_reasonable() -> None:
    import tracemalloc

    tracemalloc.start()
    cache = FqdnCache()
    for i in range(100_000):
        cache.learn(f"host-{i}.example.com", [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"], 300, T0)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(cache) == 100_000
    assert size < 80 << 20, f"{size / 1e6:.1f} MB for 100,000 names"
