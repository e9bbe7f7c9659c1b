"""The agent's toFQDNs: what the DNS proxy learns goes into the cache, its journal, the policy
engine and every sink, before the proxy releases the answer.

``learn`` is the proxy's contract (``Agent.learn_fqdn``): it returns only once the BPF ipcache and
policy maps hold the new addresses (the realizer writes them synchronously under the agent's lock)
and the managed Envoy acknowledged the listeners of that revision, so the client's first
connection to the answer is never dropped. An answer that brings no new address (a repeated
lookup) only moves expiry times: no lock, no revision.

A collector thread removes addresses after their TTL plus the grace unless conntrack still has a
flow to them that saw a packet within ``ct_idle`` seconds, and snapshots the cache now and then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..fqdn.cache import FqdnCache
from ..fqdn.config import FqdnConfig
from ..fqdn.store import CacheStore
from ..policy.l7.dns import normalize
from ..xds import LISTENER, NackError

if TYPE_CHECKING:
    from .daemon import Agent

_log = logging.getLogger(__name__)

SNAPSHOT_EVERY = 30.0  # seconds between snapshots while something changed
SNAPSHOT_LINES = 10_000  # or once the journal is this long


class FqdnLearner:
    def __init__(self, agent: Agent, config: FqdnConfig) -> None:
        self.config = config
        self.cache = FqdnCache(config.min_ttl, config.grace)
        self.store = CacheStore(agent.config.state_dir)
        self.repeated_total = 0  # answers with nothing new
        self._agent = agent
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dirty_at: float | None = None  # when the cache first changed after the last snapshot

    def load(self) -> dict[str, frozenset[str]]:
        """Read the persisted cache; what the engine must select on start."""
        self.store.load(self.cache)
        return self.cache.names()

    # ------------------------------------------------------------------ learning

    def learn(self, endpoint_name: str, qname: str, ips: Sequence[str], ttl: int) -> None:
        now = time.time()
        gained = self.cache.learn(qname, ips, ttl, now, endpoint_name)
        if gained is None:
            self.repeated_total += 1
            return
        name = normalize(qname)
        entries = self.cache.entries(name)
        if entries:
            self.store.append(name, entries[0].ips, endpoint_name)
            self._dirty_at = self._dirty_at or time.monotonic()
        revision = self.feed([name])
        if revision is not None:
            self._await_proxy(revision)

    def feed(self, names: Iterable[str]) -> int | None:
        """Give the engine these names' current addresses (read under the agent's lock, so the
        last of two racing answers never hides the other's address); the new revision, if any."""
        names = list(names)
        return self._agent.change_engine(
            lambda engine: engine.update_fqdn({n: self.cache.get(n) for n in names}).endpoints or None)

    def flush(self) -> None:
        """Write what learning deferred: the CIDR identities (identities.json)."""
        flush = getattr(self._agent.engine.allocator, "flush", None)
        if flush is not None:
            flush()

    def _await_proxy(self, revision: int) -> None:
        """Wait until the managed Envoy took ``revision``'s listeners (an L7 egress listener must
        know the new addresses' identities); a NACK or timeout is reported, the answer released."""
        agent = self._agent
        if agent.envoy is None or not agent.envoy.status().running:
            return
        version = agent.proxy.version_for(revision)
        if version is None:
            return
        try:
            agent.tracker.wait(agent.config.node_id, LISTENER, version, agent.config.apply_timeout)
        except NackError as e:
            agent._error("fqdn", f"Envoy rejected revision {revision} (learned addresses): {e.message}")
        except TimeoutError:
            agent._error("fqdn", f"Envoy has not acknowledged revision {revision} (learned addresses) after "
                                 f"{agent.config.apply_timeout:g}s")

    def clean(self, name: str | None) -> tuple[int, int | None]:
        """``cilia fqdn cache clean``: forget names (all with None); (names removed, revision)."""
        removed = self.cache.clean(name)
        revision = self.feed(removed) if removed else None
        self.store.save(self.cache)
        return len(removed), revision

    # ------------------------------------------------------------------ collection

    def collect(self, now: float | None = None) -> int | None:
        """One collection; the revision it committed, if any."""
        changed = self.cache.collect(time.time() if now is None else now, self._open_flow_addresses)
        if not changed:
            return None
        self._dirty_at = self._dirty_at or time.monotonic()
        return self.feed(changed)

    def _open_flow_addresses(self) -> set[str]:
        node = self._agent.node
        if node is None or not node.started:
            return set()
        since = time.monotonic_ns() - int(self.config.ct_idle * 1e9)
        out: set[str] = set()
        try:
            entries = node.datapath.conntrack()
        except OSError as e:  # fail towards keeping: an address in use must not vanish
            _log.warning("fqdn: cannot read conntrack: %s", e)
            return {ip for n in self.cache.names().values() for ip in n}
        for ct in entries:
            if ct.last_seen >= since:
                out.add(ct.saddr)
                out.add(ct.daddr)
        return out

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fqdn-collect", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            self.store.save(self.cache)
            self.flush()
        except OSError as e:
            _log.warning("fqdn: cannot save the cache: %s", e)
        self.store.close()

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval):
            try:
                self.collect()
                self._maybe_snapshot()
                self.flush()
            except Exception as e:  # the collector must outlive one bad round; status shows it
                _log.exception("fqdn collection failed")
                self._agent._error("fqdn", f"collection failed: {e}")

    def _maybe_snapshot(self) -> None:
        if self._dirty_at is None:
            return
        if self.store.journal_lines >= SNAPSHOT_LINES or time.monotonic() - self._dirty_at >= SNAPSHOT_EVERY:
            self._dirty_at = None
            self.store.save(self.cache)

    # ------------------------------------------------------------------ reading

    def list(self, name: str | None = None) -> list[dict[str, Any]]:
        now = time.time()
        engine = self._agent.engine
        return [{**e.to_json(now), "selected": engine.fqdn_selected(e.name)} for e in self.cache.entries(name)]

    def stats(self) -> dict[str, int]:
        return {"names": len(self.cache), "ips": self.cache.ip_count(), "learned": self.cache.learned_total,
                "expired": self.cache.expired_total, "repeated": self.repeated_total}
