"""Kubernetes NetworkPolicy files in `cilia policy validate` and `trace`: translated exactly as
the Kubernetes watcher translates the objects (so both give the same verdicts), an ipBlock with
host bits masked with a note, and named ports told to trace."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from ruamel.yaml import YAML

from cilia.cli.main import cli
from cilia.policy.netpol import derived_policy_name, network_policy_text
from cilia.policy import LabelSet, Peer, TraceRequest, parse_text, trace
from cilia.policy.model import Protocol

NS = "k8s:io.kubernetes.pod.namespace"
NETPOLS = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-fe, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - podSelector: {matchLabels: {role: fe}}
    - namespaceSelector: {matchLabels: {team: a}}
    ports:
    - {port: 80}
    - {port: serve-8080-tcp}
  - from:
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: fe-egress, namespace: prod}
spec:
  podSelector: {matchLabels: {role: fe}}
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector: {matchLabels: {app: web}}
    ports:
    - {port: 80, protocol: TCP}
"""
WEB = f"k8s:app=web,{NS}=prod"
FE = f"k8s:role=fe,{NS}=prod"
OTHER = f"k8s:role=db,{NS}=prod"
TEAM_A = f"k8s:role=x,{NS}=other,k8s:io.cilium.k8s.namespace.labels.team=a"
PEERS = [WEB, FE, OTHER, TEAM_A, "10.9.9.9", "10.1.2.3", "192.168.1.1"]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def side(flag: str, peer: str) -> list[str]:
    return [f"--{flag}-cidr" if peer[0].isdigit() else f"--{flag}", peer]


def watcher_verdict(src: str, dst: str, port: int) -> bool:
    """The verdict with the policies as the Kubernetes watcher makes them from the objects."""
    policies = []
    for obj in YAML(typ="safe").load_all(NETPOLS):
        name = obj["metadata"]["name"]
        loaded = parse_text(network_policy_text(obj, derived_policy_name(name)), f"k8s/NetworkPolicy/prod/{name}")
        assert loaded.ok
        policies += loaded.policies

    def peer(p: str, named: tuple[tuple[str, int, Protocol], ...] = ()) -> Peer:
        if p[0].isdigit():
            import ipaddress
            return Peer(address=ipaddress.ip_address(p))
        return Peer(labels=LabelSet.parse(p), named_ports=named)

    named = (("serve-8080-tcp", 8080, Protocol.TCP),)
    return trace(policies, TraceRequest(peer(src), peer(dst, named), Protocol.TCP, port)).allowed


def test_file_and_watcher_paths_give_the_same_verdicts(tmp_path: Path) -> None:
    path = tmp_path / "netpol.yaml"
    path.write_text(NETPOLS)
    code, out, _ = run("policy", "validate", str(path))
    assert code == 0 and "valid: networkpolicy.web-from-fe, networkpolicy.fe-egress" in out
    verdicts = {}
    for src, dst in itertools.permutations(PEERS, 2):
        if src[0].isdigit() and dst[0].isdigit():
            continue
        for port in (80, 8080, 443):
            code, _, err = run("policy", "trace", "--policy", str(path), *side("src", src), *side("dst", dst),
                               "--dport", str(port), "--dst-named-port", "serve-8080-tcp=8080/TCP"
                               ) if not dst[0].isdigit() else run(
                "policy", "trace", "--policy", str(path), *side("src", src), *side("dst", dst), "--dport", str(port))
            assert code in (0, 1), err
            verdicts[(src, dst, port)] = code == 0
            assert verdicts[(src, dst, port)] == watcher_verdict(src, dst, port), (src, dst, port)
    # What the NetworkPolicies say (not only that both paths agree):
    assert verdicts[(FE, WEB, 80)] and not verdicts[(FE, WEB, 8080)]  # fe's own egress allows web:80 only
    assert verdicts[(TEAM_A, WEB, 8080)] and not verdicts[(TEAM_A, WEB, 443)]  # the named port
    assert not verdicts[(OTHER, WEB, 80)]  # denied: before, the CLI skipped the NetworkPolicy and allowed it
    assert verdicts[(TEAM_A, WEB, 80)] and verdicts[("10.9.9.9", WEB, 443)] and not verdicts[("10.1.2.3", WEB, 80)]
    assert not verdicts[(FE, OTHER, 80)] and not verdicts[(FE, "192.168.1.1", 80)]  # fe's egress: web:80 only
    assert verdicts[(OTHER, "192.168.1.1", 443)]


