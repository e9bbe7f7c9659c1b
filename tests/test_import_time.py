"""`cilia` and `cilia-cni` start without loading the agent's heavy half.

Every `cilia-cni` call and every CLI command is a fresh interpreter, so what their entry modules
import at start is paid on each call (the daemon with grpc, Envoy's protos, bcc and
prometheus_client costs more than a second). `python -X importtime` lists every module an import
loads; this checks the list, not a timing.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# Top-level packages that must not load at start, and cilia modules that pull them in.
HEAVY = ("grpc", "envoy", "xds", "bcc", "prometheus_client")
HEAVY_CILIA = ("cilia.agent.daemon", "cilia.agent.api", "cilia.xds", "cilia.bpf.loader")


def imported(module: str) -> list[str]:
    """Every module ``import module`` loads in a fresh interpreter, in import order."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    names = []
    for line in res.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                names.append(name)
    assert module in names, f"{module} not in -X importtime's output: {res.stderr[-2000:]}"
    return names


def heavy(names: list[str]) -> list[str]:
    return [n for n in names if n.split(".")[0] in HEAVY
            or any(n == h or n.startswith(h + ".") for h in HEAVY_CILIA)]


@pytest.mark.parametrize("module", ["cilia.cli.main", "cilia.cni.plugin", "cilia.agent.client", "cilia.specs"])
def test_entry_module_loads_no_daemon_grpc_protos_bcc_or_prometheus(module: str) -> None:
    assert heavy(imported(module)) == []


def test_the_check_sees_the_daemon_when_it_is_imported() -> None:
    """The same check on the daemon itself finds what the entry modules must not load."""
    found = {n.split(".")[0] for n in heavy(imported("cilia.agent.daemon"))}
    assert {"grpc", "envoy", "prometheus_client"} <= found
