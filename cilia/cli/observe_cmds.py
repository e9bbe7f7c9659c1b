"""``cilia observe``: the flows the agent recorded, filtered like ``hubble observe``."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import click

from ..agent.client import AgentClient
from .common import call_agent, state_dir_option

VERDICTS = ("FORWARDED", "DROPPED", "REDIRECTED", "AUDIT", "ERROR")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
COLUMNS = (("TIME", 12), ("VERDICT", 10), ("SOURCE", 34), ("DESTINATION", 34), ("TYPE", 9), ("SUMMARY", 0))


def since_time(text: str) -> float:
    """``5m``/``1h``/``30s``/``2d`` ago, or an ISO 8601 time, as a UNIX time."""
    m = _DURATION.match(text.strip())
    if m:
        return time.time() - float(m[1]) * _UNITS[m[2]]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise click.BadParameter(f"{text!r}: give a duration (30s, 5m, 1h, 2d) or an ISO 8601 time") from None


def _who(side: dict[str, Any]) -> str:
    name = side.get("endpoint") or ",".join(side["labels"][:2]) or "?"
    where = f"{side['address']}:{side['port']} " if side.get("address") else ""
    return f"{where}({name}, id {side['identity']})"


def summary(f: dict[str, Any]) -> str:
    """What the flow was: the request, or the L4 protocol and whose policy, and why it was dropped."""
    l7 = f.get("l7") or {}
    if f["kind"] == "http":
        what = f"http {l7.get('method')} {l7.get('host')}{l7.get('path')} -> {l7.get('status')}"
    elif f["kind"] == "l3/l4":
        what = f"{f['l4_protocol'].lower()} {f['direction']} policy"
        if f.get("proxy_port"):
            what += f" to proxy port {f['proxy_port']}"
    elif l7:  # a request an L7 parser decided
        what = f"{f['kind']} " + " ".join(f"{k}={v}" for k, v in l7.items() if v)
    else:
        what = f["kind"]
    if f.get("drop_reason"):
        what += f" ({f['drop_reason']})"
    return what


def flow_line(f: dict[str, Any]) -> str:
    """One flow as a line: time, verdict, both sides with identities, what it was, the rule."""
    rule = f"  rule: {f['rule']}" if f["rule"] else ""
    return f"{f['time'][11:23]} {f['verdict']:<10} {_who(f['source'])} -> {_who(f['destination'])} {summary(f)}{rule}"


def table_row(f: dict[str, Any]) -> str:
    cells = [f["time"][11:23], f["verdict"], _who(f["source"]), _who(f["destination"]), f["kind"],
             summary(f) + (f"  [{f['rule']}]" if f["rule"] else "")]
    return "  ".join(c.ljust(w) if w else c for c, (_, w) in zip(cells, COLUMNS))


@click.command("observe")
@click.option("--last", type=click.IntRange(1), default=20, show_default=True, help="Show the newest N flows.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new flows until Ctrl-C.")
@click.option("--from-label", "from_labels", multiple=True, help="Source has these labels (k=v,k2=v2; repeatable).")
@click.option("--to-label", "to_labels", multiple=True, help="Destination has these labels (k=v,...; repeatable).")
@click.option("--verdict", "verdicts", multiple=True, type=click.Choice(VERDICTS, case_sensitive=False),
              help="Only these verdicts (repeatable).")
@click.option("--protocol", "protocols", multiple=True,
              help="Only this kind (http, kafka, cassandra, memcache, l3/l4, ...) or L4 protocol (tcp, udp, icmp).")
@click.option("--since", "since", help="Only flows since then: a duration ago (30s, 5m, 1h) or an ISO 8601 time.")
@state_dir_option
@click.option("-o", "--output", type=click.Choice(["table", "json", "text"]), default="text", show_default=True,
              help="text: one line per flow; table: aligned columns; json: one object per line.")
def observe_cmd(last: int, follow: bool, from_labels: Sequence[str], to_labels: Sequence[str],
                verdicts: Sequence[str], protocols: Sequence[str], since: str | None, state_dir: str,
                output: str) -> None:
    """Print flows (newest last) the kernel, Envoy and the L7 parsers decided: verdict, both
    sides with identities and labels, the request, the drop reason and the rule (file:line)."""
    filters: dict[str, Any] = {"from_label": list(from_labels), "to_label": list(to_labels),
                               "verdict": [v.upper() for v in verdicts], "protocol": list(protocols)}
    if since:
        filters["since_time"] = since_time(since)
    if output == "table":
        click.echo("  ".join(name.ljust(w) if w else name for name, w in COLUMNS))
    payload = call_agent(state_dir, lambda c: c.flows(limit=last, **filters))
    while True:
        for f in payload["flows"]:
            click.echo(json.dumps(f) if output == "json" else table_row(f) if output == "table" else flow_line(f))
        if not follow:
            return
        time.sleep(1.0)
        payload = call_agent(state_dir, _newer_than(payload["last"], filters))


def _newer_than(seq: int, filters: dict[str, Any]) -> Callable[[AgentClient], Any]:
    return lambda c: c.flows(since=seq, **filters)
