"""``cilia observe``: the flows the agent recorded, filtered and printed like ``hubble observe``.

Filters have Hubble's names and are applied by the agent (GET /v1/flows). Output: ``compact``
(one line per flow, Hubble's order, plus the deciding rule), ``dict`` (KEY: value blocks),
``table``, ``json`` (Hubble's export lines: ``{"flow": ..., "node_name", "time", "cilia": ...}``).
Bad input (an unknown format, a malformed selector, a time that is not one) is a one-line error
with exit code 2.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import click

from ..agent.client import AgentClient
from ..agent.flowquery import SelectorError, parse_http_status, parse_labels
from .common import call_agent, state_dir_option

VERDICTS = ("FORWARDED", "DROPPED", "REDIRECTED", "AUDIT", "ERROR", "TRACED")
TYPES = ("l7", "drop", "policy-verdict")
FORMATS = ("compact", "dict", "table", "json")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
COLUMNS = (("TIMESTAMP", 20), ("SOURCE", 36), ("DESTINATION", 36), ("TYPE", 16), ("VERDICT", 10), ("SUMMARY", 0))


def bad_input(option: str, message: str) -> NoReturn:
    """A one-line usage error (click's own would print the usage too), exit code 2."""
    click.echo(f"error: {option}: {message}", err=True)
    sys.exit(2)


def parse_time(text: str, option: str = "--since") -> float:
    """``5m``/``1h``/``30s``/``2d`` ago, or an ISO 8601 time, as a UNIX time."""
    m = _DURATION.match(text.strip())
    if m:
        return time.time() - float(m[1]) * _UNITS[m[2]]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        bad_input(option, f"{text!r}: give a duration (30s, 5m, 1h, 2d) or an ISO 8601 time")


# --- rendering (from Hubble's JSON) -----------------------------------------------------------------

def _time(line: dict[str, Any]) -> str:
    t = datetime.fromisoformat(line["flow"]["time"].replace("Z", "+00:00")).astimezone(UTC)
    return t.strftime("%b %d %H:%M:%S.%f")[:-3]


def side(ep: dict[str, Any] | None, ip: str, port: int) -> str:
    """One side as Hubble prints it: ``[ns/]pod:port (ID:n)``, or the address when no pod."""
    ep = ep or {}
    name = ep.get("pod_name", "")
    if name and ep.get("namespace"):
        name = f"{ep['namespace']}/{name}"
    who = name or ip or ",".join(ep.get("labels", [])[:2]) or "?"
    where = f"{who}:{port}" if port else who
    ident = ep.get("identity")
    return f"{where} (ID:{ident})" if ident is not None else where


def _ports(flow: dict[str, Any]) -> tuple[int, int]:
    for l4 in (flow.get("l4") or {}).values():
        return l4.get("source_port", 0), l4.get("destination_port", 0)
    return 0, 0


def sides(line: dict[str, Any]) -> tuple[str, str]:
    """Source and destination; through a service the destination is ``FRONTEND (svc NS/NAME) ->
    BACKEND``, the address the source used and where the load balancer sent it."""
    flow = line["flow"]
    ip = flow.get("IP") or {}
    sport, dport = _ports(flow)
    destination = side(flow.get("destination"), ip.get("destination", ""), dport)
    frontend = line.get("cilia", {}).get("service_frontend")
    if frontend:
        svc = flow.get("destination_service") or {}
        name = "/".join(x for x in (svc.get("namespace"), svc.get("name")) if x)
        destination = f"{frontend} (svc {name}) -> {destination}" if name else f"{frontend} -> {destination}"
    return side(flow.get("source"), ip.get("source", ""), sport), destination


def event_type(line: dict[str, Any]) -> str:
    """Hubble's type column: http-request, kafka-request, <protocol>-request, drop, policy-verdict."""
    flow = line["flow"]
    if flow["Type"] == "L7":
        kind = line.get("cilia", {}).get("kind", "l7")
        return f"{kind}-{(flow.get('l7') or {}).get('type', 'REQUEST').lower()}"
    return "drop" if flow["event_type"]["type"] == 1 else "policy-verdict"


def _rule(line: dict[str, Any]) -> str:
    return str(line.get("cilia", {}).get("rule", ""))


def compact(line: dict[str, Any]) -> str:
    """One flow as one line: time, both sides with identities, type, verdict, summary, rule."""
    src, dst = sides(line)
    flow = line["flow"]
    rule = f"  rule: {_rule(line)}" if _rule(line) else ""
    return f"{_time(line)}: {src} -> {dst} {event_type(line)} {flow['verdict']} ({flow['Summary']}){rule}"


flow_line = compact  # the name other commands know


def as_dict(line: dict[str, Any]) -> str:
    src, dst = sides(line)
    flow = line["flow"]
    rows = [("TIMESTAMP", _time(line)), ("SOURCE", src), ("DESTINATION", dst), ("TYPE", event_type(line)),
            ("VERDICT", flow["verdict"]), ("SUMMARY", flow["Summary"])]
    if _rule(line):
        rows.append(("RULE", _rule(line)))
    return "\n".join(f"{k:>11}: {v}" for k, v in rows) + "\n" + "-" * 12


def table_row(line: dict[str, Any]) -> str:
    src, dst = sides(line)
    flow = line["flow"]
    rule = f"  [{_rule(line)}]" if _rule(line) else ""
    cells = [_time(line), src, dst, event_type(line), flow["verdict"], flow["Summary"] + rule]
    return "  ".join(c.ljust(w) if w else c for c, (_, w) in zip(cells, COLUMNS))


RENDER: dict[str, Callable[[dict[str, Any]], str]] = {"compact": compact, "dict": as_dict, "table": table_row,
                                                      "json": json.dumps}


# --- the command ------------------------------------------------------------------------------------

def _check(values: Sequence[str], parse: Callable[[str], Any], option: str) -> list[str]:
    """Check values here too, so a bad one is a usage error before the agent is asked."""
    for v in values:
        try:
            parse(v)
        except (SelectorError, ValueError, re.error) as e:
            bad_input(option, str(e))
    return list(values)


def _number(upper: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) > upper:
            raise ValueError(f"{text!r} is not a number from 0 to {upper}")
        return int(text)
    return parse


def _one_of(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.upper() not in {c.upper() for c in choices}:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


def _pod(text: str) -> str:
    if text.count("/") > 1 or text.startswith("/") or text.endswith("/"):
        raise ValueError(f"{text!r} is not [namespace/]pod")
    return text


def _address(text: str) -> str:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    return text


def _format(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if value not in FORMATS:
        bad_input("-o", f"unknown output format {value!r} (use {', '.join(FORMATS)})")
    return value


@click.command("observe")
@click.option("--last", type=click.IntRange(1), default=20, show_default=True, help="Show the newest N flows.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new flows until Ctrl-C.")
@click.option("--since", help="Flows since then: a duration ago (30s, 5m, 1h) or an ISO 8601 time.")
@click.option("--until", help="Flows until then: a duration ago or an ISO 8601 time.")
@click.option("--pod", "pods", multiple=True, help="Either side is this pod ([namespace/]name prefix; repeatable).")
@click.option("--from-pod", "from_pods", multiple=True, help="The source is this pod ([namespace/]name).")
@click.option("--to-pod", "to_pods", multiple=True, help="The destination is this pod ([namespace/]name).")
@click.option("--namespace", "namespaces", multiple=True, help="Either side is in this namespace (repeatable).")
@click.option("--label", "-l", "labels", multiple=True, help="Either side matches this label selector "
              "(k=v,k!=v,k,!k,k in (a,b); each given one must match).")
@click.option("--from-label", "from_labels", multiple=True, help="The source matches this label selector.")
@click.option("--to-label", "to_labels", multiple=True, help="The destination matches this label selector.")
@click.option("--ip", "ips", multiple=True, help="Either side has this address (repeatable).")
@click.option("--port", "ports", multiple=True, help="Either side's port.")
@click.option("--identity", "identities", multiple=True, help="Either side's identity.")
@click.option("--verdict", "verdicts", multiple=True, help=f"Only these verdicts ({', '.join(VERDICTS)}; repeatable).")
@click.option("--type", "-t", "types", multiple=True, help=f"Only these event types ({', '.join(TYPES)}).")
@click.option("--protocol", "protocols", multiple=True,
              help="Only this kind (http, kafka, cassandra, memcache, dns, l3/l4...) or L4 protocol (tcp, udp, icmp).")
@click.option("--http-status", "http_status", multiple=True, help="HTTP status code (403) or class (4+).")
@click.option("--http-method", "http_methods", multiple=True, help="HTTP method (repeatable).")
@click.option("--http-path", "http_paths", multiple=True, help="HTTP path regular expression (repeatable).")
@state_dir_option
@click.option("-o", "--output", default="compact", show_default=True, callback=_format,
              help="compact: one line per flow; dict: KEY: value blocks; table: aligned columns; json: "
              "Hubble's JSON, one flow per line.")
def observe_cmd(last: int, follow: bool, since: str | None, until: str | None, pods: Sequence[str],
                from_pods: Sequence[str], to_pods: Sequence[str], namespaces: Sequence[str], labels: Sequence[str],
                from_labels: Sequence[str], to_labels: Sequence[str], ips: Sequence[str], ports: Sequence[str],
                identities: Sequence[str], verdicts: Sequence[str], types: Sequence[str], protocols: Sequence[str],
                http_status: Sequence[str], http_methods: Sequence[str], http_paths: Sequence[str],
                state_dir: str, output: str) -> None:
    """Print flows (newest last) the kernel, Envoy and the L7 parsers decided: both sides with
    identities, the verdict, the request, the drop reason and the rule (file:line)."""
    filters: dict[str, Any] = {
        "label": _check(labels, parse_labels, "--label"),
        "from_label": _check(from_labels, parse_labels, "--from-label"),
        "to_label": _check(to_labels, parse_labels, "--to-label"),
        "pod": _check(pods, _pod, "--pod"), "from_pod": _check(from_pods, _pod, "--from-pod"),
        "to_pod": _check(to_pods, _pod, "--to-pod"), "namespace": list(namespaces),
        "ip": _check(ips, _address, "--ip"),
        "port": _check(ports, _number(65535), "--port"),
        "identity": _check(identities, _number(2**32 - 1), "--identity"),
        "verdict": [v.upper() for v in _check(verdicts, _one_of(VERDICTS), "--verdict")],
        "type": [t.lower() for t in _check(types, _one_of(TYPES), "--type")], "protocol": list(protocols),
        "http_status": _check(http_status, parse_http_status, "--http-status"),
        "http_method": list(http_methods), "http_path": _check(http_paths, re.compile, "--http-path")}
    if since:
        filters["since_time"] = parse_time(since)
    if until:
        filters["until_time"] = parse_time(until, "--until")
    render = RENDER[output]
    if output == "table":
        click.echo("  ".join(name.ljust(w) if w else name for name, w in COLUMNS))
    payload = call_agent(state_dir, lambda c: c.flows(limit=last, **filters))
    while True:
        for f in payload["flows"]:
            click.echo(render(f))
        if not follow:
            return
        time.sleep(1.0)
        payload = call_agent(state_dir, _newer_than(payload["last"], filters))


def _newer_than(seq: int, filters: dict[str, Any]) -> Callable[[AgentClient], Any]:
    return lambda c: c.flows(since=seq, **filters)
