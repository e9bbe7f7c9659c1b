"""The habits operators bring from kubectl and cilium (issue 18): get commands, -o json|yaml|wide,
-l selectors, `policy trace` against the live agent, `status --wait`, `policy wait` for a
revision not committed yet, and Kubernetes NetworkPolicy files imported through the agent; each
checked against what the real managed Envoy enforces."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.agent.agent_support import (
    EXHAUST, LAND, STARWARS, TIEFIGHTER, XWING, add_starwars_endpoints, agent_in_process, deathstar_app,
    run_cli, shoot,
)

from cilia.agent.client import AgentClient


@pytest.fixture
def starwars(tmp_path: Path) -> Iterator[Path]:
    with agent_in_process(tmp_path / "state") as agent, deathstar_app() as app_port:
        add_starwars_endpoints(agent.config.state_dir, app_port)
        yield agent.config.state_dir


def import_and_wait(state: Path, *files: Path) -> int:
    res = run_cli(state, "policy", "import", *map(str, files))
    assert res.code == 0, res.err
    revision = int(res.out.split()[1])
    assert run_cli(state, "policy", "wait", str(revision)).code == 0
    return revision


def trace(state: Path, src: str, method: str, path: str) -> int:
    return run_cli(state, "policy", "trace", "--from-endpoint", src, "--to-endpoint", "deathstar", "--dport", "80",
                   "--http-method", method, "--http-path", path).code


def test_live_trace_gives_the_verdicts_envoy_enforces(starwars: Path) -> None:
    state = starwars
    assert trace(state, "tiefighter", *EXHAUST) == 0  # no policy: allowed, as Envoy lets it through
    assert shoot(TIEFIGHTER, *LAND).startswith("200")
    import_and_wait(state, STARWARS / "sw_l3_l4_l7_policy.yaml")
    cases = [("tiefighter", TIEFIGHTER, EXHAUST), ("tiefighter", TIEFIGHTER, LAND), ("xwing", XWING, LAND)]
    for name, address, (method, path) in cases:
        enforced = shoot(address, method, path)
        traced = trace(state, name, method, path)
        assert (traced == 0) == enforced.startswith("200"), (name, method, path, enforced)
    res = run_cli(state, "policy", "trace", "--from-endpoint", "tiefighter", "--to-endpoint", "deathstar",
                  "--dport", "80", "--http-method", "PUT", "--http-path", "/v1/exhaust-port", "-o", "json")
    assert res.code == 1 and res.json()["verdict"] == "denied"
    listed = run_cli(state, "endpoint", "list", "-o", "json").json()["endpoints"]
    identities = {e["name"]: e["identity"] for e in listed}
    assert (res.json()["source"]["identity"], res.json()["destination"]["identity"]) == (
        identities["tiefighter"], identities["deathstar"])  # the agent's identities, not a trace's own
    assert any((r.get("file") or "").endswith("sw_l3_l4_l7_policy.yaml") for r in res.json()["deciding_rules"])
    text = run_cli(state, "policy", "trace", "--from-endpoint", "xwing", "--to-endpoint", "deathstar", "--dport", "80")
    assert text.code == 1 and "Final verdict: DENIED" in text.out
    unknown = run_cli(state, "policy", "trace", "--from-endpoint", "falcon", "--to-endpoint", "deathstar")
    assert unknown.code == 2 and unknown.err.strip() == "error: source: no endpoint named falcon"


LABELLED_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: exhaust-audit
  labels: {team: deathstar-ops}
spec:
  endpointSelector: {matchLabels: {class: probe}}
  labels: [{key: reviewed, value: "yes"}]
  ingress: [{fromEndpoints: [{matchLabels: {org: empire}}]}]
"""


