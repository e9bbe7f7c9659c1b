"""Endpoint add benchmark: the time of one ``endpoint add`` as the agent holds more endpoints.

    .venv/bin/python -m bench.endpoint_add                 # 10, 100, 1,000, 5,000 endpoints
    .venv/bin/python -m bench.endpoint_add --sizes 10,1000 --adds 5
    .venv/bin/python -m bench.endpoint_add --profile 1000  # where one add's time goes, at that size

An in-process agent in sidecar mode (xDS cache, L7 views, flow names, sidecar guard, state on
disk; no Envoy is started, so nothing waits for an ACK; the process enters a network namespace of
its own) is given N endpoints through its persisted state (one replay, not N adds), with policies
selecting them; then ``--adds`` more endpoints are added one at a time through
``Agent.add_endpoint`` and timed, alternately one of an app some policy names (the listeners that
name its identity must change: N/50 of them) and one of an app none names. The table shows each
size's median against the smallest's. Prints a table and writes bench/results/endpoint_add.json.
Numbers compare within one run only; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import json
import os
import platform
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cilia.agent.daemon import Agent, AgentConfig
from cilia.agent.state import AgentState, PolicySource, save_state
from cilia.policy import parse_text
from cilia.specs import EndpointSpec, PortSpec

HERE = Path(__file__).resolve().parent

RESULTS = HERE / "results" / "endpoint_add.json"
APPS = 50  # endpoints are spread over this many apps (label app=svcN)


def _spec(i: int, app: str | None = None) -> EndpointSpec:
    return EndpointSpec(f"ep-{i}", (f"app={app or f'svc{i % APPS}'}", "bench=endpoint-add"),
                        (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",), (PortSpec.parse("80:8080"),))


def _policy_text() -> str:
    """One policy per app: its ingress on 80 from the next app, HTTP GET only."""
    docs = []
    for n in range(APPS):
        docs.append(f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: svc{n}, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: svc{n}}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: svc{(n + 1) % APPS}}}}}]
    toPorts: [{{ports: [{{port: "80", protocol: TCP}}], rules: {{http: [{{method: GET, path: "/"}}]}}}}]
""")
    return "---\n".join(docs)


def _agent_with(state_dir: Path, n: int) -> Agent:
    text = _policy_text()
    loaded = parse_text(text, "bench.yaml")
    assert loaded.ok, loaded.problems
    state = AgentState(1, [PolicySource("bench.yaml", text, {p.key for p in loaded.policies})],
                       {s.name: s for s in map(_spec, range(n))})
    state_dir.mkdir(mode=0o700)
    save_state(state_dir, state)
    return Agent(AgentConfig(state_dir, envoy="external"))


def measure(n: int, adds: int, profile: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cilia-bench-endpoint-add-") as tmp:
        started = time.perf_counter()
        agent = _agent_with(Path(tmp) / "state", n)
        setup = time.perf_counter() - started
        times: dict[str, list[float]] = {"named": [], "unnamed": []}
        profiler = cProfile.Profile() if profile else None
        try:
            for k in range(adds):
                for kind in times:
                    # named: joins app svc0..49, whose identity one app's policy names (its listeners change);
                    # unnamed: an app of its own that no policy names
                    spec = _spec(n + 2 * k + (kind == "unnamed"), None if kind == "named" else f"solo{k}")
                    if profiler is not None:
                        profiler.enable()
                    t0 = time.perf_counter()
                    agent.add_endpoint(spec)
                    times[kind].append(time.perf_counter() - t0)
                    if profiler is not None:
                        profiler.disable()
        finally:
            agent.stop()
        if profiler is not None:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    return {"endpoints": n, "adds": adds, "setup_s": setup,
            **{f"{kind}_{stat}_ms": f(ts) * 1e3 for kind, ts in times.items()
               for stat, f in (("median", statistics.median), ("min", min), ("max", max))}}


def _own_network_namespace() -> None:
    """Run in a network namespace of this process's own: the agent's sidecar guard writes nftables
    rules for the benchmark's made-up addresses, which must not land on the machine's."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        raise SystemExit(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())} (run as root)")


def main() -> None:
    _own_network_namespace()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000,5000", help="endpoint counts, comma-separated")
    parser.add_argument("--adds", type=int, default=9, help="endpoint adds timed at each size")
    parser.add_argument("--profile", type=int, metavar="N", help="profile the adds at N endpoints instead")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.profile:
        measure(args.profile, args.adds, profile=True)
        return
    rows = [measure(int(n), args.adds) for n in args.sizes.split(",")]
    print("one endpoint add, median ms (x the smallest size); named: its identity is named by one app's policy,")
    print("so that app's endpoints' listeners are translated again (1/50 of all); unnamed: no policy names it")
    print(f"{'endpoints':>9} | {'named':>17} | {'unnamed':>17} | setup s")
    print("-" * 60)
    for r in rows:
        for kind in ("named", "unnamed"):
            r[f"{kind}_ratio"] = r[f"{kind}_median_ms"] / rows[0][f"{kind}_median_ms"]
        print(f"{r['endpoints']:>9,} | {r['named_median_ms']:>8.1f} ({r['named_ratio']:>5.2f}x) | "
              f"{r['unnamed_median_ms']:>8.1f} ({r['unnamed_ratio']:>5.2f}x) | {r['setup_s']:.1f}")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "endpoint_add", "python": platform.python_version(),
                                    "cpus": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
