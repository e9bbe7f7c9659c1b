"""A synthetic Kubernetes cluster and its network policies, for benchmarks.

The shape follows what real clusters look like to Cilium:

- endpoints are pods of deployments ("apps"); every pod of an app carries the
  same labels, so an app is one security identity (``per_pod_identity`` adds a
  pod-unique label, as StatefulSet pods have, to make every pod its own identity);
- the cluster grows by namespaces of ~10 apps each, with uneven replica counts,
  plus ``kube-system`` with kube-dns;
- policies are CiliumNetworkPolicy YAML text, one rule each, mostly selecting one
  app and talking to apps of the same namespace, in a mix of L3, L3/L4, L7 HTTP,
  egress to entities and CIDRs, deny rules, namespace-wide rules and named ports,
  plus a few clusterwide policies with broad selectors.

Everything is derived from a seed, so a run is reproducible.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from cilia.policy import Endpoint, LabelSet, Protocol

PODS_PER_NAMESPACE = 200
APPS_PER_NAMESPACE = 10
TIERS = ("frontend", "backend", "db", "cache", "worker")
POD_NETWORK = ipaddress.ip_network("10.128.0.0/10")

#: (rule shape, weight) for namespaced policies
RULE_MIX: tuple[tuple[str, int], ...] = (
    ("l3", 22),          # ingress fromEndpoints
    ("l4", 24),          # ingress fromEndpoints + toPorts (some port ranges)
    ("l7-http", 12),     # ingress toPorts with HTTP rules
    ("egress", 14),      # egress toEndpoints + DNS to kube-dns + world on 443
    ("cidr", 6),         # egress toCIDR / toCIDRSet with except
    ("deny", 8),         # ingressDeny / egressDeny
    ("namespace", 6),    # endpointSelector {}: whole namespace
    ("named-port", 8),   # ingress toPorts by port name
)


@dataclass(frozen=True, slots=True)
class App:
    namespace: str
    name: str
    tier: str
    replicas: int
    named_ports: tuple[tuple[str, int, Protocol], ...]

    def labels(self) -> dict[str, str]:
        return {
            "k8s:app": self.name,
            "k8s:tier": self.tier,
            "k8s:io.kubernetes.pod.namespace": self.namespace,
            "k8s:io.cilium.k8s.policy.serviceaccount": self.name,
            "k8s:io.cilium.k8s.policy.cluster": "default",
        }


@dataclass(frozen=True, slots=True)
class Cluster:
    namespaces: tuple[str, ...]
    apps: tuple[App, ...]
    endpoints: tuple[Endpoint, ...]
    per_pod_identity: bool

    def apps_in(self, namespace: str) -> list[App]:
        return [a for a in self.apps if a.namespace == namespace]

    def identities(self) -> int:
        return len({ep.labels for ep in self.endpoints})


def labelset(labels: dict[str, str]) -> LabelSet:
    return LabelSet.parse([f"{k}={v}" for k, v in labels.items()])


def pod_address(index: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(POD_NETWORK.network_address) + 1 + index)


def make_cluster(n_endpoints: int, *, per_pod_identity: bool = False, seed: int = 1) -> Cluster:
    rng = random.Random(seed)
    n_ns = max(1, round(n_endpoints / PODS_PER_NAMESPACE))
    namespaces = tuple(f"ns-{i:03d}" for i in range(n_ns))
    apps: list[App] = [App("kube-system", "kube-dns", "dns", 2, (("dns", 53, Protocol.UDP),))]
    budget = n_endpoints - 2
    for i, ns in enumerate(namespaces):
        share = budget // n_ns + (1 if i < budget % n_ns else 0)
        # uneven replica counts (a few big deployments, many small ones) summing to `share`
        weights = [rng.paretovariate(1.5) for _ in range(APPS_PER_NAMESPACE)]
        total = sum(weights)
        counts = [max(1, int(share * w / total)) for w in weights]
        counts[0] += share - sum(counts)
        if counts[0] < 1:  # tiny clusters: give the remainder back evenly
            counts = [share // APPS_PER_NAMESPACE + (1 if j < share % APPS_PER_NAMESPACE else 0)
                      for j in range(APPS_PER_NAMESPACE)]
        for j, replicas in enumerate(counts):
            if replicas <= 0:
                continue
            tier = TIERS[j % len(TIERS)]
            ports: tuple[tuple[str, int, Protocol], ...] = ()
            if tier in ("frontend", "backend"):
                ports = (("http", 8080, Protocol.TCP), ("metrics", 9090, Protocol.TCP))
            elif tier == "db":
                ports = (("postgres", 5432, Protocol.TCP),)
            apps.append(App(ns, f"app-{j:02d}", tier, replicas, ports))
    endpoints: list[Endpoint] = []
    for app in apps:
        for r in range(app.replicas):
            pod = f"{app.namespace}/{app.name}-{r}"
            labels = app.labels()
            if per_pod_identity and app.namespace != "kube-system":
                labels["k8s:statefulset.kubernetes.io/pod-name"] = f"{app.name}-{r}"
            endpoints.append(Endpoint(pod, labelset(labels), (pod_address(len(endpoints)),), app.named_ports))
    return Cluster(namespaces, tuple(apps), tuple(endpoints), per_pod_identity)


# --------------------------------------------------------------------- policies


def _match(labels: dict[str, str], indent: int) -> str:
    pad = " " * indent
    if not labels:
        return f"{pad}{{}}\n"
    out = f"{pad}matchLabels:\n"
    for k, v in labels.items():
        out += f'{pad}  "{k}": "{v}"\n'
    return out


def _header(kind: str, name: str, namespace: str | None) -> str:
    ns = f"  namespace: {namespace}\n" if namespace else ""
    return f"---\napiVersion: cilium.io/v2\nkind: {kind}\nmetadata:\n  name: {name}\n{ns}spec:\n"


def _selector(labels: dict[str, str]) -> str:
    if not labels:
        return "  endpointSelector: {}\n"
    return "  endpointSelector:\n" + _match(labels, 4)


def _from(apps: list[App], key: str = "fromEndpoints") -> str:
    out = f"    {key}:\n"
    for a in apps:
        out += "    - matchLabels:\n" + f"        app: {a.name}\n"
    return out


def namespaced_policy(shape: str, name: str, subject: App, peers: list[App], variant: int) -> str:
    """One CNP of ``shape`` selecting ``subject`` (or its namespace) with ``peers``."""
    ns = subject.namespace
    doc = _header("CiliumNetworkPolicy", name, ns)
    if shape == "namespace":
        # allow everything from the own namespace (the classic "namespace isolation")
        return doc + _selector({}) + "  ingress:\n  - fromEndpoints:\n    - {}\n"
    doc += _selector({"app": subject.name})
    if shape == "l3":
        return doc + "  ingress:\n  -\n" + _from(peers)
    if shape == "l4":
        port = 8000 + variant % 50
        ports = f"      - port: \"{port}\"\n        protocol: TCP\n"
        if variant % 4 == 0:
            lo = 9000 + variant % 20
            ports += f"      - port: \"{lo}\"\n        endPort: {lo + 100}\n        protocol: TCP\n"
        return doc + "  ingress:\n  -\n" + _from(peers) + "    toPorts:\n    - ports:\n" + ports
    if shape == "l7-http":
        return doc + (
            "  ingress:\n  -\n" + _from(peers)
            + "    toPorts:\n    - ports:\n      - port: \"80\"\n        protocol: TCP\n"
            + "      rules:\n        http:\n"
            + f"        - method: GET\n          path: \"/api/v{variant % 3 + 1}/items/[0-9]+\"\n"
            + "        - method: POST\n          path: \"/api/v1/orders\"\n"
            + "          headers:\n          - \"X-Tenant: blue\"\n"
        )
    if shape == "egress":
        return doc + (
            "  egress:\n  -\n" + _from(peers, "toEndpoints")
            + f"    toPorts:\n    - ports:\n      - port: \"{5432 + variant % 3}\"\n        protocol: TCP\n"
            + "  - toEndpoints:\n    - matchLabels:\n"
            + '        "k8s:io.kubernetes.pod.namespace": kube-system\n        "k8s:app": kube-dns\n'
            + "    toPorts:\n    - ports:\n      - port: \"53\"\n        protocol: ANY\n"
            + "      rules:\n        dns:\n        - matchPattern: \"*\"\n"
            + "  - toEntities:\n    - world\n"
            + "    toPorts:\n    - ports:\n      - port: \"443\"\n        protocol: TCP\n"
        )
    if shape == "cidr":
        a, b = variant % 200, (variant * 7) % 250
        return doc + (
            "  egress:\n  - toCIDR:\n"
            + f"    - 203.0.{a}.{b}/32\n"
            + "  - toCIDRSet:\n"
            + f"    - cidr: 172.{16 + variant % 16}.0.0/16\n      except:\n"
            + f"      - 172.{16 + variant % 16}.{variant % 250}.0/24\n"
            + "    toPorts:\n    - ports:\n      - port: \"443\"\n        protocol: TCP\n"
        )
    if shape == "deny":
        if variant % 2:
            return doc + "  ingressDeny:\n  -\n" + _from(peers[:1]) + (
                "    toPorts:\n    - ports:\n      - port: \"22\"\n        protocol: TCP\n")
        return doc + "  egressDeny:\n  - toCIDR:\n    - 169.254.169.254/32\n"
    if shape == "named-port":
        return doc + ("  ingress:\n  -\n" + _from(peers)
                      + "    toPorts:\n    - ports:\n      - port: http\n        protocol: TCP\n"
                      + "      - port: metrics\n")
    raise ValueError(shape)


def clusterwide_policies(count: int) -> list[str]:
    """Broad CCNPs: every endpoint, every namespace, or one tier everywhere."""
    docs = [
        # baseline: cluster traffic in, DNS out, for every endpoint
        _header("CiliumClusterwideNetworkPolicy", "baseline-ingress-cluster", None)
        + _selector({}) + "  ingress:\n  - fromEntities:\n    - cluster\n",
        _header("CiliumClusterwideNetworkPolicy", "baseline-egress-dns", None)
        + _selector({}) + (
            "  egress:\n  - toEndpoints:\n    - matchLabels:\n"
            + '        "k8s:io.kubernetes.pod.namespace": kube-system\n        "k8s:app": kube-dns\n'
            + "    toPorts:\n    - ports:\n      - port: \"53\"\n        protocol: ANY\n"
            + "  - toEntities:\n    - kube-apiserver\n"),
        _header("CiliumClusterwideNetworkPolicy", "deny-metadata", None)
        + _selector({}) + "  egressDeny:\n  - toCIDR:\n    - 169.254.169.254/32\n",
        _header("CiliumClusterwideNetworkPolicy", "health", None)
        + _selector({}) + "  ingress:\n  - fromEntities:\n    - health\n    - remote-node\n    - host\n",
    ]
    i = 0
    while len(docs) < count:
        tier = TIERS[i % len(TIERS)]
        docs.append(
            _header("CiliumClusterwideNetworkPolicy", f"tier-{tier}-{i}", None)
            + _selector({"tier": tier})
            + f"  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        tier: {TIERS[(i + 1) % len(TIERS)]}\n"
            + f"    toPorts:\n    - ports:\n      - port: \"{7000 + i}\"\n        protocol: TCP\n")
        i += 1
    return docs[:count]


@dataclass(frozen=True, slots=True)
class GeneratedPolicy:
    """One generated policy document and what it was made from."""

    name: str
    shape: str  # a RULE_MIX shape, or "clusterwide"
    subject: App | None  # None for clusterwide policies
    peers: tuple[App, ...]
    text: str


def make_policies(cluster: Cluster, n_rules: int, *, clusterwide: bool = True,
                  seed: int = 2) -> list[GeneratedPolicy]:
    """``n_rules`` policies of one rule each: ~1% clusterwide (unless not
    ``clusterwide``), the rest namespaced."""
    rng = random.Random(seed)
    n_ccnp = min(n_rules, max(4, n_rules // 100)) if clusterwide else 0
    out = [GeneratedPolicy(f"ccnp-{i}", "clusterwide", None, (), text)
           for i, text in enumerate(clusterwide_policies(n_ccnp))]
    shapes = [s for s, _ in RULE_MIX]
    weights = [w for _, w in RULE_MIX]
    user_apps = [a for a in cluster.apps if a.namespace != "kube-system"]
    by_ns: dict[str, list[App]] = {}
    for a in user_apps:
        by_ns.setdefault(a.namespace, []).append(a)
    for i in range(n_rules - n_ccnp):
        # every app gets a policy before any gets a second one
        subject = user_apps[i] if i < len(user_apps) else rng.choice(user_apps)
        shape = rng.choices(shapes, weights)[0]
        neighbours = [a for a in by_ns[subject.namespace] if a is not subject] or [subject]
        peers = rng.sample(neighbours, min(len(neighbours), rng.randint(1, 3)))
        name = f"{shape}-{i}"
        out.append(GeneratedPolicy(name, shape, subject, tuple(peers),
                                   namespaced_policy(shape, name, subject, peers, i)))
    return out


def policies_text(policies: list[GeneratedPolicy]) -> str:
    return "".join(p.text for p in policies)


def l4_policy(name: str, subject: App, peers: tuple[App, ...] | list[App], variant: int) -> str:
    """An L3/L4 CNP selecting one app: used for "add a rule" and "replace a rule"."""
    return namespaced_policy("l4", name, subject, list(peers), variant)


def clusterwide_variant(variant: int) -> str:
    """The baseline ingress CCNP with one extra item (so replacing it changes content)."""
    return (_header("CiliumClusterwideNetworkPolicy", "baseline-ingress-cluster", None)
            + _selector({}) + "  ingress:\n  - fromEntities:\n    - cluster\n"
            + "  - fromEntities:\n    - host\n"
            + f"    toPorts:\n    - ports:\n      - port: \"{4240 + variant % 10}\"\n        protocol: TCP\n")