def test_get_commands_output_formats_and_selectors(starwars: Path, tmp_path: Path) -> None:
    state = starwars
    labelled = tmp_path / "labelled.yaml"
    labelled.write_text(LABELLED_POLICY)
    import_and_wait(state, STARWARS / "sw_l3_l4_l7_policy.yaml")
    got = run_cli(state, "policy", "get", "rule1", "-o", "yaml")
    assert got.code == 0
    assert [p["name"] for p in YAML(typ="safe").load(got.out)["policies"]] == ["rule1"]
    assert run_cli(state, "policy", "get", "nosuch").code == 2

    def policies(*selector: str) -> list[str]:
        res = run_cli(state, "policy", "get", "-l", *selector, "-o", "json")
        assert res.code == 0, res.err
        return sorted(p["name"] for p in res.json()["policies"])

    import_and_wait(state, labelled)
    # metadata labels, Cilium's derived labels and rule labels
    assert policies("team=deathstar-ops") == ["exhaust-audit"]
    assert policies("io.cilium.k8s.policy.name=rule1") == ["rule1"]
    assert policies("k8s:io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy,team!=deathstar-ops") == ["rule1"]
    assert policies("unspec:reviewed=yes") == ["exhaust-audit"] and policies("team") == ["exhaust-audit"]
    bad = run_cli(state, "policy", "get", "-l", "team in (a")
    assert bad.code == 2 and len(bad.err.strip().splitlines()) == 1 and "Traceback" not in bad.err
    endpoint = run_cli(state, "endpoint", "get", "tiefighter", "-o", "json").json()
    assert endpoint["name"] == "tiefighter" and "k8s:org=empire" in endpoint["identity_labels"]
    assert "Identity:" in run_cli(state, "endpoint", "get", "tiefighter").out
    missing = run_cli(state, "endpoint", "get", "falcon")
    assert missing.code == 2 and missing.err.strip() == "error: no endpoint named falcon"
    identity = run_cli(state, "identity", "get", str(endpoint["identity"]), "-o", "json").json()
    assert identity["labels"] == endpoint["identity_labels"]
    assert run_cli(state, "identity", "get", "99999").code == 2

    def names(*selector: str) -> list[str]:
        res = run_cli(state, "endpoint", "list", "-l", *selector, "-o", "json")
        assert res.code == 0, res.err
        return sorted(e["name"] for e in res.json()["endpoints"])

    assert names("org=empire") == ["deathstar", "tiefighter"]
    assert names("k8s:org=empire,class!=deathstar") == ["tiefighter"]
    assert names("class in (xwing, deathstar)") == ["deathstar", "xwing"]
    assert names("!org") == [] and names("org") == ["deathstar", "tiefighter", "xwing"]
    ids = run_cli(state, "identity", "list", "-l", "reserved:host", "-o", "json").json()["identities"]
    assert [i["id"] for i in ids] == [1]
    wide = run_cli(state, "endpoint", "list", "-o", "wide")
    assert wide.code == 0 and "NETNS" in wide.out.splitlines()[0]
    for bad in (["endpoint", "list", "-l", "org in (a"], ["identity", "list", "-l", "a=b=c"],
                ["endpoint", "list", "-o", "xml"]):
        res = run_cli(state, *bad)
        assert res.code == 2 and len(res.err.strip().splitlines()) <= 3 and "Traceback" not in res.err, bad


def test_policy_wait_waits_for_a_revision_not_committed_yet(starwars: Path) -> None:
    state = starwars
    current = run_cli(state, "status", "-o", "json").json()["revision"]
    waited: list[int] = []

    def wait_next() -> None:  # through the API: click's runner is not thread-safe (it swaps sys.stdout)
        client = AgentClient(state / "cilia.sock")
        try:
            waited.append(client.wait(current + 1, 60)["revision"])
        finally:
            client.close()

    waiter = threading.Thread(target=wait_next)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not waited  # still waiting: the revision does not exist yet
    res = run_cli(state, "policy", "import", str(STARWARS / "sw_l3_l4_policy.yaml"), "-o", "json")
    assert res.code == 0 and res.json()["revision"] == current + 1
    waiter.join()
    assert waited == [current + 1]
    late = run_cli(state, "policy", "wait", str(current + 5), "--timeout", "0.5")
    assert late.code == 1 and f"revision {current + 5} does not exist after 0.5s" in late.err


