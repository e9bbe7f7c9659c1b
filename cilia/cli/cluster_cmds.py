"""Commands about the cluster an agent with ``--kvstore`` belongs to: ``cilia node list`` and
``cilia kvstore get KEY`` / ``ls PREFIX`` (cilia's own keys, for debugging). All take ``-o json``."""

from __future__ import annotations

import click

from .common import call_agent, emit, output_option, state_dir_option, table


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

    @cli.group("kvstore")
    def kvstore() -> None:
        """Read cilia's keys in the kvstore (debugging)."""

    kvstore.add_command(kvstore_get_cmd)
    kvstore.add_command(kvstore_ls_cmd)


__all__ = ["register"]
