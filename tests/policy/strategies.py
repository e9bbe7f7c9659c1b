"""Hypothesis strategies: small random policies (as YAML text) and flows.

The universe is deliberately tiny so that random rules and random flows meet:
labels app in {a, b, c} and env in {prod, dev}, namespaces default and other, a
handful of nested prefixes, ports around 80 and a few HTTP methods and paths.
Policies are drawn as plain dicts and written out as YAML, so every example also
goes through the parser.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from cilia.policy.flows import HTTPRequest
from cilia.policy.labels import Label, LabelSet
from cilia.policy.model import Protocol

from tests.policy.oracle import NAMESPACE_KEY, Flow, Side

APPS = ("a", "b", "c")
ENVS = ("prod", "dev")
NAMESPACES = ("default", "other")
PREFIXES = ("10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "192.168.0.0/16", "0.0.0.0/0")
ADDRESSES = ("10.1.2.3", "10.1.9.9", "10.200.0.1", "192.168.1.1", "8.8.8.8")
ENTITIES = ("all", "world", "cluster", "host", "world-ipv4")
FLOW_PORTS = (80, 80, 80, 85, 443, 8080, 999, 22)  # 80 is where the L7 rules are
ICMP_TYPES = (0, 8)
HTTP_METHODS = ("GET", "POST", "PUT")
HTTP_PATHS = ("/a", "/a/x", "/b", "/c")

Doc = dict[str, Any]


# --- YAML ------------------------------------------------------------------------


def to_yaml(doc: Any) -> str:
    """Block-style YAML for dicts, lists, strings, ints and bools."""
    return "\n".join(_emit(doc, 0)) + "\n"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        assert not value
        return "{}"
    if isinstance(value, list):
        assert not value
        return "[]"
    text = str(value)
    plain = text.replace("-", "").replace(".", "").replace("/", "").isalnum() and not text[0].isdigit()
    return text if plain and text not in ("true", "false", "null", "yes", "no") else json.dumps(text)


def _emit(value: Any, depth: int) -> list[str]:
    pad = "  " * depth
    lines: list[str] = []
    if isinstance(value, dict):
        for key, child in value.items():
            if isinstance(child, (dict, list)) and child:
                lines.append(f"{pad}{_scalar(key)}:")
                lines.extend(_emit(child, depth + 1))
            else:
                lines.append(f"{pad}{_scalar(key)}: {_scalar(child)}")
        return lines
    assert isinstance(value, list)
    for child in value:
        if isinstance(child, (dict, list)) and child:
            sub = _emit(child, depth + 1)
            lines.append(f"{pad}- {sub[0].lstrip()}")
            lines.extend(sub[1:])
        else:
            lines.append(f"{pad}- {_scalar(child)}")
    return lines


# --- selectors ---------------------------------------------------------------------
# Strategies are built once, at import: building them inside composites on every
# draw costs more than the draws themselves.

_bools = st.booleans()
_one_in = {n: st.integers(0, n - 1) for n in (2, 3, 4, 5, 6, 7, 11, 16)}
_sel_keys = st.lists(st.sampled_from(("app", "env")), max_size=2, unique=True)
_sel_prefix = st.sampled_from(("", "", "k8s:", "any:"))
_ns_prefix = st.sampled_from(("", "k8s:"))
_apps = st.sampled_from(APPS)
_envs = st.sampled_from(ENVS)
_namespaces = st.sampled_from(NAMESPACES)
_expr_keys = st.sampled_from(("app", "env", "k8s:app", NAMESPACE_KEY))
_operators = st.sampled_from(("In", "NotIn", "Exists", "DoesNotExist"))
_expr_values = {
    universe: st.lists(st.sampled_from(universe), min_size=1, max_size=2, unique=True)
    for universe in (APPS, ENVS, NAMESPACES)
}


def _chance(draw: st.DrawFn, n: int) -> bool:
    """True one time in ``n``."""
    return draw(_one_in[n]) == 0


@st.composite
def _selectors(draw: st.DrawFn) -> Doc:
    """A label selector: 0-2 of app/env (any source prefix), sometimes a namespace,
    sometimes a matchExpression."""
    match_labels: dict[str, str] = {}
    for key in draw(_sel_keys):
        match_labels[draw(_sel_prefix) + key] = draw(_apps if key == "app" else _envs)
    if _chance(draw, 6):
        match_labels[draw(_ns_prefix) + NAMESPACE_KEY] = draw(_namespaces)
    sel: Doc = {}
    if match_labels:
        sel["matchLabels"] = match_labels
    if _chance(draw, 4):
        key = draw(_expr_keys)
        universe = NAMESPACES if key == NAMESPACE_KEY else APPS if key.endswith("app") else ENVS
        op = draw(_operators)
        expr: Doc = {"key": key, "operator": op}
        if op in ("In", "NotIn"):
            expr["values"] = draw(_expr_values[universe])
        sel["matchExpressions"] = [expr]
    return sel


selectors = _selectors()

# --- L4 / L7 -------------------------------------------------------------------------

_PORT_CHOICES = ((80, None), (443, None), (0, None), (8080, None), (80, 90), (1, 1000),
                 (85, 443), (443, 8080))  # the last two overlap the others partially
_port_choices = {False: st.sampled_from(_PORT_CHOICES),
                 True: st.sampled_from([c for c in _PORT_CHOICES if c[0] != 0])}
_port_protocols = {False: st.sampled_from(("TCP", "UDP", "ANY", "SCTP", None)),
                   True: st.sampled_from(("TCP", "ANY", None))}  # HTTP needs TCP
_as_string = st.booleans()


@st.composite
def _port_protocol(draw: st.DrawFn, l7: bool) -> Doc:
    port, end = draw(_port_choices[l7])
    out: Doc = {"port": str(port) if draw(_as_string) else port}
    if end is not None:
        out["endPort"] = end
    protocol = draw(_port_protocols[l7])
    if protocol is not None:
        out["protocol"] = protocol
    return out


_methods = st.sampled_from(("GET", "POST"))
_paths = st.sampled_from(("/a", "/a.*", "/b"))


@st.composite
def _http_rule(draw: st.DrawFn) -> Doc:
    rule: Doc = {}
    if draw(_bools):
        rule["method"] = draw(_methods)
    if not _chance(draw, 4):
        rule["path"] = draw(_paths)
    return rule


_port_lists = {l7: st.lists(_port_protocol(l7), min_size=1, max_size=2) for l7 in (False, True)}
_http_lists = st.lists(_http_rule(), max_size=2)


@st.composite
def _port_rule(draw: st.DrawFn, deny: bool) -> Doc:
    l7 = not deny and _chance(draw, 2)
    out: Doc = {"ports": draw(_port_lists[l7])}
    if l7:
        out["rules"] = {"http": draw(_http_lists)}
    elif not deny and _chance(draw, 16):
        out["rules"] = {}
    return out


_icmp_types = st.sampled_from((0, 8, "EchoRequest", "EchoReply"))
_icmp_families = st.sampled_from((None, "IPv4", "IPv6"))


@st.composite
def _icmp_field(draw: st.DrawFn) -> Doc:
    field: Doc = {"type": draw(_icmp_types)}
    family = draw(_icmp_families)
    if family is not None:
        field["family"] = family
        if family == "IPv6" and isinstance(field["type"], str):
            field["type"] = 128
    return field


_icmps = st.lists(_icmp_field(), min_size=1, max_size=2).map(lambda fields: [{"fields": fields}])

# --- rules -----------------------------------------------------------------------------

_prefixes = st.sampled_from(PREFIXES)
_inside = {
    p: st.lists(st.sampled_from([q for q in PREFIXES if ipaddress.ip_network(q).subnet_of(
        ipaddress.ip_network(p))]), max_size=2, unique=True)  # type: ignore[arg-type]
    for p in PREFIXES
}


@st.composite
def _cidr_set(draw: st.DrawFn) -> Doc:
    cidr = draw(_prefixes)
    out: Doc = {"cidr": cidr}
    excepts = draw(_inside[cidr])
    if excepts:
        out["except"] = excepts
    return out


_peer_kinds = st.sampled_from(("none", "endpoints", "endpoints", "cidr", "cidrset", "entities"))
_selector_lists = st.lists(selectors, min_size=1, max_size=2)
_cidr_lists = st.lists(_prefixes, min_size=1, max_size=2, unique=True)
_cidr_set_lists = st.lists(_cidr_set(), min_size=1, max_size=2)
_entity_lists = st.lists(st.sampled_from(ENTITIES), min_size=1, max_size=2, unique=True)
_l4_kinds = st.sampled_from(("none", "ports", "ports", "icmps"))
_port_rule_lists = {deny: st.lists(_port_rule(deny), min_size=1, max_size=2) for deny in (False, True)}


@st.composite
def _peer_item(draw: st.DrawFn, ingress: bool, deny: bool) -> Doc:
    pre = "from" if ingress else "to"
    item: Doc = {}
    kind = draw(_peer_kinds)
    if kind == "endpoints":
        item[pre + "Endpoints"] = draw(_selector_lists)
    elif kind == "cidr":
        item[pre + "CIDR"] = draw(_cidr_lists)
    elif kind == "cidrset":
        item[pre + "CIDRSet"] = draw(_cidr_set_lists)
    elif kind == "entities":
        item[pre + "Entities"] = draw(_entity_lists)
    if not deny and _chance(draw, 7):
        item[pre + "Requires"] = [draw(selectors)]
    l4 = draw(_l4_kinds)
    if l4 == "ports":
        item["toPorts"] = draw(_port_rule_lists[deny])
    elif l4 == "icmps":
        item["icmps"] = draw(_icmps)
    return item


_allow_items = {ingress: st.lists(_peer_item(ingress, False), max_size=2) for ingress in (True, False)}
_deny_items = {ingress: st.lists(_peer_item(ingress, True), min_size=1, max_size=2) for ingress in (True, False)}
_default_deny = st.fixed_dictionaries({}, optional={"ingress": st.booleans(), "egress": st.booleans()})


@st.composite
def _rule(draw: st.DrawFn) -> Doc:
    rule: Doc = {"endpointSelector": draw(selectors)}
    for ingress, name in ((True, "ingress"), (False, "egress")):
        items = draw(_allow_items[ingress])
        if items or _chance(draw, 11):
            rule[name] = items  # sometimes an empty list
        if _chance(draw, 4):
            rule[name + "Deny"] = draw(_deny_items[ingress])
    if _chance(draw, 5):
        rule["enableDefaultDeny"] = draw(_default_deny)
    return rule


rules = _rule()
_kinds = st.sampled_from(("CiliumNetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"))
_policy_namespaces = st.sampled_from((None, None, "default", "other"))
_rule_lists = st.lists(rules, min_size=1, max_size=2)


@st.composite
def _policy_doc(draw: st.DrawFn, name: str) -> Doc:
    kind = draw(_kinds)
    metadata: Doc = {"name": name}
    if kind == "CiliumNetworkPolicy":
        ns = draw(_policy_namespaces)
        if ns is not None:
            metadata["namespace"] = ns
    doc: Doc = {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": metadata}
    if _chance(draw, 4):
        doc["specs"] = draw(_rule_lists)
    else:
        doc["spec"] = draw(rules)
    return doc


_policy_docs: dict[str, st.SearchStrategy[Doc]] = {}


def policy_docs(name: str) -> st.SearchStrategy[Doc]:
    """One policy document named ``name``."""
    if name not in _policy_docs:
        _policy_docs[name] = _policy_doc(name)
    return _policy_docs[name]


def policy_sets(min_size: int = 1, max_size: int = 4) -> st.SearchStrategy[list[Doc]]:
    """Policies with distinct names (so distinct keys)."""
    sized = {n: st.tuples(*(policy_docs(f"p{i}") for i in range(n))).map(list)
             for n in range(min_size, max_size + 1)}
    return st.integers(min_size, max_size).flatmap(lambda n: sized[n])


def document_text(docs: list[Doc]) -> str:
    return "---\n".join(to_yaml(d) for d in docs)


# --- endpoints and flows ------------------------------------------------------------------

_ep_apps = st.sampled_from((*APPS, None))
_ep_envs = st.sampled_from((*ENVS, None))
_ep_namespaces = st.sampled_from((None, "default", "other"))


@st.composite
def _endpoint_labels(draw: st.DrawFn) -> LabelSet:
    """Endpoint labels from the universe; without a namespace label sometimes."""
    labels = []
    app = draw(_ep_apps)
    if app is not None:
        labels.append(Label("k8s", "app", app))
    env = draw(_ep_envs)
    if env is not None:
        labels.append(Label("k8s", "env", env))
    ns = draw(_ep_namespaces)
    if ns is not None:
        labels.append(Label("k8s", NAMESPACE_KEY, ns))
    return LabelSet(labels)


endpoint_labels = _endpoint_labels()
addresses = st.sampled_from(ADDRESSES).map(ipaddress.IPv4Address)
_flow_protocols = st.sampled_from((Protocol.TCP, Protocol.TCP, Protocol.UDP, Protocol.SCTP, Protocol.ICMP))
_icmp_flow_types = st.sampled_from(ICMP_TYPES)
_flow_ports = st.sampled_from(FLOW_PORTS)
_requests = st.builds(HTTPRequest, st.sampled_from(HTTP_METHODS), st.sampled_from(HTTP_PATHS))


@st.composite
def _flow_l4(draw: st.DrawFn) -> tuple[Protocol, int, HTTPRequest | None]:
    """Protocol, port (or ICMP type) and, sometimes, an HTTP request."""
    protocol = draw(_flow_protocols)
    if protocol is Protocol.ICMP:
        return protocol, draw(_icmp_flow_types), None
    port = draw(_flow_ports)
    return protocol, port, draw(_requests) if draw(_bools) else None


flow_l4 = _flow_l4()
_outside = st.sampled_from(("none", "none", "src", "dst"))


@st.composite
def _flow(draw: st.DrawFn) -> Flow:
    """A flow between endpoints or between an endpoint and an outside address."""
    outside = draw(_outside)
    src = Side(address=draw(addresses)) if outside == "src" else Side(labels=draw(endpoint_labels))
    dst = Side(address=draw(addresses)) if outside == "dst" else Side(labels=draw(endpoint_labels))
    protocol, port, request = draw(flow_l4)
    return Flow(src, dst, protocol, port, request)


flows = _flow()

End = int | ipaddress.IPv4Address  # endpoint index or outside address


@dataclass(frozen=True)
class Cluster:
    """Endpoints held by one engine, and flows between them (by endpoint index) or
    to/from outside addresses."""

    endpoints: tuple[LabelSet, ...]
    flows: tuple[tuple[End, End, Protocol, int, HTTPRequest | None], ...]

    def flow(self, i: int) -> Flow:
        src, dst, protocol, port, request = self.flows[i]
        return Flow(self._side(src), self._side(dst), protocol, port, request)

    def _side(self, end: End) -> Side:
        return Side(labels=self.endpoints[end]) if isinstance(end, int) else Side(address=end)


_endpoint_lists = st.lists(endpoint_labels, min_size=2, max_size=5)
_indexes = {n: st.integers(0, n - 1) for n in range(1, 6)}
_ends = {n: st.one_of(_indexes[n], addresses) for n in range(1, 6)}
_flow_counts = st.integers(4, 12)


@st.composite
def _cluster(draw: st.DrawFn) -> Cluster:
    eps = tuple(draw(_endpoint_lists))
    out = []
    for _ in range(draw(_flow_counts)):
        src = draw(_ends[len(eps)])
        dst = draw(_ends[len(eps)] if isinstance(src, int) else _indexes[len(eps)])
        out.append((src, dst, *draw(flow_l4)))
    return Cluster(eps, tuple(out))


clusters = _cluster()