def test_status_wait_and_not_enforced_notes(starwars: Path, tmp_path: Path) -> None:
    state = starwars
    assert run_cli(state, "status", "--wait", "--wait-duration", "30").code == 0
    nobody = run_cli(tmp_path / "no-agent", "status", "--wait", "--wait-duration", "1")
    assert nobody.code == 1 and "not healthy after 1s" in nobody.err
    fqdn = tmp_path / "fqdn.yaml"
    fqdn.write_text("""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-fqdn}
spec:
  endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
  - toCIDR: [192.0.2.1/32]
    authentication: {mode: required}
""")
    validated = run_cli(state, "policy", "validate", str(fqdn))
    notes = [line.strip().removeprefix("note: ") for line in validated.out.splitlines() if "note:" in line]
    assert notes and "authentication" in notes[0]
    imported = run_cli(state, "policy", "import", str(fqdn))
    assert imported.code == 0 and [line.removeprefix("note: ") for line in imported.err.splitlines()] == notes
    status = run_cli(state, "status")
    assert "Policy notes" in status.out and "default/to-fqdn:" in status.out and notes[0] in status.out


def test_network_policy_file_through_the_agent_is_enforced_as_traced(starwars: Path, tmp_path: Path) -> None:
    state = starwars
    netpol = tmp_path / "netpol.yaml"
    netpol.write_text("""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: empire-only, namespace: default}
spec:
  podSelector: {matchLabels: {class: deathstar}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {org: empire}}
    ports:
    - {port: 80, protocol: TCP}
""")
    assert run_cli(state, "policy", "validate", str(netpol)).code == 0
    offline = {src: run_cli(state, "policy", "trace", "--policy", str(netpol), "--src", labels,
                            "--dst", "class=deathstar,org=empire,io.kubernetes.pod.namespace=default",
                            "--dport", "80").code
               for src, labels in (("tiefighter", "class=tiefighter,org=empire,io.kubernetes.pod.namespace=default"),
                                   ("xwing", "class=xwing,org=alliance,io.kubernetes.pod.namespace=default"))}
    assert offline == {"tiefighter": 0, "xwing": 1}
    diff = run_cli(state, "policy", "diff", str(netpol), "-o", "json")
    assert diff.code == 0, diff.err
    import_and_wait(state, netpol)
    names = [p["name"] for p in run_cli(state, "policy", "get", "-o", "json").json()["policies"]]
    assert names == ["networkpolicy.empire-only"]
    assert shoot(TIEFIGHTER, *LAND).startswith("200")
    assert shoot(XWING, *LAND) == "blocked"
    live = {src: run_cli(state, "policy", "trace", "--from-endpoint", src, "--to-endpoint", "deathstar",
                         "--dport", "80").code for src in ("tiefighter", "xwing")}
    assert live == offline
    # an ipBlock with host bits: masked, noted at import and kept in status (the watcher's path too)
    masked = tmp_path / "masked.yaml"
    masked.write_text("""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: masked, namespace: default}
spec:
  podSelector: {matchLabels: {class: probe}}
  ingress: [{from: [{ipBlock: {cidr: 10.0.1.1/4}}]}]
""")
    res = run_cli(state, "policy", "import", str(masked))
    note = "NetworkPolicy masked: spec.ingress[0].from[0].ipBlock.cidr: 10.0.1.1/4 has host bits set"
    assert res.code == 0 and note in res.err, res.err
    assert f"{masked}:1: {note}" in run_cli(state, "status").out


def test_mutating_commands_print_json_for_scripts(starwars: Path) -> None:
    state = starwars
    added = run_cli(state, "endpoint", "add", "--name", "probe", "--labels", "app=probe", "-o", "json").json()
    assert added["endpoint"]["identity"] > 255 and added["revision"] > 0
    deleted = run_cli(state, "endpoint", "delete", "probe", "-o", "json").json()
    assert deleted["revision"] == added["revision"] + 1
    imported = run_cli(state, "policy", "import", str(STARWARS / "sw_l3_l4_policy.yaml"), "-o", "json").json()
    assert imported["revision"] == deleted["revision"] + 1 and imported["policies"][0]["name"] == "rule1"
    gone = run_cli(state, "policy", "delete", "rule1", "-o", "json").json()
    assert gone["revision"] == imported["revision"] + 1
