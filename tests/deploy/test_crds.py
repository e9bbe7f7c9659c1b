"""The CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy CRDs: up to date with their generator,
structural, and their schema accepts what cilia's parser accepts (Cilium's examples, random valid
policies) and rejects wrong shapes that the parser rejects too."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
import re2
from hypothesis import HealthCheck, assume, given, settings

from cilia.policy import parse
from cilia.policy.entities import ENTITIES
from cilia.policy.l7 import dns as l7dns
from cilia.policy.l7 import http as l7http
from cilia.policy.l7 import kafka as l7kafka

from tests.deploy.deploy_support import REPO, Doc, crd_schemas, generator, json_schema, load_docs, prune_nulls, walk
from tests.policy.strategies import policy_docs  # random valid policies

CNP, CCNP = "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"
SCHEMAS = crd_schemas()
VALIDATORS = {kind: jsonschema.Draft202012Validator(json_schema(s)) for kind, s in SCHEMAS.items()}
EXAMPLE_FILES = sorted((REPO / "examples" / "cilium").glob("*.yaml")) + sorted(
    (REPO / "examples" / "starwars").glob("*.yaml"))


def errors(doc: Doc) -> list[str]:
    """Why the CRD schema of the document's kind rejects it (after the API server's null pruning)."""
    schema = SCHEMAS[doc["kind"]]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in VALIDATORS[doc["kind"]].iter_errors(prune_nulls(doc, schema))]


def cilia_problems(doc: Doc) -> list[str]:
    """What cilia's own parser says about the document."""
    result = parse.parse_text(json.dumps(doc), "doc.yaml")
    return [str(p) for p in result.problems]


def examples() -> list[tuple[str, Doc]]:
    return [(f"{path.parent.name}/{path.name}#{i}", doc) for path in EXAMPLE_FILES
            for i, doc in enumerate(load_docs(path)) if doc.get("kind") in (CNP, CCNP)]


# --- the files ------------------------------------------------------------------------------------


def test_crd_files_are_what_the_generator_writes() -> None:
    for path, text in generator().outputs().items():
        assert path.read_text(encoding="utf-8") == text, \
            f"{path.name} is stale: run .venv/bin/python deploy/kubernetes/generate_crds.py"


@pytest.mark.parametrize("kind,scope,plural,short", [
    (CNP, "Namespaced", "ciliumnetworkpolicies", ["cnp", "ciliumnp"]),
    (CCNP, "Cluster", "ciliumclusterwidenetworkpolicies", ["ccnp"]),
])
def test_crd_names_are_ciliums(kind: str, scope: str, plural: str, short: list[str]) -> None:
    (crd,) = [d for p in REPO.glob("deploy/kubernetes/crd-*.yaml") for d in load_docs(p)
              if d["spec"]["names"]["kind"] == kind]
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{plural}.cilium.io"
    assert spec["group"] == "cilium.io" and spec["scope"] == scope
    assert spec["names"]["plural"] == plural and spec["names"]["shortNames"] == short
    assert spec["names"]["singular"] == kind.lower() and spec["names"]["listKind"] == kind + "List"
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v2", True, True)
    assert version["subresources"] == {"status": {}}
    top = version["schema"]["openAPIV3Schema"]["properties"]
    assert {"spec", "specs", "status"} <= set(top)
    assert top["specs"]["items"] == top["spec"]


def test_crds_fit_kubectl_apply_annotation() -> None:
    """Client-side `kubectl apply` keeps the object as JSON in an annotation of at most 256 KiB."""
    for path in REPO.glob("deploy/kubernetes/crd-*.yaml"):
        (crd,) = load_docs(path)
        assert len(json.dumps(crd, separators=(",", ":"))) < 262144, path.name


# --- structural schema rules (what the API server checks when the CRD is created) ---------------


_NOT_IN_JUNCTORS = ("type", "description", "default", "additionalProperties", "nullable")


