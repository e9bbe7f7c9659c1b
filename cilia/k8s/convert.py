"""Pure translations of Kubernetes objects (as the API serves them, JSON decoded) into what the agent takes.

- A Pod and its Namespace's labels → an ``EndpointSpec`` named ``POD.NAMESPACE`` (the name the
  CNI plugin gives it too) with Cilium's labels: the pod's labels with source ``k8s``,
  ``k8s:io.kubernetes.pod.namespace=NS``, ``k8s:io.cilium.k8s.namespace.labels.KEY=VALUE`` for
  each namespace label and ``k8s:io.cilium.k8s.policy.serviceaccount=SA``; its IPs; its named
  container ports (what named ports in policy resolve to).
- A CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy object → the YAML text of the policy
  (apiVersion, kind, name, namespace and the spec, without the server's metadata and status),
  imported under a stable pseudo-path (``policy_path``) that verdicts and errors name.
- A Kubernetes NetworkPolicy → the text of an equivalent CiliumNetworkPolicy, translated the way
  Cilium's ``pkg/k8s/network_policy.go`` does, under a name of its own (``derived_policy_name``)
  so it never replaces a CiliumNetworkPolicy called like the NetworkPolicy.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ruamel.yaml import YAML

from ..specs import EndpointSpec, PortSpec, StateError
from ..policy import Protocol
from ..policy.errors import LabelError
from ..policy.labels import NAMESPACE_KEY, LabelSet

CNP = "CiliumNetworkPolicy"
CCNP = "CiliumClusterwideNetworkPolicy"
NETWORK_POLICY = "NetworkPolicy"
API_VERSION = "cilium.io/v2"
PATH_PREFIX = "k8s"

NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels"
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
# Cilium's default label filter leaves these out of identities: they change with every rollout,
# and an identity per rollout would re-resolve every peer's policy each time.
IGNORED_POD_LABELS = frozenset({"pod-template-hash", "controller-revision-hash", "pod-template-generation"})
DERIVED_PREFIX = "networkpolicy"
_MAX_NAME = 253  # a DNS-1123 subdomain, as metadata.name
_PROTOCOLS = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP}


class ConvertError(ValueError):
    """An object the API served that cannot be translated; the message says what is wrong."""


# ------------------------------------------------------------------ objects

def object_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of an object; the namespace is "" for cluster-scoped objects."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ConvertError("object without metadata.name")
    namespace = meta.get("namespace")
    return (namespace if isinstance(namespace, str) else "", meta["name"])


def resource_version(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return rv if isinstance(rv, str) else ""


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list) else []


def object_labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in _map(_map(obj.get("metadata")).get("labels")).items()}


# ------------------------------------------------------------------ pods → endpoints

def endpoint_name(namespace: str, name: str) -> str:
    """The agent's endpoint for a pod: ``POD.NAMESPACE`` (endpoint names cannot hold "/")."""
    return f"{name}.{namespace}"


def pod_labels(pod: Mapping[str, Any], namespace_labels: Mapping[str, str] | None) -> tuple[str, ...]:
    """The pod's identity labels, as Cilium gives them (sorted)."""
    namespace, _ = object_key(pod)
    namespace = namespace or "default"
    labels = {f"k8s:{k}={v}" for k, v in object_labels(pod).items()
              if k not in IGNORED_POD_LABELS and k != NAMESPACE_KEY}
    labels.add(f"k8s:{NAMESPACE_KEY}={namespace}")
    for k, v in (namespace_labels or {}).items():
        labels.add(f"k8s:{NAMESPACE_LABELS_PREFIX}.{k}={v}")
    spec = _map(pod.get("spec"))
    account = spec.get("serviceAccountName") or spec.get("serviceAccount")
    if isinstance(account, str) and account:
        labels.add(f"k8s:{SERVICE_ACCOUNT_LABEL}={account}")
    return tuple(sorted(labels))


def pod_ips(pod: Mapping[str, Any]) -> tuple[str, ...]:
    status = _map(pod.get("status"))
    ips = [str(_map(item).get("ip")) for item in _list(status.get("podIPs")) if _map(item).get("ip")]
    if not ips and status.get("podIP"):
        ips = [str(status["podIP"])]
    return tuple(dict.fromkeys(ips))


