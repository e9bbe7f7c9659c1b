"""Commands about the cluster an agent with ``--kvstore`` belongs to: ``cilia node list|get``,
``cilia health status`` (each other node's answers to this node's probes) and ``cilia kvstore get
KEY`` / ``ls PREFIX`` (cilia's own keys, for debugging). All take ``-o json``."""

from __future__ import annotations

import click

from .common import call_agent, emit, fail, output_option, state_dir_option, table


@click.command("list")
@state_dir_option
@output_option
def node_list_cmd(state_dir: str, output: str) -> None:
    """List the cluster's nodes as announced in the kvstore."""
    payload = call_agent(state_dir, lambda c: c.nodes())
    emit(output, payload, lambda p: table(
        ["NAME", "NODE IP", "POD CIDR", "HEALTH IP", ""],
        [(n["name"], n["ip"] or "-", n["pod_cidr"] or "-", n["health_ip"] or "-", "(this node)" if n["local"] else "")
         for n in p["nodes"]]))


@click.command("get")
@click.argument("name")
@state_dir_option
@output_option
def node_get_cmd(name: str, state_dir: str, output: str) -> None:
    """One node as announced in the kvstore: its IP, pod CIDR and health address."""
    found = [n for n in call_agent(state_dir, lambda c: c.nodes())["nodes"] if n["name"] == name]
    if not found:
        fail(f"no node {name}")
    emit(output, found[0], lambda n: "\n".join(
        f"{k + ':':<11}{v}" for k, v in (("Name", n["name"] + (" (this node)" if n["local"] else "")),
                                          ("Node IP", n["ip"] or "-"), ("Pod CIDR", n["pod_cidr"] or "-"),
                                          ("Health IP", n["health_ip"] or "-"))))


def _ms(result: dict[str, object]) -> str:
    latency = result["latency_seconds"]
    if result["ok"] and isinstance(latency, (int, float)):
        return f"ok {latency * 1000:.2f}ms"
    return "FAIL"


def health_text(p: dict[str, object]) -> str:
    serving = p["serving"] or f"not served ({p['error']})"
    nodes = p["nodes"]
    assert isinstance(nodes, list)
    lines = [f"Node {p['node']}: health endpoint {serving}, {p['rounds']} probe round(s)"]
    lines.append(table(["NODE", "ADDRESS", "REACHABLE", "ICMP", "HTTP", "LAST ERROR"],
                       [(n["name"], n["address"], "yes" if n["reachable"] else "NO", _ms(n["icmp"]), _ms(n["http"]),
                         n["icmp"]["error"] or n["http"]["error"] or "-") for n in nodes])
                 if nodes else "(no other node announced)")
    return "\n".join(lines)


@click.command("status")
@state_dir_option
@output_option
def health_status_cmd(state_dir: str, output: str) -> None:
    """Whether every other node answered this node's last ICMP echo and HTTP probe, and how fast.
    Exits 1 if one did not."""
    payload = call_agent(state_dir, lambda c: c.cluster_health())
    emit(output, payload, health_text)
    if not all(n["reachable"] for n in payload["nodes"]):
        raise SystemExit(1)


def _entries(payload: dict[str, object]) -> str:
    entries = payload["entries"]
    assert isinstance(entries, list)
    return "\n".join(f"{e['key']} => {e['value']}" + (f"  (lease {e['lease']})" if e["lease"] else "")
                     for e in entries) or "(none)"


@click.command("get")
@click.argument("key")
@state_dir_option
@output_option
def kvstore_get_cmd(key: str, state_dir: str, output: str) -> None:
    """Print one key under cilia/ as the agent's kvstore holds it."""
    payload = call_agent(state_dir, lambda c: c.kvstore(key=key))
    if not payload["entries"] and output != "json":
        click.echo(f"error: no key {key}", err=True)
        raise SystemExit(1)
    emit(output, payload, _entries)


@click.command("ls")
@click.argument("prefix", default="cilia/")
@state_dir_option
@output_option
def kvstore_ls_cmd(prefix: str, state_dir: str, output: str) -> None:
    """Print every key under PREFIX (default cilia/) with its value."""
    payload = call_agent(state_dir, lambda c: c.kvstore(prefix=prefix))
    emit(output, payload, _entries)


def register(cli: click.Group) -> None:
    @cli.group("node")
    def node() -> None:
        """Nodes of the cluster (agents with --kvstore)."""

    node.add_command(node_list_cmd)
    node.add_command(node_get_cmd)

    @cli.group("health")
    def health() -> None:
        """Connectivity between the cluster's nodes (agents with --kvstore)."""

    health.add_command(health_status_cmd)

    @cli.group("kvstore")
    def kvstore() -> None:
        """Read cilia's keys in the kvstore (debugging)."""

    kvstore.add_command(kvstore_get_cmd)
    kvstore.add_command(kvstore_ls_cmd)


__all__ = ["register"]
