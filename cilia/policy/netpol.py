"""A Kubernetes NetworkPolicy (as the API serves it, JSON decoded) as the text of the
CiliumNetworkPolicy it means, translated as Cilium's ``pkg/k8s/network_policy.go`` translates it,
under a name of its own (``derived_policy_name``) so it never replaces a CiliumNetworkPolicy
called like the NetworkPolicy. Pure: the policy files' parser and the Kubernetes watcher both
use it, so a file and a watched object give the same verdicts.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from ruamel.yaml import YAML

from .labels import NAMESPACE_KEY
from .model import TRANSLATION_NOTES

CNP = "CiliumNetworkPolicy"
NETWORK_POLICY = "NetworkPolicy"
API_VERSION = "cilium.io/v2"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels"
DERIVED_PREFIX = "networkpolicy"
_MAX_NAME = 253  # a DNS-1123 subdomain, as metadata.name


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list) else []


def _namespace_and_name(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = _map(obj.get("metadata"))
    name, namespace = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not name:
        raise ValueError("object without metadata.name")
    return (namespace if isinstance(namespace, str) else "", name)


def dump_yaml(doc: Mapping[str, Any]) -> str:
    """Block-style YAML in the mapping's own key order, so each field has a line to name."""
    yaml = YAML(typ="rt")
    yaml.default_flow_style = False
    out = io.StringIO()
    yaml.dump(_plain(doc), out)
    return out.getvalue()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def derived_policy_name(name: str, attempt: int = 0) -> str:
    """The CiliumNetworkPolicy name a NetworkPolicy becomes: ``networkpolicy.NAME`` (then
    ``networkpolicy-2.NAME``... when a CiliumNetworkPolicy already has that name). Names that
    would be too long keep a hash of the whole name."""
    prefix = f"{DERIVED_PREFIX}-{attempt + 1}." if attempt else f"{DERIVED_PREFIX}."
    full = prefix + name
    if len(full) <= _MAX_NAME:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    head = name[:_MAX_NAME - len(prefix) - len(digest) - 1].rstrip("-.")
    return f"{prefix}{head}-{digest}"


def network_policy_text(np: Mapping[str, Any], policy_name: str) -> str:
    """A Kubernetes NetworkPolicy as the text of a CiliumNetworkPolicy called ``policy_name`` in
    the same namespace, translated as Cilium translates it:

    - podSelector → endpointSelector (in the policy's namespace);
    - each ``from``/``to`` peer → one rule: podSelector alone selects pods of the policy's
      namespace; namespaceSelector (with an optional podSelector) selects by the namespace's
      labels (``io.cilium.k8s.namespace.labels.*``; empty = every namespace); ipBlock → a CIDR
      set with its ``except``;
    - a rule without peers (``from`` missing or empty) → every peer (entity ``all``);
    - ``ports`` (number or name, protocol (default TCP), endPort; no port = all ports) → toPorts,
      applied to each of the rule's peers;
    - no ingress rules while policyTypes lists Ingress (or does not list Egress) → ingress
      default deny; no egress rules while policyTypes lists Egress → egress default deny.
    """
    namespace, name = _namespace_and_name(np)
    namespace = namespace or "default"
    spec = _map(np.get("spec"))
    ingress = [r for rule in _list(spec.get("ingress"))
               for r in _np_rule(_map(rule), namespace, "from", "ingress")]
    egress = [r for rule in _list(spec.get("egress"))
              for r in _np_rule(_map(rule), namespace, "to", "egress")]
    types = [str(t) for t in _list(spec.get("policyTypes"))]
    if not ingress and ("Ingress" in types or "Egress" not in types):
        ingress = [{}]  # an ingress section with an empty rule: default deny, nothing allowed
    if not egress and "Egress" in types:
        egress = [{}]
    rule: dict[str, Any] = {"endpointSelector": _pod_selector(_map(spec.get("podSelector")), namespace)}
    if ingress:
        rule["ingress"] = ingress
    if egress:
        rule["egress"] = egress
    uid = _map(np.get("metadata")).get("uid")
    rule["labels"] = [{"key": key, "value": value, "source": "k8s"} for key, value in (
        ("io.cilium.k8s.policy.derived-from", NETWORK_POLICY), ("io.cilium.k8s.policy.name", name),
        ("io.cilium.k8s.policy.namespace", namespace), *((("io.cilium.k8s.policy.uid", str(uid)),) if uid else ()))]
    metadata: dict[str, Any] = {"name": policy_name, "namespace": namespace}
    if notes := network_policy_notes(np):  # kept with the policy, for status (whichever path imported it)
        metadata["annotations"] = {TRANSLATION_NOTES: "\n".join(f"NetworkPolicy {name}: {n}" for n in notes)}
    return dump_yaml({"apiVersion": API_VERSION, "kind": CNP, "metadata": metadata, "spec": rule})


