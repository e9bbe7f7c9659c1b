"""The Star Wars demo (``make demo``): Cilium's getting-started guide, policies unchanged.

First it traces each ship's request through the policy engine, printing the verdict and the rule
(file:line) that decided it. Then it runs the guide's steps as real traffic through a real
`cilia agent` and the Envoy it supervises, driven by the `cilia` command as a user would: the
ships are registered as endpoints, each policy file is imported and waited for (`policy wait`),
and `cilia observe` shows what was decided.

Where the BPF datapath can load (root, bcc, kernel headers) it runs the way Cilium runs it: the
agent, in a node namespace of its own, creates a namespace per ship, enforces L3/L4 in the kernel
(xwing's request is dropped there and times out, and `cilia monitor` shows the drop) and hands
L7 ports to Envoy's transparent listener. Otherwise it runs in sidecar mode: Envoy listens on
deathstar's address and tells the ships apart by source address (ships in namespaces as root,
else on loopback addresses). ``CILIA_DEMO_MODE=bpf|sidecar`` picks a mode. It says which mode
ran, and exits non-zero if any verdict or outcome differs from the guide's or if the agent,
Envoy or the datapath cannot run; everything it started or made is removed whatever happens,
Ctrl-C included.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ruamel.yaml import YAML

from .bpf.loader import bpf_available
from .bpf.netns import (
    Namespace,
    add_host_address,
    can_create_namespaces,
    create_netns,
    del_host_address,
    delete_netns,
    run_in_netns,
)
from .netutil import free_port
from .policy import (
    HTTPRequest,
    LabelSet,
    Peer,
    Protocol,
    TraceRequest,
    load_paths,
    trace,
)

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
TIMEOUT = "timeout"  # no answer at all: what a drop in the kernel looks like to curl
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


class Ships:
    """Where the ships live and how they shoot. With root: tiefighter and xwing each in a network
    namespace of their own, joined to the node by a veth pair, and deathstar (with its sidecar
    Envoy) on the node. Without root: loopback addresses, each ship binding its own source."""

    NETNS = {"deathstar": "10.199.0.10", "tiefighter": "10.199.0.11", "xwing": "10.199.0.12"}

    def __init__(self, use_netns: bool) -> None:
        self.use_netns = use_netns
        self.addresses = dict(self.NETNS if use_netns else ADDRESSES)
        self._namespaces: list[Namespace] = []
        self._host_address = False

    @property
    def mode(self) -> str:
        return "network namespaces" if self.use_netns else "loopback addresses"

    def setup(self) -> None:
        if not self.use_netns:
            return
        tag = f"{os.getpid() % 100000}"
        self._host_address = add_host_address(self.addresses["deathstar"])
        for ship in ("tiefighter", "xwing"):
            ns = Namespace(f"cilia-demo-{ship}-{tag}", self.addresses[ship], f"cd{ship[0]}{tag}")
            self._namespaces.append(ns)
            ns.create(self.addresses["deathstar"])

    def namespace(self, ship: str) -> str | None:
        return next((ns.name for ns in self._namespaces if ship in ns.name), None)

    def teardown(self) -> None:
        for ns in self._namespaces:
            ns.delete()
        if self._host_address:
            del_host_address(self.addresses["deathstar"])

    def shoot(self, ship: str, method: str, path: str) -> tuple[str, str]:
        """One request from ``ship`` to deathstar:80: (outcome to compare, what the user saw)."""
        source = self.addresses[ship]
        target = self.addresses["deathstar"]
        ns = next((n for n in self._namespaces if ship in n.name), None)
        if ns is not None:
            return ns.run_in(lambda: _request(None, target, method, path))
        return _request(source, target, method, path)


def _request(source: str | None, target: str, method: str, path: str) -> tuple[str, str]:
    conn = http.client.HTTPConnection(target, 80, timeout=REQUEST_TIMEOUT,
                                      source_address=(source, 0) if source else None)
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
        return TIMEOUT, f"no answer within {REQUEST_TIMEOUT:g}s (curl would time out)"
    finally:
        conn.close()


class AgentRun:
    """A real `cilia agent` process in a private state directory, driven by the `cilia` command
    exactly as a user would type it (each command is printed with its output)."""

    def __init__(self, state_dir: Path, args: Sequence[str] = (), netns: str | None = None) -> None:
        self.state_dir = state_dir
        self.args = tuple(args)
        self.netns = netns  # the network namespace the agent runs in (the demo's node); None: this one
        self.env = {**os.environ, "CILIA_STATE_DIR": str(state_dir)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.state_dir / "agent.log", "wb") as log:  # the child keeps its own copy
            def launch() -> subprocess.Popen[bytes]:
                return subprocess.Popen([sys.executable, "-m", "cilia", "agent", *self.args],
                                        env=self.env, stdout=subprocess.DEVNULL, stderr=log)

            # a child starts in the network namespace of the thread that forks it
            self.proc = run_in_netns(self.netns, launch) if self.netns else launch()
        deadline = time.monotonic() + 60
        while subprocess.run([sys.executable, "-m", "cilia", "status"], env=self.env,
                             capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = (self.state_dir / "agent.log").read_text(errors="replace")
                raise OSError(f"cilia agent did not start:\n{text[-3000:]}")
            time.sleep(0.2)

    def cilia(self, *args: str, show: bool = True) -> str:
        """Run `cilia ARGS`; print it and its output; raise OSError if it fails."""
        res = subprocess.run([sys.executable, "-m", "cilia", *args], env=self.env, capture_output=True, text=True)
        if show:
            print(f"   $ cilia {' '.join(args)}")
            for line in (res.stdout + res.stderr).rstrip().splitlines():
                print(f"     {line}")
        if res.returncode != 0:
            raise OSError(f"cilia {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def envoy_section(ships: Ships) -> int:
    """Run ENVOY_STEPS as traffic through the agent's Envoy; returns the number of unexpected outcomes.

    Raises OSError (a command failed, the agent or Envoy could not start)."""
    labels = ship_labels(EXAMPLES / "http-sw-app.yaml")
    deathstar = ships.addresses["deathstar"]
    with tempfile.TemporaryDirectory(prefix="cilia-demo-") as tmp:
        agent = AgentRun(Path(tmp))
        backend: ThreadingHTTPServer | None = None
        try:
            ships.setup()
            backend = ThreadingHTTPServer((deathstar, free_port(deathstar)), Deathstar)
            backend.daemon_threads = True
            threading.Thread(target=backend.serve_forever, name="deathstar", daemon=True).start()
            app_port = backend.server_address[1]
            agent.start()
            envoy_pid = json.loads(agent.cilia("status", "-o", "json", show=False))["envoy"]["pid"]
            print(f"   cilia agent (pid {agent.proc.pid if agent.proc else '?'}) runs Envoy (pid {envoy_pid}); "
                  f"deathstar's app listens on {deathstar}:{app_port}, its sidecar Envoy on {deathstar}:80")
            for ship in ("tiefighter", "xwing"):
                where = ships.namespace(ship)
                print(f"   {ship} at {ships.addresses[ship]}" + (f" in network namespace {where}" if where else ""))
            print()
            for name in ("deathstar", "tiefighter", "xwing"):
                port = ["--port", f"80:{app_port}"] if name == "deathstar" else []
                revision = agent.cilia("endpoint", "add", "--name", name, "--labels",
                                       ",".join(f"{k}={v.value}" for k, v in labels[name].items()),
                                       "--ip", ships.addresses[name], *port).split()[-1]
            agent.cilia("policy", "wait", revision)
            # Envoy closes a connection its network RBAC refuses; a timeout is as blocked
            failures = run_steps(agent, ships.shoot, (BLOCKED, TIMEOUT), watch_drops=False)
            print("\n-- what Envoy logged, with identities and the deciding rule")
            time.sleep(1.2)  # Envoy flushes access logs about once a second
            agent.cilia("observe", "--last", "6")
            return failures
        finally:
            agent.stop()
            if backend is not None:
                backend.shutdown()
                backend.server_close()
            ships.teardown()


# --- BPF mode: the kernel enforces L3/L4, Envoy's transparent listener L7 ---------------------

class BpfNode:
    """The demo's node: a network namespace holding the agent (only the network namespace is
    entered, so its maps are pinned in this bpffs), the host ends of the ships' veths and Envoy."""

    ROUTER = "10.199.0.1"
    ADDRESSES = Ships.NETNS

    def __init__(self, tag: str) -> None:
        self.name = f"cilia-demo-node-{tag}"
        self.tag = tag
        self.pin_dir = f"/sys/fs/bpf/cilia-demo-{tag}"
        self.servers: list[ThreadingHTTPServer] = []

    def netns(self, ship: str) -> str:
        return f"cilia-demo-{ship}-{self.tag}"

    def agent_args(self) -> list[str]:
        return ["--datapath", "bpf", "--bpf-pin-dir", self.pin_dir, "--router-ip", self.ROUTER]

    def setup(self) -> None:
        create_netns(self.name)

    def serve_deathstar(self) -> int:
        server = run_in_netns(self.netns("deathstar"), lambda: ThreadingHTTPServer(("0.0.0.0", 80), Deathstar))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="deathstar", daemon=True).start()
        self.servers.append(server)
        return 80

    def shoot(self, ship: str, method: str, path: str) -> tuple[str, str]:
        return run_in_netns(self.netns(ship), lambda: _request(None, self.ADDRESSES["deathstar"], method, path))

    def teardown(self, state_dir: Path) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        try:  # the agent is stopped: remove its programs, pins, route and the ships' namespaces
            run_in_netns(self.name, lambda: subprocess.run(
                [sys.executable, "-m", "cilia", "cleanup", "--state-dir", str(state_dir)],
                capture_output=True, timeout=60, check=False))
        except OSError:
            pass  # no node namespace to clean up in: setup did not get that far
        finally:
            for ship in self.ADDRESSES:
                delete_netns(self.netns(ship))
            delete_netns(self.name)
            subprocess.run(["rm", "-rf", self.pin_dir], check=False)


