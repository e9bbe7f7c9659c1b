"""Policy resolution benchmark: a full resolution, how it scales, and the cost
of one incremental change.

    .venv/bin/python -m bench.policy_resolution           # 1,000 rules x 10,000 endpoints
    .venv/bin/python -m bench.policy_resolution --quick   # small sizes, smoke use

Prints a table and writes bench/results/policy_resolution.json. Numbers compare
within one run only (machines are noisy); nothing here asserts a timing.

Time and memory are measured in separate runs: tracemalloc slows allocation-heavy
code several times over, so timed runs never trace.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cilia.policy import Change, Endpoint, Label, Policy, PolicyEngine, parse_text
from bench.synthetic_cluster import (
    App,
    Cluster,
    GeneratedPolicy,
    clusterwide_variant,
    l4_policy,
    labelset,
    make_cluster,
    make_policies,
    pod_address,
    policies_text,
)

HERE = Path(__file__).resolve().parent

TARGET_MS = 10.0
LINEAR_EXPONENT = 1.15  # a fitted exponent up to this reads as "linear" (noise allowance)
RESULTS = HERE / "results" / "policy_resolution.json"
QUICK_RESULTS = HERE / "results" / "policy_resolution-quick.json"


SCALES = (0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Variant:
    """One cluster shape, resolved at ``SCALES`` x (rules, endpoints), then changed
    incrementally at full scale."""

    name: str
    description: str
    rules: int
    endpoints: int
    per_pod_identity: bool = False
    clusterwide: bool = True  # include the broad CCNPs
    reps: int = 50  # samples of each incremental change
    heavy_reps: int = 3  # samples of the clusterwide change


FULL = (
    Variant("shared", "pods of an app share labels (one identity per app), with ~1% clusterwide policies",
            1000, 10_000),
    Variant("namespaced-only", "as shared, without the clusterwide policies (every peer selector is "
            "namespace-local)", 1000, 10_000, clusterwide=False),
    # Every pod its own identity: map states grow with endpoints x identities, so 1/10 of the size.
    Variant("per-pod", "every pod its own identity (a pod-unique label), with ~1% clusterwide policies",
            100, 1000, per_pod_identity=True, reps=10, heavy_reps=1),
)
QUICK = (
    Variant(FULL[0].name, FULL[0].description, 100, 1000, reps=10, heavy_reps=3),
    Variant(FULL[1].name, FULL[1].description, 100, 1000, clusterwide=False, reps=10),
    Variant(FULL[2].name, FULL[2].description, 10, 100, per_pod_identity=True, reps=5, heavy_reps=1),
)


# --------------------------------------------------------------- full resolution


@dataclass
class Resolution:
    """One full resolution: parse, apply + add endpoints, materialize map states."""

    variant: str
    rules: int
    endpoints: int
    identities: int
    parse_s: float
    resolve_s: float
    materialize_s: float
    entries: int  # map-state entries summed over every endpoint (one policy map each)
    distinct_entries: int  # entries of distinct map states (endpoints sharing one count once)
    distinct_map_states: int
    peak_mb: float | None = None  # tracemalloc, building the engine + every map state
    retained_mb: float | None = None  # what stays allocated afterwards (the engine)

    @property
    def total_s(self) -> float:
        return self.resolve_s + self.materialize_s

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["total_s"] = self.total_s
        out["us_per_endpoint"] = self.total_s / self.endpoints * 1e6
        out["ns_per_rule_x_endpoint"] = self.total_s / (self.rules * self.endpoints) * 1e9
        out["us_per_entry"] = self.total_s / max(1, self.entries) * 1e6
        if self.retained_mb is not None:
            out["bytes_per_distinct_entry"] = self.retained_mb * 1e6 / max(1, self.distinct_entries)
        return out


def parse_policies(text: str) -> list[Policy]:
    result = parse_text(text, "bench-policies.yaml")
    if result.problems:
        raise SystemExit("generated policies do not validate:\n"
                         + "\n".join(str(p) for p in result.problems[:10]))
    return result.policies


def build_engine(policies: list[Policy], cluster: Cluster) -> PolicyEngine:
    engine = PolicyEngine()
    with engine.batch():
        engine.apply(policies)
        for ep in cluster.endpoints:
            engine.upsert_endpoint(ep)
    return engine


def materialize(engine: PolicyEngine, cluster: Cluster) -> tuple[int, int, int]:
    """Every endpoint's map state; returns (entries, distinct entries, distinct map states)."""
    entries = 0
    seen: dict[int, int] = {}  # id(map state) -> entries; endpoints of one identity share one
    for ep in cluster.endpoints:
        ms = engine.endpoint_policy(ep.name).map_state
        n = seen.get(id(ms))
        if n is None:
            n = seen[id(ms)] = len(ms)
        entries += n
    return entries, sum(seen.values()), len(seen)