def pod_ports(pod: Mapping[str, Any]) -> tuple[PortSpec, ...]:
    """Named container ports: what ``port: NAME`` in a policy resolves to. Unnamed ports add
    nothing to policy resolution, so they are left out."""
    out: dict[tuple[int, Protocol], PortSpec] = {}
    for container in _list(_map(pod.get("spec")).get("containers")):
        for port in _list(_map(container).get("ports")):
            port = _map(port)
            name, number = port.get("name"), port.get("containerPort")
            proto = _PROTOCOLS.get(str(port.get("protocol") or "TCP").upper())
            if not isinstance(name, str) or not name or not isinstance(number, int) or proto is None:
                continue
            out.setdefault((number, proto), PortSpec(number, proto, None, name.lower()))
    return tuple(out.values())


def pod_skip_reason(pod: Mapping[str, Any]) -> str | None:
    """Why a pod has no endpoint yet (or any more), or None when it should have one."""
    if _map(pod.get("spec")).get("hostNetwork"):
        return "uses the node's network (hostNetwork)"
    phase = _map(pod.get("status")).get("phase")
    if phase != "Running":
        return f"phase {phase or 'unknown'}, not Running"
    if not pod_ips(pod):
        return "no IP yet"
    return None


def pod_endpoint(pod: Mapping[str, Any], namespace_labels: Mapping[str, str] | None,
                 ports: bool = True) -> EndpointSpec | None:
    """The endpoint a pod should have, or None while it should have none (see ``pod_skip_reason``).
    ``ports=False`` leaves the named ports out (a sidecar-mode agent would put Envoy on them)."""
    namespace, name = object_key(pod)
    if pod_skip_reason(pod) is not None:
        return None
    try:
        return EndpointSpec(endpoint_name(namespace or "default", name), pod_labels(pod, namespace_labels),
                            pod_ips(pod), pod_ports(pod) if ports else ())
    except StateError as e:
        raise ConvertError(str(e)) from None


def merge_endpoint(desired: EndpointSpec, existing: EndpointSpec | None) -> EndpointSpec:
    """``desired`` with the plumbing of the agent's current endpoint of that name kept: the CNI
    plugin registers a pod with the interface it made, and relabelling must not lose it."""
    if existing is None:
        return desired
    return replace(desired, interface=existing.interface, netns=existing.netns, create=False,
                   managed=existing.managed)


def is_pod_endpoint(spec: EndpointSpec) -> bool:
    """Whether an agent endpoint is one the watcher made for a pod: named ``POD.NAMESPACE``,
    labelled with that namespace, and without an interface (one with an interface was plumbed by
    the CNI plugin or ``endpoint add``, whose DEL or delete removes it)."""
    if spec.interface is not None:
        return False
    try:
        namespace = LabelSet.parse(list(spec.labels)).namespace()
    except LabelError:
        return False
    return namespace is not None and spec.name.endswith(f".{namespace}") and len(spec.name) > len(namespace) + 1


# ------------------------------------------------------------------ policies

def policy_path(kind: str, namespace: str, name: str) -> str:
    """The pseudo-path an object's policy is imported under: ``k8s/KIND/NAMESPACE/NAME`` (no
    namespace for cluster-scoped kinds)."""
    return "/".join(p for p in (PATH_PREFIX, kind, namespace, name) if p)


def parse_policy_path(path: str) -> tuple[str, str, str] | None:
    """(kind, namespace, name) of a pseudo-path, or None when it is not one."""
    parts = path.split("/")
    if len(parts) == 4 and parts[0] == PATH_PREFIX and parts[1] in (CNP, NETWORK_POLICY):
        return parts[1], parts[2], parts[3]
    if len(parts) == 3 and parts[0] == PATH_PREFIX and parts[1] == CCNP:
        return parts[1], "", parts[2]
    return None


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


def policy_text(obj: Mapping[str, Any], kind: str) -> str:
    """The YAML text of a CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy object: the
    server's metadata (uid, managedFields, annotations...) and status are left out, as they are
    not policy and would change the text without changing the policy."""
    if kind not in (CNP, CCNP):
        raise ConvertError(f"{kind} is not a Cilium policy kind")
    namespace, name = object_key(obj)
    metadata: dict[str, Any] = {"name": name}
    if kind == CNP:
        metadata["namespace"] = namespace or "default"
    doc: dict[str, Any] = {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata}
    for key, value in obj.items():
        if key not in ("apiVersion", "kind", "metadata", "status"):
            doc[key] = value
    return dump_yaml(doc)


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
    namespace, name = object_key(np)
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
    return dump_yaml({"apiVersion": API_VERSION, "kind": CNP,
                      "metadata": {"name": policy_name, "namespace": namespace}, "spec": rule})


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
