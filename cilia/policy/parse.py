"""CiliumNetworkPolicy YAML -> validated ``Policy`` values.

The parser walks the YAML once, building the model and collecting every
``Problem`` (``file:line: field.path: message``). A file with any problem
yields no policies: callers apply all of a file or none of it.

Semantics that need other subsystems (toFQDNs, toServices, TLS, ...) are parsed
and validated here; the resolver reports them as "not enforced yet".
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _fields as F
from ._yaml import Node, load_documents
from .entities import ENTITIES
from .errors import Problem, SourceRef, ValidationError
from .icmp import icmp_type
from .l7 import dns as l7dns
from .l7 import http as l7http
from .l7 import kafka as l7kafka
from .l7.registry import L7Registry, default_registry
from .labels import DEFAULT_NAMESPACE, Label, split_source
from .netpol import derived_policy_name, network_policy_notes, network_policy_text
from .model import (
    CIDRRule,
    DefaultDeny,
    Direction,
    FQDNSelector,
    GenericL7Rule,
    ICMPField,
    IPNetwork,
    L7Rule,
    L7Rules,
    PeerRule,
    Policy,
    PolicyKind,
    PortProtocol,
    PortRule,
    Protocol,
    TRANSLATION_NOTES,
    Rule,
    ServiceSelector,
    TLSContext,
)
from .selectors import LabelSelector, Operator, Requirement

API_VERSION = "cilium.io/v2"
POLICY_KINDS = {k.value: k for k in PolicyKind}

_TOP_FIELDS = ("apiVersion", "kind", "metadata", "spec", "specs", "status",
               # Cilium's own sw_l3_l4_policy.yaml example carries a top-level
               # description; accept it as documentation.
               "description")
_METADATA_FIELDS = ("name", "namespace", "labels", "annotations", "uid", "resourceVersion",
                    "generation", "creationTimestamp", "deletionTimestamp", "managedFields",
                    "ownerReferences", "finalizers", "generateName", "selfLink")
_RULE_FIELDS = ("endpointSelector", "nodeSelector", "ingress", "ingressDeny", "egress",
                "egressDeny", "labels", "description", "enableDefaultDeny", "log")

_COMMON_PEER = ("toPorts", "icmps")
_INGRESS_PEERS = ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities", "fromGroups",
                  "fromNodes")
_EGRESS_PEERS = ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities", "toGroups", "toNodes",
                 "toServices", "toFQDNs")
_SECTION_FIELDS = {
    ("ingress", False): (*_INGRESS_PEERS, "fromRequires", *_COMMON_PEER, "authentication"),
    ("ingress", True): (*_INGRESS_PEERS, "fromRequires", *_COMMON_PEER),
    ("egress", False): (*_EGRESS_PEERS, "toRequires", *_COMMON_PEER, "authentication"),
    ("egress", True): (*(p for p in _EGRESS_PEERS if p != "toFQDNs"), "toRequires", *_COMMON_PEER),
}

_PORT_RULE_FIELDS = ("ports", "rules", "terminatingTLS", "originatingTLS", "serverNames", "listener")
_ENVOY_CONFIG_KINDS = ("CiliumEnvoyConfig", "CiliumClusterwideEnvoyConfig")
_L7_FIELDS = ("http", "kafka", "dns", "l7proto", "l7")
_PROTOCOLS = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP, "ANY": Protocol.ANY}
# IANA service name, as Kubernetes validates named container ports.
_PORT_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?=[a-z0-9]))*$")
_DNS1123_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass
class LoadResult:
    """What one or more files held: policies, problems, and documents skipped."""

    policies: list[Policy] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: list[tuple[SourceRef, str]] = field(default_factory=list)  # (where, kind)
    # what a translation changed to accept a document (a NetworkPolicy's masked ipBlock), as "file:line: text"
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def load_files(paths: Iterable[str | Path], registry: L7Registry | None = None) -> list[Policy]:
    """Load and validate files; raise ValidationError (naming every problem) if any
    file has one, so that nothing is applied from a bad set of files."""
    result = load_paths(paths, registry)
    if result.problems:
        raise ValidationError(result.problems)
    return result.policies


def load_paths(paths: Iterable[str | Path], registry: L7Registry | None = None) -> LoadResult:
    total = LoadResult()
    for path in paths:
        name = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            total.problems.append(Problem(SourceRef(name, 0), "", f"cannot read file: {exc}"))
            continue
        one = parse_text(text, name, registry)
        total.policies.extend(one.policies)
        total.problems.extend(one.problems)
        total.skipped.extend(one.skipped)
        total.notes.extend(one.notes)
    return total


def parse_text(text: str, filename: str, registry: L7Registry | None = None) -> LoadResult:
    """Parse every document of one file."""
    result = LoadResult()
    docs, problems = load_documents(text, filename)
    result.problems.extend(problems)
    parser = _Parser(registry or default_registry())
    for doc in docs:
        if _is_network_policy(doc):
            _network_policy(doc, registry, result)
            continue
        policy, skipped = parser.document(doc)
        if skipped is not None:
            result.skipped.append((doc.source, skipped))
        elif policy is not None:
            result.policies.append(policy)
    result.problems.extend(parser.problems)
    if result.problems:
        result.policies = []
    return result


NETWORK_POLICY_API = "networking.k8s.io/v1"


def _is_network_policy(doc: Node) -> bool:
    return (doc.is_mapping() and doc.value.get("kind") == "NetworkPolicy"
            and doc.value.get("apiVersion") == NETWORK_POLICY_API)


def _network_policy(doc: Node, registry: L7Registry | None, result: LoadResult) -> None:
    """A Kubernetes NetworkPolicy, translated exactly as the Kubernetes watcher translates it (to the
    CiliumNetworkPolicy ``networkpolicy.NAME`` of its namespace) and parsed as that; every
    problem and source names the NetworkPolicy document's line."""
    where = doc.source
    meta = doc.value.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        result.problems.append(Problem(where, "metadata.name", "a NetworkPolicy needs a name"))
        return
    spec = doc.value.get("spec")
    if spec is not None and not isinstance(spec, dict):
        result.problems.append(Problem(where, "spec", "expected a mapping"))
        return
    try:
        text = network_policy_text(doc.value, derived_policy_name(name))
        notes = network_policy_notes(doc.value)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        result.problems.append(Problem(where, "spec", f"NetworkPolicy cannot be translated: {exc}"))
        return
    one = parse_text(text, where.file, registry)
    suffix = " (in the CiliumNetworkPolicy this NetworkPolicy translates to)"
    result.problems.extend(Problem(where, p.path, p.message + suffix) for p in one.problems)
    result.policies.extend(_relocate(p, where) for p in one.policies)
    result.notes.extend(f"{where}: NetworkPolicy {name}: {n}" for n in notes)


