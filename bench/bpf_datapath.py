#!/usr/bin/env python3
"""BPF datapath cost: connection rate and throughput between two endpoints with no program, and
with the program and 10, 1,000 and 100,000 entries in the receiver's policy trie; and the time
to apply a change of 10,000 entries. Needs root (namespaces, BPF).

    .venv/bin/python bench/bpf_datapath.py           # 3 interleaved rounds, ~2 minutes
    .venv/bin/python bench/bpf_datapath.py --quick   # 1 short round

Prints a table and writes bench/results/bpf_datapath.json (--quick: bpf_datapath-quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cilia.bpf.datapath import Datapath  # noqa: E402
from cilia.bpf.loader import Loader, bpf_available  # noqa: E402
from cilia.bpf.netns import Namespace, run_in_netns  # noqa: E402
from cilia.bpf.policykey import PolicyKey, PolicyValue  # noqa: E402

RESULTS = HERE / "results" / "bpf_datapath.json"
QUICK_RESULTS = HERE / "results" / "bpf_datapath-quick.json"
NODE_IP = "10.212.0.1"
CLIENT, SERVER = "10.212.0.10", "10.212.0.11"
CLIENT_ID, SERVER_ID = 1000, 1001
CONN_PORT, STREAM_PORT = 5001, 5002
SIZES = (10, 1_000, 100_000)
CHANGE = 10_000
TARGET = 0.05  # flat cost: within 5% from 10 to 100,000 entries


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """iproute2's ``ip`` for the benchmark's own setup (cilia itself uses pyroute2)."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def entries(n: int, port: int = 80) -> dict[bytes, bytes]:
    """The server's ingress trie: the client on the two bench ports, and n-2 other identities."""
    allow = PolicyValue(0, False, 1).pack()
    out = {PolicyKey(CLIENT_ID, False, 6, p, 16).pack(): allow for p in (CONN_PORT, STREAM_PORT)}
    for i in range(max(0, n - 2)):
        out[PolicyKey(200_000 + i, False, 6, port, 16).pack()] = PolicyValue(0, False, 2).pack()
    return out