def resolve_once(variant: Variant, scale: float, *, memory: bool,
                 keep: bool = False) -> tuple[Resolution, PolicyEngine | None, Cluster, list[GeneratedPolicy]]:
    """One full resolution, timed; with ``memory``, first a traced run of the same."""
    n_rules, n_endpoints = max(1, round(variant.rules * scale)), max(1, round(variant.endpoints * scale))
    cluster = make_cluster(n_endpoints, per_pod_identity=variant.per_pod_identity)
    generated = make_policies(cluster, n_rules, clusterwide=variant.clusterwide)
    text = policies_text(generated)
    gc.collect()
    t0 = time.perf_counter()
    policies = parse_policies(text)
    parse_s = time.perf_counter() - t0
    peak_mb = retained_mb = None
    if memory:
        peak_mb, retained_mb = measure_memory(policies, cluster)
    gc.collect()
    t0 = time.perf_counter()
    engine = build_engine(policies, cluster)
    resolve_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    entries, distinct, states = materialize(engine, cluster)
    materialize_s = time.perf_counter() - t0
    res = Resolution(variant.name, len(policies), len(cluster.endpoints), cluster.identities(),
                     parse_s, resolve_s, materialize_s, entries, distinct, states, peak_mb, retained_mb)
    if not keep:
        del engine
        gc.collect()
        return res, None, cluster, generated
    return res, engine, cluster, generated


def measure_memory(policies: list[Policy], cluster: Cluster) -> tuple[float, float]:
    """(peak, retained) MB of building the engine and every map state, traced.

    The parsed policies and endpoints exist before tracing starts: they are
    input, not engine state."""
    gc.collect()
    engine: PolicyEngine | None = None
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        engine = build_engine(policies, cluster)
        materialize(engine, cluster)
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        return (peak - base) / 1e6, (current - base) / 1e6
    finally:
        tracemalloc.stop()
        del engine
        gc.collect()


# ------------------------------------------------------------------ scaling


def growth_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): y ~ x^k."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def scaling_summary(points: list[Resolution], scales: tuple[float, ...]) -> dict[str, Any]:
    s = list(scales)
    summary: dict[str, Any] = {
        "scales": s,
        "points": [p.to_json() for p in points],
        "exponent_vs_size": {
            "total_s": growth_exponent(s, [p.total_s for p in points]),
            "resolve_s": growth_exponent(s, [p.resolve_s for p in points]),
            "materialize_s": growth_exponent(s, [p.materialize_s for p in points]),
            "parse_s": growth_exponent(s, [p.parse_s for p in points]),
            "entries": growth_exponent(s, [float(p.entries) for p in points]),
            "identities": growth_exponent(s, [float(p.identities) for p in points]),
        },
        "exponent_vs_entries": {
            "total_s": growth_exponent([float(p.entries) for p in points], [p.total_s for p in points]),
        },
    }
    if all(p.retained_mb is not None for p in points):
        summary["exponent_vs_size"]["retained_mb"] = growth_exponent(
            s, [p.retained_mb or 0.0 for p in points])
    k = summary["exponent_vs_size"]["total_s"]
    summary["linear"] = k is not None and k <= LINEAR_EXPONENT
    return summary


def run_series(variant: Variant, memory: bool, log: Callable[[str], None]
               ) -> tuple[dict[str, Any], PolicyEngine, Cluster, list[GeneratedPolicy], Resolution]:
    """Full resolutions at every scale; the engine of the last (full) one is kept."""
    points: list[Resolution] = []
    engine: PolicyEngine | None = None
    cluster: Cluster | None = None
    policies: list[GeneratedPolicy] = []
    for s in SCALES:
        last = s == SCALES[-1]
        r, e, c, p = resolve_once(variant, s, memory=memory, keep=last)
        log(f"  {variant.name:15} x{s:<5} {r.rules:>5} rules {r.endpoints:>6} endpoints "
            f"{r.identities:>6} identities: resolve {r.resolve_s:7.2f} s, "
            f"materialize {r.materialize_s:7.2f} s, {r.entries:>10,} entries"
            + (f", peak {r.peak_mb:.0f} MB" if r.peak_mb is not None else ""))
        points.append(r)
        if last:
            engine, cluster, policies = e, c, p
    assert engine is not None and cluster is not None
    summary = scaling_summary(points, SCALES)
    summary["description"] = variant.description
    return summary, engine, cluster, policies, points[-1]