def _relocate(value: Any, where: SourceRef) -> Any:
    """``value`` with every SourceRef in it replaced by ``where``."""
    if isinstance(value, SourceRef):
        return where
    if isinstance(value, tuple):
        items = tuple(_relocate(v, where) for v in value)
        return items if any(a is not b for a, b in zip(items, value)) else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: new for f in dataclasses.fields(value) if f.init
                   for old in (getattr(value, f.name),) for new in (_relocate(old, where),) if new is not old}
        return dataclasses.replace(value, **changes) if changes else value
    return value


def check_unique(policies: Sequence[Policy]) -> None:
    """A set of policies to apply together must not name one policy twice."""
    seen: dict[tuple[str, str, str], Policy] = {}
    problems = []
    for policy in policies:
        first = seen.get(policy.key)
        if first is not None:
            problems.append(Problem(
                policy.source, "metadata.name",
                f"{policy.kind} {policy.display_name!r} is defined twice (first at {first.source})"))
        else:
            seen[policy.key] = policy
    if problems:
        raise ValidationError(problems)


def _quote(text: str) -> str:
    """A value as the user wrote it in YAML: in double quotes."""
    return json.dumps(text, ensure_ascii=False)


class _Parser:
    def __init__(self, registry: L7Registry) -> None:
        self.registry = registry
        self.problems: list[Problem] = []

    # --- document ---------------------------------------------------------

    def document(self, doc: Node) -> tuple[Policy | None, str | None]:
        p = self.problems
        if not doc.is_mapping():
            p.append(doc.problem(f"expected a Kubernetes object (mapping), got {doc.type_name}"))
            return None, None
        kind_node = doc.value.get("kind")
        api = doc.value.get("apiVersion")
        if kind_node is None:
            p.append(doc.problem("missing required field 'kind'"))
            return None, None
        if not isinstance(kind_node, str):
            where = dict(doc.items())["kind"]
            p.append(where.problem(f"expected a string, got {where.type_name}"))
            return None, None
        if kind_node not in POLICY_KINDS:
            if isinstance(api, str) and api.startswith("cilium.io/"):
                p.append(dict(doc.items())["kind"].problem(
                    f"kind {kind_node!r} is not a policy kind (expected one of "
                    f"{', '.join(POLICY_KINDS)})"))
                return None, None
            # Other Kubernetes objects (Pods, Services...) may share a file with policies.
            return None, kind_node
        kind = POLICY_KINDS[kind_node]
        top = F.fields(doc, _TOP_FIELDS, p, required=("apiVersion", "metadata"))
        if top is None:
            return None, None
        if "apiVersion" in top and top["apiVersion"].value != API_VERSION:
            p.append(top["apiVersion"].problem(
                f"unsupported apiVersion {top['apiVersion'].value!r} (expected {API_VERSION!r})"))
        name, namespace, before = None, None, len(p)
        labels: tuple[str, ...] = ()
        notes: tuple[str, ...] = ()
        if "metadata" in top:
            name, namespace, labels, notes = self.metadata(top["metadata"], kind)
        if kind is PolicyKind.CNP:
            namespace = namespace or DEFAULT_NAMESPACE
        rules: list[Rule] = []
        if "spec" not in top and "specs" not in top:
            p.append(doc.problem("missing 'spec' or 'specs'"))
        if "spec" in top:
            spec = top["spec"]
            if spec.is_mapping():
                rule = self.rule(Node(spec.value, "", spec.source), kind)
                if rule is not None:
                    rules.append(rule)
            else:
                p.append(spec.problem(f"expected a mapping, got {spec.type_name}"))
        if "specs" in top:
            items = F.elements(top["specs"], p)
            for item in items or ():
                rule = self.rule(item, kind)
                if rule is not None:
                    rules.append(rule)
        if len(p) > before or name is None:
            return None, None
        return Policy(kind, name, namespace if kind is PolicyKind.CNP else None, tuple(rules),
                      doc.source, labels, notes), None

    def metadata(self, node: Node, kind: PolicyKind
                 ) -> tuple[str | None, str | None, tuple[str, ...], tuple[str, ...]]:
        """The name, namespace, labels (``k8s:key=value``) and translation notes (the annotation
        ``TRANSLATION_NOTES``) of the metadata ``node``."""
        p = self.problems
        meta = F.fields(node, _METADATA_FIELDS, p, required=("name",))
        if meta is None:
            return None, None, (), ()
        name = namespace = None
        if "name" in meta:
            name = F.strict_string(meta["name"], p)
            if name is not None and not _DNS1123_SUBDOMAIN.match(name):
                p.append(meta["name"].problem(
                    f"{name!r} is not a valid name (lowercase letters, digits, '-' and '.')"))
                name = None
        if "namespace" in meta:
            if kind is PolicyKind.CCNP:
                p.append(meta["namespace"].problem(
                    "CiliumClusterwideNetworkPolicy is cluster-scoped and takes no namespace"))
            else:
                namespace = F.strict_string(meta["namespace"], p)
        labels: tuple[str, ...] = ()
        notes: tuple[str, ...] = ()
        for key in ("labels", "annotations"):
            if key in meta:
                found = F.string_map(meta[key], p) or {}
                if key == "labels":
                    labels = tuple(sorted(f"k8s:{k}={v}" for k, v in found.items()))
                elif TRANSLATION_NOTES in found:
                    notes = tuple(n for n in found[TRANSLATION_NOTES].splitlines() if n)
        return name, namespace, labels, notes

    # --- rule ---------------------------------------------------------------

    def rule(self, node: Node, kind: PolicyKind) -> Rule | None:
        p, before = self.problems, len(self.problems)
        f = F.fields(node, _RULE_FIELDS, p)
        if f is None:
            return None
        endpoint_selector = node_selector = None
        if "endpointSelector" in f:
            endpoint_selector = self.selector(f["endpointSelector"])
        if "nodeSelector" in f:
            if kind is not PolicyKind.CCNP:
                p.append(f["nodeSelector"].problem(
                    "nodeSelector (host policy) is only allowed in CiliumClusterwideNetworkPolicy"))
            else:
                node_selector = self.selector(f["nodeSelector"])
        if ("endpointSelector" in f) == ("nodeSelector" in f):
            p.append(node.problem("exactly one of endpointSelector or nodeSelector is required")
                     if "endpointSelector" not in f else
                     f["nodeSelector"].problem("endpointSelector and nodeSelector are mutually exclusive"))
        sections: dict[tuple[str, bool], tuple[PeerRule, ...]] = {}
        for name, direction, deny in (("ingress", Direction.INGRESS, False),
                                      ("ingressDeny", Direction.INGRESS, True),
                                      ("egress", Direction.EGRESS, False),
                                      ("egressDeny", Direction.EGRESS, True)):
            items = F.elements(f[name], p) if name in f else []
            peers = [self.peer_rule(item, direction, deny) for item in items or ()]
            sections[(direction.value, deny)] = tuple(r for r in peers if r is not None)
        default_deny = DefaultDeny()
        if "enableDefaultDeny" in f:
            dd = F.fields(f["enableDefaultDeny"], ("ingress", "egress"), p)
            if dd is not None:
                default_deny = DefaultDeny(
                    F.boolean(dd["ingress"], p) if "ingress" in dd else None,
                    F.boolean(dd["egress"], p) if "egress" in dd else None)
        description = F.string(f["description"], p) if "description" in f else None
        labels = self.rule_labels(f["labels"]) if "labels" in f else ()
        if "log" in f:
            F.fields(f["log"], ("value",), p)
        if len(p) > before:
            return None
        return Rule(endpoint_selector, node_selector,
                    sections[("ingress", False)], sections[("ingress", True)],
                    sections[("egress", False)], sections[("egress", True)],
                    default_deny, description, labels, node.path, node.source)

    def rule_labels(self, node: Node) -> tuple[str, ...]:
        """Rule labels as ``source:key=value``; the source is ``unspec`` unless given,
        for the object form and the short string form (``"key=value"``) alike."""
        p = self.problems
        out = []
        for item in F.elements(node, p) or ():
            if item.is_mapping():
                f = F.fields(item, ("key", "value", "source"), p, required=("key",))
                if not f or "key" not in f:
                    continue
                key = F.string(f["key"], p, allow_empty=False)
                value = F.string(f["value"], p) if "value" in f else ""
                source = F.string(f["source"], p, allow_empty=False) if "source" in f else "unspec"
            else:
                text = F.string(item, p)
                if text is None:
                    continue
                raw_key, _, value = text.partition("=")
                source, key = split_source(raw_key, "unspec")
                if not key:
                    p.append(item.problem(f"label {text!r} has an empty key"))
                    continue
            if key is not None and value is not None and source is not None:
                out.append(str(Label(source, key, value)))
        return tuple(out)

    # --- selectors ----------------------------------------------------------

    def selector(self, node: Node) -> LabelSelector | None:
        p, before = self.problems, len(self.problems)
        f = F.fields(node, ("matchLabels", "matchExpressions"), p)
        if f is None:
            return None
        reqs: list[Requirement] = []
        if "matchLabels" in f:
            ml = f["matchLabels"]
            if ml.value is None:
                p.append(ml.problem(
                    "matchLabels is null: check the indentation of the labels below it "
                    "(an empty selector {} selects everything)"))
            else:
                labels = F.string_map(ml, p)
                for key, child in (ml.items() if labels is not None else ()):
                    if self.label_key(child, key):
                        source, bare = split_source(key)
                        value = labels[key] if labels else ""
                        if not _LABEL_VALUE.match(value) or len(value) > 63:
                            p.append(child.problem(f"{value!r} is not a valid label value"))
                        reqs.append(Requirement(source, bare, Operator.IN, (value,)))
        if "matchExpressions" in f:
            me = f["matchExpressions"]
            if me.value is None:
                p.append(me.problem("matchExpressions is null: check the indentation below it"))
            for item in F.elements(me, p) or ():
                req = self.requirement(item)
                if req is not None:
                    reqs.append(req)
        if len(p) > before:
            return None
        return LabelSelector(tuple(sorted(set(reqs))))

    def label_key(self, node: Node, key: str) -> bool:
        _, bare = split_source(key)
        if not bare or any(c.isspace() for c in bare) or "=" in bare or len(bare) > 317:
            self.problems.append(node.problem(f"{key!r} is not a valid label key"))
            return False
        return True

    def requirement(self, node: Node) -> Requirement | None:
        p = self.problems
        f = F.fields(node, ("key", "operator", "values"), p, required=("key", "operator"))
        if f is None or "key" not in f or "operator" not in f:
            return None
        key = F.string(f["key"], p)
        op_text = F.string(f["operator"], p)
        if key is None or op_text is None or not self.label_key(f["key"], key):
            return None
        try:
            op = Operator(op_text)
        except ValueError:
            p.append(f["operator"].problem(
                f"unknown operator {op_text!r} (expected In, NotIn, Exists or DoesNotExist)"))
            return None
        values: list[str] = []
        if "values" in f:
            for item in F.elements(f["values"], p) or ():
                v = F.string(item, p)
                if v is not None:
                    values.append(v)
        if op in (Operator.IN, Operator.NOT_IN) and not values:
            p.append(node.problem(f"operator {op.value} needs a non-empty 'values' list"))
            return None
        if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
            p.append(f["values"].problem(f"operator {op.value} takes no values"))
            return None
        source, bare = split_source(key)
        return Requirement(source, bare, op, tuple(sorted(set(values))))

    def selectors(self, node: Node) -> tuple[LabelSelector, ...]:
        out = []
        for item in F.elements(node, self.problems) or ():
            sel = self.selector(item)
            if sel is not None:
                out.append(sel)
        return tuple(out)

    # --- peer rules (one ingress/egress item) ---------------------------------

    def peer_rule(self, node: Node, direction: Direction, deny: bool) -> PeerRule | None:
        p, before = self.problems, len(self.problems)
        section = direction.value
        allowed = _SECTION_FIELDS[(section, deny)]
        other = _SECTION_FIELDS[("egress" if section == "ingress" else "ingress", False)]
        misplaced = {k: f"{k} is not allowed in {section} rules" for k in other}
        if deny:
            misplaced.update({k: f"{k} is not supported in {section}Deny rules"
                              for k in ("toFQDNs", "authentication") if k not in allowed})
        f = F.fields(node, allowed, p, misplaced=misplaced)
        if f is None:
            return None
        # Kubernetes drops null fields, and Cilium tests len(toPorts) and len(icmps):
        # `fromEndpoints:` with nothing below it is absent, and so is `toPorts: []`.
        # (An explicit empty peer list such as `fromEndpoints: []` selects no peer.)
        f = {k: v for k, v in f.items()
             if v.value is not None and not (k in _COMMON_PEER and v.value == [])}

        prefix = "from" if direction is Direction.INGRESS else "to"
        present = [k for k in (_INGRESS_PEERS if prefix == "from" else _EGRESS_PEERS) if k in f]
        if len(present) > 1:
            p.append(f[present[1]].problem(
                f"{present[0]} and {present[1]} cannot be combined in one rule; write separate rules"))
        if "icmps" in f and "toPorts" in f:
            p.append(f["icmps"].problem(
                "icmps cannot be combined with toPorts in one rule; write separate rules"))

        endpoints = self.selectors(f[prefix + "Endpoints"]) if prefix + "Endpoints" in f else None
        requires = self.selectors(f[prefix + "Requires"]) if prefix + "Requires" in f else ()
        cidrs: list[CIDRRule] | None = None
        if prefix + "CIDR" in f:
            cidrs = []
            for item in F.elements(f[prefix + "CIDR"], p) or ():
                net = self.cidr(item)
                if net is not None:
                    cidrs.append(CIDRRule(net, (), item.source))
        unenforced: list[str] = []
        if prefix + "CIDRSet" in f:
            cidrs = cidrs or []
            for item in F.elements(f[prefix + "CIDRSet"], p) or ():
                rule = self.cidr_set(item, unenforced)
                if rule is not None:
                    cidrs.append(rule)
        entities = None
        if prefix + "Entities" in f:
            entities = []
            for item in F.elements(f[prefix + "Entities"], p) or ():
                ent = F.string(item, p)
                if ent is not None and ent not in ENTITIES:
                    p.append(item.problem(f"unknown entity {ent!r} (expected one of {', '.join(ENTITIES)})"))
                elif ent is not None:
                    entities.append(ent)
        fqdns = None
        if "toFQDNs" in f:
            fqdns = tuple(x for x in (self.fqdn(i) for i in F.elements(f["toFQDNs"], p) or ()) if x)
        services = None
        if "toServices" in f:
            services = tuple(x for x in (self.service(i) for i in F.elements(f["toServices"], p) or ()) if x)
        for key in (prefix + "Groups", prefix + "Nodes"):
            if key in f:
                if key.endswith("Nodes"):
                    self.selectors(f[key])
                else:
                    for item in F.elements(f[key], p) or ():
                        self.group(item)
                unenforced.append(key)
        to_ports = None
        if "toPorts" in f:
            to_ports = tuple(x for x in (self.port_rule(i, deny) for i in F.elements(f["toPorts"], p) or ()) if x)
        icmps = None
        if "icmps" in f:
            icmps = tuple(self.icmp_rules(f["icmps"]))
        authentication = None
        if "authentication" in f:
            a = F.fields(f["authentication"], ("mode",), p, required=("mode",))
            if a and "mode" in a:
                mode = F.string(a["mode"], p)
                if mode not in ("required", "disabled", None):
                    p.append(a["mode"].problem(f"unknown mode {mode!r} (expected required or disabled)"))
                authentication = mode
        if len(p) > before:
            return None
        return PeerRule(direction, deny, endpoints, requires,
                        tuple(cidrs) if cidrs is not None else None,
                        tuple(entities) if entities is not None else None,
                        fqdns, services, tuple(unenforced), to_ports, icmps, authentication,
                        node.path, node.source)

    def cidr(self, node: Node) -> IPNetwork | None:
        text = F.string(node, self.problems)
        if text is None:
            return None
        try:
            if "/" not in text:
                return ipaddress.ip_network(text)  # a bare address is a /32 or /128
            return ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            if "host bits set" in str(exc):
                net = ipaddress.ip_network(text, strict=False)
                self.problems.append(node.problem(
                    f"{text!r} has host bits set (did you mean {str(net)!r}?)"))
            else:
                self.problems.append(node.problem(f"{text!r} is not a valid CIDR"))
            return None

    def cidr_set(self, node: Node, unenforced: list[str]) -> CIDRRule | None:
        p = self.problems
        f = F.fields(node, ("cidr", "except", "cidrGroupRef", "cidrGroupSelector"), p)
        if f is None:
            return None
        refs = [k for k in ("cidr", "cidrGroupRef", "cidrGroupSelector") if k in f]
        if len(refs) != 1:
            p.append(node.problem("exactly one of cidr, cidrGroupRef or cidrGroupSelector is required"))
            return None
        if "cidr" not in f:
            if "cidrGroupRef" in f:
                F.string(f["cidrGroupRef"], p)
            else:
                self.selector(f["cidrGroupSelector"])
            unenforced.append(refs[0])
            return None
        net = self.cidr(f["cidr"])
        excepts: list[IPNetwork] = []
        for item in F.elements(f["except"], p) or () if "except" in f else []:
            ex = self.cidr(item)
            if ex is None or net is None:
                continue
            if ex.version != net.version or not ex.subnet_of(net):  # type: ignore[arg-type]
                p.append(item.problem(f"except {str(ex)!r} is not inside {str(net)!r}"))
                continue
            excepts.append(ex)
        if net is None:
            return None
        return CIDRRule(net, tuple(excepts), node.source)

    def fqdn(self, node: Node) -> FQDNSelector | None:
        p = self.problems
        f = F.fields(node, ("matchName", "matchPattern"), p)
        if f is None:
            return None
        if len(f) != 1:
            p.append(node.problem("exactly one of matchName or matchPattern is required"))
            return None
        key, child = next(iter(f.items()))
        value = F.string(child, p)
        if value is None:
            return None
        # the syntax of DNS rules' names and patterns: the proxy matches both the same way
        syntax, what = (l7dns.PATTERN_SYNTAX, "pattern") if key == "matchPattern" else (l7dns.NAME_SYNTAX, "name")
        if not syntax.fullmatch(value):
            chars = "'-', '_', '*'" if key == "matchPattern" else "'-', '_'"
            p.append(child.problem(f"{value!r} is not a valid DNS {what}: use labels of letters, digits, {chars} "
                                   "separated by single dots"))
            return None
        return FQDNSelector(value if key == "matchName" else None,
                            value if key == "matchPattern" else None, node.source)

    def service(self, node: Node) -> ServiceSelector | None:
        p = self.problems
        f = F.fields(node, ("k8sService", "k8sServiceSelector"), p)
        if f is None:
            return None
        if len(f) != 1:
            p.append(node.problem("exactly one of k8sService or k8sServiceSelector is required"))
            return None
        if "k8sService" in f:
            s = F.fields(f["k8sService"], ("serviceName", "namespace"), p, required=("serviceName",))
            if not s or "serviceName" not in s:
                return None
            name = F.string(s["serviceName"], p)
            ns = F.string(s["namespace"], p) if "namespace" in s else None
            return ServiceSelector(name, None, ns, node.source)
        s = F.fields(f["k8sServiceSelector"], ("selector", "namespace"), p, required=("selector",))
        if not s or "selector" not in s:
            return None
        sel = self.selector(s["selector"])
        ns = F.string(s["namespace"], p) if "namespace" in s else None
        return ServiceSelector(None, sel, ns, node.source)

    def group(self, node: Node) -> None:
        p = self.problems
        f = F.fields(node, ("aws",), p, required=("aws",))
        if f and "aws" in f:
            a = F.fields(f["aws"], ("securityGroupsIds", "securityGroupsNames", "labels", "region"), p)
            if a:
                for key in ("securityGroupsIds", "securityGroupsNames"):
                    for item in F.elements(a[key], p) or () if key in a else []:
                        F.string(item, p)
                if "labels" in a:
                    F.string_map(a["labels"], p)
                if "region" in a:
                    F.string(a["region"], p)

    # --- L4 -------------------------------------------------------------------

    def port_rule(self, node: Node, deny: bool) -> PortRule | None:
        p, before = self.problems, len(self.problems)
        misplaced = None
        if deny:
            misplaced = {k: f"{k} is not supported in deny rules" for k in _PORT_RULE_FIELDS}
            misplaced["rules"] = "L7 rules are not supported in deny rules"
        f = F.fields(node, ("ports",) if deny else _PORT_RULE_FIELDS, p, misplaced=misplaced)
        if f is None:
            return None
        ports: list[PortProtocol] = []
        for item in F.elements(f["ports"], p) or () if "ports" in f else []:
            pp = self.port_protocol(item)
            if pp is not None:
                ports.append(pp)
        rules = self.l7_rules(f["rules"], ports) if "rules" in f else None
        tls = {k: self.tls(f[k]) for k in ("terminatingTLS", "originatingTLS") if k in f}
        server_names: list[str] = []
        for item in F.elements(f["serverNames"], p) or () if "serverNames" in f else []:
            sn = F.string(item, p)
            if sn is not None:
                server_names.append(sn)
        listener: dict[str, object] | None = None
        if "listener" in f:
            lf = F.fields(f["listener"], ("envoyConfig", "name", "priority"), p,
                          required=("envoyConfig", "name"))
            if lf is not None:
                listener = {}
                if "envoyConfig" in lf:
                    ec = F.fields(lf["envoyConfig"], ("kind", "name"), p, required=("name",)) or {}
                    config = {k: F.string(v, p) for k, v in ec.items()}
                    if "kind" in ec and config["kind"] not in (None, *_ENVOY_CONFIG_KINDS):
                        p.append(ec["kind"].problem(
                            f"unknown kind {config['kind']!r} (expected {' or '.join(_ENVOY_CONFIG_KINDS)})"))
                    listener["envoyConfig"] = config
                if "name" in lf:
                    listener["name"] = F.string(lf["name"], p)
                if "priority" in lf:
                    listener["priority"] = F.integer(lf["priority"], p, 1, 100)
        if len(p) > before:
            return None
        return PortRule(tuple(ports), rules, tls.get("terminatingTLS"), tls.get("originatingTLS"),
                        tuple(server_names), listener, node.source)

    def port_protocol(self, node: Node) -> PortProtocol | None:
        p, before = self.problems, len(self.problems)
        f = F.fields(node, ("port", "endPort", "protocol"), p)
        if f is None:
            return None
        port: int | None = 0
        name: str | None = None
        if "port" in f:
            raw = f["port"].value
            text = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
            if not isinstance(text, str):
                p.append(f["port"].problem(f"expected a port number or name, got {f['port'].type_name}"))
                return None
            if text.isascii() and text.isdigit():
                port = int(text)
                if port > 65535:
                    p.append(f["port"].problem(f"{_quote(text)} is not a port number or name (ports are 0-65535)"))
            elif _PORT_NAME.match(text.lower()):
                # Cilium compares port names case-insensitively, as lowercase.
                port, name = None, text.lower()
            elif text == "":
                port = 0
            else:
                p.append(f["port"].problem(f"{_quote(text)} is not a port number or name"))
        end_port = None
        if "endPort" in f:
            end_port = F.integer(f["endPort"], p, 0, 65535)
            if end_port is not None:
                if name is not None:
                    p.append(f["endPort"].problem("endPort cannot be used with a named port"))
                elif not port:
                    p.append(f["endPort"].problem("endPort needs a non-zero port"))
                elif end_port < port:
                    p.append(f["endPort"].problem(f"endPort {end_port} is below port {port}"))
                elif end_port == port:
                    end_port = None
        protocol = Protocol.ANY
        if "protocol" in f:
            text = F.string(f["protocol"], p)
            if text is not None:
                if text not in _PROTOCOLS:
                    p.append(f["protocol"].problem(
                        f"unknown protocol {text!r} (expected TCP, UDP, SCTP or ANY)"))
                else:
                    protocol = _PROTOCOLS[text]
        if len(p) > before:
            return None
        return PortProtocol(port, name, end_port, protocol, node.source)

    def icmp_rules(self, node: Node) -> list[ICMPField]:
        p = self.problems
        out: list[ICMPField] = []
        for item in F.elements(node, p) or ():
            f = F.fields(item, ("fields",), p, required=("fields",))
            if not f or "fields" not in f:
                continue
            for fld in F.elements(f["fields"], p) or ():
                ff = F.fields(fld, ("type", "family"), p, required=("type",))
                if not ff or "type" not in ff:
                    continue
                family = "IPv4"
                if "family" in ff:
                    family = F.string(ff["family"], p) or "IPv4"
                    if family not in ("IPv4", "IPv6"):
                        p.append(ff["family"].problem(f"unknown family {family!r} (expected IPv4 or IPv6)"))
                        continue
                raw = ff["type"].value
                if isinstance(raw, bool) or not isinstance(raw, (int, str)):
                    p.append(ff["type"].problem(f"expected an ICMP type number or name, got {ff['type'].type_name}"))
                    continue
                # (icmp_type reads digit strings; names and numbers are ASCII.)
                t = icmp_type(family, raw) if not isinstance(raw, str) or raw.isascii() else None
                if t is None:
                    p.append(ff["type"].problem(f"{raw!r} is not an {family} ICMP type number (0-255) or name"))
                    continue
                out.append(ICMPField(family, t, fld.source))
        return out

    def tls(self, node: Node) -> TLSContext | None:
        p = self.problems
        f = F.fields(node, ("secret", "trustedCA", "certificate", "privateKey"), p)
        if f is None:
            return None
        ns = name = None
        if "secret" in f:
            s = F.fields(f["secret"], ("namespace", "name"), p, required=("name",))
            if s:
                ns = F.string(s["namespace"], p) if "namespace" in s else None
                name = F.string(s["name"], p) if "name" in s else None
        vals = {k: F.string(f[k], p) if k in f else None for k in ("trustedCA", "certificate", "privateKey")}
        return TLSContext(ns, name, vals["trustedCA"], vals["certificate"], vals["privateKey"], node.source)

    # --- L7 -------------------------------------------------------------------

    def l7_rules(self, node: Node, ports: Sequence[PortProtocol]) -> L7Rules | None:
        p, before = self.problems, len(self.problems)
        f = F.fields(node, _L7_FIELDS, p)
        if f is None:
            return None
        kinds = [k for k in ("http", "kafka", "dns", "l7proto") if k in f]
        if "l7" in f and "l7proto" not in f:
            p.append(f["l7"].problem("l7 rules need l7proto to name the parser"))
            return None
        if len(kinds) > 1:
            p.append(f[kinds[1]].problem(
                f"{kinds[0]} and {kinds[1]} rules cannot be mixed on one port rule"))
            return None
        if not kinds:
            return None  # `rules: {}` restricts nothing at L7
        kind = kinds[0]
        rules: list[L7Rule] = []
        protocol: str = kind
        if kind == "l7proto":
            proto_name = F.string(f["l7proto"], p)
            if proto_name is None:
                return None
            proto = self.registry.get(proto_name)
            if proto is None:
                known = ", ".join(self.registry.names()) or "none"
                p.append(f["l7proto"].problem(
                    f"unknown L7 protocol {proto_name!r} (registered parsers: {known})"))
                return None
            protocol = proto_name
            for item in F.elements(f["l7"], p) or () if "l7" in f else []:
                fields = F.string_map(item, p)
                if fields is None:
                    continue
                key_nodes = dict(item.items()) if item.is_mapping() else {}
                for fp in proto.validate_rule(fields):
                    where = key_nodes.get(fp.key, item) if fp.key else item
                    p.append(where.problem(fp.message))
                rules.append(GenericL7Rule(tuple(sorted(fields.items())), item.source))
        else:
            parse = {"http": l7http.parse_rule, "kafka": l7kafka.parse_rule, "dns": l7dns.parse_rule}[kind]
            for item in F.elements(f[kind], p) or ():
                rule = parse(item, p)
                if rule is not None:
                    rules.append(rule)
        self.check_l7_ports(node, protocol, kind, ports)
        if len(p) > before:
            return None
        return L7Rules(protocol, tuple(rules), node.source)

    def check_l7_ports(self, node: Node, protocol: str, kind: str, ports: Sequence[PortProtocol]) -> None:
        p = self.problems
        if not ports:
            p.append(node.problem(f"{protocol} rules need explicit ports"))
        for pp in ports:
            where = f"port {pp}"
            if pp.port == 0:
                p.append(node.problem(f"{protocol} rules cannot apply to all ports ({where}); name a port"))
            if kind == "dns":
                if pp.end_port is not None:
                    p.append(node.problem(f"dns rules cannot apply to a port range ({where})"))
                if pp.protocol is Protocol.SCTP:
                    p.append(node.problem(f"dns rules apply to UDP or TCP, not SCTP ({where})"))
            elif pp.protocol not in (Protocol.TCP, Protocol.ANY):
                p.append(node.problem(f"{protocol} rules need TCP, not {pp.protocol.label} ({where})"))

