"""The agent's toFQDNs: what the DNS proxy learns goes into the cache, its journal, the policy
engine and every sink, before the proxy releases the answer.

``learn`` is the proxy's contract (``Agent.learn_fqdn``): it returns only once the BPF ipcache and
policy maps hold the new addresses (the realizer writes them synchronously under the agent's lock)
and the managed Envoy acknowledged the listeners of that revision, so the client's first
connection to the answer is never dropped. An answer that brings no new address (a repeated
lookup) only moves expiry times: no lock, no revision.

``known`` is the proxy's cheap check on its own loop: True when every address of the answer is in
what the engine was last fed for that name *and* that feed was realized (``_published``), so the
answer may go without the learner's thread. "In the cache" is not enough: an address another
thread just added to the cache may not be in the maps yet, and its answer must wait for that.

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
from ..xds import NackError

if TYPE_CHECKING:
    from ..policy.engine import PolicyEngine
    from .daemon import Agent

_log = logging.getLogger(__name__)

SNAPSHOT_EVERY = 30.0  # seconds between snapshots while something changed
SNAPSHOT_LINES = 10_000  # or once the journal is this long


class _Fed:
    """One feed of names to the engine: their addresses, its number and its revision."""

    def __init__(self) -> None:
        self.addresses: dict[str, frozenset[str]] = {}
        self.number = 0
        self.revision: int | None = None


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
        # name -> addresses the maps hold for it (realized, Envoy waited for), and the number of the
        # feed that said so: a feed's news is taken only if no later feed of the name came first
        self._published: dict[str, tuple[int, frozenset[str]]] = {}
        self._feeds = 0  # feeds numbered under the agent's lock, in the engine's order
        self._published_lock = threading.Lock()

    def load(self) -> dict[str, frozenset[str]]:
        """Read the persisted cache; what the engine must select on start."""
        self.store.load(self.cache)
        return self.cache.names()

    # ------------------------------------------------------------------ learning

    def known(self, endpoint_name: str, qname: str, ips: Sequence[str], ttl: int) -> bool:
        """The proxy's check before ``learn``: True if every address is in the maps already
        (their expiry times are pushed out here); False: ``learn`` must run."""
        name = normalize(qname)
        published = self._published.get(name)
        if published is None or not published[1].issuperset(ips):  # (addresses in canonical form as answered)
            return False
        if not self.cache.refresh(name, ips, ttl, time.time(), endpoint_name):
            return False  # collected meanwhile: ``learn`` feeds it again
        self.repeated_total += 1
        return True

    def learn(self, endpoint_name: str, qname: str, ips: Sequence[str], ttl: int) -> None:
        now = time.time()
        gained = self.cache.learn(qname, ips, ttl, now, endpoint_name)
        name = normalize(qname)
        if gained is None:
            published = self._published.get(name)
            if published is not None and published[1].issuperset(ips):
                self.repeated_total += 1
                return
            # in the cache but not known to be in the maps (another answer's feed still running):
            # feed it too, which returns once the maps have it
        else:
            entries = self.cache.entries(name)
            if entries:
                self.store.append(name, entries[0].ips, endpoint_name)
                self._dirty_at = self._dirty_at or time.monotonic()
        fed = self._feed([name])
        if fed.revision is not None:
            self._await_proxy(fed.revision)
        self._publish(fed)

    def feed(self, names: Iterable[str]) -> int | None:
        """Give the engine these names' current addresses (read under the agent's lock, so the
        last of two racing answers never hides the other's address); the new revision, if any."""
        fed = self._feed(names)
        self._publish(fed)
        return fed.revision

    def _feed(self, names: Iterable[str]) -> _Fed:
        names = list(names)
        fed = _Fed()

        def change(engine: PolicyEngine) -> Iterable[str] | None:
            fed.addresses = {n: self.cache.get(n) for n in names}
            with self._published_lock:
                self._feeds += 1
                fed.number = self._feeds
                for n, ips in fed.addresses.items():  # what leaves the maps is not published from now on
                    old = self._published.get(n)
                    if old is not None:
                        self._published[n] = (fed.number, old[1] & ips)
            return engine.update_fqdn(fed.addresses).endpoints or None

        fed.revision = self._agent.change_engine(change)
        return fed

    def _publish(self, fed: _Fed) -> None:
        """``fed``'s addresses are in the maps: ``known`` may say so, unless a later feed of a
        name came first (its addresses are the ones that count)."""
        with self._published_lock:
            for n, ips in fed.addresses.items():
                old = self._published.get(n)
                if old is None or old[0] <= fed.number:
                    self._published[n] = (fed.number, ips)

    def flush(self) -> None:
        """Write what learning deferred: the CIDR identities (identities.json)."""
        flush = getattr(self._agent.engine.allocator, "flush", None)
        if flush is not None:
            flush()

    def _await_proxy(self, revision: int) -> None:
        """Wait until the managed Envoy took ``revision``'s listeners (an L7 egress listener must
        know the new addresses' identities); a NACK or timeout is reported, the answer released."""
        agent = self._agent
        try:
            agent.wait_for_managed_envoy(revision)
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
