"""Sidecar mode's missing half: the application's own port answers only Envoy.

In sidecar mode Envoy listens on the endpoint's address at the policy port and forwards what the
policy allows to the application's port on the same address; without more, anyone who can reach
the address can also reach that port directly, past the policy. This sink keeps, in the network
namespace where each endpoint's address lives, an nftables table that resets every TCP connection
to ``ADDRESS:APP_PORT`` whose packets do not carry Envoy's upstream mark (``SO_MARK`` INGRESS_MARK,
set on the sidecar backend clusters; it needs CAP_NET_ADMIN, as Istio's sidecars do).

Each agent has its own table (named after its state dir), built whole at start and then changed
by set elements as endpoints come and go (an add looks at that endpoint only, and costs the same
at any count), deleted when no
endpoint needs it and when the agent stops (its Envoy stops with it; a crashed agent's table stays
until the next agent rebuilds it). A failure (no libnftables, no privilege, a namespace gone)
raises: the realizer keeps it as this sink's error and health reports it, naming the cause.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from ..bpf.netns import netns_exists, run_in_netns
from ..envoy.translate import INGRESS_MARK
from ..realizer import Desired
from . import nftables

_log = logging.getLogger(__name__)

TABLE_PREFIX = "cilia_guard_"  # + a digest of the agent's state dir: agents sharing a namespace keep apart


def table_name(owner: str) -> str:
    """The table of the agent whose state dir is ``owner``."""
    return TABLE_PREFIX + hashlib.sha256(owner.encode()).hexdigest()[:12]
Guarded = frozenset[tuple[str, int]]  # (application address, application port)


def guarded_ports(desired: Desired, netns_of: Callable[[str], str | None]) -> dict[str | None, Guarded]:
    """Per network namespace (None: the agent's own), the application ports that only Envoy may reach."""
    out: dict[str | None, set[tuple[str, int]]] = {}
    for name, ep in desired.endpoints.items():
        apps = {p.app_port for p in ep.ports if p.app_port != p.port}
        if apps:
            out.setdefault(netns_of(name), set()).update((ip, port) for ip in ep.ips for port in apps)
    return {ns: frozenset(ports) for ns, ports in out.items()}


def _element_sets(guarded: Guarded) -> dict[str, list[dict[str, Any]]]:
    """The set elements (address . port) of ``guarded``, by set name (IPv4 and IPv6 apart)."""
    out: dict[str, list[dict[str, Any]]] = {"app4": [], "app6": []}
    for address, port in sorted(guarded):
        out["app4" if ipaddress.ip_address(address).version == 4 else "app6"].append({"concat": [address, port]})
    return out


def _elements(table: str, verb: str, guarded: Guarded) -> list[dict[str, Any]]:
    return [{verb: {"element": {"family": "inet", "table": table, "name": name, "elem": elems}}}
            for name, elems in _element_sets(guarded).items() if elems]


def table_commands(name: str, guarded: Guarded, mark: int = INGRESS_MARK) -> list[dict[str, Any]]:
    """The nftables batch that makes the table hold exactly ``guarded`` (none: no table): two sets
    of address . port, and a rule per set resetting what is sent to one of them without ``mark``."""
    table = {"family": "inet", "name": name}
    # add-then-delete empties it whether or not it was there, in the same transaction as the refill
    commands: list[dict[str, Any]] = [{"add": {"table": table}}, {"delete": {"table": table}}]
    if not guarded:
        return commands
    commands += [{"add": {"table": table}},
                 {"add": {"chain": {"family": "inet", "table": name, "name": "input", "type": "filter",
                                    "hook": "input", "prio": 0, "policy": "accept"}}}]
    for set_name, family, addr_type in (("app4", "ip", "ipv4_addr"), ("app6", "ip6", "ipv6_addr")):
        commands.append({"add": {"set": {"family": "inet", "table": name, "name": set_name,
                                         "type": [addr_type, "inet_service"]}}})
        commands.append({"add": {"rule": {"family": "inet", "table": name, "chain": "input", "expr": [
            {"match": {"op": "==", "left": {"concat": [{"payload": {"protocol": family, "field": "daddr"}},
                                                       {"payload": {"protocol": "tcp", "field": "dport"}}]},
                       "right": f"@{set_name}"}},
            {"match": {"op": "!=", "left": {"meta": {"key": "mark"}}, "right": mark}},
            {"reject": {"type": "tcp reset"}}]}}})
    return commands + _elements(name, "add", guarded)


def update_commands(name: str, before: Guarded, after: Guarded, mark: int = INGRESS_MARK) -> list[dict[str, Any]]:
    """The batch from a table holding ``before`` to one holding ``after``: only the elements that
    differ while both hold some (an endpoint add costs the same at any count), else the whole table."""
    if not before or not after:
        return table_commands(name, after, mark)
    return _elements(name, "delete", before - after) + _elements(name, "add", after - before)


class SidecarGuard:
    """The realizer sink; ``netns_of`` names an endpoint's network namespace (None: the agent's)."""

    name = "sidecar-guard"

    def __init__(self, netns_of: Callable[[str], str | None], owner: str, mark: int = INGRESS_MARK) -> None:
        self.netns_of = netns_of
        self.table = table_name(owner)
        self.mark = mark
        self.applied: dict[str | None, Guarded] = {}  # what each namespace's table holds now
        # what each endpoint asks to guard (its namespace, its address . port pairs), and per namespace
        # how many endpoints ask for each pair: a change recounts only the endpoints it names
        self._of_endpoint: dict[str, tuple[str | None, Guarded]] = {}
        self._ports: dict[str | None, dict[tuple[str, int], int]] = {}
        self._behind: set[str | None] = set()  # namespaces whose last update failed

    def _wanted(self, desired: Desired) -> dict[str | None, Guarded]:
        """What the namespaces this change touches (and those a failure left behind) must hold;
        only the endpoints it names are looked at (all when ``desired.changed`` is None)."""
        if desired.changed is None:
            self._of_endpoint.clear()
            self._ports.clear()
        names = desired.endpoints.keys() if desired.changed is None else desired.changed
        touched: set[str | None] = set(self.applied) if desired.changed is None else set(self._behind)
        for name in names:
            old = self._of_endpoint.pop(name, None)
            if old is not None:
                touched.add(old[0])
                counts = self._ports[old[0]]
                for key in old[1]:
                    counts[key] -= 1
                    if not counts[key]:
                        del counts[key]
            ep = desired.endpoints.get(name)
            apps = {p.app_port for p in ep.ports if p.app_port != p.port} if ep is not None else set()
            if ep is None or not apps:
                continue
            netns = self.netns_of(name)
            mine = frozenset((ip, port) for ip in ep.ips for port in apps)
            self._of_endpoint[name] = (netns, mine)
            counts = self._ports.setdefault(netns, {})
            for key in mine:
                counts[key] = counts.get(key, 0) + 1
            touched.add(netns)
        return {ns: frozenset(self._ports.get(ns, ())) for ns in touched}

    def realize(self, desired: Desired) -> None:
        wanted = self._wanted(desired)
        failures = []
        self._behind = set()
        for netns in sorted(wanted, key=lambda ns: ns or ""):
            guarded = wanted[netns]
            before = self.applied.get(netns, frozenset()) if desired.changed is not None else frozenset()
            if before == guarded and desired.changed is not None:
                continue
            try:
                try:
                    self._apply(netns, update_commands(self.table, before, guarded, self.mark))
                except OSError:
                    if not before or not guarded:
                        raise
                    self._apply(netns, table_commands(self.table, guarded, self.mark))  # not as left: anew
            except OSError as e:
                if not guarded:  # nothing to keep closed any more (its namespace may be gone with it)
                    _log.warning("sidecar guard: cannot remove the table in %s: %s", netns or "the agent namespace", e)
                    self.applied.pop(netns, None)
                    continue
                failures.append(f"{netns or 'the agent namespace'}: cannot keep the application ports "
                                f"{_ports(guarded)} closed to all but Envoy: {e}")
                self._behind.add(netns)  # tried again at the next change, whatever it touches
                continue
            if guarded:
                self.applied[netns] = guarded
            else:
                self.applied.pop(netns, None)
        if failures:
            raise RuntimeError("; ".join(failures))

    def close(self) -> None:
        """Remove the tables (the agent stops and its Envoy with it; a crashed agent's tables stay
        until the next one replaces them). Errors are logged: the namespaces may be gone."""
        for netns in list(self.applied):
            try:
                self._apply(netns, table_commands(self.table, frozenset()))
            except OSError as e:
                _log.warning("sidecar guard: cannot remove %s in %s: %s", self.table, netns or "the agent namespace", e)
        self.applied.clear()

    @staticmethod
    def _apply(netns: str | None, commands: list[dict[str, Any]]) -> None:
        if netns is None:
            nftables.run(commands)
        else:
            run_in_netns(netns, partial(nftables.run, commands))


def remove_left(owner: str, namespaces: list[str | None]) -> list[str]:
    """``cilia cleanup``: delete the table the agent whose state dir is ``owner`` left in each of
    ``namespaces`` (None: the caller's own); where each one was removed, one line each. A namespace
    that is gone took its table with it; any other failure raises (the ports would stay closed)."""
    name = table_name(owner)
    done: list[str] = []
    if not nftables.available():
        return done
    for netns in namespaces:
        if netns is not None and not netns_exists(netns):
            continue
        listing = partial(nftables.run, [{"list": {"tables": None}}])
        tables = listing() if netns is None else run_in_netns(netns, listing)
        if not any(t.get("table", {}).get("name") == name for t in (tables or {}).get("nftables", [])):
            continue
        SidecarGuard._apply(netns, table_commands(name, frozenset()))
        done.append(f"removed the sidecar guard's nftables table inet {name} from "
                    f"{f'namespace {netns}' if netns else 'this namespace'}")
    return done


def _ports(guarded: Guarded) -> str:
    return ", ".join(f"{a}:{p}" for a, p in sorted(guarded)) or "(none)"
