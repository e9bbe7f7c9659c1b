#!/usr/bin/env python3
"""xDS fan-out: from a policy import until every proxy acked it, with 1 real Envoy and 100 or
1,000 simulated ones on one XdsServer.

    .venv/bin/python bench/xds_fanout.py           # full run, a few minutes
    .venv/bin/python bench/xds_fanout.py --quick   # small sizes, < 60 s, for smoke use

Prints a table and writes bench/results/xds_fanout.json (--quick: xds_fanout-quick.json).
Progress goes to stderr. See bench/README.md for what is measured.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ads_load import AdsLoad  # noqa: E402
from synthetic_cluster import make_cluster, make_policies, policies_text  # noqa: E402

from cilia.envoy.bootstrap import build_bootstrap, to_json  # noqa: E402
from cilia.netutil import free_port  # noqa: E402
from cilia.envoy.supervisor import EnvoySupervisor  # noqa: E402
from cilia.envoy.translate import PortMapping, prefixes_by_identity, translate_ingress  # noqa: E402
from cilia.policy import Endpoint, PolicyEngine, parse_text  # noqa: E402
from cilia.policy.model import Policy  # noqa: E402
from cilia.xds import CLUSTER, LISTENER, AckTracker, Cache, TypeChange, Update, XdsServer  # noqa: E402

RESULTS = HERE / "results" / "xds_fanout.json"
QUICK_RESULTS = HERE / "results" / "xds_fanout-quick.json"
TARGET_S = 2.0  # the target: 1,000 proxies acked within 2 s of an import
ENVOY_NODE = "envoy-0"


@dataclass(frozen=True, slots=True)
class Config:
    clients: tuple[int, ...]  # simulated proxies, besides the real Envoy
    policies: tuple[int, ...]
    endpoints: int
    reps: int
    processes: int  # load generator processes


FULL = Config(clients=(100, 1000), policies=(10, 1000), endpoints=200, reps=3, processes=2)
QUICK = Config(clients=(100,), policies=(10, 100), endpoints=40, reps=2, processes=2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class Rig:
    """One XdsServer (a UNIX socket for the real Envoy, TCP for the simulated ones), one Envoy,
    the engine holding the synthetic cluster, and ``clients`` simulated proxies.

    Proxy k serves endpoint k mod E (its node view holds that endpoint's listeners and clusters),
    so every proxy has something to receive and the resources stay per-endpoint sized."""

    def __init__(self, clients: int, n_endpoints: int, processes: int, workdir: Path) -> None:
        self.cluster = make_cluster(n_endpoints)
        # The real Envoy serves an endpoint with HTTP ports, on loopback ports it can bind.
        eps = sorted(self.cluster.endpoints, key=lambda e: not any(p == 8080 for _, p, _ in e.named_ports))
        self.endpoints: list[Endpoint] = eps
        self.local_ports = {p: free_port() for _, p, _ in eps[0].named_ports}
        self.engine = PolicyEngine()
        with self.engine.batch():
            for ep in eps:
                self.engine.upsert_endpoint(ep)
        self.cache, self.tracker = Cache(), AckTracker()
        self.nodes = [ENVOY_NODE] + [f"sim-{i}" for i in range(1, clients + 1)]
        self.server = XdsServer(self.cache, self.tracker, max_streams=len(self.nodes) + 64)
        self.workdir = workdir
        self.processes = processes
        self.envoy: EnvoySupervisor | None = None
        self.load: AdsLoad | None = None

    def translate(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[str]]]:
        prefixes = prefixes_by_identity(self.engine.ipcache.items())
        listeners: dict[str, Any] = {}
        clusters: dict[str, Any] = {}
        names: dict[str, list[str]] = {}
        for i, ep in enumerate(self.endpoints):
            ports = sorted({p for _, p, _ in ep.named_ports}) or [80]
            if i == 0:
                maps = [PortMapping(p, self.local_ports[p], p) for p in ports]
                listen = "127.0.0.1"
            else:
                maps = [PortMapping.same(p) for p in ports]
                listen = str(ep.ips[0])
            res = translate_ingress(ep.name, self.engine.endpoint_policy(ep.name).map_state.ingress, maps,
                                    listen, "127.0.0.1", prefixes)
            listeners.update((li.name, li) for li in res.listeners)
            clusters.update((c.name, c) for c in res.clusters)
            names[ep.name] = [li.name for li in res.listeners] + [c.name for c in res.clusters]
        return listeners, clusters, names

    def publish(self, listeners: dict[str, Any], clusters: dict[str, Any]) -> Update:
        return self.cache.update_many({CLUSTER: TypeChange(clusters, replace=True),
                                       LISTENER: TypeChange(listeners, replace=True)})

    def wait_all(self, up: Update, timeout: float = 120) -> None:
        for node in self.nodes:
            self.tracker.wait(node, LISTENER, up.versions[LISTENER], timeout)
            self.tracker.wait(node, CLUSTER, up.versions[CLUSTER], timeout)

    @contextmanager
    def running(self) -> Iterator[Rig]:
        listeners, clusters, names = self.translate()
        for k, node in enumerate(self.nodes):
            ep = self.endpoints[k % len(self.endpoints)]
            self.cache.set_node_view(node, LISTENER, [n for n in names[ep.name] if n in listeners])
            self.cache.set_node_view(node, CLUSTER, [n for n in names[ep.name] if n in clusters])
        up = self.publish(listeners, clusters)
        sock = f"unix:{self.workdir}/xds.sock"
        self.server.add_address(sock)
        port = self.server.add_address("127.0.0.1:0", insecure=True)  # loopback clients of this benchmark
        self.server.start()
        try:
            admin = f"127.0.0.1:{free_port()}"
            bootstrap = self.workdir / "bootstrap.json"
            bootstrap.write_text(to_json(build_bootstrap(ENVOY_NODE, sock, admin)), encoding="utf-8")
            self.envoy = EnvoySupervisor(bootstrap, admin, log_path=self.workdir / "envoy.log",
                                         extra_args=["--drain-time-s", "0"])
            self.envoy.start()
            self.tracker.wait(ENVOY_NODE, LISTENER, up.versions[LISTENER], 30)
            self.load = AdsLoad(f"127.0.0.1:{port}", self.nodes[1:], processes=self.processes).start()
            self.load.wait_ready(300)
            self.wait_all(up)
            yield self
        finally:
            if self.load is not None:
                self.load.stop()
            if self.envoy is not None:
                self.envoy.stop()
            self.server.stop(0)

    def change(self, mutate: Any) -> dict[str, Any]:
        """Time one change: ``mutate()`` on the engine, translation, cache update, all acked."""
        assert self.load is not None
        gc.collect()
        _, before = self.load.report({})
        cpu0, t0 = time.process_time(), time.monotonic()
        mutate()
        t_engine = time.monotonic()
        listeners, clusters, _ = self.translate()
        t_translate, cpu_translate = time.monotonic(), time.process_time()
        up = self.publish(listeners, clusters)
        t_cache = time.monotonic()
        self.wait_all(up)
        t_done, cpu_done = time.monotonic(), time.process_time()
        acks, after = self.load.report({LISTENER: up.versions[LISTENER]})
        # Fan-out starts at the cache update: notifying 1,000 streams already competes for the GIL
        # with the streams that woke first, so the update call alone says little.
        lat = [t[LISTENER] - t_translate for t in acks.values() if t[LISTENER] is not None]
        return {
            "engine_ms": (t_engine - t0) * 1e3,
            "translate_ms": (t_translate - t_engine) * 1e3,
            "cache_ms": (t_cache - t_translate) * 1e3,
            "fanout_ms": (t_done - t_translate) * 1e3,
            "total_ms": (t_done - t0) * 1e3,
            "server_cpu_ms": (cpu_done - cpu0) * 1e3,
            "fanout_cpu_ms": (cpu_done - cpu_translate) * 1e3,
            "pushed_clients": len(lat),
            "client_ack_p50_ms": pct(lat, 0.5) * 1e3,
            "client_ack_p99_ms": pct(lat, 0.99) * 1e3,
            "client_ack_max_ms": max(lat, default=float("nan")) * 1e3,
            "responses": after["responses"] - before["responses"],
            "bytes": after["bytes"] - before["bytes"],
            "listeners": len(listeners),
            "errors": len(after["errors"]),
        }


def run_case(clients: int, policy_sets: dict[int, list[Policy]], cfg: Config) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cilia-fanout-") as tmp:
        rig = Rig(clients, cfg.endpoints, cfg.processes, Path(tmp))
        t = time.monotonic()
        with rig.running():
            log(f"  {clients} clients connected and acked in {time.monotonic() - t:.1f} s")
            for n, policies in policy_sets.items():
                keys = [p.key for p in policies]
                imports, removes = [], []
                for rep in range(cfg.reps):
                    imports.append(rig.change(functools.partial(rig.engine.apply, policies)))
                    removes.append(rig.change(functools.partial(rig.engine.delete, keys)))
                    log(f"  {clients} clients, {n} policies, rep {rep + 1}: import "
                        f"{imports[-1]['total_ms']:.0f} ms (fan-out {imports[-1]['fanout_ms']:.0f} ms), "
                        f"removal {removes[-1]['total_ms']:.0f} ms")
                out.append({"clients": clients, "proxies": clients + 1, "policies": n,
                            "endpoints": len(rig.endpoints), "import": summarize(imports),
                            "remove": summarize(removes), "import_samples": imports, "remove_samples": removes})
    return out


def summarize(samples: list[dict[str, Any]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "cilia"],
                                    capture_output=True, text=True, check=False).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {"nproc": os.cpu_count(), "python": platform.python_version(),
            "implementation": platform.python_implementation(), "platform": platform.platform(),
            "cilia_commit": commit, "cilia_dirty": dirty}


def render(report: dict[str, Any]) -> str:
    head = ("proxies", "policies", "engine", "translate", "cache", "fan-out", "total", "ack p50", "ack p99",
            "fan-out CPU", "CPU/proxy", "MB sent", "target")
    rows = []
    for r in report["results"]:
        m = r["import"]
        rows.append((
            f"{r['proxies']:,}", f"{r['policies']:,}", f"{m['engine_ms']:.0f}", f"{m['translate_ms']:.0f}",
            f"{m['cache_ms']:.0f}", f"{m['fanout_ms']:.0f}", f"{m['total_ms']:.0f}",
            f"{m['client_ack_p50_ms']:.0f}", f"{m['client_ack_p99_ms']:.0f}", f"{m['fanout_cpu_ms']:.0f}",
            f"{m['fanout_cpu_ms'] * 1e3 / r['proxies']:.0f} µs", f"{m['bytes'] / 1e6:.1f}",
            "met" if m["total_ms"] <= TARGET_S * 1e3 else "missed",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["Import of N policies until every proxy acked (medians, ms unless noted)",
             "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (< 60 s), for smoke use")
    ap.add_argument("--clients", type=int, action="append", help="simulated proxies (repeatable)")
    ap.add_argument("--output", type=Path, default=None,
                    help=f"JSON path (default {RESULTS.relative_to(HERE.parent)}, with --quick "
                         f"{QUICK_RESULTS.relative_to(HERE.parent)})")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.clients:
        cfg = Config(tuple(args.clients), cfg.policies, cfg.endpoints, cfg.reps, cfg.processes)
    output: Path = args.output or (QUICK_RESULTS if args.quick else RESULTS)
    started = time.perf_counter()
    cluster = make_cluster(cfg.endpoints)
    policy_sets: dict[int, list[Policy]] = {}
    for n in cfg.policies:
        parsed = parse_text(policies_text(make_policies(cluster, n)), "bench-policies.yaml")
        if parsed.problems:
            raise SystemExit(f"generated policies do not validate: {parsed.problems[:3]}")
        policy_sets[n] = parsed.policies
    report: dict[str, Any] = {
        "benchmark": "xds_fanout", "mode": "quick" if args.quick else "full", "machine": machine(),
        "target_s": TARGET_S, "config": asdict(cfg),
        "results": [],
    }
    for clients in cfg.clients:
        log(f"{clients} simulated proxies + 1 Envoy, {cfg.endpoints} endpoints")
        report["results"] += run_case(clients, policy_sets, cfg)
    report["wall_s"] = time.perf_counter() - started
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(render(report))
    print(f"\nwall time {report['wall_s']:.0f} s; JSON written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
