"""cilia.k8s.convert: pods → endpoints, Cilium policy objects → text, NetworkPolicy → CiliumNetworkPolicy."""

from __future__ import annotations

from typing import Any

import pytest
from tests.helpers import run
from ruamel.yaml import YAML

from cilia.specs import EndpointSpec, PortSpec
from cilia.policy.netpol import derived_policy_name, network_policy_notes, network_policy_text
from cilia.k8s.convert import (
    CCNP,
    CNP,
    ConvertError,
    is_pod_endpoint,
    merge_endpoint,
    parse_policy_path,
    pod_endpoint,
    pod_labels,
    pod_skip_reason,
    policy_path,
    policy_text,
)
from cilia.policy import Policy, Protocol, parse_text

NS = "k8s:io.kubernetes.pod.namespace"


def pod(name: str = "web-1", namespace: str = "prod", labels: dict[str, str] | None = None,
        phase: str = "Running", ip: str | None = "10.0.0.5", **spec: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status.update(podIP=ip, podIPs=[{"ip": ip}])
    return {"metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": "web"}},
            "spec": {"containers": [{"name": "c"}], **spec}, "status": status}


def load(text: str) -> Any:
    return YAML(typ="safe").load(text)


def netpol(spec: dict[str, Any], name: str = "np", namespace: str = "prod") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "uid": "u-1"}, "spec": spec}


def translate(spec: dict[str, Any]) -> dict[str, Any]:
    text = network_policy_text(netpol(spec), "networkpolicy.np")
    loaded = parse_text(text, "k8s/NetworkPolicy/prod/np")
    assert loaded.problems == [], text
    rule: dict[str, Any] = load(text)["spec"]
    rule.pop("labels")
    return rule


# ------------------------------------------------------------------ pods

def test_pod_labels_are_ciliums() -> None:
    p = pod(labels={"app": "web", "pod-template-hash": "abc", "tier": "fe"}, serviceAccountName="web-sa")
    assert pod_labels(p, {"team": "a", "kubernetes.io/metadata.name": "prod"}) == tuple(sorted((
        "k8s:app=web", "k8s:tier=fe", f"{NS}=prod",
        "k8s:io.cilium.k8s.namespace.labels.team=a",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=prod",
        "k8s:io.cilium.k8s.policy.serviceaccount=web-sa")))


