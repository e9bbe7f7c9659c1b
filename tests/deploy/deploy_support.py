"""Shared helpers for the offline checks of deploy/: loading manifests, Kubernetes' $(VAR) expansion,
the CRDs' openAPIV3Schema as JSON Schema, and the cilia commands' own option parsers."""

from __future__ import annotations

import copy
import functools
import importlib.util
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.37"  # the newest Kubernetes whose schemas kubernetes-validate ships; strict mode

Doc = dict[str, Any]


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def _load(path: Path) -> list[Doc]:
    return [d for d in yaml.load_all(path.read_text(encoding="utf-8"), Loader=_LOADER) if d is not None]


def load_docs(path: Path) -> list[Doc]:
    """The documents of a YAML file (a fresh copy: callers may change them)."""
    return copy.deepcopy(_load(path.resolve()))


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest in deploy/ (the kustomization is kustomize's, not the API server's)."""
    return sorted(K8S.glob("*.yaml")) + [DEPLOY / "sidecar" / "pod.yaml"]


def find(kind: str, name: str | None = None) -> Doc:
    """The one object of ``kind`` (and ``name``) in deploy/kubernetes."""
    found = [d for path in sorted(K8S.glob("*.yaml")) for d in load_docs(path)
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def project_version() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def generator() -> ModuleType:
    """deploy/kubernetes/generate_crds.py as a module."""
    path = K8S / "generate_crds.py"
    spec = importlib.util.spec_from_file_location("generate_crds", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- Kubernetes' $(VAR) expansion in command, args and env ---------------------------------------


def expand(text: str, env: Mapping[str, str]) -> str:
    """Expand like the kubelet: $(VAR) when VAR is defined (left as written otherwise), $$ -> $."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("$(", i):
            end = text.find(")", i + 2)
            if end != -1:
                name = text[i + 2:end]
                out.append(env.get(name, text[i:end + 1]))
                i = end + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def container_env(container: Doc, config_maps: Mapping[str, Mapping[str, str]],
                  fields: Mapping[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet resolves it (configMapKeyRef and fieldRef)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
            continue
        source = item["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            assert ref["name"] in config_maps, f"env {item['name']}: no ConfigMap {ref['name']}"
            assert ref["key"] in config_maps[ref["name"]], f"env {item['name']}: {ref['name']} has no {ref['key']}"
            env[item["name"]] = config_maps[ref["name"]][ref["key"]]
        else:
            env[item["name"]] = fields[source["fieldRef"]["fieldPath"]]
    return env


def unexpanded(argv: Sequence[str]) -> list[str]:
    """References left after expansion: variables the container does not define."""
    return [a for a in argv if "$(" in a]


# --- the cilia commands -------------------------------------------------------------------------


@functools.cache
def help_text(*command: str) -> str:
    """``cilia COMMAND --help``, as a user sees it."""
    res = subprocess.run([sys.executable, "-m", "cilia", *command, "--help"], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return res.stdout


def flags(argv: Sequence[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def parse_cilia(argv: Sequence[str]) -> dict[str, Any]:
    """Parse ``cilia SUBCOMMAND ARGS...`` with the real click command (without running it): raises
    click's UsageError/BadParameter exactly as `cilia` would reject the arguments."""
    from cilia.cli.main import cli

    assert argv[0] == "cilia", argv
    command = cli.get_command(click.Context(cli), argv[1])
    assert isinstance(command, click.Command), f"no command cilia {argv[1]}"
    with command.make_context(argv[1], list(argv[2:])) as ctx:
        return dict(ctx.params)


# --- the CRDs' openAPIV3Schema as JSON Schema -----------------------------------------------------

_JUNCTORS = ("allOf", "anyOf", "oneOf", "not")


def json_schema(node: Any, *, in_junctor: bool = False) -> Any:
    """Translate a Kubernetes structural schema to JSON Schema (draft 2020-12) for jsonschema.

    x-kubernetes-* keys and formats go; ``nullable`` becomes a null type; objects with properties
    and no additionalProperties get ``additionalProperties: false``, which is what the API server
    does with ``kubectl``'s strict field validation (unknown fields are errors, not silently pruned).
    Inside anyOf/oneOf/... the schema only constrains, so no such closing there."""
    if isinstance(node, list):
        return [json_schema(n, in_junctor=in_junctor) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("format", "nullable"):
            continue
        if key == "properties":
            out[key] = {name: json_schema(s, in_junctor=in_junctor) for name, s in value.items()}
        elif key in _JUNCTORS:
            out[key] = json_schema(value, in_junctor=True)
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = json_schema(value, in_junctor=in_junctor)
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node and not in_junctor
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def prune_nulls(doc: Any, schema: Mapping[str, Any]) -> Any:
    """Drop null fields whose schema is not nullable, as the API server does before validating."""
    if isinstance(doc, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for key, value in doc.items():
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            if value is None and not sub.get("nullable"):
                continue
            out[key] = prune_nulls(value, sub)
        return out
    if isinstance(doc, list):
        items = schema.get("items", {})
        return [prune_nulls(v, items) for v in doc]
    return doc


def crd_schemas() -> dict[str, Doc]:
    """kind -> the k8s openAPIV3Schema of that kind's served version."""
    out = {}
    for path in sorted(K8S.glob("crd-*.yaml")):
        for crd in load_docs(path):
            (version,) = crd["spec"]["versions"]
            out[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return out


def walk(schema: Any, path: str = "") -> Iterator[tuple[str, Doc]]:
    """Every schema node with its path (properties by name, [] for items, {} for map values)."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")
    for junctor in _JUNCTORS:
        subs = schema.get(junctor)
        for i, sub in enumerate(subs if isinstance(subs, list) else [subs] if subs else []):
            yield from walk(sub, f"{path}<{junctor}{i}>")
