"""Service load balancing cost: connection rate and request latency through a service address
with 10, 1,000 and 10,000 services configured, against the backend's own address (no load
balancing) and against kube-proxy's iptables mode (the same services as ``iptables -t nat``
DNAT chains); and the time for a service change to reach the BPF maps at 10,000 services.
Needs root (namespaces, BPF, iptables).

    .venv/bin/python -m bench.service_lb           # 3 interleaved rounds, a few minutes
    .venv/bin/python -m bench.service_lb --quick   # 1 short round

Rig: a node namespace, a client and a backend namespace on veths with cilia's BPF programs on
both (policy allows everything, so every case pays the same policy cost). Client and server are
a small C program (service_lb_load.c, built with cc into a temporary directory), so Python is
not what is measured: one client opens and resets connections in a loop; round trips of 64 bytes
on one connection give the latency. Cases:
- ``direct``: the client connects to the backend's address.
- ``bpf-N``: N services in the BPF load balancer; the client connects to the one in the middle.
- ``iptables-N``: no BPF services; the node namespace has N services as kube-proxy writes them
  (``SVCDP-SERVICES``: one rule per service, each jumping to its ``SVCDP-SVC-i`` chain, which
  jumps to ``SVCDP-SEP-i``, the DNAT); the client connects to the one in the middle. The chains
  live in the bench's own namespace and are deleted after each case.
Change-to-map: with 10,000 services loaded, one service's backends change and
``LoadBalancer.sync`` runs over all 10,000 (what the agent's sink does per revision): p50/p99.

Prints a table and writes bench/results/service_lb.json (--quick: service_lb-quick.json).
Numbers compare within one run only; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from cilia.bpf.datapath import Datapath
from cilia.bpf.lb import LoadBalancer
from cilia.bpf.loader import Loader, bpf_available
from cilia.bpf.netns import Namespace, run_in_netns
from cilia.bpf.policykey import PolicyKey, PolicyValue
from cilia.services.model import Backend, Frontend, Service

HERE = Path(__file__).resolve().parent

RESULTS = HERE / "results" / "service_lb.json"
QUICK_RESULTS = HERE / "results" / "service_lb-quick.json"
NODE_IP = "10.214.0.1"
CLIENT, SERVER = "10.214.0.10", "10.214.0.11"
CONN_PORT, ECHO_PORT = 8080, 8081  # the backend's ports; the services' are 80 and 81
SIZES = (10, 1_000, 10_000)
CHANGES = 200
TARGET_FLAT = 0.05
CHAIN = "SVCDP"  # prefix of the bench's iptables chains


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")


def vip(i: int) -> str:
    return f"10.96.{(i >> 8) & 255}.{i & 255}" if i < 65536 else f"10.97.{(i >> 8) & 255}.{i & 255}"


def services(n: int, measured_port: int) -> list[Service]:
    """n services; the one in the middle (index n // 2) leads to the real backend on the
    measured port, the others to addresses nobody answers."""
    out = []
    for i in range(n):
        if i == n // 2:
            backends = (Backend(SERVER, CONN_PORT if measured_port == 80 else ECHO_PORT),)
            front = Frontend(vip(i), measured_port)
        else:
            backends = (Backend(f"10.215.{(i >> 8) & 255}.{i & 255}", 8080),)
            front = Frontend(vip(i), 80)
        out.append(Service(i + 1, front, backends))
    # the echo service sits beside the measured one (same frontend address, port 81)
    if measured_port == 80:
        out.append(Service(n + 1, Frontend(vip(n // 2), 81), (Backend(SERVER, ECHO_PORT),)))
    return out


def iptables_rules(n: int) -> str:
    """kube-proxy's iptables mode for the same n services (one backend each), iptables-restore text."""
    lines = ["*nat", f":{CHAIN}-SERVICES - [0:0]"]
    for i in range(n + 1):
        lines += [f":{CHAIN}-SVC-{i} - [0:0]", f":{CHAIN}-SEP-{i} - [0:0]"]
    lines.append(f"-A PREROUTING -j {CHAIN}-SERVICES")
    for i in range(n):
        lines.append(f"-A {CHAIN}-SERVICES -d {vip(i)}/32 -p tcp -m tcp --dport 80 -j {CHAIN}-SVC-{i}")
        if i == n // 2:
            lines.append(f"-A {CHAIN}-SERVICES -d {vip(i)}/32 -p tcp -m tcp --dport 81 -j {CHAIN}-SVC-{n}")
    for i in range(n + 1):
        to = (f"{SERVER}:{CONN_PORT}" if i == n // 2 else f"{SERVER}:{ECHO_PORT}" if i == n
              else f"10.215.{(i >> 8) & 255}.{i & 255}:8080")
        lines += [f"-A {CHAIN}-SVC-{i} -j {CHAIN}-SEP-{i}",
                  f"-A {CHAIN}-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {to}"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class Rig:
    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:4]
        self.node = f"svcdp-node-{suffix}"
        self.client = Namespace(f"svcdp-c-{suffix}", CLIENT, f"svcdpc{suffix}", node=self.node)
        self.server = Namespace(f"svcdp-s-{suffix}", SERVER, f"svcdps{suffix}", node=self.node)
        self.loader = Loader(pin_dir=f"/sys/fs/bpf/svcdp-bench-{suffix}", netns=self.node)
        self.datapath = Datapath(self.loader)
        self.lb: LoadBalancer | None = None
        self.tmp = tempfile.TemporaryDirectory(prefix="svcdp-bench-")
        self.load = f"{self.tmp.name}/load"
        self.servers: list[subprocess.Popen[bytes]] = []

    def setup(self) -> None:
        ip("netns", "add", self.node)
        ip("-n", self.node, "link", "set", "lo", "up")
        ip("-n", self.node, "addr", "add", f"{NODE_IP}/32", "dev", "lo")
        subprocess.run(["ip", "netns", "exec", self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        self.client.create(NODE_IP)
        self.server.create(NODE_IP)
        self.loader.load()
        self.datapath.sync_ipcache([])
        self.datapath.upsert_endpoint(1, CLIENT, self.client.host_if, 1000)
        self.datapath.upsert_endpoint(2, SERVER, self.server.host_if, 1001)
        allow_all = PolicyValue(0, False, 3).pack()
        self.datapath.write_policy(1, {PolicyKey(0, True, 0, 0, 0).pack(): allow_all})
        self.datapath.write_policy(2, {PolicyKey(0, False, 0, 0, 0).pack(): allow_all})
        self.lb = LoadBalancer(self.loader)
        self._serve()

    def _serve(self) -> None:
        subprocess.run(["cc", "-O2", "-o", self.load, str(HERE / "service_lb_load.c")], check=True)
        for mode, port in (("serve-close", CONN_PORT), ("serve-echo", ECHO_PORT)):
            self.servers.append(subprocess.Popen(["ip", "netns", "exec", self.server.name, self.load, mode,
                                                  str(port)]))
        deadline = time.monotonic() + 10
        while not all(run_in_netns(self.server.name, lambda p=p: _listening(p)) for p in (CONN_PORT, ECHO_PORT)):
            if time.monotonic() > deadline:
                raise OSError("the bench servers did not start")
            time.sleep(0.05)

    def _client(self, *args: str) -> str:
        res = subprocess.run(["ip", "netns", "exec", self.client.name, self.load, *args], capture_output=True,
                             text=True, timeout=120)
        if res.returncode != 0:
            raise OSError(f"load {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout
    def iptables(self, text: str | None) -> None:
        """Load kube-proxy-style chains (text) into the node namespace, or remove them (None)."""
        if text is None:
            subprocess.run(["ip", "netns", "exec", self.node, "iptables", "-t", "nat", "-F"], check=True)
            subprocess.run(["ip", "netns", "exec", self.node, "iptables", "-t", "nat", "-X"], check=True)
            return
        subprocess.run(["ip", "netns", "exec", self.node, "iptables-restore", "--noflush"], input=text, text=True,
                       check=True, capture_output=True)

    def client_ports(self, span: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.client.name, "sysctl", "-qw",
                        f"net.ipv4.ip_local_port_range={span}"], check=True)

    def conn_rate(self, addr: str, port: int, seconds: float) -> float:
        return float(self._client("connect", addr, str(port), str(seconds)))

    def latency(self, addr: str, port: int, requests: int) -> tuple[float, float]:
        """p50 and p99 of round trips of 64 bytes over one connection, in microseconds."""
        p50, p99 = self._client("pingpong", addr, str(port), str(requests)).split()
        return float(p50), float(p99)

    def teardown(self) -> None:
        for p in self.servers:
            p.kill()
            p.wait()
        self.tmp.cleanup()
        if self.lb is not None:
            self.lb.close()
        try:
            self.loader.remove_all()
        finally:
            self.client.delete()
            self.server.delete()
            subprocess.run(["ip", "netns", "del", self.node], capture_output=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((SERVER, port)) == 0


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    why = bpf_available()
    if why:
        raise SystemExit(f"service_lb: {why}")
    rounds, seconds, requests = (1, 1.0, 2000) if args.quick else (args.rounds, args.seconds, args.requests)
    started = time.perf_counter()
    rig = Rig()
    samples: dict[str, dict[str, list[float]]] = {}
    change_ms: list[float] = []
    try:
        rig.setup()
        assert rig.lb is not None
        by_size = {n: services(n, 80) for n in SIZES}
        rules = {n: iptables_rules(n) for n in SIZES}
        cases = ["direct", *[f"bpf-{n}" for n in SIZES], *[f"iptables-{n}" for n in SIZES]]
        for r in range(rounds):
            for case in cases:
                kind, _, size = case.partition("-")
                # kube-proxy's cases get client ports of their own: netfilter's conntrack keeps their
                # NATed tuples a while, and a BPF case's new flow on one of them would clash there
                rig.client_ports("20000 39999" if kind == "iptables" else "40000 60999")
                if kind == "direct":
                    rig.lb.sync([])
                    conn, echo = (SERVER, CONN_PORT), (SERVER, ECHO_PORT)
                else:
                    n = int(size)
                    conn, echo = (vip(n // 2), 80), (vip(n // 2), 81)
                    if kind == "bpf":
                        t = time.perf_counter()
                        rig.lb.sync(by_size[n])
                        log(f"  {n:,} BPF services written in {time.perf_counter() - t:.2f} s")
                    else:
                        rig.lb.sync([])
                        t = time.perf_counter()
                        rig.iptables(rules[n])
                        log(f"  {n:,} iptables services loaded in {time.perf_counter() - t:.2f} s")
                try:
                    s = samples.setdefault(case, {"conn_per_s": [], "p50_us": [], "p99_us": []})
                    s["conn_per_s"].append(rig.conn_rate(*conn, seconds))
                    p50, p99 = rig.latency(*echo, requests)
                    s["p50_us"].append(p50)
                    s["p99_us"].append(p99)
                finally:
                    if kind == "iptables":
                        rig.iptables(None)
                log(f"round {r + 1}/{rounds} {case:15} {s['conn_per_s'][-1]:8.0f} conn/s "
                    f"p50 {s['p50_us'][-1]:6.1f} us p99 {s['p99_us'][-1]:6.1f} us")
        # change-to-map at 10,000 services: one service's backends change per revision
        base = services(SIZES[-1], 80)
        rig.lb.sync(base)
        target = len(base) // 3
        for i in range(CHANGES):
            svc = base[target]
            extra = Backend(f"10.216.{(i >> 8) & 255}.{i & 255}", 8080)
            changed = list(base)
            changed[target] = Service(svc.id, svc.frontend, (*svc.backends, extra))
            t = time.perf_counter()
            result = rig.lb.sync(changed)
            change_ms.append((time.perf_counter() - t) * 1e3)
            assert result.backends_written >= 1, result
        assert rig.conn_rate(vip(SIZES[-1] // 2), 80, 0.2) > 0
    finally:
        rig.teardown()

    med = {c: {k: statistics.median(v) for k, v in s.items()} for c, s in samples.items()}
    direct = med["direct"]
    print(f"{'case':15} {'conn/s':>8} {'vs direct':>9} {'p50 us':>8} {'p99 us':>8}")
    for case, m in med.items():
        print(f"{case:15} {m['conn_per_s']:8.0f} {m['conn_per_s'] / direct['conn_per_s'] - 1:+9.1%} "
              f"{m['p50_us']:8.1f} {m['p99_us']:8.1f}")
    big = SIZES[-1]
    ratio = med[f"bpf-{big}"]["conn_per_s"] / med[f"iptables-{big}"]["conn_per_s"]
    within = all(abs(med[f"bpf-{n}"]["conn_per_s"] / direct["conn_per_s"] - 1) <= TARGET_FLAT for n in SIZES)
    flat = abs(med[f"bpf-{big}"]["conn_per_s"] / med[f"bpf-{SIZES[0]}"]["conn_per_s"] - 1) <= TARGET_FLAT
    p99 = _pct(change_ms, 0.99)
    print(f"change to maps at {big:,} services: p50 {_pct(change_ms, 0.5):.2f} ms, p99 {p99:.2f} ms "
          f"({CHANGES} changes)")
    print(f"targets: BPF within 5% of direct at every size: {'met' if within else 'NOT met'}; flat 10 -> {big:,}: "
          f"{'met' if flat else 'NOT met'}; >= 2x iptables at {big:,}: {ratio:.2f}x "
          f"{'met' if ratio >= 2 else 'NOT met'}; change p99 < 50 ms: {'met' if p99 < 50 else 'NOT met'}")
    out = args.output or (QUICK_RESULTS if args.quick else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "service_lb", "mode": "quick" if args.quick else "full",
        "machine": {"python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg()},
        "rounds": rounds, "seconds": seconds, "requests": requests, "medians": med, "samples": samples,
        "change_to_map_ms": {"p50": _pct(change_ms, 0.5), "p99": p99, "samples": change_ms},
        "bpf_vs_iptables_conn_ratio": ratio,
        "targets": {"within_5pct_of_direct": within, "flat": flat, "2x_iptables": ratio >= 2,
                    "change_p99_50ms": p99 < 50},
        "wall_s": time.perf_counter() - started,
    }, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(HERE.parent) if out.is_relative_to(HERE.parent) else out}")


if __name__ == "__main__":
    main()