def _np_rule(rule: Mapping[str, Any], namespace: str, peers_field: str, direction: str) -> list[dict[str, Any]]:
    side = "from" if direction == "ingress" else "to"
    peers = _list(rule.get(peers_field))
    out: list[dict[str, Any]] = []
    if not peers:
        out.append({f"{side}Entities": ["all"]})
    for raw in peers:
        peer = _map(raw)
        item: dict[str, Any] = {}
        selector = _peer_selector(peer, namespace)
        if selector is not None:
            item[f"{side}Endpoints"] = [selector]
        block = _map(peer.get("ipBlock"))
        if block:
            cidr: dict[str, Any] = {"cidr": _masked(block.get("cidr"))}
            if _list(block.get("except")):
                cidr["except"] = [_masked(c) for c in _list(block.get("except"))]
            item[f"{side}CIDRSet"] = [cidr]
        if not item:
            # A peer naming nothing (the API server rejects it) selects no peer: fail closed.
            item[f"{side}Endpoints"] = []
        out.append(item)
    ports = _np_ports(_list(rule.get("ports")))
    if ports:
        for item in out:
            item["toPorts"] = ports
    return out


def _masked(cidr: Any) -> Any:
    """A CIDR with its host bits cleared (10.0.1.1/4 -> 0.0.0.0/4), as Kubernetes' and Cilium's
    parsers read it; anything that is not a CIDR is left for the policy parser to reject."""
    if not isinstance(cidr, str) or "/" not in cidr:
        return cidr
    try:
        return str(ipaddress.ip_network(cidr, strict=False))
    except ValueError:
        return cidr


def network_policy_notes(np: Mapping[str, Any]) -> list[str]:
    """What the translation changed to accept ``np``: each ipBlock CIDR with host bits set."""
    notes = []
    spec = _map(np.get("spec"))
    for direction, peers_field in (("ingress", "from"), ("egress", "to")):
        for i, rule in enumerate(_list(spec.get(direction))):
            for j, peer in enumerate(_list(_map(rule).get(peers_field))):
                block = _map(_map(peer).get("ipBlock"))
                for field, value in (("cidr", block.get("cidr")),
                                     *(("except", c) for c in _list(block.get("except")))):
                    masked = _masked(value)
                    if masked != value:
                        notes.append(f"spec.{direction}[{i}].{peers_field}[{j}].ipBlock.{field}: {value} has host "
                                     f"bits set; read as {masked}, as Kubernetes and Cilium do")
    return notes


def _np_ports(ports: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for raw in ports:
        port = _map(raw)
        entry: dict[str, Any] = {"port": str(port["port"]) if port.get("port") is not None else "0",
                                 "protocol": str(port.get("protocol") or "TCP")}
        if port.get("endPort") is not None:
            entry["endPort"] = port["endPort"]
        out.append({"ports": [entry]})
    return out


def _selector(selector: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, str], list[dict[str, Any]]]:
    """A Kubernetes label selector with every key given the ``k8s`` source (and ``prefix``)."""
    labels = {f"k8s:{prefix}{k}": str(v) for k, v in _map(selector.get("matchLabels")).items()}
    expressions = []
    for raw in _list(selector.get("matchExpressions")):
        expr = _map(raw)
        out: dict[str, Any] = {"key": f"k8s:{prefix}{expr.get('key')}", "operator": expr.get("operator")}
        if _list(expr.get("values")):
            out["values"] = [str(v) for v in _list(expr.get("values"))]
        expressions.append(out)
    return labels, expressions


def _selector_doc(labels: Mapping[str, str], expressions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if labels:
        doc["matchLabels"] = dict(labels)
    if expressions:
        doc["matchExpressions"] = list(expressions)
    return doc


def _pod_selector(selector: Mapping[str, Any], namespace: str) -> dict[str, Any]:
    """A podSelector of the policy's own namespace (an explicit namespace label is overridden, as
    Cilium does)."""
    labels, expressions = _selector(selector)
    labels[f"k8s:{NAMESPACE_KEY}"] = namespace
    return _selector_doc(labels, expressions)


def _peer_selector(peer: Mapping[str, Any], namespace: str) -> dict[str, Any] | None:
    if peer.get("namespaceSelector") is not None:
        labels, expressions = _selector(_map(peer["namespaceSelector"]), f"{NAMESPACE_LABELS_PREFIX}.")
        pod_labels_, pod_expressions = _selector(_map(peer.get("podSelector")))
        labels.update(pod_labels_)
        # Any namespace whose labels match: a requirement on the namespace label itself keeps the
        # engine from limiting the selector to the policy's namespace, as it does for a
        # CiliumNetworkPolicy's peers that name no namespace (Cilium's NetworkPolicy parser does
        # not scope them either). Alone (an empty namespaceSelector) it selects every namespace.
        expressions = [*expressions, *pod_expressions, {"key": f"k8s:{NAMESPACE_KEY}", "operator": "Exists"}]
        return _selector_doc(labels, expressions)
    if peer.get("podSelector") is not None:
        return _pod_selector(_map(peer["podSelector"]), namespace)
    return None
