"""Commands for the BPF datapath: ``cilia monitor``, ``cilia bpf policy get``, ``cilia bpf lb list``
and ``cilia cleanup``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from ..agent.client import AgentClient
from .common import call_agent, emit, fail, output_option, state_dir_option, table

EVENT_TYPES = ("drop", "policy-verdict", "trace")


def _peer(side: dict[str, Any]) -> str:
    labels = ",".join(side.get("labels", [])) or "unknown"
    return f"{side['identity']} ({side.get('endpoint') or labels})"


def event_line(e: dict[str, Any]) -> str:
    """One event the way ``cilium monitor`` prints it, with endpoint names and the deciding rule."""
    src, dst = e["source"], e["destination"]
    flow = (f"{src['address']}:{src['port']} -> {dst['address']}:{dst['port']} {e['protocol'].lower()}"
            if e["protocol"] in ("TCP", "UDP", "SCTP") else
            f"{src['address']} -> {dst['address']} {e['protocol'].lower()} type {dst['port']}")
    if e.get("service_frontend"):
        flow += f" (service {e['service_frontend']})"
    policy = f"{e['direction']} policy of {e['endpoint'] or 'endpoint ' + str(e['endpoint_id'])}"
    if e["type"] == "trace":
        where = e["endpoint"] or f"endpoint {e['endpoint_id']}"
        head = f"-> {e['observation_point']} ({where})" + (f" port {e['proxy_port']}" if e["proxy_port"] else "")
        return f"{e['time'][11:23]} {head}, identity {_peer(src)} -> {_peer(dst)}: {flow}, {e['length']} bytes"
    if e["type"] == "drop":
        head = f"xx drop ({e['reason_text'] or e['reason']}) by {policy}"
    else:
        head = f"-> policy-verdict {e['verdict']}" + (f" to proxy port {e['proxy_port']}" if e["proxy_port"] else "")
        head += f" by {policy}"
    return (f"{e['time'][11:23]} {head}, identity {_peer(src)} -> {_peer(dst)}: {flow}"
            + (f"; rule: {e['rule']}" if e["rule"] else ""))


@click.command("monitor")
@click.option("--type", "-t", "types", multiple=True, type=click.Choice(EVENT_TYPES),
              help="Only these event types (repeatable).")
@click.option("--related-to", help="Only events decided by this endpoint's policy or to/from it (endpoint name).")
@click.option("--last", type=click.IntRange(0), default=0, show_default=True,
              help="Print the newest N events already recorded, then stop (a snapshot; add --follow to go on).")
@click.option("--follow/--no-follow", "-f", default=None,
              help="Keep printing new events (the default without --last).")
@state_dir_option
@output_option
def monitor_cmd(types: Sequence[str], related_to: str | None, last: int, follow: bool | None, state_dir: str,
                output: str) -> None:
    """Stream the BPF datapath's drop, policy-verdict and trace events, decoded with identities,
    labels and the deciding rule, until Ctrl-C. Trace events (every packet passed) are emitted
    only while a monitor asks for them (no --type, or --type trace)."""
    def wanted(e: dict[str, Any]) -> bool:
        if types and e["type"] not in types:
            return False
        if related_to is not None:
            names = {e["endpoint"], e["source"].get("endpoint"), e["destination"].get("endpoint")}
            return related_to in names
        return True

    if follow is None:  # like hubble observe: --last N is a snapshot unless --follow
        follow = last == 0
    trace = not types or "trace" in types
    payload = call_agent(state_dir, lambda c: c.monitor(limit=last, trace=trace))
    seen = payload["last"]
    events = payload["events"] if last else []
    while True:
        for e in events:
            if wanted(e):
                click.echo(json.dumps(e) if output == "json" else event_line(e))
        sys.stdout.flush()
        if not follow:
            return
        payload = call_agent(state_dir, _events_after(seen, trace))
        seen = payload["last"]
        events = payload["events"]


def _events_after(seq: int, trace: bool) -> Callable[[AgentClient], Any]:
    return lambda c: c.monitor(since=seq, wait=10, trace=trace)


@click.command("get")
@click.argument("endpoint")
@state_dir_option
@output_option
def bpf_policy_get_cmd(endpoint: str, state_dir: str, output: str) -> None:
    """An endpoint's policy map in the kernel, like `cilium bpf policy get`: verdict, direction,
    identity, port/protocol, proxy port and the packets and bytes each entry matched."""
    payload = call_agent(state_dir, lambda c: c.bpf_policy(endpoint))
    emit(output, payload, lambda p: table(
        ["POLICY", "DIRECTION", "IDENTITY", "LABELS", "PORT/PROTO", "PROXY PORT", "BYTES", "PACKETS", "RULE"],
        [(r["verdict"].capitalize(), r["direction"].capitalize(), r["identity"] or "ANY",
          ",".join(r["labels"]) or ("reserved:all" if not r["identity"] else "-"), r["port"], r["proxy_port"] or "-",
          r["bytes"], r["packets"], r["rule"]) for r in p["entries"]]))


@click.command("list")
@state_dir_option
@output_option
def bpf_lb_list_cmd(state_dir: str, output: str) -> None:
    """The load balancer's maps in the kernel, like `cilium bpf lb list`: each service frontend
    with its backends (state, weight) and the connections, packets and bytes it balanced."""
    payload = call_agent(state_dir, lambda c: c.bpf_lb())
    rows = []
    for s in payload["services"]:
        front = f"{s['frontend']}/{s['protocol']}" + (f" ({s['name']})" if s["name"] else "")
        backends = [f"{b['address']} ({b['state']}, weight {b['weight']})" for b in s["backends"]] or ["-"]
        for i, b in enumerate(backends):
            rows.append((s["id"], front, s["type"], s["algorithm"], b, s["connections"], s["packets"], s["bytes"],
                         s["no_backend_drops"]) if i == 0 else ("", "", "", "", b, "", "", "", ""))
    emit(output, payload, lambda _: table(
        ["ID", "FRONTEND", "TYPE", "ALGORITHM", "BACKENDS", "CONNECTIONS", "PACKETS", "BYTES", "NO BACKEND"], rows))


@click.command("cleanup")
@state_dir_option
@output_option
def cleanup_cmd(state_dir: str, output: str) -> None:
    """With the agent stopped: remove its BPF programs, pinned maps, proxy route, the
    namespaces it created for endpoints and the sidecar guard's nftables tables (policies stay)."""
    from ..agent.cleanup import CleanupError, cleanup

    if not Path(state_dir).is_dir():
        fail(f"--state-dir {state_dir}: no such directory (no agent ran there)")
    try:
        done = cleanup(Path(state_dir).resolve())
    except (CleanupError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    emit(output, {"removed": list(done or [])}, lambda p: "\n".join(p["removed"] or ["nothing to remove"]))


def register(cli: click.Group) -> None:
    cli.add_command(monitor_cmd)
    cli.add_command(cleanup_cmd)

    @cli.group("bpf")
    def bpf() -> None:
        """The BPF datapath's maps."""

    @bpf.group("policy")
    def bpf_policy() -> None:
        """Endpoint policy maps."""

    bpf_policy.add_command(bpf_policy_get_cmd)

    @bpf.group("lb")
    def bpf_lb() -> None:
        """The service load balancer's maps."""

    bpf_lb.add_command(bpf_lb_list_cmd)
