"""What the agent persists in its state directory, and how it is written.

``state.json`` holds the revision, the endpoints, the services and the policy sources: every imported file's
text under its original path, with the keys of the policies still live from it. Keeping the text
(not a re-serialized model) means a restarted agent parses the same bytes, so every verdict still
names the user's file and line. Identities live beside it in ``identities.json``
(``cilia.policy.FileAllocator``). Writes go to a temporary file renamed over the old one, so a
crash leaves either the old state or the new, never half of one.

The running agent does not rewrite ``state.json`` at every change (that costs as much as the state
is big): ``StateWriter`` appends what changed to ``state.journal`` (``cilia.agent.journal``) and
now and then writes the whole state again (compaction; the journal then starts anew). Loading
replays the journal over the snapshot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..envoy.private_file import write_private
from ..services.model import Service
from ..services.validate import ServiceError, service_from_json, service_to_json
from ..specs import EndpointSpec, PolicyKey, StateError
from .journal import Journal, read

STATE_FILE = "state.json"
JOURNAL_FILE = "state.journal"
FORMAT = 1
COMPACT_MIN_BYTES = 1 << 20  # the journal is folded into state.json beyond this and twice the snapshot


@dataclass
class PolicySource:
    """One imported file: its path as the user gave it, its text, and its live policies."""

    path: str
    text: str
    keys: set[PolicyKey] = field(default_factory=set)
    audit: bool = False  # imported in audit mode: the endpoints it selects audit instead of dropping


class ServiceTable(dict[int, Service]):
    """The services by id, with what every change would otherwise rebuild for 10,000 of them kept
    beside: the services in id order (for ``Desired``) and the count of backends.
    Only item assignment, ``del`` and ``pop`` change it (what the agent uses)."""

    def __init__(self, items: dict[int, Service] | None = None) -> None:
        super().__init__(items or {})
        self._ordered: tuple[Service, ...] | None = None
        self.backends = sum(len(s.backends) for s in self.values())  # in all services

    def __setitem__(self, key: int, value: Service) -> None:
        old = self.get(key)
        super().__setitem__(key, value)
        self.backends += len(value.backends) - (len(old.backends) if old is not None else 0)
        self._ordered = None

    def __delitem__(self, key: int) -> None:
        self.backends -= len(self[key].backends)
        super().__delitem__(key)
        self._ordered = None

    def pop(self, key: int, *default: Any) -> Any:
        if key in self:
            self.backends -= len(self[key].backends)
        self._ordered = None
        return super().pop(key, *default)

    def update(self, *_: Any, **__: Any) -> None:
        raise TypeError("ServiceTable changes by item (the memos follow items)")

    setdefault = popitem = clear = update  # type: ignore[assignment]

    def ordered(self) -> tuple[Service, ...]:
        """The services by id: the same tuple until the table changes."""
        if self._ordered is None:
            self._ordered = tuple(v for _, v in sorted(self.items()))
        return self._ordered


@dataclass
class AgentState:
    revision: int = 0
    sources: list[PolicySource] = field(default_factory=list)  # oldest first
    endpoints: dict[str, EndpointSpec] = field(default_factory=dict)
    # BPF datapath: each endpoint's id (its policy map's index) and each L7 port's proxy port,
    # kept so a restarted agent finds its pinned maps and Envoy listeners where they were.
    endpoint_ids: dict[str, int] = field(default_factory=dict)
    proxy_ports: dict[str, int] = field(default_factory=dict)  # "ingress/80" -> 10000
    services: ServiceTable = field(default_factory=ServiceTable)  # by id (issue 16)
    # issue 13: endpoints accepted while no cluster-wide identity could be had (the kvstore
    # unreachable): not in the engine, nothing published, their BPF policy empty until admitted
    waiting: dict[str, EndpointSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.services, ServiceTable):
            self.services = ServiceTable(self.services)

    def add_source(self, path: str, text: str, keys: set[PolicyKey], audit: bool = False) -> None:
        """Record an import: its policies now come from this text, not from older sources."""
        for src in self.sources:
            src.keys -= keys
        self.sources = [s for s in self.sources if s.keys]
        self.sources.append(PolicySource(path, text, set(keys), audit))

    def audit_keys(self) -> set[PolicyKey]:
        return {k for s in self.sources if s.audit for k in s.keys}

    def drop_keys(self, keys: set[PolicyKey]) -> None:
        for src in self.sources:
            src.keys -= keys
        self.sources = [s for s in self.sources if s.keys]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "revision": self.revision,
            "policies": self.policies_json(),
            "endpoints": [_endpoint_json(e) for _, e in sorted(self.endpoints.items())],
            "endpoint_ids": self.endpoint_ids,
            "proxy_ports": self.proxy_ports,
            "services": [service_to_json(v) for v in self.services.ordered()],
            **({"waiting": [_endpoint_json(e) for _, e in sorted(self.waiting.items())]} if self.waiting else {}),
        }

    def policies_json(self) -> list[dict[str, Any]]:
        return [{"path": s.path, "text": s.text, "keys": sorted(list(k) for k in s.keys),
                 **({"audit": True} if s.audit else {})} for s in self.sources]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AgentState:
        if d.get("format") != FORMAT:
            raise StateError(f"state format {d.get('format')!r} is not {FORMAT}")
        sources = _sources(d.get("policies", []))
        endpoints = {e.name: e for e in (EndpointSpec.from_json(x) for x in d.get("endpoints", []))}
        services = ServiceTable()
        for i, raw in enumerate(d.get("services", [])):
            service = _service(raw, f"services[{i}]")
            services[service.id] = service
        waiting = {e.name: e for e in (EndpointSpec.from_json(x) for x in d.get("waiting", []))}
        return cls(int(d.get("revision", 0)), sources, endpoints,
                   {str(k): int(v) for k, v in d.get("endpoint_ids", {}).items()},
                   {str(k): int(v) for k, v in d.get("proxy_ports", {}).items()}, services, waiting)


def _service(raw: Any, where: str) -> Service:
    try:
        return service_from_json(raw)
    except ServiceError as e:
        raise StateError(f"{where}.{e}") from None


def _sources(policies: list[dict[str, Any]]) -> list[PolicySource]:
    return [PolicySource(str(s["path"]), str(s["text"]), {(k[0], k[1], k[2]) for k in s["keys"]},
                         bool(s.get("audit", False))) for s in policies]


def _endpoint_json(spec: EndpointSpec) -> dict[str, Any]:
    """``spec.to_json()``, made once per spec object (specs are frozen; the state is written whole at
    every change, so this keeps an endpoint add from re-rendering every endpoint)."""
    hit = _SPEC_JSON.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    if len(_SPEC_JSON) >= 1 << 17:
        _SPEC_JSON.clear()
    out = spec.to_json()
    _SPEC_JSON[id(spec)] = (spec, out)
    return out


#: id(spec) -> (the spec, kept alive so the id stays its own; its JSON form, never modified)
_SPEC_JSON: dict[int, tuple[EndpointSpec, dict[str, Any]]] = {}


def _read_snapshot(state_dir: Path) -> tuple[AgentState, int]:
    """``state.json`` (empty for a new directory) and the journal generation it starts."""
    path = state_dir / STATE_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return AgentState(), 0
    try:
        d = json.loads(raw)
        return AgentState.from_json(d), int(d.get("journal", 0))
    except (ValueError, KeyError, TypeError) as e:
        raise StateError(f"{path}: unreadable state: {e}") from None


def _replay(state: AgentState, record: dict[str, Any]) -> None:
    """Apply one journal record (``StateWriter._delta``) to ``state``."""
    state.revision = int(record["revision"])
    for name, spec in record.get("endpoints", {}).items():
        if spec is None:
            state.endpoints.pop(name, None)
        else:
            state.endpoints[name] = EndpointSpec.from_json(spec)
    for name, spec in record.get("waiting", {}).items():
        if spec is None:
            state.waiting.pop(name, None)
        else:
            state.waiting[name] = EndpointSpec.from_json(spec)
    for name, endpoint_id in record.get("endpoint_ids", {}).items():
        if endpoint_id is None:
            state.endpoint_ids.pop(name, None)
        else:
            state.endpoint_ids[name] = int(endpoint_id)
    if "proxy_ports" in record:
        state.proxy_ports = {str(k): int(v) for k, v in record["proxy_ports"].items()}
    if "policies" in record:
        state.sources = _sources(record["policies"])
    for key, raw in record.get("services", {}).items():
        if raw is None:
            state.services.pop(int(key), None)
        else:
            service = _service(raw, f"services.{key}")
            state.services[service.id] = service


def _load(state_dir: Path) -> tuple[AgentState, int]:
    state, generation = _read_snapshot(state_dir)
    path = state_dir / JOURNAL_FILE
    records, _ = read(path, generation)
    for number, record in enumerate(records, 2):
        try:
            _replay(state, record)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StateError(f"{path}:{number}: unreadable journal record: {e}") from None
    return state, generation


def load_state(state_dir: Path) -> AgentState:
    """The persisted state (the snapshot and the journal's changes over it), or an empty one for
    a new directory."""
    return _load(state_dir)[0]


def _write_snapshot(state_dir: Path, state: AgentState, generation: int) -> int:
    """Owner-only (it holds every policy's text) and on disk before it replaces the last one, so a
    crash leaves the old state or the new one, never an empty file. Returns its size."""
    # compact: json's C encoder does not indent, and a 5,000-endpoint state is written now and then
    text = json.dumps({**state.to_json(), "journal": generation}, sort_keys=True, separators=(",", ":"))
    write_private(state_dir / STATE_FILE, text)
    return len(text)


def save_state(state_dir: Path, state: AgentState) -> None:
    """Write the state whole (e.g. ``cilia cleanup``, with no agent running): a new snapshot, and
    the journal emptied for it."""
    _, generation = _read_snapshot(state_dir)
    _write_snapshot(state_dir, state, generation + 1)
    journal = Journal(state_dir / JOURNAL_FILE, generation + 1)
    journal.restart(generation + 1)
    journal.close()


class StateWriter:
    """The running agent's persistence: ``write`` appends what changed since the last write to the
    journal (the endpoints whose spec object changed, by name), and writes the state whole when
    the journal has grown past twice the snapshot (so each change costs O(1), amortized)."""

    def __init__(self, state_dir: Path) -> None:
        """Load the state (``loaded``) and fold the journal into a new snapshot: an agent starts
        with a short journal, and a new state dir gets its ``state.json`` at once."""
        self.state_dir = state_dir
        self.compactions = 0  # snapshots written, for tests
        self.loaded, generation = _load(state_dir)
        self._journal = Journal(state_dir / JOURNAL_FILE, generation)
        self._snapshot_size = 0
        self.compact(self.loaded)

    def _remember(self, state: AgentState) -> None:
        """What is on disk now: compared with at the next write."""
        self._endpoints = dict(state.endpoints)
        self._waiting = dict(state.waiting)
        self._endpoint_ids = dict(state.endpoint_ids)
        self._proxy_ports = dict(state.proxy_ports)
        self._sources = _sources_key(state)
        self._services = dict(state.services)

    def write(self, state: AgentState) -> None:
        """Persist ``state``; on return it survives a crash (a change of the revision alone: of the
        process)."""
        if self._journal.size > max(COMPACT_MIN_BYTES, 2 * self._snapshot_size):
            self.compact(state)
            return
        record = self._delta(state)
        # A revision alone (what learned names and other nodes' endpoints commit; their data has its
        # own, unsynced journal or none) is not synced: in the page cache it survives the agent's
        # crash, and a machine crash also ends every waiter that knew the number. Synced, it cost
        # each DNS answer an fsync before its release (issue 17).
        self._journal.append(record, sync=len(record) > 1)
        self._remember_delta(state)

    def compact(self, state: AgentState) -> None:
        generation = self._journal.generation + 1
        self._snapshot_size = _write_snapshot(self.state_dir, state, generation)
        self._journal.restart(generation)
        self.compactions += 1
        self._remember(state)

    def _delta(self, state: AgentState) -> dict[str, Any]:
        record: dict[str, Any] = {"revision": state.revision}
        endpoints: dict[str, Any] = {n: _endpoint_json(s) for n, s in state.endpoints.items()
                                     if self._endpoints.get(n) is not s}
        endpoints.update(dict.fromkeys(self._endpoints.keys() - state.endpoints.keys()))
        if endpoints:
            record["endpoints"] = endpoints
        if state.waiting != self._waiting:
            waiting: dict[str, Any] = {n: _endpoint_json(s) for n, s in state.waiting.items()
                                       if self._waiting.get(n) is not s}
            waiting.update(dict.fromkeys(self._waiting.keys() - state.waiting.keys()))
            record["waiting"] = waiting
        if state.endpoint_ids != self._endpoint_ids:
            ids: dict[str, int | None] = {n: i for n, i in state.endpoint_ids.items()
                                          if self._endpoint_ids.get(n) != i}
            ids.update(dict.fromkeys(self._endpoint_ids.keys() - state.endpoint_ids.keys()))
            record["endpoint_ids"] = ids
        if state.proxy_ports != self._proxy_ports:
            record["proxy_ports"] = state.proxy_ports
        sources = _sources_key(state)
        if sources != self._sources:
            record["policies"] = state.policies_json()
        services: dict[str, Any] = {str(i): service_to_json(v) for i, v in state.services.items()
                                    if self._services.get(i) is not v}
        services.update((str(i), None) for i in self._services.keys() - state.services.keys())
        if services:
            record["services"] = services
        return record

    def _remember_delta(self, state: AgentState) -> None:
        """``_remember`` for a change just journaled, touching only what it names."""
        for n in self._endpoints.keys() - state.endpoints.keys():
            del self._endpoints[n]
        self._endpoints.update((n, s) for n, s in state.endpoints.items() if self._endpoints.get(n) is not s)
        if state.waiting != self._waiting:
            self._waiting = dict(state.waiting)
        if state.endpoint_ids != self._endpoint_ids:
            self._endpoint_ids = dict(state.endpoint_ids)
        if state.proxy_ports != self._proxy_ports:
            self._proxy_ports = dict(state.proxy_ports)
        self._sources = _sources_key(state)
        for i in self._services.keys() - state.services.keys():
            del self._services[i]
        self._services.update((i, v) for i, v in state.services.items() if self._services.get(i) is not v)

    def close(self) -> None:
        self._journal.close()


def _sources_key(state: AgentState) -> tuple[tuple[str, str, frozenset[PolicyKey], bool], ...]:
    """What of the sources is persisted (the texts compare by identity first: fast)."""
    return tuple((s.path, s.text, frozenset(s.keys), s.audit) for s in state.sources)
