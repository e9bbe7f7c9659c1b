"""bench/cluster_scale.py at a tiny size (real etcd, two agents, simulated nodes in worker
processes, an agent process for the RSS): it runs end to end, every timed address arrives, and a
pod start costs node-a at most 4 etcd writes (the issue's bound; no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_benchmark_runs_and_a_pod_start_costs_at_most_four_writes(tmp_path: Path) -> None:
    out = tmp_path / "cluster_scale.json"
    res = subprocess.run([sys.executable, "-m", "bench.cluster_scale", "--nodes", "3,5", "--endpoints", "60",
                          "--adds", "4", "--remote", "300", "--out", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [s["nodes"] for s in data["stages"]] == [3, 5]
    for stage in data["stages"]:
        assert stage["adds"] == 4 and stage["p99_ms"] >= stage["p50_ms"] > 0
        assert 1 <= stage["etcd_writes_per_add"] <= 4, stage["requests"]
    assert data["rss"]["remote_endpoints"] == 300 and data["rss"]["rss_after_mib"] > 0
    assert "agent RSS" in res.stdout