def structural_problems(schema: Doc) -> list[str]:
    """Where a schema breaks Kubernetes' rules for structural schemas (which CRDs must follow)."""
    problems = []
    for path, node in walk(schema):
        if "<" in path:
            continue  # inside a junctor: checked below, from the node that has it
        where = path or "<root>"
        if node.get("x-kubernetes-int-or-string"):
            assert node.get("anyOf") == [{"type": "integer"}, {"type": "string"}], where
            assert "type" not in node, where
        elif "type" not in node:
            problems.append(f"{where}: no type")
        if node.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{where}: keeps unknown fields (Cilium's policy CRDs never do)")
        for name in node.get("required", []):
            if name not in node.get("properties", {}):
                problems.append(f"{where}: requires {name!r}, which is not a field here")
        for junctor in ("allOf", "anyOf", "oneOf"):
            if junctor == "anyOf" and node.get("x-kubernetes-int-or-string"):
                continue  # the one allowed use of types in a junctor
            for sub in node.get(junctor, []):
                for inner_path, inner in walk(sub):
                    problems += [f"{where}<{junctor}>{inner_path}: {key} inside a junctor"
                                 for key in _NOT_IN_JUNCTORS if key in inner]
                for name in [*sub.get("properties", {}), *sub.get("required", [])]:
                    if name not in node.get("properties", {}):
                        problems.append(f"{where}: {junctor} names {name!r}, which is not a field here")
    return problems


@pytest.mark.parametrize("kind", [CNP, CCNP])
def test_schema_is_structural(kind: str) -> None:
    schema = SCHEMAS[kind]
    assert schema["type"] == "object"
    assert schema["properties"]["metadata"] == {"type": "object"}  # metadata: only name restrictions allowed
    assert structural_problems(schema) == []


def test_structural_check_finds_problems() -> None:
    bad = {"type": "object", "properties": {"a": {"description": "untyped"}, "b": {"type": "string"}},
           "oneOf": [{"description": "x", "required": ["b"]}, {"required": ["c"]}]}
    assert sorted(structural_problems(bad)) == [".a: no type", "<root>: oneOf names 'c', which is not a field here",
                                                "<root><oneOf>: description inside a junctor"]


@pytest.mark.parametrize("kind", [CNP, CCNP])
def test_patterns_are_re2(kind: str) -> None:
    """The API server matches `pattern` with Go's regexp (RE2 syntax); jsonschema uses Python's re."""
    patterns = {node["pattern"] for _, node in walk(SCHEMAS[kind]) if "pattern" in node}
    assert patterns
    for pattern in patterns:
        re2.compile(pattern)
        re.compile(pattern)


# --- the fields are the parser's ------------------------------------------------------------------


def fields_at(schema: Doc, path: str) -> set[str]:
    node = dict(walk(schema))[path]
    return set(node["properties"])


@pytest.mark.parametrize("kind", [CNP, CCNP])
def test_schema_fields_are_the_parsers(kind: str) -> None:
    s = SCHEMAS[kind]
    assert set(s["properties"]) == set(parse._TOP_FIELDS)
    rule_fields = set(parse._RULE_FIELDS) - ({"nodeSelector"} if kind == CNP else set())
    assert fields_at(s, ".spec") == rule_fields  # a CNP cannot have a nodeSelector (host policy)
    for section, deny in (("ingress", False), ("ingress", True), ("egress", False), ("egress", True)):
        name = section + ("Deny" if deny else "")
        assert fields_at(s, f".spec.{name}[]") == set(parse._SECTION_FIELDS[(section, deny)]), name
        assert fields_at(s, f".spec.{name}[].toPorts[]") == ({"ports"} if deny else set(parse._PORT_RULE_FIELDS))
        assert fields_at(s, f".spec.{name}[].toPorts[].ports[]") == {"port", "endPort", "protocol"}
    port_rule = ".spec.ingress[].toPorts[]"
    assert fields_at(s, port_rule + ".rules") == set(parse._L7_FIELDS)
    assert fields_at(s, port_rule + ".rules.http[]") == set(l7http._RULE_FIELDS)
    assert fields_at(s, port_rule + ".rules.http[].headerMatches[]") == set(l7http._MATCH_FIELDS)
    assert fields_at(s, port_rule + ".rules.http[].headerMatches[].secret") == set(l7http._SECRET_FIELDS)
    assert fields_at(s, port_rule + ".rules.kafka[]") == set(l7kafka._RULE_FIELDS)
    assert fields_at(s, port_rule + ".rules.dns[]") == set(l7dns._RULE_FIELDS)
    assert fields_at(s, ".spec.endpointSelector") == {"matchLabels", "matchExpressions"}
    assert set(dict(walk(s))[".spec.ingress[].toPorts[].ports[].protocol"]["enum"]) == set(parse._PROTOCOLS)
    assert dict(walk(s))[".spec.ingress[].fromEntities[]"]["enum"] == list(ENTITIES)
    assert dict(walk(s))[".spec.egress[].toEntities[]"]["enum"] == list(ENTITIES)


# --- examples and random policies validate -------------------------------------------------------


def test_examples_include_both_kinds() -> None:
    kinds = [doc["kind"] for _, doc in examples()]
    assert kinds.count(CCNP) >= 2 and kinds.count(CNP) >= 20


@pytest.mark.parametrize("name,doc", examples(), ids=[name for name, _ in examples()])
def test_cilium_example_validates(name: str, doc: Doc) -> None:
    assert not cilia_problems(doc)  # (cilia accepts them all: tests/policy/test_cilium_examples.py)
    assert not errors(doc), errors(doc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_docs("random"))
def test_policies_cilia_accepts_validate(doc: Doc) -> None:
    assume(not cilia_problems(doc))
    assert not errors(doc), errors(doc)


# --- wrong shapes are rejected, by the schema and by cilia alike -----------------------------------

BASE: Doc = {
    "apiVersion": "cilium.io/v2", "kind": CNP, "metadata": {"name": "p"},
    "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
             "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                          "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                       "rules": {"http": [{"method": "GET", "path": "/"}]}}]}]},
}


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    def change(doc: Doc) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = doc
        for p in parents:
            node = node[p]
        node[last] = value
    return change


