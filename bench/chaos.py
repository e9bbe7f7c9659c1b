"""Chaos run: mixed load through a real agent while its parts are killed at random.

    unshare --net sh -c "ip link set lo up; exec .venv/bin/python -m bench.chaos --minutes 3"  # own netns
    .venv/bin/python -m bench.chaos                                       # 10 minutes

A real `cilia agent --l7-workers 2` process (sidecar mode, managed Envoy) enforces the Star Wars
HTTP policy (examples/starwars) and the r2d2 plugin's policy (examples/r2d2, parsed in the L7
workers). Client threads send, without pause, requests the policy allows and requests it denies:

- allowed: tiefighter POST /v1/request-landing (HTTP), c3po `READ /public/plans` (r2d2)
- denied: tiefighter PUT /v1/exhaust-port (HTTP RBAC), xwing POST /v1/request-landing (L3),
  c3po `WRITE /public/plans` (r2d2 parser), jawa `READ` (L3), and xwing straight to deathstar's
  application port (sidecar bypass)

Meanwhile, every ``--interval`` seconds (randomized), one victim is killed with SIGKILL: the agent
(then started again, as an init system would), its Envoy (the agent starts another) or one L7
worker (the agent starts another). After each kill the run measures how long until both allowed
requests succeed again and until /healthz says 200.

Reported: denied requests that got through (must be 0: fail closed under every kill), allowed
requests lost (expected while a part is down), and recovery times per victim. Prints a table and
writes bench/results/chaos.json. Not a test: nothing asserts; numbers vary with the machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cilia.demo import Deathstar
from cilia.netutil import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

RESULTS = HERE / "results" / "chaos.json"
DEATHSTAR, TIEFIGHTER, XWING = "127.0.7.10", "127.0.7.11", "127.0.7.12"
DROID, C3PO, JAWA = "127.0.7.20", "127.0.7.21", "127.0.7.22"
STARWARS_POLICY = REPO / "examples" / "starwars" / "sw_l3_l4_l7_policy.yaml"
DROID_POLICY = REPO / "examples" / "r2d2" / "droid.yaml"


class _Droid(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        try:
            for _line in self.rfile:
                self.wfile.write(b"OK\r\n")
        except ConnectionError:
            pass  # Envoy, its upstream side, was killed: expected here, not worth a traceback


def _http(source: str, method: str, path: str, port: int) -> str:
    """"<status>", or "failed" (refused, reset, closed or timed out)."""
    conn = http.client.HTTPConnection(DEATHSTAR, port, timeout=3, source_address=(source, 0))
    try:
        conn.request(method, path, body=b"", headers={"Host": "deathstar.default.svc.cluster.local"})
        resp = conn.getresponse()
        resp.read()
        return str(resp.status)
    except (OSError, http.client.HTTPException):
        return "failed"
    finally:
        conn.close()


def _droid(source: str, line: bytes) -> str:
    try:
        with socket.create_connection((DROID, 4242), timeout=3, source_address=(source, 0)) as s:
            s.sendall(line)
            reply = s.makefile("rb").readline().strip().decode("ascii", "replace")
            return reply or "failed"
    except OSError:
        return "failed"


@dataclass(frozen=True)
class Probe:
    name: str
    allowed: bool
    send: Callable[[], str]
    passed: Callable[[str], bool]  # the reply says the request reached the server and was answered yes


def _probes(app_port: int) -> list[Probe]:
    return [
        Probe("http allowed (tiefighter landing)", True, lambda: _http(TIEFIGHTER, "POST", "/v1/request-landing", 80),
              lambda r: r == "200"),
        Probe("r2d2 allowed (c3po READ /public)", True, lambda: _droid(C3PO, b"READ /public/plans\r\n"),
              lambda r: r == "OK"),
        Probe("http L7-denied (exhaust port)", False, lambda: _http(TIEFIGHTER, "PUT", "/v1/exhaust-port", 80),
              lambda r: r not in ("failed", "403")),
        Probe("http L3-denied (xwing)", False, lambda: _http(XWING, "POST", "/v1/request-landing", 80),
              lambda r: r not in ("failed", "403")),
        Probe("sidecar bypass (xwing to app port)", False,
              lambda: _http(XWING, "POST", "/v1/request-landing", app_port), lambda r: r != "failed"),
        Probe("r2d2 parser-denied (c3po WRITE)", False, lambda: _droid(C3PO, b"WRITE /public/plans\r\n"),
              lambda r: r == "OK"),
        Probe("r2d2 L3-denied (jawa)", False, lambda: _droid(JAWA, b"READ /public/plans\r\n"), lambda r: r == "OK"),
    ]


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    passed: Counter[str] = field(default_factory=Counter)
    replies: dict[str, Counter[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, probe: Probe, reply: str) -> None:
        with self.lock:
            self.sent[probe.name] += 1
            self.replies.setdefault(probe.name, Counter())[reply] += 1
            if probe.passed(reply):
                self.passed[probe.name] += 1


class Agent:
    """The `cilia agent` process under test, started again after each kill."""

    def __init__(self, state: Path, log: Path) -> None:
        self.state, self.log = state, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "cilia", "agent", "--state-dir", str(self.state),
                                          "--l7-workers", "2"], stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(REPO)})

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cilia", *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(REPO), "CILIA_STATE_DIR": str(self.state)})

    def healthy(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.settimeout(3)
                s.connect(str(self.state / "cilia.sock"))
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
                return s.makefile("rb").readline().split()[1:2] == [b"200"]
            except OSError:
                return False

    def children(self) -> list[tuple[int, str]]:
        assert self.proc is not None
        try:
            pids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return []
        out = []
        for pid in map(int, pids):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            out.append((pid, cmdline))
        return out

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _victim_pid(agent: Agent, kind: str) -> int | None:
    if kind == "envoy":  # as the agent reports it
        res = agent.cli("status", "-o", "json")
        pid = json.loads(res.stdout)["envoy"].get("pid") if res.returncode == 0 else None
        return int(pid) if pid else None
    for pid, cmdline in agent.children():
        if "spawn_main" in cmdline:
            return pid
    return None


def _recovery(agent: Agent, probes: list[Probe], started: float, limit: float = 120.0) -> dict[str, float | None]:
    """Seconds from the kill until every allowed probe passes again, and until /healthz is 200."""
    allowed = [p for p in probes if p.allowed]
    traffic = health = None
    while time.monotonic() - started < limit and (traffic is None or health is None):
        if traffic is None and all(p.passed(p.send()) for p in allowed):
            traffic = time.monotonic() - started
        if health is None and agent.healthy():
            health = time.monotonic() - started
        time.sleep(0.05)
    return {"traffic_s": traffic, "health_s": health}


def _setup(agent: Agent, app_port: int, droid_port: int) -> None:
    for args in (["--name", "deathstar", "--labels", "org=empire,class=deathstar", "--ip", DEATHSTAR,
                  "--port", f"80:{app_port}"],
                 ["--name", "tiefighter", "--labels", "org=empire,class=tiefighter", "--ip", TIEFIGHTER],
                 ["--name", "xwing", "--labels", "org=alliance,class=xwing", "--ip", XWING],
                 ["--name", "r2d2", "--labels", "app=r2d2", "--ip", DROID, "--port", f"4242:{droid_port}"],
                 ["--name", "c3po", "--labels", "app=c3po", "--ip", C3PO],
                 ["--name", "jawa", "--labels", "app=jawa", "--ip", JAWA]):
        res = agent.cli("endpoint", "add", *args)
        if res.returncode != 0:
            raise SystemExit(f"endpoint add failed: {res.stderr}")
    res = agent.cli("policy", "import", str(STARWARS_POLICY), str(DROID_POLICY))
    if res.returncode != 0:
        raise SystemExit(f"policy import failed: {res.stderr}")
    res = agent.cli("policy", "wait", res.stdout.split()[-1])
    if res.returncode != 0:
        raise SystemExit(f"policy wait failed: {res.stderr}")


class _QuietHTTPServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a connection reset by a killed Envoy is what this run does on purpose


def _servers() -> tuple[ThreadingHTTPServer, socketserver.ThreadingTCPServer]:
    app = _QuietHTTPServer((DEATHSTAR, free_port(DEATHSTAR)), Deathstar)
    droid = socketserver.ThreadingTCPServer((DROID, free_port(DROID)), _Droid)
    for server in (app, droid):
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return app, droid


def run(minutes: float, interval: float, clients: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    app, droid = _servers()
    app_port, droid_port = app.server_address[1], droid.server_address[1]
    probes = _probes(app_port)
    tally = Tally()
    kills: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cilia-bench-chaos-") as tmp:
        agent = Agent(Path(tmp) / "state", Path(tmp) / "agent.log")
        agent.start()
        deadline = time.monotonic() + 60
        while not agent.healthy():
            if time.monotonic() > deadline or (agent.proc is not None and agent.proc.poll() is not None):
                raise SystemExit("agent did not start: " + agent.log.read_text()[-2000:])
            time.sleep(0.1)
        _setup(agent, app_port, droid_port)
        stop = threading.Event()

        def client(k: int) -> None:
            local = random.Random(seed + k)
            while not stop.is_set():
                probe = local.choice(probes)
                tally.record(probe, probe.send())

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        end = time.monotonic() + minutes * 60
        try:
            while time.monotonic() < end:
                time.sleep(min(rng.uniform(interval / 2, interval * 1.5), max(0.0, end - time.monotonic())))
                if time.monotonic() >= end:
                    break
                kind = rng.choice(["agent", "envoy", "worker"])
                started = time.monotonic()
                if kind == "agent":
                    agent.kill()
                    agent.start()
                else:
                    pid = _victim_pid(agent, kind)
                    if pid is None:
                        kills.append({"victim": kind, "at_s": round(started - end + minutes * 60, 1),
                                      "skipped": "not running"})
                        continue
                    os.kill(pid, signal.SIGKILL)
                rec = _recovery(agent, probes, started)
                kills.append({"victim": kind, "at_s": round(started - end + minutes * 60, 1), **rec})
                print(f"  killed {kind:<6} traffic back after {_seconds(rec['traffic_s'])}, "
                      f"health after {_seconds(rec['health_s'])}", flush=True)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            agent.stop()
            app.shutdown()
            droid.shutdown()
    return {"minutes": minutes, "clients": clients, "seed": seed, "kills": kills,
            "probes": [{"probe": p.name, "allowed": p.allowed, "sent": tally.sent[p.name],
                        "passed": tally.passed[p.name], "replies": dict(tally.replies.get(p.name, {}))}
                       for p in probes]}


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def _stats(kills: list[dict[str, Any]], key: str) -> str:
    values = [k[key] for k in kills if k[key] is not None]
    never = len(kills) - len(values)
    text = f"{statistics.median(values):.2f} / {max(values):.2f}" if values else "-"
    return text + (f" ({never} never)" if never else "")


def _summary(result: dict[str, Any]) -> None:
    print(f"\n{'probe':<38} | {'sent':>7} | {'passed':>7} | verdict")
    print("-" * 78)
    for p in result["probes"]:
        if p["allowed"]:
            lost = p["sent"] - p["passed"]
            verdict = f"{lost} lost ({100 * lost / max(1, p['sent']):.1f}%)"
        else:
            verdict = "OK: none passed" if p["passed"] == 0 else f"VIOLATION: {p['passed']} passed"
        print(f"{p['probe']:<38} | {p['sent']:>7,} | {p['passed']:>7,} | {verdict}")
    print(f"\n{'victim':<7} | {'kills':>5} | {'traffic back: median / max s':>30} | {'health: median / max s':>24}")
    print("-" * 78)
    for kind in ("agent", "envoy", "worker"):
        done = [k for k in result["kills"] if k["victim"] == kind and "skipped" not in k]
        if not done:
            continue
        print(f"{kind:<7} | {len(done):>5} | {_stats(done, 'traffic_s'):>30} | {_stats(done, 'health_s'):>24}")
    denied_passed = sum(p["passed"] for p in result["probes"] if not p["allowed"])
    print(f"\ndenied requests that passed: {denied_passed} (must be 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=15.0, help="mean seconds between kills")
    parser.add_argument("--clients", type=int, default=4, help="client threads sending requests")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.minutes, args.interval, args.clients, args.seed)
    result.update(python=platform.python_version(), cpus=os.cpu_count(),
                  denied_passed=sum(p["passed"] for p in result["probes"] if not p["allowed"]))
    _summary(result)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
