"""Proxy ports: one Envoy transparent listener port per (direction, TCP port) some endpoint
redirects to L7 other than DNS (``dns`` rules go to the agent's DNS proxy, on its own port), BPF
datapath only, in Cilium's range 10000-20000. Ports are kept across changes
and restarts (the agent persists them) so a redirect in the kernel never points at a listener
that moved; a port no longer needed is released.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..bpf.node import proxy_key
from ..policy import Direction, Protocol
from ..policy.mapstate import MapState, Verdict

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Redirect:
    """A map-state entry sending a port to the proxy (``l7_protocol`` "" when it names none)."""

    direction: Direction
    protocol: Protocol
    port_lo: int
    port_hi: int
    l7_protocol: str


class RedirectIndex:
    """Each endpoint's REDIRECT entries, scanned again only when its map state changed."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[MapState, tuple[Redirect, ...]]] = {}

    def of(self, name: str, ms: MapState) -> tuple[Redirect, ...]:
        done = self._done.get(name)
        if done is None or done[0] is not ms:
            found: dict[Redirect, None] = {}
            for d in (ms.ingress, ms.egress):
                # identities selected by the same rules share a group: each group once (the
                # engine's snapshots list them; a few, however many identities)
                groups = d.distinct if d.distinct is not None else tuple({id(g): g for g in d.groups.values()}.values())
                for group in (d.any_group, *groups):
                    for l4, e in group.items():
                        if e.verdict is Verdict.REDIRECT:
                            found[Redirect(d.direction, l4.protocol, l4.port_lo, l4.port_hi,
                                           e.l7.protocol if e.l7 is not None else "")] = None
            done = (ms, tuple(found))
            self._done[name] = done
        return done[1]

    def update(self, map_states: Mapping[str, MapState]) -> dict[str, tuple[Redirect, ...]]:
        """Every endpoint's redirects; endpoints not in ``map_states`` are forgotten."""
        out = {name: self.of(name, ms) for name, ms in map_states.items()}
        self._done = {n: d for n, d in self._done.items() if n in map_states}
        return out


def allocate(redirects: Iterable[tuple[Redirect, ...]], current: Mapping[str, int],
             port_range: tuple[int, int]) -> dict[str, int]:
    """Proxy ports for every single TCP port redirected, keeping the ports ``current`` gave."""
    needed = {proxy_key(r.direction, r.port_lo) for rs in redirects for r in rs
              if r.protocol is Protocol.TCP and r.port_lo == r.port_hi
              and r.l7_protocol != "dns"}  # DNS goes to the DNS proxy's own port, never to Envoy
    ports = {k: v for k, v in current.items() if k in needed}
    lo, hi = port_range
    taken = set(ports.values())
    free = (p for p in range(lo, hi + 1) if p not in taken)
    for key in sorted(needed - ports.keys()):
        port = next(free, None)
        if port is None:
            _log.error("no free proxy port in %d-%d for %s: its traffic is dropped", lo, hi, key)
            continue
        ports[key] = port
    return ports
