"""The CiliumIdentity and CiliumEndpoint CRDs take exactly what the agents write in CRD mode
(cilia/k8s/crd_identities.py, crd_endpoints.py), and reject what the agents would skip."""

from __future__ import annotations

import jsonschema

from cilia.k8s.crd_endpoints import Published, endpoint_object
from cilia.k8s.crd_identities import identity_object
from cilia.policy import LabelSet
from tests.deploy.deploy_support import crd_schemas, json_schema

SCHEMAS = crd_schemas()


def errors(kind: str, doc: dict[str, object]) -> list[str]:
    validator = jsonschema.Draft202012Validator(json_schema(SCHEMAS[kind]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_what_the_agents_write_validates() -> None:
    labels = LabelSet.parse(["k8s:app=x", "k8s:io.kubernetes.pod.namespace=default"])
    assert errors("CiliumIdentity", identity_object(4321, labels)) == []
    published = Published("default", "deathstar", 4321, ("10.0.0.1", "fd00::1"), tuple(labels.to_list()))
    assert errors("CiliumEndpoint", endpoint_object(published, "node-1")) == []


def test_what_the_agents_would_skip_is_rejected() -> None:
    assert errors("CiliumIdentity", {"metadata": {"name": "1"}})  # no security-labels
    assert errors("CiliumIdentity", {"metadata": {"name": "1"}, "security-labels": {"k8s:app": 3}})
    bad_id = endpoint_object(Published("default", "x", 4321, ("10.0.0.1",), ()), "node-1")
    bad_id["status"]["identity"]["id"] = 1  # type: ignore[index]
    assert errors("CiliumEndpoint", bad_id)
    no_node = endpoint_object(Published("default", "x", 4321, ("10.0.0.1",), ()), "node-1")
    del no_node["status"]["networking"]["node"]  # type: ignore[attr-defined]
    assert errors("CiliumEndpoint", no_node)