def test_named_port_without_its_number_traces_as_denied(tmp_path: Path) -> None:
    path = tmp_path / "netpol.yaml"
    path.write_text(NETPOLS)
    base = ("policy", "trace", "--policy", str(path), "--src", TEAM_A, "--dst", WEB, "--dport", "8080")
    assert run(*base)[0] == 1
    assert run(*base, "--dst-named-port", "serve-8080-tcp=8080/TCP")[0] == 0
    assert run(*base, "--dst-named-port", "serve-8080-tcp=9090")[0] == 1
    code, _, err = run(*base, "--dst-named-port", "8080")
    assert code == 2 and err.strip().startswith("error: --dst-named-port '8080': expected NAME=PORT")


def test_ip_block_with_host_bits_is_masked_with_a_note(tmp_path: Path) -> None:
    path = tmp_path / "conformance.yaml"
    path.write_text("""\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: cidr, namespace: default}
spec:
  podSelector: {}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.1.1/4, except: [10.0.1.5/24]}
""")
    code, out, err = run("policy", "validate", str(path))
    assert code == 0, err
    assert (f"note: {path}:1: NetworkPolicy cidr: spec.ingress[0].from[0].ipBlock.cidr: 10.0.1.1/4 has host bits "
            "set; read as 0.0.0.0/4, as Kubernetes and Cilium do") in out
    assert "ipBlock.except: 10.0.1.5/24 has host bits set; read as 10.0.1.0/24" in out
    dst = ["--dst", f"app=x,{NS}=default", "--dport", "80"]
    assert run("policy", "trace", "--policy", str(path), "--src-cidr", "9.1.1.1", *dst)[0] == 0
    assert run("policy", "trace", "--policy", str(path), "--src-cidr", "10.0.1.1", *dst)[0] == 1  # the except
    assert run("policy", "trace", "--policy", str(path), "--src-cidr", "16.0.0.1", *dst)[0] == 1


def test_bad_network_policy_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("""\
apiVersion: v1
kind: Service
metadata: {name: svc}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: default}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: 80, protocol: TCPX}]
""")
    code, _, err = run("policy", "validate", str(path))
    assert code == 2
    assert err.startswith(f"{path}:5: ") and "TCPX" in err and "translates to" in err
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {}\nspec: {}\n")
    code, _, err = run("policy", "validate", str(nameless))
    assert code == 2 and f"{nameless}:1: metadata.name: a NetworkPolicy needs a name" in err


def test_completion_scripts_and_completions() -> None:
    import os
    import subprocess
    import sys

    for shell in ("bash", "zsh", "fish"):
        code, out, _ = run("completion", shell)
        assert code == 0 and "_CILIA_COMPLETE" in out
    env = {**os.environ, "_CILIA_COMPLETE": "bash_complete", "COMP_WORDS": "cilia policy tr", "COMP_CWORD": "2"}
    done = subprocess.run([sys.executable, "-m", "cilia.cli.main"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "plain,trace" in done.stdout.splitlines()
    assert run("completion", "tcsh")[0] == 2


def selector_matches(selector: str, labels: list[str]) -> Any:
    from cilia.cli.selectors import parse_selector
    return parse_selector(selector)(labels)


def test_label_selectors() -> None:
    from cilia.cli.selectors import SelectorError, parse_selector

    labels = ["k8s:app=web", "k8s:tier=fe", "reserved:host"]
    assert selector_matches("app=web", labels) and selector_matches("k8s:app==web", labels)
    assert not selector_matches("container:app=web", labels)
    assert selector_matches("tier in (fe, be),app!=db", labels)
    assert not selector_matches("tier notin (fe)", labels) and selector_matches("zone notin (a)", labels)
    assert selector_matches("reserved:host", labels) and selector_matches("!zone", labels)
    assert not selector_matches("!app", labels)
    for bad in ("", "a in (b", "a in ()", "a=b=c", "a b"):
        try:
            parse_selector(bad)
        except SelectorError:
            continue
        raise AssertionError(f"{bad!r} parsed")
