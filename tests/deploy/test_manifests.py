"""deploy/kubernetes and deploy/cni: the manifests validate against Kubernetes' schemas (strict), the
RBAC grants only what the agent's watcher reads, the DaemonSet runs a `cilia agent` command line the
real CLI accepts with what the node must give it, and the CNI config is one cilia-cni understands."""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest

from cilia.cni import plugin as cni

from tests.deploy.deploy_support import (
    DEPLOY,
    K8S_VERSION,
    Doc,
    container_env,
    expand,
    find,
    flags,
    help_text,
    load_docs,
    manifest_files,
    parse_cilia,
    project_version,
    unexpanded,
)

STATE_DIR = "/var/run/cilia"
NODE_FIELDS = {"spec.nodeName": "node-1", "status.hostIP": "192.0.2.1", "metadata.name": "deathstar",
               "metadata.namespace": "default"}


def all_docs() -> list[tuple[str, Doc]]:
    return [(f"{path.relative_to(DEPLOY)}#{doc['kind']}/{doc['metadata']['name']}", doc)
            for path in manifest_files() for doc in load_docs(path)]


def daemonset() -> Doc:
    return find("DaemonSet", "cilia-agent")


def pod_spec() -> Doc:
    spec: Doc = daemonset()["spec"]["template"]["spec"]
    return spec


def named(containers: list[Doc], name: str) -> Doc:
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def agent_container() -> Doc:
    return named(pod_spec()["containers"], "cilia-agent")


def init_container(name: str) -> Doc:
    return named(pod_spec()["initContainers"], name)


def config_maps() -> dict[str, dict[str, str]]:
    cm = find("ConfigMap", "cilia-config")
    return {cm["metadata"]["name"]: cm["data"]}


def agent_argv() -> list[str]:
    """The agent container's argv after the kubelet's expansion: ``sh -c SCRIPT cilia agent ...``."""
    container = agent_container()
    env = container_env(container, config_maps(), NODE_FIELDS)
    return [expand(a, env) for a in container["command"] + container["args"]]


def cilia_argv() -> list[str]:
    """What the wrapper script execs: ``cilia agent ...``."""
    argv = agent_argv()
    assert argv[:2] == ["/bin/sh", "-c"]
    return argv[3:]


# --- Kubernetes schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,doc", all_docs(), ids=[name for name, _ in all_docs()])
def test_manifest_validates_strictly(name: str, doc: Doc) -> None:
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION


