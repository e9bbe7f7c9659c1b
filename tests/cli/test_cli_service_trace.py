"""`cilia policy trace --policy ... --service ...` offline: toServices allow and deny, a frontend
traced to its backend with the choice explained, and bad service files named by file and field."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from cilia.cli.main import cli

POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-to-db, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toServices:
    - k8sService: {serviceName: db}
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"""
SERVICES = {"services": [
    {"id": 1, "frontend": {"address": "10.96.0.10", "port": 5432}, "name": "db", "algorithm": "maglev",
     "backends": [{"address": "10.0.0.10", "port": 5432, "state": "terminating"},
                  {"address": "10.0.0.11", "port": 5432}, {"address": "10.0.0.12", "port": 5432}]},
    {"id": 2, "frontend": {"address": "10.96.0.20", "port": 80}, "name": "cache",
     "backends": [{"address": "10.0.0.20", "port": 8080}]},
    {"id": 3, "frontend": {"address": "10.96.0.30", "port": 80}, "name": "empty", "backends": []},
]}


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def files(tmp_path: Path, services: object = SERVICES) -> list[str]:
    (tmp_path / "p.yaml").write_text(POLICY)
    (tmp_path / "s.json").write_text(json.dumps(services))
    return ["--policy", str(tmp_path / "p.yaml"), "--service", str(tmp_path / "s.json")]


def test_a_frontend_is_traced_to_its_backend_and_to_services_allows_it(tmp_path: Path) -> None:
    code, out, err = run("policy", "trace", *files(tmp_path), "--src", "app=web", "--dst-cidr", "10.96.0.10",
                         "--dport", "5432", "-o", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["verdict"] == "allowed"
    assert result["destination"]["cidr"] == "10.0.0.11"  # the terminating backend gets no new connection
    assert result["dport"] == 5432
    service = result["service"]
    assert service["id"] == 1 and service["chosen"] == "10.0.0.11:5432" and service["name"] == "default/db"
    assert "2 active backend(s) of 3; Maglev" in service["why"]
    code, text, _ = run("policy", "trace", *files(tmp_path), "--src", "app=web", "--dst-cidr", "10.96.0.10",
                        "--dport", "5432")
    assert code == 0 and "Service: service 1 (default/db) at 10.96.0.10:5432/TCP" in text
    # the backend address itself is allowed too; another port and another service's backend are not
    assert run("policy", "trace", *files(tmp_path), "--src", "app=web", "--dst-cidr", "10.0.0.12",
               "--dport", "5432")[0] == 0
    assert run("policy", "trace", *files(tmp_path), "--src", "app=web", "--dst-cidr", "10.0.0.12",
               "--dport", "22")[0] == 1
    code, out, _ = run("policy", "trace", *files(tmp_path), "--src", "app=web", "--dst-cidr", "10.96.0.20",
                       "--dport", "80", "-o", "json")
    assert code == 1 and json.loads(out)["destination"]["cidr"] == "10.0.0.20"


def test_without_the_service_to_services_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    code, _, _ = run("policy", "trace", "--policy", str(tmp_path / "p.yaml"), "--src", "app=web",
                     "--dst-cidr", "10.0.0.11", "--dport", "5432")
    assert code == 1
    code, out, _ = run("policy", "validate", str(tmp_path / "p.yaml"))
    assert code == 0 and "toServices is resolved against the agent's services, and none are given here" in out
    code, out, _ = run("policy", "trace", *files(tmp_path, {"services": SERVICES["services"][1:]}),
                       "--src", "app=web", "--dst-cidr", "10.0.0.11", "--dport", "5432")
    assert code == 1


def test_a_service_without_active_backends_drops(tmp_path: Path) -> None:
    code, out, _ = run("policy", "trace", *files(tmp_path), "--src", "app=web", "--dst-cidr", "10.96.0.30",
                       "--dport", "80", "-o", "json")
    assert code == 1
    result = json.loads(out)
    assert result["service"]["chosen"] is None
    assert "has no active backend (none configured): new connections are dropped" in result["egress"]["reason"]


def test_bad_service_files_name_the_file_and_field(tmp_path: Path) -> None:
    bad = {"services": [SERVICES["services"][0], {**SERVICES["services"][1], "backends": [
        {"address": "10.0.0.20", "port": 8080, "weight": 0}]}]}
    code, _, err = run("policy", "trace", *files(tmp_path, bad), "--src", "app=web", "--dst-cidr", "10.0.0.1")
    assert code == 2
    assert f"--service {tmp_path / 's.json'}: services[1].backends[0].weight: 0 is outside 1-65535" in err
    clash = [SERVICES["services"][0], {**SERVICES["services"][1], "frontend": {"address": "10.96.0.10", "port": 5432}}]
    code, _, err = run("policy", "trace", *files(tmp_path, clash), "--src", "app=web", "--dst-cidr", "10.0.0.1")
    assert code == 2 and "[1].frontend: 10.96.0.10:5432/TCP is already service 1's frontend" in err
    code, _, err = run("policy", "trace", "--service", "x.json", "--src", "app=web", "--dst-cidr", "10.0.0.1")
    assert code == 2 and "--service goes with --policy" in err
