"""Pure translations of Kubernetes objects (as the API serves them, JSON decoded) into what the agent takes.

- A Pod and its Namespace's labels → an ``EndpointSpec`` named ``POD.NAMESPACE`` (the name the
  CNI plugin gives it too) with Cilium's labels: the pod's labels with source ``k8s``,
  ``k8s:io.kubernetes.pod.namespace=NS``, ``k8s:io.cilium.k8s.namespace.labels.KEY=VALUE`` for
  each namespace label and ``k8s:io.cilium.k8s.policy.serviceaccount=SA``; its IPs; its named
  container ports (what named ports in policy resolve to).
- A CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy object → the YAML text of the policy
  (apiVersion, kind, name, namespace and the spec, without the server's metadata and status),
  imported under a stable pseudo-path (``policy_path``) that verdicts and errors name.
- A Kubernetes NetworkPolicy → the text of an equivalent CiliumNetworkPolicy: that translation is
  ``cilia.policy.netpol``, shared with the policy files' parser.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..specs import EndpointSpec, PortSpec, StateError
from ..policy import Protocol
from ..policy.errors import LabelError
from ..policy.labels import NAMESPACE_KEY, LabelSet
from ..policy.netpol import (API_VERSION, CNP, NAMESPACE_LABELS_PREFIX, NETWORK_POLICY,
                             dump_yaml)

CCNP = "CiliumClusterwideNetworkPolicy"
PATH_PREFIX = "k8s"

SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
# Cilium's default label filter leaves these out of identities: they change with every rollout,
# and an identity per rollout would re-resolve every peer's policy each time.
IGNORED_POD_LABELS = frozenset({"pod-template-hash", "controller-revision-hash", "pod-template-generation"})
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


