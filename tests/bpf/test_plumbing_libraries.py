"""Namespaces, links, routes and sysctls go through pyroute2 and BPF maps through libbcc: the
agent, the CNI plugin and the datapath spawn no ``ip``, ``nsenter`` or ``sysctl`` and issue no raw
syscalls (whose numbers differ between architectures). Checked on the source's syntax tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from tests.helpers import REPO

CHECKED = [REPO / "cilia" / "bpf", REPO / "cilia" / "cni", REPO / "cilia" / "agent", REPO / "cilia" / "demo.py",
           REPO / "cilia" / "demo_cluster.py"]
TOOLS = {"ip", "nsenter", "sysctl"}
SPAWNERS = {"run", "Popen", "call", "check_call", "check_output", "system", "popen", "create_subprocess_exec",
            "create_subprocess_shell", "execv", "execvp", "execvpe", "spawnv", "spawnvp"}
LOOKUPS = {"get", "pop", "setdefault"}  # d.get("ip") reads a field, it runs nothing


def _commands(call: ast.Call) -> set[str]:
    """Tool names passed as an argument that more arguments follow: a command line handed to a
    helper (``in_netns(path, "ip", "link", ...)``), not a field named "ip" (``entry(d, "ip")``)."""
    return {a.value for a in call.args[:-1] if isinstance(a, ast.Constant) and a.value in TOOLS}


def _tool(node: ast.AST) -> str | None:
    """The program a command names: the first word of a string, or a list/tuple's first item."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        word = node.value.split()[0] if node.value.split() else ""
        return word.rsplit("/", 1)[-1]
    if isinstance(node, ast.List | ast.Tuple) and node.elts:
        return _tool(node.elts[0])
    return None


def violations(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name == "syscall":
                found.append(f"{filename}:{node.lineno}: raw syscall()")
            elif name in SPAWNERS and node.args and _tool(node.args[0]) in TOOLS:
                found.append(f"{filename}:{node.lineno}: spawns {_tool(node.args[0])}")
            elif name in TOOLS:
                found.append(f"{filename}:{node.lineno}: calls an {name}() wrapper")
            elif name not in LOOKUPS and _commands(node):
                found.append(f"{filename}:{node.lineno}: hands a helper a command for {_commands(node)}")
        # a command kept aside and spawned later, e.g. a ("nsenter", "--net=...") wrapper
        if isinstance(node, ast.List | ast.Tuple) and len(node.elts) > 1 and _tool(node) in TOOLS:
            found.append(f"{filename}:{node.lineno}: command line for {_tool(node)}")
    return found


def _sources() -> list[Path]:
    out: list[Path] = []
    for where in CHECKED:
        out += sorted(where.rglob("*.py")) if where.is_dir() else [where]
    return out


def test_checked_sources_are_found() -> None:
    names = {p.name for p in _sources()}
    assert {"netns.py", "bpfmap.py", "plugin.py", "daemon.py", "demo.py"} <= names


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_ip_nsenter_sysctl_or_raw_syscall(path: Path) -> None:
    assert violations(path.read_text(encoding="utf-8"), str(path.relative_to(REPO))) == []


@pytest.mark.parametrize("snippet", [
    'subprocess.run(["ip", "link", "del", name], check=False)',
    'subprocess.run(["/usr/sbin/ip", "-n", ns, "addr"])',
    'subprocess.Popen(("nsenter", "--net=/run/netns/x", "true"))',
    'os.system("sysctl -w net.ipv4.ip_forward=1")',
    'wrapper = ("nsenter", f"--net={path}")',
    'libc.syscall(321, cmd, attr, size)',
    'ip("link", "show", "dev", name, check=False)',
    'in_netns(path, "ip", "-o", "link", "show")',
    'in_netns(path, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")',
])
def test_the_check_finds_each_kind(snippet: str) -> None:
    assert violations(snippet, "snippet.py")


def test_the_check_lets_other_commands_and_strings_pass() -> None:
    source = ('subprocess.run([sys.executable, "-m", "cilia"])\nd.get("ip")\nos.system("mount -t bpf bpf /x")\n'
              '_entry(result[family], family, "ip")\n')
    assert violations(source, "ok.py") == []