class Rig:
    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:5]
        self.node = f"bb-node-{suffix}"
        self.client = Namespace(f"bb-c-{suffix}", CLIENT, f"bbc{suffix}", node=self.node)
        self.server = Namespace(f"bb-s-{suffix}", SERVER, f"bbs{suffix}", node=self.node)
        self.loader = Loader(pin_dir=f"/sys/fs/bpf/cilia-bench-{suffix}", netns=self.node, policy_max=131_072)
        self.datapath = Datapath(self.loader)
        self.socks: list[socket.socket] = []

    def setup(self) -> None:
        ip("netns", "add", self.node)
        ip("-n", self.node, "link", "set", "lo", "up")
        ip("-n", self.node, "addr", "add", f"{NODE_IP}/32", "dev", "lo")
        subprocess.run(["ip", "netns", "exec", self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        self.client.create(NODE_IP)
        self.server.create(NODE_IP)
        self.loader.load()
        self.datapath.sync_ipcache([])
        self.attach()
        self.datapath.write_policy(1, {PolicyKey(0, True, 0, 0, 0).pack(): PolicyValue(0, False, 3).pack()})
        self._serve()

    def attach(self) -> None:
        self.datapath.upsert_endpoint(1, CLIENT, self.client.host_if, CLIENT_ID)
        self.datapath.upsert_endpoint(2, SERVER, self.server.host_if, SERVER_ID)

    def detach(self) -> None:
        self.loader.detach(self.client.host_if)
        self.loader.detach(self.server.host_if)

    def _serve(self) -> None:
        def listen(port: int) -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((SERVER, port))
            s.listen(1024)
            return s

        acc = run_in_netns(self.server.name, lambda: listen(CONN_PORT))
        stream = run_in_netns(self.server.name, lambda: listen(STREAM_PORT))
        self.socks += [acc, stream]

        def accept_close() -> None:
            while True:
                try:
                    c, _ = acc.accept()
                    c.close()
                except OSError:
                    return

        def drain() -> None:
            buf = bytearray(1 << 20)
            while True:
                try:
                    c, _ = stream.accept()
                except OSError:
                    return
                with c:
                    while c.recv_into(buf):
                        pass

        for fn in (accept_close, drain):
            threading.Thread(target=fn, daemon=True).start()

    def conn_rate(self, seconds: float) -> float:
        def run() -> float:
            n, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                with socket.create_connection((SERVER, CONN_PORT), timeout=2) as c:
                    # Close with a reset: no TIME_WAIT, so the client never runs out of ports
                    # (which, not BPF, is what slows a long connect loop down).
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    n += 1
            return n / seconds

        return run_in_netns(self.client.name, run)

    def throughput(self, seconds: float) -> float:
        def run() -> float:
            chunk = b"\0" * (1 << 20)
            sent, end = 0, time.monotonic() + seconds
            with socket.create_connection((SERVER, STREAM_PORT), timeout=5) as c:
                while time.monotonic() < end:
                    c.sendall(chunk)
                    sent += len(chunk)
            return sent * 8 / seconds / 1e9

        return run_in_netns(self.client.name, run)

    def teardown(self) -> None:
        for s in self.socks:
            s.close()
        try:
            self.loader.remove_all()
        finally:
            self.client.delete()
            self.server.delete()
            ip("netns", "del", self.node, check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    why = bpf_available()
    if why:
        raise SystemExit(f"bpf_datapath: {why}")
    rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)
    started = time.perf_counter()
    rig = Rig()
    samples: dict[str, dict[str, list[float]]] = {}
    apply: dict[str, float] = {}
    try:
        rig.setup()
        cases = ["no-program", *[f"entries-{n}" for n in SIZES]]
        for r in range(rounds):
            for case in cases:
                if case == "no-program":
                    rig.detach()
                else:
                    rig.attach()
                    n = int(case.split("-")[1])
                    t = time.perf_counter()
                    rig.datapath.write_policy(2, entries(n))
                    if r == 0:
                        apply[f"write {n:,} entries"] = time.perf_counter() - t
                s = samples.setdefault(case, {"conn_per_s": [], "gbit_per_s": []})
                s["conn_per_s"].append(rig.conn_rate(seconds))
                s["gbit_per_s"].append(rig.throughput(seconds))
                log(f"round {r + 1}/{rounds} {case:15} {s['conn_per_s'][-1]:8.0f} conn/s "
                    f"{s['gbit_per_s'][-1]:6.2f} Gbit/s")
        # A change of 10,000 entries in a 100,000-entry trie: 10,000 identities move to port 81.
        rig.attach()
        rig.datapath.write_policy(2, entries(100_000))
        changed = entries(100_000)
        for i in range(CHANGE):
            changed.pop(PolicyKey(200_000 + i, False, 6, 80, 16).pack())
            changed[PolicyKey(200_000 + i, False, 6, 81, 16).pack()] = PolicyValue(0, False, 2).pack()
        t = time.perf_counter()
        written, removed = rig.datapath.write_policy(2, changed)
        apply["change 10,000 of 100,000"] = time.perf_counter() - t
        assert (written, removed) == (CHANGE, CHANGE), (written, removed)
        assert rig.conn_rate(0.2) > 0  # still allowed after the change
    finally:
        rig.teardown()

    med = {c: {k: statistics.median(v) for k, v in s.items()} for c, s in samples.items()}
    base = med["entries-10"]
    print("case             conn/s   vs 10    Gbit/s   vs 10")
    for case, m in med.items():
        print(f"{case:15} {m['conn_per_s']:8.0f} {m['conn_per_s'] / base['conn_per_s'] - 1:+7.1%} "
              f"{m['gbit_per_s']:8.2f} {m['gbit_per_s'] / base['gbit_per_s'] - 1:+7.1%}")
    for what, secs in apply.items():
        print(f"apply: {what:28} {secs * 1e3:8.1f} ms")
    flat = abs(med["entries-100000"]["conn_per_s"] / base["conn_per_s"] - 1) <= TARGET
    print(f"target: within 5% from 10 to 100,000 entries (connection rate): {'met' if flat else 'NOT met'}")
    out = args.output or (QUICK_RESULTS if args.quick else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bpf_datapath", "mode": "quick" if args.quick else "full",
        "machine": {"python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count()},
        "rounds": rounds, "seconds": seconds, "medians": med, "samples": samples,
        "apply_s": apply, "target_met": flat, "wall_s": time.perf_counter() - started,
    }, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(HERE.parent) if out.is_relative_to(HERE.parent) else out}")


if __name__ == "__main__":
    main()