def test_pod_endpoint() -> None:
    p = pod(containers=[{"name": "c", "ports": [{"name": "HTTP", "containerPort": 8080},
                                                 {"containerPort": 9090},
                                                 {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}])
    p["status"]["podIPs"] = [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]
    ep = pod_endpoint(p, None)
    assert ep == EndpointSpec("web-1.prod", ("k8s:app=web", f"{NS}=prod"), ("10.0.0.5", "fd00::5"),
                              (PortSpec(8080, Protocol.TCP, None, "http"), PortSpec(53, Protocol.UDP, None, "dns")))
    without = pod_endpoint(p, None, ports=False)
    assert without is not None and without.ports == ()


def test_pod_ip_falls_back_to_pod_ip() -> None:
    p = pod()
    del p["status"]["podIPs"]
    ep = pod_endpoint(p, None)
    assert ep is not None and ep.ips == ("10.0.0.5",)


@pytest.mark.parametrize(("p", "reason"), [
    (pod(phase="Pending"), "phase Pending, not Running"),
    (pod(phase="Succeeded"), "phase Succeeded, not Running"),
    (pod(ip=None), "no IP yet"),
    (pod(hostNetwork=True), "uses the node's network (hostNetwork)"),
])
def test_pods_without_an_endpoint(p: dict[str, Any], reason: str) -> None:
    assert pod_skip_reason(p) == reason
    assert pod_endpoint(p, None) is None


def test_bad_pod_ip_is_a_convert_error() -> None:
    with pytest.raises(ConvertError, match="not an IP address"):
        pod_endpoint(pod(ip="10.0.0.300"), None)
    with pytest.raises(ConvertError, match="metadata.name"):
        pod_endpoint({"metadata": {}}, None)


def test_merge_keeps_the_cni_plumbing() -> None:
    desired = EndpointSpec("web-1.prod", ("k8s:app=web", f"{NS}=prod"), ("10.0.0.5",))
    cni = EndpointSpec("web-1.prod", ("io.kubernetes.pod.namespace=prod",), ("10.0.0.5",), interface="lxc1234",
                       netns="cni-1234")
    merged = merge_endpoint(desired, cni)
    assert merged.labels == desired.labels and merged.interface == "lxc1234" and merged.netns == "cni-1234"
    assert merge_endpoint(desired, None) is desired
    assert is_pod_endpoint(desired) and not is_pod_endpoint(cni)
    assert not is_pod_endpoint(EndpointSpec("web", ("app=web",), ()))
    assert not is_pod_endpoint(EndpointSpec("web.other", (f"{NS}=prod",), ()))


# ------------------------------------------------------------------ Cilium policy objects

def test_policy_text_keeps_only_the_policy() -> None:
    obj = {"apiVersion": "cilium.io/v2", "kind": CNP,
           "metadata": {"name": "rule1", "namespace": "prod", "uid": "x", "resourceVersion": "7",
                        "deletionGracePeriodSeconds": 0, "managedFields": [{"manager": "kubectl"}],
                        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
           "spec": {"endpointSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]},
           "status": {"conditions": []}}
    text = policy_text(obj, CNP)
    assert load(text) == {"apiVersion": "cilium.io/v2", "kind": CNP, "metadata": {"name": "rule1", "namespace": "prod"},
                          "spec": {"endpointSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}}
    loaded = parse_text(text, policy_path(CNP, "prod", "rule1"))
    assert loaded.problems == [] and [p.key for p in loaded.policies] == [(CNP, "prod", "rule1")]


def test_clusterwide_policy_text() -> None:
    obj = {"metadata": {"name": "all-dns"}, "specs": [{"endpointSelector": {}, "egress": [{"toEntities": ["all"]}]}]}
    text = policy_text(obj, CCNP)
    loaded = parse_text(text, policy_path(CCNP, "", "all-dns"))
    assert loaded.problems == [] and [p.key for p in loaded.policies] == [(CCNP, "", "all-dns")]


def test_invalid_policy_names_the_pseudo_path_and_line() -> None:
    obj = {"metadata": {"name": "bad", "namespace": "prod"},
           "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "web!"}]}]}]}}
    path = policy_path(CNP, "prod", "bad")
    problems = [str(p) for p in parse_text(policy_text(obj, CNP), path).problems]
    assert problems == [f"{path}:11: ingress[0].toPorts[0].ports[0].port: \"web!\" is not a port number or name"]


def test_policy_paths() -> None:
    assert policy_path(CNP, "prod", "a") == "k8s/CiliumNetworkPolicy/prod/a"
    assert policy_path(CCNP, "", "a") == "k8s/CiliumClusterwideNetworkPolicy/a"
    assert parse_policy_path("k8s/NetworkPolicy/prod/a") == ("NetworkPolicy", "prod", "a")
    assert parse_policy_path("k8s/CiliumClusterwideNetworkPolicy/a") == (CCNP, "", "a")
    assert parse_policy_path("policies/a.yaml") is None


# ------------------------------------------------------------------ NetworkPolicy: translation table

ALL_FROM = {"fromEntities": ["all"]}
ALL_TO = {"toEntities": ["all"]}
WEB = {"matchLabels": {"k8s:app": "web", NS: "prod"}}
EVERY_NS = {"key": NS, "operator": "Exists"}
PORT_80 = [{"ports": [{"port": "80", "protocol": "TCP"}]}]

CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("no rules, no policyTypes: ingress default deny",
     {"podSelector": {"matchLabels": {"app": "web"}}},
     {"endpointSelector": WEB, "ingress": [{}]}),
    ("policyTypes Ingress without rules: ingress default deny",
     {"podSelector": {}, "policyTypes": ["Ingress"]},
     {"endpointSelector": {"matchLabels": {NS: "prod"}}, "ingress": [{}]}),
    ("policyTypes Egress without rules: egress default deny only",
     {"podSelector": {}, "policyTypes": ["Egress"]},
     {"endpointSelector": {"matchLabels": {NS: "prod"}}, "egress": [{}]}),
    ("both policyTypes without rules: both denied",
     {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
     {"endpointSelector": {"matchLabels": {NS: "prod"}}, "ingress": [{}], "egress": [{}]}),
    ("a rule without from: every peer",
     {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": 80}]}]},
     {"endpointSelector": WEB, "ingress": [{**ALL_FROM, "toPorts": PORT_80}]}),
    ("an empty from: every peer, every port",
     {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": []}]},
     {"endpointSelector": WEB, "ingress": [ALL_FROM]}),
    ("podSelector peer: pods of the policy's namespace",
     {"podSelector": {"matchLabels": {"app": "web"}},
      "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "fe"}}}]}]},
     {"endpointSelector": WEB, "ingress": [{"fromEndpoints": [{"matchLabels": {"k8s:role": "fe", NS: "prod"}}]}]}),
    ("empty namespaceSelector: every namespace",
     {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [{"namespaceSelector": {}}]}]},
     {"endpointSelector": WEB, "ingress": [{"fromEndpoints": [{"matchExpressions": [EVERY_NS]}]}]}),
    ("namespaceSelector and podSelector: both, on the namespace's labels",
     {"podSelector": {"matchLabels": {"app": "web"}},
      "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"},
                                                    "matchExpressions": [{"key": "env", "operator": "NotIn",
                                                                          "values": ["dev"]}]},
                             "podSelector": {"matchLabels": {"role": "fe"}}}]}]},
     {"endpointSelector": WEB, "ingress": [{"fromEndpoints": [{
         "matchLabels": {"k8s:io.cilium.k8s.namespace.labels.team": "a", "k8s:role": "fe"},
         "matchExpressions": [{"key": "k8s:io.cilium.k8s.namespace.labels.env", "operator": "NotIn",
                               "values": ["dev"]}, EVERY_NS]}]}]}),
    ("ipBlock with except: a CIDR set",
     {"podSelector": {"matchLabels": {"app": "web"}},
      "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                            {"ipBlock": {"cidr": "192.168.0.0/16"}}]}]},
     {"endpointSelector": WEB, "ingress": [{"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]},
                                           {"fromCIDRSet": [{"cidr": "192.168.0.0/16"}]}]}),
    ("ports: number, name, range, protocol, none (all ports of a protocol), to every peer of the rule",
     {"podSelector": {"matchLabels": {"app": "web"}},
      "ingress": [{"from": [{"podSelector": {}}, {"namespaceSelector": {}}],
                   "ports": [{"port": 80}, {"port": "http"}, {"port": 1000, "endPort": 2000, "protocol": "UDP"},
                             {"protocol": "SCTP"}]}]},
     {"endpointSelector": WEB, "ingress": [
         {"fromEndpoints": [{"matchLabels": {NS: "prod"}}], "toPorts": (ports := [
             {"ports": [{"port": "80", "protocol": "TCP"}]}, {"ports": [{"port": "http", "protocol": "TCP"}]},
             {"ports": [{"port": "1000", "protocol": "UDP", "endPort": 2000}]},
             {"ports": [{"port": "0", "protocol": "SCTP"}]}])},
         {"fromEndpoints": [{"matchExpressions": [EVERY_NS]}], "toPorts": ports}]}),
    ("egress: to peers and ports; a rule without to: every destination",
     {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
      "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": 5432}]},
                 {"ports": [{"port": 53, "protocol": "UDP"}]}]},
     {"endpointSelector": WEB, "egress": [
         {"toEndpoints": [{"matchLabels": {"k8s:app": "db", NS: "prod"}}],
          "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]},
         {**ALL_TO, "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}]}),
    ("policyTypes Egress with ingress rules: Cilium translates the ingress rules too",
     {"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]},
     {"endpointSelector": {"matchLabels": {NS: "prod"}}, "ingress": [ALL_FROM], "egress": [{}]}),
    ("matchExpressions in the podSelector; its namespace label is the policy's",
     {"podSelector": {"matchLabels": {"io.kubernetes.pod.namespace": "other"},
                      "matchExpressions": [{"key": "app", "operator": "Exists"}]}, "ingress": [{}]},
     {"endpointSelector": {"matchLabels": {NS: "prod"}, "matchExpressions": [{"key": "k8s:app", "operator": "Exists"}]},
      "ingress": [ALL_FROM]}),
    ("a peer naming nothing (the API rejects it) selects nobody",
     {"podSelector": {}, "ingress": [{"from": [{}], "ports": [{"port": 80}]}]},
     {"endpointSelector": {"matchLabels": {NS: "prod"}}, "ingress": [{"fromEndpoints": [], "toPorts": PORT_80}]}),
]


@pytest.mark.parametrize(("spec", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_network_policy_translation(spec: dict[str, Any], expected: dict[str, Any]) -> None:
    assert translate(spec) == expected


def test_network_policy_metadata_and_labels() -> None:
    doc = load(network_policy_text(netpol({"podSelector": {}}, "allow", "prod"), "networkpolicy.allow"))
    assert doc["kind"] == CNP and doc["metadata"] == {"name": "networkpolicy.allow", "namespace": "prod"}
    assert {(x["key"], x["value"], x["source"]) for x in doc["spec"]["labels"]} == {
        ("io.cilium.k8s.policy.derived-from", "NetworkPolicy", "k8s"), ("io.cilium.k8s.policy.name", "allow", "k8s"),
        ("io.cilium.k8s.policy.namespace", "prod", "k8s"), ("io.cilium.k8s.policy.uid", "u-1", "k8s")}


def test_derived_names_never_collide_with_a_cnp_of_the_netpols_name() -> None:
    assert derived_policy_name("allow") == "networkpolicy.allow"
    assert derived_policy_name("allow", 1) == "networkpolicy-2.allow"
    long = "a" * 200 + "." + "b-" * 25 + "c"
    names = {derived_policy_name(long, i) for i in range(3)}
    assert len(names) == 3
    for name in names:
        text = network_policy_text(netpol({"podSelector": {}}, long), name)
        loaded = parse_text(text, "x")
        assert loaded.problems == [] and loaded.policies[0].name == name and len(name) <= 253
    # A NetworkPolicy and a CiliumNetworkPolicy of the same name are two policies.
    cnp = parse_text(policy_text({"metadata": {"name": "allow", "namespace": "prod"},
                                  "spec": {"endpointSelector": {}}}, CNP), "a").policies[0]
    np = parse_text(network_policy_text(netpol({"podSelector": {}}, "allow"), derived_policy_name("allow")),
                    "b").policies[0]
    assert cnp.key != np.key


# ------------------------------------------------------------------ NetworkPolicy: what it allows

def policies(*specs: dict[str, Any]) -> list[Policy]:
    out = []
    for i, spec in enumerate(specs):
        loaded = parse_text(network_policy_text(netpol(spec, f"np{i}"), f"networkpolicy.np{i}"), f"np{i}")
        assert loaded.problems == []
        out += loaded.policies
    return out


WEB_POD = f"k8s:app=web,{NS}=prod"
PROD_FE = f"k8s:role=fe,{NS}=prod"
TEAM_A_FE = f"k8s:role=fe,{NS}=other,k8s:io.cilium.k8s.namespace.labels.team=a"
TEAM_B_FE = f"k8s:role=fe,{NS}=third,k8s:io.cilium.k8s.namespace.labels.team=b"


def test_pod_selector_peers_stay_in_the_namespace() -> None:
    ps = policies({"podSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "fe"}}}], "ports": [{"port": 80}]}]})
    assert run(ps, PROD_FE, WEB_POD).allowed
    assert not run(ps, PROD_FE, WEB_POD, dport=81).allowed
    assert not run(ps, TEAM_A_FE, WEB_POD).allowed


def test_namespace_selector_peers_cross_namespaces_by_their_labels() -> None:
    ps = policies({"podSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}},
                                          "podSelector": {"matchLabels": {"role": "fe"}}}]}]})
    assert run(ps, TEAM_A_FE, WEB_POD).allowed
    assert not run(ps, TEAM_B_FE, WEB_POD).allowed
    assert not run(ps, PROD_FE, WEB_POD).allowed  # prod has no team=a label
    every = policies({"podSelector": {"matchLabels": {"app": "web"}},
                      "ingress": [{"from": [{"namespaceSelector": {}}]}]})
    assert run(every, TEAM_B_FE, WEB_POD).allowed and not run(every, "10.9.9.9", WEB_POD).allowed


def test_rules_without_peers_allow_the_world_and_ip_blocks_their_cidrs() -> None:
    everyone = policies({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": 80}]}]})
    assert run(everyone, "10.9.9.9", WEB_POD).allowed and run(everyone, TEAM_B_FE, WEB_POD).allowed
    blocks = policies({"podSelector": {"matchLabels": {"app": "web"}},
                       "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}]})
    assert run(blocks, "10.9.9.9", WEB_POD).allowed
    assert not run(blocks, "10.1.2.3", WEB_POD).allowed
    assert not run(blocks, PROD_FE, WEB_POD).allowed


def test_default_deny_directions() -> None:
    deny_in = policies({"podSelector": {}})
    assert not run(deny_in, PROD_FE, WEB_POD).allowed
    assert run(deny_in, WEB_POD, "10.9.9.9").allowed  # egress untouched
    deny_out = policies({"podSelector": {}, "policyTypes": ["Egress"]})
    assert not run(deny_out, WEB_POD, "10.9.9.9").allowed
    assert run(deny_out, "10.9.9.9", WEB_POD).allowed  # ingress untouched
    # Policies add up: a second NetworkPolicy opens what the first denies.
    assert run(policies({"podSelector": {}}, {"podSelector": {"matchLabels": {"app": "web"}},
                                             "ingress": [{"from": [{"podSelector": {}}]}]}), PROD_FE, WEB_POD).allowed


def test_ip_block_with_host_bits_is_masked_as_kubernetes_reads_it() -> None:
    """The API server accepts 10.0.1.1/4 (its conformance suite uses it); the watcher masks it instead
    of rejecting the whole NetworkPolicy, and says so."""
    spec = {"podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.1.1/4", "except": ["10.0.1.5/24"]}}]}]}
    assert translate(spec)["ingress"] == [{"fromCIDRSet": [{"cidr": "0.0.0.0/4", "except": ["10.0.1.0/24"]}]}]
    assert network_policy_notes(netpol(spec)) == [
        "spec.ingress[0].from[0].ipBlock.cidr: 10.0.1.1/4 has host bits set; read as 0.0.0.0/4, as Kubernetes "
        "and Cilium do",
        "spec.ingress[0].from[0].ipBlock.except: 10.0.1.5/24 has host bits set; read as 10.0.1.0/24, as "
        "Kubernetes and Cilium do"]
    ps = policies(spec)
    assert run(ps, "9.1.1.1", WEB_POD).allowed and not run(ps, "10.0.1.1", WEB_POD).allowed
