"""The layering of cilia's packages, read from the source with ast (nothing is imported).

- ``cilia.xds`` is a generic xDS server: it imports nothing else of cilia.
- ``cilia.l7parsers`` is sans-I/O parsers and their interface: no gRPC, no Envoy (protos or
  ``cilia.envoy``), no agent; the ext_proc host that feeds them lives in ``cilia.envoy``.
- ``cilia.policy`` is the engine: no agent, xDS, Envoy, BPF, Kubernetes, kvstore nor gRPC (the
  NetworkPolicy translation the watcher shares is ``cilia.policy.netpol``).
- ``cilia.specs`` is a leaf shared by the agent, its CLI, CNI and k8s: at most ``cilia.policy``.
- ``cilia.cli`` talks to the agent through its client and works offline with ``cilia.policy``;
  anything else is listed in CLI_ANYWHERE or CLI_INSIDE_COMMANDS with the reason.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cilia"

# What a CLI module may import at its top level.
CLI_ANYWHERE = {
    "cilia": "the package's __version__ (cilia --version)",
    "cilia.cli": "the CLI itself",
    "cilia.agent.client": "the agent's HTTP client: how client commands reach the agent",
    "cilia.specs": "endpoint and port specs, checked before they are sent to the agent",
    "cilia.policy": "offline validate and trace",
    "cilia.services.validate": "service flags checked before they are sent (the model and its checks, pure)",
    "cilia.services.model": "the service values --service files are read into (pure)",
    "cilia.bpf.paths": "the default --bpf-pin-dir shown in --help (constants only, no bcc)",
    "cilia.agent.flowquery": "cilia observe checks selectors and HTTP statuses before asking (pure Python)",
    "cilia.fqdn.config": "the --tofqdns-* defaults shown in cilia agent --help (constants only)",
}
# What a CLI module may import only inside a function, so that no other command pays for it.
CLI_INSIDE_COMMANDS = {
    "cilia.envoy.bootstrap": "cilia envoy bootstrap prints a bootstrap (Envoy's protos)",
    "cilia.agent.daemon": "cilia agent runs the agent in the CLI's process",
    "cilia.agent.api": "cilia agent serves the agent's REST API",
    "cilia.xds": "cilia agent reads the xDS server's mutual TLS files (--xds-tls-*)",
    "cilia.envoy.supervisor": "cilia agent reports why the managed Envoy did not start",
    "cilia.bpf.loader": "cilia agent checks that BPF is available for --datapath bpf",
    "cilia.k8s": "cilia agent --kubernetes runs the Kubernetes watcher",
    "cilia.agent.cleanup": "cilia bpf cleanup removes what an agent left on the node",
    "cilia.connectivity": "cilia connectivity test runs its servers and probes (in namespaces with BPF)",
    "cilia.agent.metrics": "cilia agent counts the warnings and errors it logs",
    "cilia.agent.metrics_server": "cilia agent serves /metrics and the probes' pages on TCP",
    "cilia.agent.cluster": "cilia agent --kvstore etcd builds the kvstore config it checks at start",
    "cilia.kvstore": "cilia agent reports a kvstore that cannot be reached (KVStoreError)",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. cilia.cli.main
    path: str  # its file, relative to the repository
    line: int
    name: str  # what it imports, absolute: cilia.policy.trace, grpc, envoy.config.core.v3
    in_function: bool

    def __str__(self) -> str:
        where = "inside a function" if self.in_function else "at module level"
        return f"{self.path}:{self.line}: {self.module} imports {self.name} ({where})"


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    """``name`` is a module or package under cilia/ (not an attribute of one)."""
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def imports_of(path: Path, source: str | None = None) -> list[Import]:
    """Every import in ``path`` with its target made absolute; ``from P import m`` also names
    ``P.m`` when that is a cilia module."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    found: list[Import] = []
    rel = str(path.relative_to(ROOT))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend(Import(module, rel, child.lineno, a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append(Import(module, rel, child.lineno, target, in_function))
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    if target.split(".")[0] == "cilia" and _is_module(sub):
                        found.append(Import(module, rel, child.lineno, sub, in_function))
            visit(child, inside)

    visit(tree, False)
    return found


def violation(imp: Import) -> str | None:
    """Why ``imp`` breaks the layering, or None."""
    m, name = imp.module, imp.name
    top = name.split(".")[0]
    if _within(m, ["cilia.xds"]):
        if top == "cilia" and not _within(name, ["cilia.xds"]):
            return "cilia.xds imports nothing else of cilia"
    if _within(m, ["cilia.l7parsers"]):
        if top in ("grpc", "envoy", "xds") or _within(name, ["cilia.envoy", "cilia.agent", "cilia.xds"]):
            return "cilia.l7parsers imports no gRPC, Envoy or agent (the host is in cilia.envoy)"
    if _within(m, ["cilia.dnsproxy"]):
        if top in ("grpc", "envoy", "xds", "bcc", "pyroute2") or _within(
                name, ["cilia.envoy", "cilia.agent", "cilia.xds", "cilia.bpf", "cilia.fqdn"]):
            return "cilia.dnsproxy imports no gRPC, Envoy, BPF, agent or toFQDNs (it is handed a learner)"
    if _within(m, ["cilia.policy"]):
        if top in ("grpc", "envoy", "xds", "bcc") or _within(
                name, ["cilia.agent", "cilia.xds", "cilia.envoy", "cilia.bpf", "cilia.k8s", "cilia.realizer",
                       "cilia.kvstore", "cilia.cluster", "cilia.cli", "cilia.cni"]):
            return "cilia.policy imports no agent, xDS, Envoy, BPF, Kubernetes, kvstore or gRPC"
    if m == "cilia.specs":
        if top == "cilia" and not _within(name, ["cilia.policy"]):
            return "cilia.specs is a leaf: it imports at most cilia.policy"
    if _within(m, ["cilia.cli"]) and top == "cilia":
        allowed_here = name in CLI_ANYWHERE or _within(name, ["cilia.cli", "cilia.policy"])
        if not allowed_here and not (imp.in_function and _within(name, CLI_INSIDE_COMMANDS)):
            if _within(name, CLI_INSIDE_COMMANDS):
                return "the CLI imports this only inside the command that needs it"
            return "the CLI imports only the agent client, specs, policy and what CLI_* list"
    if _within(m, ["cilia.cli"]) and top in ("grpc", "envoy", "xds", "bcc", "prometheus_client") \
            and not imp.in_function:
        return "the CLI loads no gRPC, Envoy protos, bcc or prometheus_client at start"
    return None


def all_imports() -> list[Import]:
    return [imp for path in sorted(PACKAGE.rglob("*.py")) for imp in imports_of(path)]


def test_the_packages_keep_their_layering() -> None:
    imports = all_imports()
    assert any(i.module == "cilia.cli.main" for i in imports)  # the walk found the source
    broken = [f"{imp}: {why}" for imp in imports if (why := violation(imp)) is not None]
    assert not broken, "import contract broken:\n" + "\n".join(broken)


@pytest.mark.parametrize(("path", "source", "expected"), [
    ("cilia/xds/cache.py", "from cilia.policy import PolicyEngine\n", "cilia.xds imports nothing else"),
    ("cilia/xds/cache.py", "from ..ring import SeqRing\n", "cilia.xds imports nothing else"),
    ("cilia/l7parsers/kafka.py", "import grpc\n", "cilia.l7parsers imports no gRPC"),
    ("cilia/l7parsers/kafka.py", "from ..envoy import metadata\n", "cilia.l7parsers imports no gRPC"),
    ("cilia/policy/engine.py", "from ..bpf import maps\n", "cilia.policy imports no agent"),
    ("cilia/policy/parse.py", "def f():\n    from ..k8s.convert import policy_text\n", "cilia.policy imports no agent"),
    ("cilia/specs.py", "from .agent import state\n", "cilia.specs is a leaf"),
    ("cilia/cli/main.py", "from ..agent.daemon import Agent\n", "only inside the command"),
    ("cilia/cli/main.py", "def f():\n    from ..bpf.node import NodeDatapath\n", "the CLI imports only"),
    ("cilia/cli/main.py", "import grpc\n", "the CLI loads no gRPC"),
])
def test_the_check_finds_a_broken_import(path: str, source: str, expected: str) -> None:
    found = [why for imp in imports_of(ROOT / path, source) if (why := violation(imp)) is not None]
    assert found and all(expected in why for why in found), found


def test_a_command_may_import_the_daemon_inside_its_function() -> None:
    source = "def agent_cmd():\n    from ..agent.daemon import Agent\n"
    assert [violation(i) for i in imports_of(ROOT / "cilia/cli/agent_cmds.py", source)] == [None]
