"""Cluster scale benchmark: agents sharing identities and endpoints through a real etcd.

    .venv/bin/python -m bench.cluster_scale                       # 10, 50, 100 nodes; 10,000 endpoints
    .venv/bin/python -m bench.cluster_scale --nodes 10,20 --endpoints 1000 --remote 5000 --adds 20

A real etcd (Debian's etcd-server, tests/kvstore/etcd_support.py) and two real agents in this
process (node-a, where endpoints are added, and node-b, which receives them; no Envoy, no BPF:
what the datapath sink is handed next is the engine's ipcache, which is what is timed), plus
simulated nodes: worker processes in which each simulated node holds its own lease, publishes its
share of the endpoints under it and watches every node's endpoint addresses (a PrefixMirror), as
an agent does. Stages add simulated nodes until ``--nodes``; the endpoints grow with them, to
``--endpoints`` at the last stage. At each stage ``--adds`` endpoints are added on node-a, one at a
time, and the time until node-b's ipcache holds the address is taken (p50/p99). The etcd requests
node-a's store client makes per endpoint add are counted (writes: put, transaction, delete). Last,
``--remote`` endpoint addresses are published (by simulated nodes that only publish) while a
`cilia agent` process watches: its RSS once it holds them all, against its RSS with none.

Prints a table and writes bench/results/cluster_scale.json. The machine is shared and loaded:
numbers compare within one run; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "cluster_scale.json"
NODES_PER_WORKER = 25
WRITES = ("put", "create", "delete", "delete_prefix", "delete_unchanged")
READS = ("get", "get_prefix", "revision")


def address(i: int, base: int = 11) -> str:
    return str(ipaddress.ip_address(f"{base}.0.0.0") + i)


# ---------------------------------------------------------------------- simulated nodes (worker)


def simulate(endpoints: list[str], first_node: int, nodes: int, first_ep: int, count: int, base: int,
             watch: bool) -> None:
    """A worker process: ``nodes`` simulated nodes, each with its lease and (``watch``) a watch of
    the ipcache, publishing ``count`` endpoints between them. Prints "ready ..." when all are written and every
    watch has listed; exits when stdin closes."""
    from cilia.cluster import keys
    from cilia.cluster.ipcache import IPEntry
    from cilia.cluster.session import Session
    from cilia.kvstore.etcd import EtcdKVStore
    from cilia.kvstore.mirror import PrefixMirror

    store = EtcdKVStore(endpoints, timeout=30)
    sessions, mirrors = [], []
    for n in range(nodes):
        session = Session(store, f"sim-{first_node + n}", ttl=60)
        session.start()
        sessions.append(session)
        if watch:
            mirror = PrefixMirror(store, keys.IPCACHE, lambda upserts, deletes: None)
            mirror.start()
            mirrors.append(mirror)

    def put(i: int) -> None:
        node = i % nodes
        ip = address(first_ep + i, base)
        entry = IPEntry(ip, 256 + (first_ep + i) % 1000, f"sim-{first_node + node}")
        store.put(keys.ip_key(ip), entry.encode(), lease=sessions[node].lease)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(count)))
    for m in mirrors:
        m.synced.wait(120)
    print(f"ready {nodes} {count}", flush=True)
    sys.stdin.read()
    for m in mirrors:
        m.stop()
    for s in sessions:
        s.stop(revoke=True)
    store.close()


class Workers:
    """The worker processes of the simulated nodes so far."""

    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = endpoints
        self.procs: list[subprocess.Popen[str]] = []
        self.nodes = 0
        self.published = 0

    def add(self, nodes: int, count: int, base: int = 11, watch: bool = True) -> None:
        """``nodes`` more simulated nodes publishing ``count`` more endpoints, in workers of
        ``NODES_PER_WORKER`` nodes; returns when they are all written and watched."""
        started = []
        left_nodes, left_eps = nodes, count
        while left_nodes > 0:
            n = min(NODES_PER_WORKER, left_nodes)
            c = left_eps * n // left_nodes
            args = json.dumps([self.endpoints, self.nodes, n, self.published, c, base, watch])
            proc = subprocess.Popen([sys.executable, "-m", "bench.cluster_scale", "--simulate", args], cwd=REPO,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    env=dict(os.environ, PYTHONPATH=str(REPO)))
            self.procs.append(proc)
            started.append(proc)
            self.nodes += n
            self.published += c
            left_nodes -= n
            left_eps -= c
        for proc in started:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"a simulated node worker failed: {line!r}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------------- measurements


def count_requests(store: Any) -> Counter[str]:
    """Count the calls ``store`` (an agent's EtcdKVStore) gets, by method, from now on."""
    counts: Counter[str] = Counter()
    for name in WRITES + READS:
        original = getattr(store, name)

        def counted(*args: Any, _original: Callable[..., Any] = original, _name: str = name, **kw: Any) -> Any:
            counts[_name] += 1
            return _original(*args, **kw)

        setattr(store, name, counted)
    return counts


def wait_for(predicate: Callable[[], bool], timeout: float = 120.0, interval: float = 0.0005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("not reached")
        time.sleep(interval)


def propagation(a: Any, b: Any, adds: int, offset: int) -> list[float]:
    """Seconds from ``endpoint add`` on a until b's ipcache holds the address, ``adds`` times."""
    from cilia.specs import EndpointSpec

    times = []
    for i in range(adds):
        ip = address(offset + i, 12)
        net = ipaddress.ip_network(ip)
        started = time.perf_counter()
        a.add_endpoint(EndpointSpec(f"pod-{offset + i}", (f"app=bench{(offset + i) % 20}",), (ip,)))
        wait_for(lambda net=net: b.engine.ipcache.get(net) is not None)  # type: ignore[misc]
        times.append(time.perf_counter() - started)
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def agent_rss(endpoints: list[str], workdir: Path, remote: int) -> dict[str, Any]:
    """A `cilia agent` process: its RSS with no remote endpoints, then once it holds ``remote``."""
    from cilia.agent.client import AgentClient

    state = workdir / "rss-agent"
    state.mkdir()
    log = open(workdir / "rss-agent.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen([sys.executable, "-m", "cilia", "agent", "--state-dir", str(state), "--envoy", "none",
                             "--node-id", "rss-node", "--kvstore", "etcd", "--kvstore-endpoints", ",".join(endpoints),
                             "--cluster-health-port", "0"], stdout=log, stderr=log,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    client = AgentClient(state / "cilia.sock", timeout=30)
    workers = Workers(endpoints)
    try:
        wait_for(lambda: _status(client) is not None, 60, interval=0.2)
        time.sleep(2)
        before = rss_kib(proc.pid)
        started = time.monotonic()
        workers.add(max(1, remote // 1000), remote, base=13, watch=False)  # publishers only: the agent is measured
        published = time.monotonic() - started
        wait_for(lambda: (_status(client) or {}).get("remote_endpoints", 0) >= remote, 900, interval=0.5)
        held = time.monotonic() - started
        time.sleep(2)
        after = rss_kib(proc.pid)
    finally:
        client.close()
        proc.terminate()
        proc.wait(60)
        log.close()
        workers.close()
    return {"remote_endpoints": remote, "rss_before_mib": before["VmRSS"] / 1024,
            "rss_after_mib": after["VmRSS"] / 1024, "peak_mib": after["VmHWM"] / 1024,
            "publish_s": published, "all_held_s": held}


def _status(client: Any) -> dict[str, Any] | None:
    try:
        st = client.status()
    except Exception:
        return None
    return st.get("kvstore")  # type: ignore[no-any-return]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cilia.agent.cluster import KVStoreConfig
    from cilia.agent.daemon import Agent, AgentConfig
    from tests.kvstore.etcd_support import EtcdCluster

    stages = [int(n) for n in args.nodes.split(",")]
    out: dict[str, Any] = {"benchmark": "cluster_scale", "python": platform.python_version(),
                           "cpus": os.cpu_count(), "etcd_members": args.members, "stages": []}
    with tempfile.TemporaryDirectory(prefix="cilia-cluster-scale-") as tmp:
        work = Path(tmp)
        etcd = EtcdCluster(work, members=args.members)
        agents: list[Agent] = []
        workers = Workers(etcd.endpoints)
        try:
            for name in ("node-a", "node-b"):
                kv = KVStoreConfig("etcd", tuple(etcd.endpoints), lease_ttl=60, timeout=10.0, health_port=0)
                (work / name).mkdir()
                agent = Agent(AgentConfig(work / name, "none", node_id=name, kvstore=kv))
                agent.start()
                agents.append(agent)
            a, b = agents
            assert a.cluster is not None and b.cluster is not None
            counts = count_requests(a.cluster.store)
            offset = 0
            for nodes in stages:
                simulated = nodes - 2
                want_eps = args.endpoints * nodes // stages[-1]
                workers.add(simulated - workers.nodes, want_eps - workers.published)
                expected = workers.published + offset
                wait_for(lambda: len(b.engine.remote()) >= expected, 600, interval=0.2)  # noqa: B023
                counts.clear()
                batches = b.cluster.feed.batches
                times = propagation(a, b, args.adds, offset)
                offset += args.adds
                requests = dict(counts)
                writes = sum(requests.get(k, 0) for k in WRITES)
                row = {"nodes": nodes, "endpoints": workers.published + offset, "adds": args.adds,
                       "p50_ms": pct(times, 0.5) * 1000, "p99_ms": pct(times, 0.99) * 1000,
                       "max_ms": max(times) * 1000, "mean_ms": statistics.fmean(times) * 1000,
                       "etcd_writes_per_add": writes / args.adds,
                       "etcd_reads_per_add": sum(requests.get(k, 0) for k in READS) / args.adds,
                       "requests": requests, "b_batches": b.cluster.feed.batches - batches}
                out["stages"].append(row)
                print(f"  {nodes} nodes: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms", flush=True)
        finally:
            for agent in agents:
                agent.stop()
            workers.close()
        if args.remote:
            out["rss"] = agent_rss(etcd.endpoints, work, args.remote)
        etcd.close()
    return out


def report(out: dict[str, Any]) -> None:
    first = out["stages"][0]
    print("endpoint add on node-a until node-b's ipcache holds it (ms), etcd requests of node-a per add")
    print(f"{'nodes':>5} | {'endpoints':>9} | {'p50':>7} | {'p99':>7} | {'max':>7} | p99 x | writes | reads")
    print("-" * 72)
    for r in out["stages"]:
        print(f"{r['nodes']:>5} | {r['endpoints']:>9,} | {r['p50_ms']:>7.1f} | {r['p99_ms']:>7.1f} | "
              f"{r['max_ms']:>7.1f} | {r['p99_ms'] / first['p99_ms']:>5.2f} | {r['etcd_writes_per_add']:>6.2f} | "
              f"{r['etcd_reads_per_add']:.2f}")
    rss = out.get("rss")
    if rss:
        print(f"agent RSS: {rss['rss_before_mib']:.0f} MiB with no remote endpoint, {rss['rss_after_mib']:.0f} MiB "
              f"(peak {rss['peak_mib']:.0f}) holding {rss['remote_endpoints']:,} "
              f"(published in {rss['publish_s']:.0f} s, all held after {rss['all_held_s']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="10,50,100", help="node counts of the stages (2 real, the rest simulated)")
    parser.add_argument("--endpoints", type=int, default=10_000, help="endpoints at the last stage")
    parser.add_argument("--adds", type=int, default=50, help="endpoint adds timed at each stage")
    parser.add_argument("--remote", type=int, default=100_000, help="remote endpoints for the RSS (0: skip)")
    parser.add_argument("--members", type=int, default=1, help="etcd members")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--simulate", help=argparse.SUPPRESS)  # a worker process of simulated nodes
    args = parser.parse_args()
    if args.simulate:
        simulate(*json.loads(args.simulate))
        return
    out = run(args)
    report(out)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
