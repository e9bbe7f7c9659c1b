"""toFQDNs learning: the time from a new DNS answer to its addresses being in the BPF maps, and the
memory of 100,000 learned names.

    .venv/bin/python -m bench.fqdn_learn                  # 0, 1,000, 5,000 names already learned
    .venv/bin/python -m bench.fqdn_learn --sizes 0,1000 --answers 100

Answer to map: an in-process agent with the BPF datapath (the process enters a network namespace
of its own; pins under a private bpffs directory, removed at the end) and one endpoint whose
egress policy is ``toFQDNs: [{matchPattern: "*.bench.test"}]`` on 443/TCP. With N names already
learned, ``--answers`` new answers (one new name and address each) go through
``Agent.learn_fqdn``, what the DNS proxy calls before releasing an answer: it returns once the
BPF ipcache and the endpoint's policy map hold the address, so its duration is the time from
answer to map (every address is then checked in the kernel's ipcache). A repeated answer (nothing
new) is timed too. Target (issue 17): p99 < 20 ms.

Memory: tracemalloc of the DNS cache alone, and of the cache plus a policy engine whose endpoint's
``matchPattern: "*"`` selects every learned address (100,000 CIDR identities, selections and map
state entries), per name. The kernel maps hold at most 65,536 ipcache entries and 16,384 policy
entries per endpoint (Cilium's sizes), so 100,000 selected addresses are an engine figure only.

Prints a table and writes bench/results/fqdn_learn.json. Numbers compare within one run only.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import ipaddress
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from cilia.agent.daemon import Agent, AgentConfig
from cilia.bpf import maps
from cilia.bpf import node as bpf_node
from cilia.bpf.netns import delete_netns
from cilia.fqdn.cache import FqdnCache
from cilia.policy import Endpoint, LabelSet, PolicyEngine, parse_text
from cilia.specs import EndpointSpec

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "fqdn_learn.json"
ROUTER = "10.215.0.1"
POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-fqdn}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toFQDNs: [{{matchPattern: "{pattern}"}}]
    toPorts: [{{ports: [{{port: "443", protocol: TCP}}]}}]
"""


def address(i: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("100.64.0.0")) + i))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def answer_to_map(n: int, answers: int) -> dict[str, Any]:
    pin_dir = f"/sys/fs/bpf/cilia-bench-fqdn-{os.getpid()}-{n}"
    with tempfile.TemporaryDirectory(prefix="cilia-bench-fqdn-") as tmp:
        state = Path(tmp) / "state"
        agent = Agent(AgentConfig(state, envoy="none", datapath="bpf", bpf_pin_dir=pin_dir, router_ip=ROUTER))
        try:
            agent.start()
            agent.add_endpoint(EndpointSpec("client", ("app=client",), ("10.215.0.11",),
                                            netns=f"cfq-bench-{os.getpid()}-{n}", create=True))
            agent.import_policies([("bench.yaml", POLICY.format(pattern="*.bench.test"))])
            names = [f"pre{i}.bench.test" for i in range(n)]
            now = time.time()
            for i, name in enumerate(names):
                agent.fqdn.cache.learn(name, [address(i)], 3600, now, "client")
            started = time.perf_counter()
            if names:
                agent.fqdn.feed(names)  # one revision for the preload
            preload = time.perf_counter() - started
            new, repeated = [], []
            learned = []
            for k in range(answers):
                ip = address(n + k)
                t0 = time.perf_counter()
                agent.learn_fqdn("client", f"new{k}.bench.test", [ip], 300)
                new.append((time.perf_counter() - t0) * 1e3)
                learned.append(ip)
                t0 = time.perf_counter()
                agent.learn_fqdn("client", f"new{k}.bench.test", [ip], 300)
                repeated.append((time.perf_counter() - t0) * 1e3)
            assert agent.node is not None
            in_kernel = {str(p.network_address) for p in maps.ipcache_items(agent.node.loader.maps["ipcache"])}
            missing = [ip for ip in learned if ip not in in_kernel]
            if missing:
                raise SystemExit(f"{len(missing)} learned addresses are not in the BPF ipcache: {missing[:5]}")
        finally:
            agent.stop()
            bpf_node.cleanup(pin_dir, [s.interface for s in agent.state.endpoints.values() if s.interface])
            for spec in agent.state.endpoints.values():
                if spec.netns:
                    delete_netns(spec.netns)
            shutil.rmtree(pin_dir, ignore_errors=True)
    return {"learned_before": n, "answers": answers, "preload_s": preload,
            "new_p50_ms": statistics.median(new), "new_p99_ms": pct(new, 99), "new_max_ms": max(new),
            "repeated_p50_ms": statistics.median(repeated), "repeated_p99_ms": pct(repeated, 99)}


def memory(names: int) -> dict[str, Any]:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    cache = FqdnCache()
    now = time.time()
    for i in range(names):
        cache.learn(f"host{i}.example.org", [address(i)], 300, now, "client")
    cache_bytes = tracemalloc.get_traced_memory()[0] - base
    engine = PolicyEngine()
    engine.upsert_endpoint(Endpoint("client", LabelSet.parse(["app=client"])))
    loaded = parse_text(POLICY.format(pattern="*"), "bench.yaml")
    engine.apply(loaded.policies)
    before_engine = tracemalloc.get_traced_memory()[0]
    engine.update_fqdn(cache.names())
    engine.endpoint_policy("client")  # its map state, with an entry per selected identity
    engine_bytes = tracemalloc.get_traced_memory()[0] - before_engine
    tracemalloc.stop()
    selected = sum(1 for ident in engine.identities() if ident.kind.value == "cidr")
    return {"names": names, "cache_mb": cache_bytes / 1e6, "engine_mb": engine_bytes / 1e6,
            "bytes_per_name": (cache_bytes + engine_bytes) / names, "cidr_identities": selected}


def _own_network_namespace() -> None:
    """The agent's router address, routes and tc programs go into a namespace of this process's own."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        raise SystemExit(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())} (run as root)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0,1000,5000", help="names learned before timing, comma-separated")
    parser.add_argument("--answers", type=int, default=200, help="new answers timed at each size")
    parser.add_argument("--memory-names", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    _own_network_namespace()
    rows = [answer_to_map(int(n), args.answers) for n in args.sizes.split(",")]
    print("answer to BPF map: Agent.learn_fqdn of a new name (returns once ipcache and policy map hold it), ms")
    print(f"{'learned':>8} | {'p50':>6} | {'p99':>6} | {'max':>6} | repeated answer p50/p99 | preload s")
    print("-" * 72)
    for r in rows:
        print(f"{r['learned_before']:>8,} | {r['new_p50_ms']:>6.2f} | {r['new_p99_ms']:>6.2f} | "
              f"{r['new_max_ms']:>6.1f} | {r['repeated_p50_ms']:>8.3f} / {r['repeated_p99_ms']:.3f}       | "
              f"{r['preload_s']:.1f}")
    mem = memory(args.memory_names)
    print(f"\nmemory for {mem['names']:,} learned names: cache {mem['cache_mb']:.1f} MB, engine (all selected: "
          f"{mem['cidr_identities']:,} CIDR identities) {mem['engine_mb']:.1f} MB, "
          f"{mem['bytes_per_name']:.0f} bytes per name")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "fqdn_learn", "python": platform.python_version(),
                                    "cpus": os.cpu_count(), "answer_to_map": rows, "memory": mem}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