def test_strict_validation_rejects_unknown_fields() -> None:
    """Strict mode has teeth: a misspelt field of the DaemonSet fails."""
    doc = copy.deepcopy(daemonset())
    doc["spec"]["template"]["spec"]["hostNetworking"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_kind_is_there() -> None:
    kinds = sorted(doc["kind"] for _, doc in all_docs())
    assert kinds == sorted(["CustomResourceDefinition"] * 4 + ["ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                                               "ConfigMap", "DaemonSet", "Pod"])


def test_objects_are_labelled_and_in_kube_system() -> None:
    for name, doc in all_docs():
        if doc["kind"] == "Pod":
            continue  # the sidecar example's app
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cilia", name
        if doc["kind"] in ("ServiceAccount", "ConfigMap", "DaemonSet"):
            assert doc["metadata"]["namespace"] == "kube-system", name


def test_every_image_is_this_version_of_cilia() -> None:
    for name, doc in all_docs():
        spec = doc["spec"]["template"]["spec"] if doc["kind"] == "DaemonSet" else doc.get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            assert c["image"] == f"cilia:{project_version()}", f"{name} {c['name']}"


# --- RBAC -------------------------------------------------------------------------------------------

# (API group, resource) of what the agent's watcher lists and watches, and nothing else
WATCHED = {("", "namespaces"), ("", "pods"), ("networking.k8s.io", "networkpolicies"),
           ("cilium.io", "ciliumnetworkpolicies"), ("cilium.io", "ciliumclusterwidenetworkpolicies"),
           ("", "services"), ("discovery.k8s.io", "endpointslices")}
# CRD mode (cilia/k8s/crd_identities.py, crd_endpoints.py): what the agents write, and read one by one
WRITTEN = {("cilium.io", "ciliumidentities"): {"get", "list", "watch", "create"},
           ("cilium.io", "ciliumendpoints"): {"get", "list", "watch", "create", "update", "delete"}}


def granted() -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in find("ClusterRole", "cilia")["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames, nonResourceURLs..."
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_cluster_role_is_list_and_watch_on_the_watched_resources() -> None:
    roles = granted()
    assert set(roles) == WATCHED | set(WRITTEN)
    crds = [d for path in sorted((DEPLOY / "kubernetes").glob("crd-*.yaml")) for d in load_docs(path)]
    assert {("cilium.io", crd["spec"]["names"]["plural"]) for crd in crds} == \
        {r for r in WATCHED | set(WRITTEN) if r[0] == "cilium.io"}
    assert all(roles[r] == {"list", "watch"} for r in WATCHED), roles
    assert all(roles[r] == verbs for r, verbs in WRITTEN.items()), roles


def test_cluster_role_matches_the_watchers_resources() -> None:
    """The watcher's own list of resources (cilia/k8s/watch.py, and CRD mode's) is what the role grants."""
    watch = pytest.importorskip("cilia.k8s.watch")
    assert set(watch.RESOURCES) == {resource for _, resource in WATCHED}
    assert {watch.CILIUM_IDENTITIES, watch.CILIUM_ENDPOINTS} == {resource for _, resource in WRITTEN}
    from cilia.k8s import crd_endpoints, crd_identities

    assert {(m.GROUP, m.PLURAL) for m in (crd_identities, crd_endpoints)} == set(WRITTEN)


def test_cluster_role_is_nothing_like_cluster_admin() -> None:
    role = find("ClusterRole", "cilia")
    text = json.dumps(role["rules"])
    assert "*" not in text and "secrets" not in text and "aggregationRule" not in role
    for rule in role["rules"]:
        writes = set(rule["verbs"]) & {"create", "update", "patch", "delete", "deletecollection", "escalate",
                                       "bind", "impersonate"}
        if writes:  # only CRD mode's shared state, never deletecollection/escalate/...
            assert {(g, r) for g in rule["apiGroups"] for r in rule["resources"]} <= set(WRITTEN), rule
            assert writes <= {"create", "update", "delete"}, rule


def test_binding_gives_the_role_to_the_daemonsets_service_account() -> None:
    binding = find("ClusterRoleBinding", "cilia")
    account = find("ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cilia"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    assert pod_spec()["serviceAccountName"] == account["metadata"]["name"]
    assert daemonset()["metadata"]["namespace"] == account["metadata"]["namespace"]


# --- the DaemonSet --------------------------------------------------------------------------------------


def test_daemonset_runs_everywhere_and_first() -> None:
    ds, spec = daemonset(), pod_spec()
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]  # no key: tolerates every taint
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert 0 < spec["terminationGracePeriodSeconds"] <= 60
    requests = agent_container()["resources"]["requests"]
    assert set(requests) == {"cpu", "memory"}


def test_agent_is_privileged_for_bpf() -> None:
    sc = agent_container()["securityContext"]
    assert sc["privileged"] is True
    assert {"BPF", "NET_ADMIN", "SYS_ADMIN"} <= set(sc["capabilities"]["add"])


def mounts(container: Doc) -> dict[str, tuple[str, Doc]]:
    """mountPath -> (hostPath, the mount)."""
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    out = {}
    for m in container["volumeMounts"]:
        volume = volumes[m["name"]]
        out[m["mountPath"]] = (volume["hostPath"]["path"] if "hostPath" in volume else "", m)
    return out


def test_agent_mounts_what_it_needs_from_the_node() -> None:
    m = mounts(agent_container())
    assert m["/sys/fs/bpf"][0] == "/sys/fs/bpf" and m["/sys/fs/bpf"][1]["mountPropagation"] == "HostToContainer"
    assert m[STATE_DIR][0] == STATE_DIR
    for path in ("/lib/modules", "/usr/src"):  # bcc compiles against the node's kernel headers
        assert m[path][0] == path and m[path][1]["readOnly"] is True
    assert m["/run/netns"][0] == "/run/netns" and m["/run/netns"][1]["mountPropagation"] == "HostToContainer"
    assert m["/var/lib/cni"][0] == "/var/lib/cni"  # the CNI plugin's leases, as it runs in this mount namespace
    # a delegated IPAM plugin (ipam.type host-local) is found in the runtime's CNI_PATH there too
    assert m["/opt/cni/bin"][0] == "/opt/cni/bin" and m["/opt/cni/bin"][1]["readOnly"] is True


def test_bpffs_is_mounted_like_cilium_does() -> None:
    """An init container mounts bpffs with Bidirectional propagation so that it is the node's mount."""
    container = init_container("mount-bpf-fs")
    m = mounts(container)
    assert m["/sys/fs/bpf"][0] == "/sys/fs/bpf" and m["/sys/fs/bpf"][1]["mountPropagation"] == "Bidirectional"
    assert container["securityContext"]["privileged"] is True
    script = container["args"][0]
    test = script.split("||")[0].strip()  # the check that bpffs is there already
    for line, mounted in (("bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0", True),
                          ("none /sys/fs/bpf bpf rw,relatime 0 0", True),
                          ("sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0", False)):
        res = subprocess.run(["sh", "-c", test.replace("/proc/mounts", "-")], input=line + "\n", text=True)
        assert (res.returncode == 0) is mounted, line


def test_volumes_are_all_used_and_all_declared() -> None:
    spec = pod_spec()
    declared = {v["name"] for v in spec["volumes"]}
    used = {m["name"] for c in spec["containers"] + spec["initContainers"] for m in c["volumeMounts"]}
    assert used == declared


def test_agent_command_expands_completely() -> None:
    argv = agent_argv()
    assert not unexpanded(argv), unexpanded(argv)
    assert cilia_argv()[:2] == ["cilia", "agent"]


def test_agent_flags_are_in_cilia_agent_help() -> None:
    """Every flag the DaemonSet passes is one `cilia agent --help` lists (--kubernetes: see below)."""
    usage = help_text("agent")
    missing = [f for f in flags(cilia_argv()) if f != "--kubernetes" and f not in usage]
    assert not missing, f"not in `cilia agent --help`: {missing}"


def without_kubernetes(argv: list[str]) -> list[str]:
    i = argv.index("--kubernetes")
    return argv[:i] + argv[i + 2:]


def test_cilia_agent_accepts_the_command_line() -> None:
    """The real option parser takes the expanded command line and the ConfigMap's values."""
    argv = cilia_argv()
    if "--kubernetes" not in help_text("agent"):
        argv = without_kubernetes(argv)
    params = parse_cilia(argv)
    data = config_maps()["cilia-config"]
    assert params["state_dir"] == STATE_DIR
    assert params["datapath"] == data["datapath"] == "bpf"
    assert params["envoy_mode"] == data["envoy"] == "managed"
    assert params["router_ip"] == data["router-ip"]
    assert params["log_level"] == data["log-level"]
    assert params["node_id"] == NODE_FIELDS["spec.nodeName"]
    assert params["kvstore"] == data["kvstore"] == "none" and params["kvstore_endpoints"] == data["kvstore-endpoints"]
    assert params["node_ip"] == NODE_FIELDS["status.hostIP"]


def test_daemonset_runs_an_etcd_cluster_when_the_configmap_says_so() -> None:
    """kvstore: etcd with endpoints in the ConfigMap: the agent's options take them."""
    container = agent_container()
    data = dict(config_maps()["cilia-config"], kvstore="etcd", **{"kvstore-endpoints": "http://10.0.0.5:2379"})
    env = container_env(container, {**config_maps(), "cilia-config": data}, NODE_FIELDS)
    argv = [expand(a, env) for a in container["command"] + container["args"]][3:]
    params = parse_cilia(argv)
    assert params["kvstore"] == "etcd" and params["kvstore_endpoints"] == "http://10.0.0.5:2379"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert params["cluster_health_port"] == ports["cluster-health"] == 4240


def test_daemonset_passes_kubernetes_in_cluster() -> None:
    argv = cilia_argv()
    assert argv.count("--kubernetes") == 1
    assert argv[argv.index("--kubernetes") + 1] == "in-cluster"


def test_cilia_agent_accepts_kubernetes_in_cluster() -> None:
    assert "--kubernetes" in help_text("agent")
    params = parse_cilia(cilia_argv())
    assert params["kubernetes"] == "in-cluster"


def fake_cilia(tmp_path: Path, body: str) -> dict[str, str]:
    """An environment whose PATH finds a fake `cilia` running ``body`` first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "cilia"
    fake.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_wrapper_records_the_agents_pid_and_execs_it(tmp_path: Path) -> None:
    """The command writes its own PID, then execs cilia with that PID and the args unchanged."""
    argv = agent_argv()
    pid_file = tmp_path / "agent.pid"
    assert f"{STATE_DIR}/agent.pid" in argv[2]
    script = argv[2].replace(f"{STATE_DIR}/agent.pid", str(pid_file))
    env = fake_cilia(tmp_path, 'echo "$$"; for a in "$@"; do echo "$a"; done')
    res = subprocess.run([argv[0], argv[1], script, *argv[3:]], capture_output=True, text=True, env=env, check=True)
    pid, *args = res.stdout.splitlines()
    assert pid_file.read_text().strip() == pid
    assert args == argv[4:]


def test_probes_use_the_agents_health_port() -> None:
    """httpGet probes on the port `--agent-health-port` opens, at paths its health server serves:
    liveness on /livez (restart only an agent that does not answer), readiness on /healthz (a
    degraded agent leaves readiness). tests/agent/test_agent_prometheus.py runs those pages."""
    from cilia.agent.metrics_server import HEALTH_PORT

    container = agent_container()
    params = parse_cilia(cilia_argv())
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert params["agent_health_port"] == ports["health"] == HEALTH_PORT
    paths = {probe: container[probe]["httpGet"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {p["port"] for p in paths.values()} == {"health"}
    assert [p["path"] for p in paths.values()] == ["/livez", "/livez", "/healthz"]


def test_prometheus_scrapes_the_metrics_port() -> None:
    """The scrape annotation names the port `--prometheus-serve-addr` serves /metrics on."""
    from cilia.agent.metrics_server import PROMETHEUS_PORT, parse_address

    pod = daemonset()["spec"]["template"]
    params = parse_cilia(cilia_argv())
    host, port = parse_address(params["prometheus_serve_addr"], PROMETHEUS_PORT)
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert (host, port) == ("", PROMETHEUS_PORT) == ("", ports["prometheus"])
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port)}


# --- the CNI plugin and its config ---------------------------------------------------------------------


def conflist() -> Doc:
    doc: Doc = json.loads((DEPLOY / "cni" / "05-cilia.conflist").read_text(encoding="utf-8"))
    return doc


def test_configmap_carries_the_same_conflist() -> None:
    assert json.loads(config_maps()["cilia-config"]["05-cilia.conflist"]) == conflist()


def test_conflist_names_cilia_cni_and_its_ipam() -> None:
    net = conflist()
    assert net["cniVersion"] in cni.SUPPORTED_VERSIONS
    (plugin,) = net["plugins"]
    assert plugin["type"] == "cilia-cni"
    assert plugin["agentSocket"] == f"{STATE_DIR}/cilia.sock"
    ipam = plugin["ipam"]
    assert ipam["type"] == "cilia"
    subnet = ipaddress.ip_network(ipam["subnet"])
    assert ipaddress.ip_address(ipam["gateway"]) in subnet and ipaddress.ip_address(ipam["rangeStart"]) in subnet
    assert ipam["gateway"] == config_maps()["cilia-config"]["router-ip"]  # the agent's --router-ip
    assert ipam["dataDir"].startswith("/var/lib/cni/")  # kept on the node (mounted into the agent)


def runtime_config(net: Doc) -> str:
    """What a runtime feeds the plugin for a conflist: the plugin's entry with the network's name and version."""
    (plugin,) = net["plugins"]
    return json.dumps({**plugin, "cniVersion": net["cniVersion"], "name": net["name"]})


def test_cilia_cni_reads_the_config() -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/var/run/netns/cni-1",
           "CNI_IFNAME": "eth0", "CNI_ARGS": "K8S_POD_NAME=deathstar;K8S_POD_NAMESPACE=default"}
    req = cni.parse_request(env, runtime_config(conflist()))
    pool = req.pool()
    assert str(pool.gateway) == config_maps()["cilia-config"]["router-ip"]
    assert str(pool.data_dir) == conflist()["plugins"][0]["ipam"]["dataDir"]
    code, out = cni.run({"CNI_COMMAND": "VERSION"}, runtime_config(conflist()))
    assert code == 0 and out is not None and conflist()["cniVersion"] in out["supportedVersions"]


def test_install_cni_installs_plugin_and_config(tmp_path: Path) -> None:
    """Run the init container's script against a scratch node: the shim lands executable in
    /opt/cni/bin, the ConfigMap's conflist in /etc/cni/net.d, nothing else."""
    container = init_container("install-cni")
    m = mounts(container)
    assert m["/host/opt/cni/bin"][0] == "/opt/cni/bin" and m["/host/etc/cni/net.d"][0] == "/etc/cni/net.d"
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    config_mount = m["/etc/cilia/cni"][1]
    assert volumes[config_mount["name"]]["configMap"]["items"] == [{"key": "05-cilia.conflist",
                                                                    "path": "05-cilia.conflist"}]
    image = tmp_path / "image"  # the paths the script reads, in a scratch tree
    (image / "opt/cilia/cni").mkdir(parents=True)
    (image / "opt/cilia/cni/cilia-cni").write_bytes((DEPLOY / "docker" / "cilia-cni-shim.sh").read_bytes())
    (image / "etc/cilia/cni").mkdir(parents=True)
    (image / "etc/cilia/cni/05-cilia.conflist").write_text(config_maps()["cilia-config"]["05-cilia.conflist"])
    node = tmp_path / "node"
    (node / "opt/cni/bin").mkdir(parents=True)
    (node / "etc/cni/net.d").mkdir(parents=True)
    script = (container["args"][0].replace("/host/", f"{node}/")
              .replace("/opt/cilia/", f"{image}/opt/cilia/").replace("/etc/cilia/", f"{image}/etc/cilia/"))
    subprocess.run([*container["command"], script], check=True)
    assert sorted(p.name for p in (node / "opt/cni/bin").iterdir()) == ["cilia-cni"]
    assert sorted(p.name for p in (node / "etc/cni/net.d").iterdir()) == ["05-cilia.conflist"]
    assert os.access(node / "opt/cni/bin/cilia-cni", os.X_OK)
    assert json.loads((node / "etc/cni/net.d/05-cilia.conflist").read_text()) == conflist()


def test_state_dir_is_one_path_everywhere() -> None:
    env = {e["name"]: e.get("value") for e in agent_container()["env"]}
    assert env["CILIA_STATE_DIR"] == STATE_DIR
    shim = (DEPLOY / "docker" / "cilia-cni-shim.sh").read_text(encoding="utf-8")
    assert f"state_dir=${{CILIA_STATE_DIR:-{STATE_DIR}}}" in shim


def test_deploy_readme_names_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = path.relative_to(DEPLOY)
        if rel.parts[0] == "sidecar":
            assert path.name in (DEPLOY / "sidecar" / "README.md").read_text(encoding="utf-8") or \
                path.name == "README.md", rel
        elif rel != Path("README.md"):
            assert f"`{rel}`" in readme, f"deploy/README.md does not name {rel}"
