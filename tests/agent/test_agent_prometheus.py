"""A real Prometheus (Debian's `prometheus`) scraping a real `cilia agent` process over TCP
(--prometheus-serve-addr): a denied request moves the drop counter Prometheus reports; the health
port answers kubelet's probes; every PromQL expression of the shipped Grafana dashboard names a
metric the agent exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import EXHAUST, LAND, STARWARS, AgentProcess, deathstar_app, run_cli
from prometheus_client.parser import text_string_to_metric_families

from cilia.netutil import free_port

# Addresses of this test's own, so it never meets other tests' listeners.
DEATHSTAR, TIEFIGHTER = "127.0.18.10", "127.0.18.11"
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "cilia-dashboard.json"
PROMETHEUS = shutil.which("prometheus")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def shoot(method: str, path: str) -> str:
    import http.client
    conn = http.client.HTTPConnection(DEATHSTAR, 80, timeout=5, source_address=(TIEFIGHTER, 0))
    try:
        conn.request(method, path, body=b"")
        resp = conn.getresponse()
        return f"{resp.status} {resp.read().decode().strip()}"
    finally:
        conn.close()


class Node:
    def __init__(self, agent: AgentProcess, metrics_port: int, health_port: int) -> None:
        self.agent, self.metrics_port, self.health_port = agent, metrics_port, health_port

    def cli(self, *args: str) -> str:
        res = run_cli(self.agent.state_dir, *args)
        assert res.code == 0, res.err
        return res.out

    def metrics(self) -> str:
        status, text = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert status == 200
        return text


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("opsg-prom")
    metrics_port, health_port = free_port(), free_port()
    agent = AgentProcess(tmp / "state", "--prometheus-serve-addr", f"127.0.0.1:{metrics_port}",
                         "--agent-health-port", str(health_port))
    with deathstar_app(DEATHSTAR) as app_port:
        try:
            agent.start()
            n = Node(agent, metrics_port, health_port)
            n.cli("endpoint", "add", "--name", "deathstar", "--labels", "org=empire,class=deathstar", "--ip",
                  DEATHSTAR, "--port", f"80:{app_port}")
            n.cli("endpoint", "add", "--name", "tiefighter", "--labels", "org=empire,class=tiefighter", "--ip",
                  TIEFIGHTER)
            revision = n.cli("policy", "import", str(STARWARS / "sw_l3_l4_l7_policy.yaml")).split()[-1]
            n.cli("policy", "wait", revision)
            yield n
        finally:
            agent.stop()


class Prometheus:
    """`prometheus` with a config of our own, scraping the agent every second."""

    def __init__(self, tmp: Path, target: str) -> None:
        assert PROMETHEUS, "the prometheus binary is missing (Debian package prometheus, scripts/apt-packages.txt)"
        config = tmp / "prometheus.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "cilia", "static_configs": [{"targets": [target]}]}]}))
        self.port = free_port()
        self.log = tmp / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                          f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                         stdout=log, stderr=subprocess.STDOUT)

    def wait_until(self, what: str, check: Any, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            try:
                value = check()
            except (OSError, ValueError):
                value = None
            if value is not None:
                return value
            assert time.monotonic() < deadline, f"Prometheus: {what} not seen in {timeout}s"
            time.sleep(0.5)

    def query(self, promql: str) -> float | None:
        """The instant value of a one-series query, None while it has no series."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        status, body = http_get(url)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", body
        results = answer["data"]["result"]
        return float(results[0]["value"][1]) if results else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_prometheus_sees_the_drop_counter_move(node: Node, tmp_path: Path) -> None:
    prom = Prometheus(tmp_path, f"127.0.0.1:{node.metrics_port}")
    try:
        prom.wait_until("the agent up", lambda: prom.query('up{job="cilia"} == 1'))
        # Cilium's L7 denial counter and Hubble's drop counter, as Prometheus stores them
        denied = 'sum(cilia_policy_l7_total{rule="denied",proxy_type="http"}) or vector(0)'
        drops = 'sum(cilia_hubble_drop_total{reason="POLICY_DENIED",protocol="TCP"}) or vector(0)'
        before = {q: prom.wait_until("the counters", lambda q=q: prom.query(q)) for q in (denied, drops)}
        assert shoot(*LAND) == "200 Ship landed"
        assert shoot(*EXHAUST) == "403 Access denied"
        for q in (denied, drops):
            after = prom.wait_until(f"{q} move", lambda q=q: v if (v := prom.query(q)) > before[q] else None)
            assert after == before[q] + 1, q
        http = 'sum(cilia_hubble_http_requests_total{method="PUT",status="403"})'
        assert prom.wait_until("the HTTP request counter", lambda: prom.query(http)) == 1
        # the process collector and the state gauges come along
        assert prom.wait_until("process metrics", lambda: prom.query('process_resident_memory_bytes{job="cilia"}')) > 0
        assert prom.query('cilia_identity{type="endpoint"}') == 2
        assert prom.query('cilia_endpoint_state{endpoint_state="ready"}') == 2
        assert prom.query('cilia_envoy_up') == 1
    finally:
        prom.stop()


def test_health_port_answers_probes(node: Node) -> None:
    base = f"http://127.0.0.1:{node.health_port}"
    assert http_get(f"{base}/healthz") == (200, '{"status": "ok"}\n')
    assert http_get(f"{base}/livez")[0] == 200
    assert http_get(f"{base}/metrics")[0] == 404  # only the probes' pages on this port
    status, _ = http_get(f"http://127.0.0.1:{node.metrics_port}/healthz")
    assert status == 404


# --- the Grafana dashboard -------------------------------------------------------------------------

_FUNCTIONS = {"sum", "rate", "irate", "increase", "histogram_quantile", "by", "without", "on", "ignoring", "le",
              "avg", "max", "min", "count", "topk", "bottomk", "vector", "or", "and", "unless", "clamp_min",
              "sort_desc", "label_replace", "delta", "deriv", "abs", "time", "offset", "bool", "group_left",
              "group_right", "avg_over_time", "max_over_time", "sum_over_time", "changes", "resets", "absent"}


def dashboard_expressions() -> list[str]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside label matchers, [ranges]
    and by (...) lists, that are not functions or keywords."""
    bare = re.sub(r"\{[^}]*\}", "", expr)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    bare = re.sub(r'"[^"]*"', "", bare)
    return {name for name in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare) if name not in _FUNCTIONS}


def test_dashboard_names_only_metrics_the_agent_exports(node: Node) -> None:
    exported: set[str] = set()
    for family in text_string_to_metric_families(node.metrics()):
        exported.add(family.name)
        exported.update(s.name for s in family.samples)
        if family.type == "counter":
            exported.add(family.name + "_total")
        if family.type == "histogram":
            exported.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    expressions = dashboard_expressions()
    assert len(expressions) >= 5
    for expr in expressions:
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, f"{expr}: {sorted(names - exported)} not exported"
    used = set().union(*(metric_names(e) for e in expressions))
    # the panels the dashboard promises
    assert {"cilia_policy_l7_total", "cilia_hubble_drop_total", "cilia_xds_push_latency_seconds_bucket",
            "cilia_envoy_up", "cilia_hubble_flows_processed_total"} <= used


def test_the_name_check_has_teeth() -> None:
    assert metric_names('sum by (reason) (rate(cilia_nope_total{a="b"}[5m]))') == {"cilia_nope_total"}
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(x_bucket[1m])))") == {"x_bucket"}
