"""What the agent persists in its state directory, and how it is written.

``state.json`` holds the revision, the endpoints and the policy sources: every imported file's
text under its original path, with the keys of the policies still live from it. Keeping the text
(not a re-serialized model) means a restarted agent parses the same bytes, so every verdict still
names the user's file and line. Identities live beside it in ``identities.json``
(``cilia.policy.FileAllocator``). Writes go to a temporary file renamed over the old one, so a
crash leaves either the old state or the new, never half of one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..envoy.private_file import write_private
from ..specs import EndpointSpec, PolicyKey, StateError

STATE_FILE = "state.json"
FORMAT = 1


@dataclass
class PolicySource:
    """One imported file: its path as the user gave it, its text, and its live policies."""

    path: str
    text: str
    keys: set[PolicyKey] = field(default_factory=set)
    audit: bool = False  # imported in audit mode: the endpoints it selects audit instead of dropping


@dataclass
class AgentState:
    revision: int = 0
    sources: list[PolicySource] = field(default_factory=list)  # oldest first
    endpoints: dict[str, EndpointSpec] = field(default_factory=dict)
    # BPF datapath: each endpoint's id (its policy map's index) and each L7 port's proxy port,
    # kept so a restarted agent finds its pinned maps and Envoy listeners where they were.
    endpoint_ids: dict[str, int] = field(default_factory=dict)
    proxy_ports: dict[str, int] = field(default_factory=dict)  # "ingress/80" -> 10000

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
            "policies": [{"path": s.path, "text": s.text, "keys": sorted(list(k) for k in s.keys),
                          **({"audit": True} if s.audit else {})} for s in self.sources],
            "endpoints": [_endpoint_json(e) for _, e in sorted(self.endpoints.items())],
            "endpoint_ids": self.endpoint_ids,
            "proxy_ports": self.proxy_ports,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AgentState:
        if d.get("format") != FORMAT:
            raise StateError(f"state format {d.get('format')!r} is not {FORMAT}")
        sources = [PolicySource(str(s["path"]), str(s["text"]), {(k[0], k[1], k[2]) for k in s["keys"]},
                                bool(s.get("audit", False))) for s in d.get("policies", [])]
        endpoints = {e.name: e for e in (EndpointSpec.from_json(x) for x in d.get("endpoints", []))}
        return cls(int(d.get("revision", 0)), sources, endpoints,
                   {str(k): int(v) for k, v in d.get("endpoint_ids", {}).items()},
                   {str(k): int(v) for k, v in d.get("proxy_ports", {}).items()})


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


def load_state(state_dir: Path) -> AgentState:
    """The persisted state, or an empty one for a new directory."""
    path = state_dir / STATE_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return AgentState()
    try:
        return AgentState.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        raise StateError(f"{path}: unreadable state: {e}") from None


def save_state(state_dir: Path, state: AgentState) -> None:
    """Owner-only (it holds every policy's text) and on disk before it replaces the last one, so a
    crash leaves the old state or the new one, never an empty file."""
    write_state_text(state_dir, state_text(state))


def state_text(state: AgentState) -> str:
    # compact: json's C encoder does not indent, and this runs at every change (a 5,000-endpoint state)
    return json.dumps(state.to_json(), sort_keys=True, separators=(",", ":"))


def write_state_text(state_dir: Path, text: str) -> None:
    """``save_state`` in two steps: the text (taken where the state may not change) and the write."""
    write_private(state_dir / STATE_FILE, text)
