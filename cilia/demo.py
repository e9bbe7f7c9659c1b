"""The Star Wars demo (``make demo``).

This stage of cilia has the policy engine only, so the demo validates Cilium's
Star Wars policies unchanged and traces each ship's request through them,
printing the verdict and the rule (file:line) that decided it. It exits
non-zero if any verdict differs from what Cilium's getting-started guide shows.
Later stages run the same steps against a real Envoy and the BPF datapath.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML

from .policy import HTTPRequest, LabelSet, Peer, Protocol, TraceRequest, load_paths, trace

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


def main() -> int:
    ships = ship_labels(EXAMPLES / "http-sw-app.yaml")
    print("cilia Star Wars demo (policy engine: trace mode; Envoy and BPF modes come in later stages)")
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
    print()
    if failures:
        print(f"demo FAILED: {failures} verdict(s) differ from Cilium's")
        return 1
    print("demo passed: every verdict matches Cilium's getting-started guide")
    return 0


if __name__ == "__main__":
    sys.exit(main())