def _delete(path: str) -> Callable[[Doc], None]:
    def change(doc: Doc) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for p in parents:
            node = node[p]
        del node[last]
    return change


INVALID: dict[str, Callable[[Doc], None]] = {
    "unknown field in spec": _set("spec.endpointSelectors", {}),
    "unknown top-level field": _set("rules", []),
    "unknown field in a peer rule": _set("spec.ingress.0.fromEndpoint", []),
    "unknown field in a port": _set("spec.ingress.0.toPorts.0.ports.0.portName", "http"),
    "spec is a list": _set("spec", [BASE["spec"]]),
    "ingress is a mapping": _set("spec.ingress", {"fromEndpoints": []}),
    "endpointSelector is a string": _set("spec.endpointSelector", "app=web"),
    "matchLabels value is a list": _set("spec.endpointSelector.matchLabels", {"app": ["web"]}),
    "port is a list": _set("spec.ingress.0.toPorts.0.ports.0.port", [80]),
    "port out of range": _set("spec.ingress.0.toPorts.0.ports.0.port", 70000),
    "port is not a number or name": _set("spec.ingress.0.toPorts.0.ports.0.port", "web!"),
    "endPort is a string": _set("spec.ingress.0.toPorts.0.ports.0.endPort", "90"),
    "unknown protocol": _set("spec.ingress.0.toPorts.0.ports.0.protocol", "HTTP"),
    "unknown entity": _set("spec.ingress.0", {"fromEntities": ["galaxy"]}),
    "unknown operator": _set("spec.endpointSelector", {"matchExpressions": [{"key": "a", "operator": "Is"}]}),
    "http method is a number": _set("spec.ingress.0.toPorts.0.rules.http.0.method", 1),
    "l7 rule values are not strings": _set("spec.ingress.0.toPorts.0.rules",
                                           {"l7proto": "memcache", "l7": [{"command": ["get"]}]}),
    "L7 rules in a deny rule": lambda d: d["spec"].update(ingressDeny=d["spec"].pop("ingress")),
    "toFQDNs in ingress": _set("spec.ingress.0", {"toFQDNs": [{"matchName": "cilium.io"}]}),
    "no spec and no specs": _delete("spec"),
    "no endpointSelector": _delete("spec.endpointSelector"),
    "nodeSelector in a CiliumNetworkPolicy": _set("spec.nodeSelector", {}),
    "both selectors in a clusterwide policy": lambda d: d.update(kind=CCNP, spec={**d["spec"], "nodeSelector": {}}),
    "enableDefaultDeny is not a boolean": _set("spec.enableDefaultDeny", {"ingress": "yes"}),
    "icmp field without type": _set("spec.ingress.0", {"icmps": [{"fields": [{"family": "IPv4"}]}]}),
    "cidrSet with cidr and group": _set("spec.ingress.0", {"fromCIDRSet": [{"cidr": "10.0.0.0/8",
                                                                            "cidrGroupRef": "g"}]}),
    "not a CIDR": _set("spec.ingress.0", {"fromCIDR": ["ten.0.0.0/8"]}),
    "fqdn with both fields": lambda d: d["spec"].update(egress=[{"toFQDNs": [{"matchName": "a.io",
                                                                               "matchPattern": "*.a.io"}]}]),
}


def test_base_policy_is_valid() -> None:
    assert not cilia_problems(BASE) and not errors(BASE)


@pytest.mark.parametrize("change", INVALID.values(), ids=list(INVALID))
def test_invalid_policy_is_rejected(change: Callable[[Doc], None]) -> None:
    doc = copy.deepcopy(BASE)
    change(doc)
    assert errors(doc), "the CRD schema accepts it"
    assert cilia_problems(doc), "cilia accepts it: the schema must not be stricter than cilia"