# -------------------------------------------------------------- incremental


class GCClock:
    """Time spent in the cyclic garbage collector (gc.callbacks)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.full = 0  # generation-2 collections
        self._start = 0.0

    def __enter__(self) -> GCClock:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start
            self.full += info["generation"] == 2


def p95(xs: list[float]) -> float:
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(sorted(xs), n=20, method="inclusive")[18]


@dataclass
class OpStats:
    """Samples of one kind of change: the engine call, the GC time inside it,
    and reading the new policy of every endpoint the change names."""

    op: str
    note: str
    samples_ms: list[float] = field(default_factory=list)
    gc_ms: list[float] = field(default_factory=list)
    read_ms: list[float] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        no_gc = [t - g for t, g in zip(self.samples_ms, self.gc_ms)]
        return {
            "op": self.op, "note": self.note, "reps": len(self.samples_ms),
            "median_ms": self.median, "p95_ms": self.p95, "max_ms": max(self.samples_ms),
            "p95_excluding_gc_ms": p95(no_gc), "gc_ms_total": sum(self.gc_ms),
            "read_changed_median_ms": statistics.median(self.read_ms),
            "endpoints_changed_median": statistics.median(self.changed),
            "meets_target": self.p95 < TARGET_MS,
            "samples_ms": self.samples_ms, "gc_ms": self.gc_ms,
        }

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p95(self) -> float:
        return p95(self.samples_ms)


class Incremental:
    """Timed single changes on a resolved engine.

    Each timed change is undone (untimed, unless the undo is itself a measured
    change) so every sample starts from the same cluster. A sample covers the
    engine call and reading the new policy of every endpoint it reports as
    changed (the engine resolves eagerly; reading only packages the result).
    """

    def __init__(self, engine: PolicyEngine, cluster: Cluster, generated: list[GeneratedPolicy],
                 seed: int = 3) -> None:
        self.engine = engine
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.apps = [a for a in cluster.apps if a.namespace != "kube-system"]
        self.multi = [a for a in self.apps if a.replicas > 1] or self.apps
        self.namespaced = [g for g in generated if g.subject is not None]
        self.policy = {p.name: p for p in engine.policies()}
        self.pods = {a: [ep for ep in cluster.endpoints if ep.name.startswith(f"{a.namespace}/{a.name}-")]
                     for a in self.apps}
        self.serial = 0
        self.next_ip = len(cluster.endpoints) + 1000
        self.gc = GCClock()

    def timed(self, stats: OpStats, change: Callable[..., Change], *args: Any) -> None:
        gc0 = self.gc.total
        t0 = time.perf_counter()
        result = change(*args)
        t1 = time.perf_counter()
        gc1 = self.gc.total
        for name in result.endpoints:
            try:
                self.engine.endpoint_policy(name)
            except KeyError:  # the endpoint was removed
                pass
        stats.samples_ms.append((t1 - t0) * 1e3)
        stats.gc_ms.append((gc1 - gc0) * 1e3)
        stats.read_ms.append((time.perf_counter() - t1) * 1e3)
        stats.changed.append(len(result.endpoints))

    def _new_pod(self, app: App, like: Endpoint | None = None, extra: dict[str, str] | None = None) -> Endpoint:
        """A new pod of ``app``: with the labels of ``like``, or fresh ones plus ``extra``."""
        self.serial += 1
        self.next_ip += 1
        name = f"{app.namespace}/{app.name}-bench-{self.serial}"
        if like is not None:
            return Endpoint(name, like.labels, (pod_address(self.next_ip),), like.named_ports)
        labels = app.labels() | (extra or {})
        if self.cluster.per_pod_identity:
            labels["k8s:statefulset.kubernetes.io/pod-name"] = f"{app.name}-bench-{self.serial}"
        return Endpoint(name, labelset(labels), (pod_address(self.next_ip),), app.named_ports)

    def _parse_one(self, text: str) -> Policy:
        [policy] = parse_policies(text)
        return policy

    def run(self, reps: int, heavy_reps: int) -> list[OpStats]:
        with self.gc:
            return self._run(reps, heavy_reps)

    def _run(self, reps: int, heavy_reps: int) -> list[OpStats]:
        e = self.engine
        add_same = OpStats("add endpoint, existing identity", "same labels as a running pod")
        rm_stay = OpStats("remove endpoint, identity stays", "other pods keep the identity")
        add_new = OpStats("add endpoint, new identity",
                          "app labels + version=canary-N: existing peer selectors select it")
        rm_gone = OpStats("remove endpoint, identity goes", "the last pod of its identity")
        add_rule = OpStats("add policy (new CNP, one app)", "L3/L4 ingress from an app of the namespace")
        replace_p = OpStats("replace policy (namespaced)", "same name, new content (L3/L4, other port)")
        delete_p = OpStats("delete policy (namespaced)", "an existing CNP (re-added untimed)")
        relabel = OpStats("change endpoint labels", "a running pod gets a new label: new identity")
        ccnp = OpStats("replace clusterwide policy", "selects every endpoint: O(cluster), for reference")
        for _ in range(reps):
            # endpoints
            if not self.cluster.per_pod_identity:
                app = self.rng.choice(self.multi)
                ep = self._new_pod(app, like=self.pods[app][0])
                self.timed(add_same, e.upsert_endpoint, ep)
                self.timed(rm_stay, e.remove_endpoint, ep.name)
            ep = self._new_pod(self.rng.choice(self.apps), extra={"k8s:version": f"canary-{self.serial}"})
            self.timed(add_new, e.upsert_endpoint, ep)
            self.timed(rm_gone, e.remove_endpoint, ep.name)
            # policies
            subject = self.rng.choice(self.apps)
            peer = self.rng.choice([a for a in self.apps if a.namespace == subject.namespace])
            self.serial += 1
            new = self._parse_one(l4_policy(f"bench-new-{self.serial}", subject, [peer], self.serial))
            self.timed(add_rule, e.apply, [new])
            e.delete([new.key])
            gen = self.rng.choice(self.namespaced)
            assert gen.subject is not None
            old = self.policy[gen.name]
            changed = self._parse_one(l4_policy(gen.name, gen.subject, gen.peers, self.serial + 7))
            self.timed(replace_p, e.apply, [changed])
            e.apply([old])
            old = self.policy[self.rng.choice(self.namespaced).name]
            self.timed(delete_p, e.delete, [old.key])
            e.apply([old])
            # relabel a running pod
            target = self.rng.choice(self.pods[self.rng.choice(self.multi)])
            moved = Endpoint(target.name, target.labels.with_label(Label("k8s", "rollout", "canary")),
                             target.ips, target.named_ports)
            self.timed(relabel, e.upsert_endpoint, moved)
            e.upsert_endpoint(target)
        baseline = self.policy.get("baseline-ingress-cluster")
        if baseline is not None:
            for i in range(heavy_reps):
                variant = self._parse_one(clusterwide_variant(i))
                self.timed(ccnp, e.apply, [variant])
            e.apply([baseline])
        # every change was undone: the engine holds the cluster it started with
        assert len(e) == len(self.cluster.endpoints) and len(e.policies()) == len(self.policy)
        ops = [add_same, rm_stay, add_new, rm_gone, add_rule, replace_p, delete_p, relabel, ccnp]
        return [op for op in ops if op.samples_ms]


# ------------------------------------------------------------------ report


def machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "cilia"],
                                    capture_output=True, text=True, check=False).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cilia_commit": commit,
        "cilia_dirty": dirty,
    }


def fmt_k(k: float | None) -> str:
    return "n/a" if k is None else f"{k:.2f}"


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    m = report["machine"]
    lines.append(f"policy resolution benchmark ({report['mode']}): {m['nproc']} CPUs, "
                 f"{m['implementation']} {m['python']}, cilia {m['cilia_commit'][:10]}"
                 + (" (+local changes)" if m["cilia_dirty"] else ""))
    lines.append("full resolution = parse; resolve (apply every policy and add every endpoint in one "
                 "batch()); materialize (read every endpoint's map state)")
    lines.append("entries = map-state entries summed over endpoints (one policy map each); distinct = "
                 "entries of distinct map states; MB = tracemalloc, separate run")
    for name, series in report["scaling"].items():
        lines.append("")
        lines.append(f"full resolution: {name}: {series['description']}")
        head = (f"{'scale':>5} {'rules':>5} {'endpoints':>9} {'idents':>6} {'parse s':>8} {'resolve s':>9} "
                f"{'mater. s':>8} {'total s':>8} {'us/ep':>7} {'ns/(r*ep)':>9} {'entries':>11} "
                f"{'distinct':>10} {'peak MB':>8} {'kept MB':>8}")
        lines.append(head)
        lines.append("-" * len(head))
        for s, p in zip(series["scales"], series["points"]):
            peak = "-" if p["peak_mb"] is None else f"{p['peak_mb']:.0f}"
            kept = "-" if p["retained_mb"] is None else f"{p['retained_mb']:.0f}"
            lines.append(
                f"{s:>5} {p['rules']:>5} {p['endpoints']:>9} {p['identities']:>6} {p['parse_s']:>8.2f} "
                f"{p['resolve_s']:>9.2f} {p['materialize_s']:>8.2f} {p['total_s']:>8.2f} "
                f"{p['us_per_endpoint']:>7.0f} {p['ns_per_rule_x_endpoint']:>9.1f} {p['entries']:>11,} "
                f"{p['distinct_entries']:>10,} {peak:>8} {kept:>8}")
        ex = series["exponent_vs_size"]
        lines.append(
            f"growth exponent vs size (time ~ scale^k; 1 = linear): total {fmt_k(ex['total_s'])} "
            f"(resolve {fmt_k(ex['resolve_s'])}, materialize {fmt_k(ex['materialize_s'])}, "
            f"parse {fmt_k(ex['parse_s'])}); entries {fmt_k(ex['entries'])}"
            + (f"; retained memory {fmt_k(ex['retained_mb'])}" if "retained_mb" in ex else ""))
        lines.append(f"  time vs map-state entries: k = {fmt_k(series['exponent_vs_entries']['total_s'])}; "
                     f"linear in size: {'yes' if series['linear'] else 'NO'}")
    for name, ops in report["incremental"].items():
        lines.append("")
        info = report["incremental_engine"][name]
        lines.append(f"incremental changes: {name} ({info['rules']} rules, {info['endpoints']} "
                     f"endpoints, {info['identities']} identities; target < {TARGET_MS:g} ms at p95)")
        head = (f"{'change':<34} {'reps':>4} {'median ms':>9} {'p95 ms':>8} {'max ms':>8} "
                f"{'p95 no-GC':>9} {'GC ms':>7} {'changed eps':>11} {'read ms':>8}  target")
        lines.append(head)
        lines.append("-" * len(head))
        for op in ops:
            mark = "ok" if op["meets_target"] else "MISSED"
            lines.append(f"{op['op']:<34} {op['reps']:>4} {op['median_ms']:>9.2f} {op['p95_ms']:>8.2f} "
                         f"{op['max_ms']:>8.2f} {op['p95_excluding_gc_ms']:>9.2f} {op['gc_ms_total']:>7.0f} "
                         f"{op['endpoints_changed_median']:>11.0f} {op['read_changed_median_ms']:>8.2f}  {mark}")
    lines.append("")
    lines.append("median/p95/max: the engine call; p95 no-GC: the same without cyclic-GC pauses; GC ms: "
                 "GC time summed over all samples; read ms: median time to fetch the new policy of "
                 "every changed endpoint (not in the target)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds), for smoke use")
    ap.add_argument("--no-memory", action="store_true", help="skip the traced (slower) memory runs")
    ap.add_argument("--variant", action="append", choices=[v.name for v in FULL],
                    help="run only this variant (repeatable; default: all)")
    ap.add_argument("--output", type=Path, default=None,
                    help=f"JSON path (default {RESULTS.relative_to(HERE.parent)}, with --quick "
                         f"{QUICK_RESULTS.relative_to(HERE.parent)})")
    args = ap.parse_args(argv)
    output: Path = args.output or (QUICK_RESULTS if args.quick else RESULTS)
    variants = [v for v in (QUICK if args.quick else FULL) if not args.variant or v.name in args.variant]
    memory = not args.no_memory
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "benchmark": "policy_resolution",
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "targets": {"incremental_p95_ms": TARGET_MS, "full_growth_exponent_max": LINEAR_EXPONENT},
        "variants": [v.__dict__ for v in variants],
        "scales": SCALES,
        "scaling": {},
        "incremental": {},
        "incremental_engine": {},
    }
    for variant in variants:
        log(f"{variant.name}: full resolutions up to {variant.rules} rules x {variant.endpoints} endpoints")
        summary, engine, cluster, policies, last = run_series(variant, memory, log)
        report["scaling"][variant.name] = summary
        log(f"{variant.name}: incremental changes")
        gc.collect()
        ops = Incremental(engine, cluster, policies).run(variant.reps, variant.heavy_reps)
        report["incremental"][variant.name] = [op.to_json() for op in ops]
        report["incremental_engine"][variant.name] = {"rules": last.rules, "endpoints": last.endpoints,
                                                      "identities": last.identities}
        del engine
        gc.collect()
    report["wall_s"] = time.perf_counter() - started
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(render(report))
    print(f"\nwall time {report['wall_s']:.0f} s; JSON written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