class MonitorRun:
    """`cilia monitor --type drop` running while a step's requests are sent, as a user would
    watch it in a second terminal."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "cilia", "monitor", "--type", "drop"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        time.sleep(1.0)  # its first poll is waiting: the drops that follow reach it

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def stop(self) -> list[str]:
        time.sleep(0.5)
        self.proc.terminate()
        self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.lines


def run_steps(agent: AgentRun, shoot: Callable[[str, str, str], tuple[str, str]], blocked: tuple[str, ...],
              watch_drops: bool) -> int:
    """ENVOY_STEPS through ``agent``: import and wait for each policy, send the shots, count the
    outcomes that differ from Cilium's (a BLOCKED shot may end as any of ``blocked``); with
    ``watch_drops``, `cilia monitor --type drop` runs beside a step's shots and must show xwing's."""
    failures = 0
    for step in ENVOY_STEPS:
        print(f"\n-- {step.title}")
        if step.policy_file is not None:
            out = agent.cilia("policy", "import", str(EXAMPLES / step.policy_file))
            agent.cilia("policy", "wait", out.split()[-1])
        monitor = MonitorRun(agent.env) if watch_drops and any(s.expect == BLOCKED for s in step.shots) else None
        for shot in step.shots:
            outcome, seen = shoot(shot.ship, shot.method, shot.path)
            ok = outcome in blocked if shot.expect == BLOCKED else outcome == shot.expect
            failures += not ok
            verdict = "ok" if ok else f"UNEXPECTED: Cilium gives {shot.expect}"
            print(f"   {shot.ship:>10} {shot.method:<4} {shot.path:<22} -> {seen}  [{verdict}]")
        if monitor is not None:
            lines = monitor.stop()
            print("   $ cilia monitor --type drop     (meanwhile, in another terminal)")
            for line in lines:
                print(f"     {line}")
            if not any("xwing" in line and "Policy denied" in line for line in lines):
                print("   UNEXPECTED: cilia monitor did not show xwing's drop")
                failures += 1
    return failures


def bpf_section() -> int:
    """Run ENVOY_STEPS with the BPF datapath; returns the number of unexpected outcomes.

    Raises OSError (a command failed, the agent, Envoy or the datapath could not start)."""
    labels = ship_labels(EXAMPLES / "http-sw-app.yaml")
    node = BpfNode(f"{os.getpid() % 100000}")
    with tempfile.TemporaryDirectory(prefix="cilia-demo-") as tmp:
        agent = AgentRun(Path(tmp), node.agent_args(), node.name)
        try:
            node.setup()
            agent.start()
            envoy_pid = json.loads(agent.cilia("status", "-o", "json", show=False))["envoy"]["pid"]
            print(f"   cilia agent (pid {agent.proc.pid if agent.proc else '?'}) runs Envoy (pid {envoy_pid}) in "
                  f"network namespace {node.name}; the ships get namespaces of their own, made by the agent")
            print()
            revision = ""
            for name in ("deathstar", "tiefighter", "xwing"):
                port = ["--port", "80"] if name == "deathstar" else []
                revision = agent.cilia("endpoint", "add", "--name", name, "--labels",
                                       ",".join(f"{k}={v.value}" for k, v in labels[name].items()),
                                       "--ip", node.ADDRESSES[name], "--create-netns", "--netns", node.netns(name),
                                       *port).split()[-1]
            agent.cilia("policy", "wait", revision)
            node.serve_deathstar()
            print(f"   deathstar's app listens on {node.ADDRESSES['deathstar']}:80 in {node.netns('deathstar')}")
            failures = run_steps(agent, node.shoot, (TIMEOUT,), watch_drops=True)  # dropped in the kernel
            print("\n-- deathstar's policy map in the kernel, with what each entry matched")
            agent.cilia("bpf", "policy", "get", "deathstar")
            print("\n-- what the kernel and Envoy decided, with identities and the deciding rule")
            time.sleep(1.2)  # Envoy flushes access logs about once a second
            agent.cilia("observe", "--last", "8")
            return failures
        finally:
            agent.stop()
            node.teardown(Path(tmp))


def choose_mode() -> tuple[str, str]:
    """(mode, why): bpf where the datapath can load, else sidecar; CILIA_DEMO_MODE overrides."""
    asked = os.environ.get("CILIA_DEMO_MODE", "")
    why = bpf_available() or (None if can_create_namespaces() else "cannot create network namespaces")
    if asked == "sidecar":
        return "sidecar", "CILIA_DEMO_MODE=sidecar"
    if asked == "bpf" or why is None:
        return "bpf", why or "the BPF datapath loads here"
    return "sidecar", f"the BPF datapath cannot run here: {why}"


def main() -> int:
    print("cilia Star Wars demo (Cilium's getting-started guide, policies unchanged)")
    print("\n## policy engine (trace mode): each verdict and the rule (file:line) that decided it")
    failures = trace_section()
    mode, why = choose_mode()
    try:
        if mode == "bpf":
            print(f"\n## mode: BPF datapath ({why}): L3/L4 enforced in the kernel on each ship's veth, L7 ports "
                  "redirected to Envoy with bpf_sk_assign")
            failures += bpf_section()
        else:
            ships = Ships(can_create_namespaces())
            print(f"\n## mode: Envoy via the cilia agent ({ships.mode}): real requests through a real Envoy "
                  f"configured over xDS ({why})")
            failures += envoy_section(ships)
    except KeyboardInterrupt:
        print("\ninterrupted: the agent, Envoy and the deathstar app were stopped")
        return 130
    except (OSError, ImportError) as exc:
        part = "BPF" if mode == "bpf" else "Envoy"
        print(f"\nthe {part} part could not run: {type(exc).__name__}: {exc}")
        print("demo FAILED")
        return 1
    print()
    if failures:
        print(f"demo FAILED ({mode} mode): {failures} outcome(s) differ from Cilium's")
        return 1
    print(f"demo passed ({mode} mode): every verdict and every request matches Cilium's getting-started guide")
    return 0


if __name__ == "__main__":
    sys.exit(main())
