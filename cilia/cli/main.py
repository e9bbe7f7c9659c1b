"""The ``cilia`` command.

Exit codes follow the policy contract: ``policy validate`` 0 valid / 2 invalid;
``policy trace`` 0 allowed / 1 denied / 2 error.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Sequence
from typing import Any

import click

from .. import __version__
from ..policy import (
    DNSRequest,
    GenericL7Request,
    HTTPRequest,
    KafkaRequest,
    L7Request,
    LabelSet,
    Peer,
    PolicyError,
    Protocol,
    TraceRequest,
    ValidationError,
    default_registry,
    load_paths,
    trace,
)
from ..policy.l7 import kafka as l7kafka
from ..policy.parse import check_unique
from ..policy.trace import PROTOCOL_NAMES
from ..policy.trace import l7_request_json
from ..specs import PortSpec, StateError
from . import (bpf_cmds, bugtool_cmds, cluster_cmds, completion_cmds, connectivity_cmds, fqdn_cmds, observe_cmds,
               service_cmds)
from .agent_cmds import register
from .common import UsageError, call_agent, emit, output_option, policy_notes, state_dir_option

EXIT_ERROR = 2


class _Cli(click.Group):
    """The root group: a usage error (unknown option or format, a bad value) is one line on stderr
    with exit 2, naming the command's --help, instead of click's usage block."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # a group without its command: its help
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(EXIT_ERROR)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cilia")
def cli() -> None:
    """cilia: identity-aware L3-L7 network policy, the way Cilium does it."""


@cli.group()
def policy() -> None:
    """Validate and trace policy files; import, list, delete and wait for them in the agent."""


@policy.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@output_option
def validate_cmd(files: Sequence[str], output: str) -> None:
    """Validate policy FILES: exit 0 if all are valid, else print every problem
    (file:line: field: message) and exit 2."""
    results: list[dict[str, Any]] = []
    failed = False
    for path in files:
        res = load_paths([path])
        notes = policy_notes(res)
        failed |= bool(res.problems)
        results.append({
            "file": path,
            "valid": not res.problems,
            "policies": [{"kind": p.kind.value, "name": p.name, "namespace": p.namespace,
                          "rules": len(p.rules)} for p in res.policies],
            "skipped": [{"line": s.line, "kind": kind} for s, kind in res.skipped],
            "errors": [str(p) for p in res.problems],
            "notes": notes,
        })
    if output in ("json", "yaml"):
        emit(output, {"valid": not failed, "files": results}, str)
    else:
        for r in results:
            if r["valid"]:
                names = ", ".join(p["name"] for p in r["policies"]) or "no policies"
                skipped = f" (skipped non-policy kinds: {', '.join(s['kind'] for s in r['skipped'])})" \
                    if r["skipped"] else ""
                click.echo(f"{r['file']}: valid: {names}{skipped}")
                for n in r["notes"]:
                    click.echo(f"  note: {n}")
            else:
                for e in r["errors"]:
                    click.echo(e, err=True)
    if failed:
        sys.exit(EXIT_ERROR)


def _parse_labels(text: str, opt: str) -> LabelSet:
    try:
        labels = LabelSet.parse(text)
    except PolicyError as exc:
        raise UsageError(f"{opt}: {exc}") from exc
    if not len(labels):
        raise UsageError(f"{opt}: no labels given")
    return labels


def _parse_ip(text: str, opt: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise UsageError(f"{opt}: {text!r} is not an IP address") from exc


def _l7_request(http_method: str | None, http_path: str | None, http_host: str | None,
                http_headers: Sequence[str], kafka_api_key: str | None, kafka_api_version: int | None,
                kafka_client_id: str | None, kafka_topics: Sequence[str], l7: str | None,
                l7_fields: Sequence[str]) -> L7Request | None:
    kinds = [name for name, given in (
        ("--http-*", http_method or http_path or http_host or http_headers),
        ("--kafka-*", kafka_api_key or kafka_api_version is not None or kafka_client_id or kafka_topics),
        ("--l7", l7 or l7_fields)) if given]
    if len(kinds) > 1:
        raise UsageError(f"one L7 request at a time: {' and '.join(kinds)} were both given")
    if http_method or http_path or http_host or http_headers:
        if not http_method or not http_path:
            raise UsageError("an HTTP request needs --http-method and --http-path")
        headers = []
        for h in http_headers:
            name, sep, value = h.partition(":")
            if not sep or not name.strip():
                raise UsageError(f"--http-header {h!r}: expected 'Name: value'")
            headers.append((name.strip(), value.strip()))
        return HTTPRequest(http_method, http_path, http_host or "", tuple(headers))
    if kafka_api_key or kafka_api_version is not None or kafka_client_id or kafka_topics:
        if not kafka_api_key:
            raise UsageError("a Kafka request needs --kafka-api-key")
        try:
            api_key = l7kafka.parse_api_key(kafka_api_key)
        except ValueError as exc:
            raise UsageError(f"--kafka-api-key: {exc}") from exc
        return KafkaRequest(api_key, kafka_api_version or 0, kafka_client_id or "", tuple(kafka_topics))
    if l7 or l7_fields:
        if not l7:
            raise UsageError("--l7-field needs --l7 PROTO")
        fields: dict[str, str] = {}
        for item in l7_fields:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"--l7-field {item!r}: expected key=value")
            fields[key] = value
        if l7 == "dns":
            query = fields.get("name") or fields.get("query")
            if not query:
                raise UsageError("a DNS request needs --l7-field name=QUERY")
            return DNSRequest(query)
        if l7 in ("http", "kafka"):
            raise UsageError(f"use the --{l7}-* options for {l7} requests")
        proto = default_registry().get(l7)
        if proto is None:
            known = ", ".join(["dns", *default_registry().names()])
            raise UsageError(f"--l7: unknown L7 protocol {l7!r} (known: {known})")
        unknown = sorted(set(fields) - set(proto.request_fields))
        if unknown:
            raise UsageError(f"--l7-field: {l7} requests have fields {', '.join(proto.request_fields)}, "
                             f"not {', '.join(unknown)}")
        return GenericL7Request.of(l7, fields)
    return None


def _side(side: str, endpoint: str | None, labels: str | None, cidr: str | None, live: bool,
          fqdn: str | None = None) -> dict[str, Any]:
    """One side of a traced flow as the live trace API takes it: endpoint, labels, address or a
    learned DNS name."""
    flag = {"src": "--from-endpoint", "dst": "--to-endpoint"}[side]
    given = [x for x in (endpoint, labels, cidr, fqdn) if x is not None]
    if len(given) != 1:
        more = " (or --dst-fqdn)" if side == "dst" else ""
        raise UsageError(f"give exactly one of {flag}, --{side} or --{side}-cidr{more}")
    if fqdn is not None:
        if not live:
            raise UsageError("--dst-fqdn names a DNS name the running agent learned: omit --policy to trace "
                             "against it (or give its address with --dst-cidr)")
        return {"fqdn": fqdn}
    if endpoint is not None:
        if not live:
            raise UsageError(f"{flag} names an endpoint of the running agent: omit --policy to trace against it")
        return {"endpoint": endpoint}
    if labels is not None:
        return {"labels": _parse_labels(labels, f"--{side}").to_list()}
    assert cidr is not None
    return {"address": str(_parse_ip(cidr, f"--{side}-cidr"))}


def _named_ports(values: Sequence[str]) -> list[PortSpec]:
    specs = []
    for v in values:
        try:
            spec = PortSpec.parse(v)
        except StateError as e:
            raise UsageError(f"--dst-named-port: {e}") from None
        if not spec.name or spec.backend is not None:
            raise UsageError(f"--dst-named-port {v!r}: expected NAME=PORT[/PROTO], e.g. serve-80-tcp=80/TCP")
        specs.append(spec)
    return specs


@policy.command("trace")
@click.option("--policy", "policy_files", multiple=True, type=click.Path(dir_okay=False),
              help="Policy file (repeatable; CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or Kubernetes "
                   "NetworkPolicy). Without it: the running agent's policies and endpoints.")
@click.option("--from-endpoint", help="Source: an endpoint of the running agent (its labels).")
@click.option("--to-endpoint", help="Destination: an endpoint of the running agent (its labels and named ports).")
@click.option("--src", help="Source endpoint labels, k=v,k2=v2.")
@click.option("--src-cidr", help="Source address outside the cluster.")
@click.option("--dst", help="Destination endpoint labels, k=v,k2=v2.")
@click.option("--dst-cidr", help="Destination address outside the cluster.")
@click.option("--dst-fqdn", help="Destination: a DNS name the running agent learned (its first address; toFQDNs).")
@click.option("--service", "service_files", multiple=True, type=click.Path(dir_okay=False),
              help="With --policy: services (JSON or YAML, as `cilia service list -o json` prints them, or "
                   "one service, or a list; repeatable): toServices selects from them, and a --dst-cidr that is a "
                   "frontend (with --dport) is traced to the backend the load balancer would choose.")
@click.option("--dst-named-port", "dst_named_ports", multiple=True, metavar="NAME=PORT[/PROTO]",
              help="A named port the destination serves, what a policy's named port resolves to (repeatable; "
                   "added to a --to-endpoint's own).")
@click.option("--protocol", type=click.Choice(sorted(PROTOCOL_NAMES), case_sensitive=False),
              default="tcp", show_default=True)
@click.option("--dport", type=click.IntRange(0, 65535), help="Destination port (omit: every port).")
@click.option("--icmp-type", type=click.IntRange(0, 255), help="ICMP type (with --protocol icmp|icmpv6).")
@click.option("--http-method")
@click.option("--http-path")
@click.option("--http-host")
@click.option("--http-header", "http_headers", multiple=True, help="'Name: value' (repeatable).")
@click.option("--kafka-api-key", help="API key name or number.")
@click.option("--kafka-api-version", type=click.IntRange(0, 32767))
@click.option("--kafka-client-id")
@click.option("--kafka-topic", "kafka_topics", multiple=True, help="Topic (repeatable).")
@click.option("--l7", help="L7 protocol of an l7proto parser (cassandra, memcache, ...) or dns.")
@click.option("--l7-field", "l7_fields", multiple=True, help="key=value request field (repeatable).")
@click.option("--dns-query", help="A DNS query for NAME (the DNS rules judge it; use --dport 53 --protocol udp).")
@state_dir_option
@output_option
def trace_cmd(policy_files: Sequence[str], from_endpoint: str | None, to_endpoint: str | None, src: str | None,
              src_cidr: str | None, dst: str | None, dst_cidr: str | None, dst_named_ports: Sequence[str],
              service_files: Sequence[str], protocol: str, dport: int | None, icmp_type: int | None,
              http_method: str | None, http_path: str | None, http_host: str | None,
              http_headers: Sequence[str], kafka_api_key: str | None, kafka_api_version: int | None,
              kafka_client_id: str | None, kafka_topics: Sequence[str], l7: str | None,
              l7_fields: Sequence[str], dns_query: str | None, state_dir: str, output: str,
              dst_fqdn: str | None = None) -> None:
    """Trace a flow and explain the verdict: against policy files (--policy), or against the
    running agent's policies and endpoints (--from-endpoint/--to-endpoint, no --policy).

    The verdict combines the source's egress and the destination's ingress
    policy (a CIDR side is outside the cluster and has no policy of its own).
    Exit 0 when allowed, 1 when denied, 2 on error.
    """
    live = not policy_files
    if live and service_files:
        raise UsageError("--service goes with --policy: without it the running agent's own services are used")
    src_side = _side("src", from_endpoint, src, src_cidr, live)
    dst_side = _side("dst", to_endpoint, dst, dst_cidr, live, dst_fqdn)
    named = _named_ports(dst_named_ports)
    if named and "address" in dst_side:
        raise UsageError("--dst-named-port: the destination is an address (--dst-cidr), not an endpoint")
    proto = PROTOCOL_NAMES[protocol.lower()]
    if proto in (Protocol.ICMP, Protocol.ICMPV6):
        if dport is not None:
            raise UsageError("ICMP has no ports: use --icmp-type")
        port = icmp_type
    else:
        if icmp_type is not None:
            raise UsageError("--icmp-type needs --protocol icmp or icmpv6")
        port = dport
    if dns_query is not None:
        if l7 is not None or l7_fields:
            raise UsageError("--dns-query is the DNS request: do not combine it with --l7/--l7-field")
        l7, l7_fields = "dns", (f"name={dns_query}",)
    request = _l7_request(http_method, http_path, http_host, http_headers, kafka_api_key,
                          kafka_api_version, kafka_client_id, kafka_topics, l7, l7_fields)
    if request is not None and proto not in (Protocol.TCP, Protocol.UDP, Protocol.ANY):
        raise UsageError(f"an L7 request needs --protocol tcp (or udp for dns), not {protocol}")
    if live:
        body = {"source": src_side, "destination": dst_side, "protocol": protocol.lower(), "dport": port,
                "l7": l7_request_json(request), "destination_named_ports": [str(p) for p in named]}
        payload = call_agent(state_dir, lambda c: c.trace(body))
        text = payload.pop("text", "")
        emit(output, payload, lambda _: str(text))
        sys.exit(0 if payload.get("verdict") == "allowed" else 1)
    src_peer = _offline_peer(src_side, ())
    dst_peer = _offline_peer(dst_side, tuple((p.name or "", p.port, p.protocol) for p in named))
    res = load_paths(policy_files)
    try:
        if res.problems:
            raise ValidationError(res.problems)
        check_unique(res.policies)
        services = service_cmds.load_service_files(service_files) if service_files else None
        result = trace(res.policies, TraceRequest(src_peer, dst_peer, proto, port, request), services=services)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_ERROR)
    emit(output, result.to_json(), lambda _: result.render())
    sys.exit(0 if result.allowed else 1)


def _offline_peer(side: dict[str, Any], named: tuple[tuple[str, int, Protocol], ...]) -> Peer:
    if "labels" in side:
        return Peer(labels=LabelSet.parse(side["labels"]), named_ports=named)
    return Peer(address=ipaddress.ip_address(side["address"]))


@cli.group()
def envoy() -> None:
    """Envoy helpers."""


@envoy.command("bootstrap")
@click.option("--node-id", required=True, help="Envoy node id (the xDS server keys its views by it).")
@click.option("--xds-address", required=True, help="xDS server: HOST:PORT or unix:PATH.")
@click.option("--admin", "--admin-address", "admin_address", default="127.0.0.1:9901", show_default=True,
              help="Envoy admin listener: unix:PATH (an owner-only socket, mode 0600) or HOST:PORT "
                   "(reachable by every local user: the admin API can dump the policy, drain or stop Envoy).")
@click.option("--delta", is_flag=True, help="Use incremental (delta) ADS.")
@click.option("--xds-tls-cert", type=click.Path(dir_okay=False), help="Envoy's client certificate for a TCP xDS "
              "address (its subject CN must be the node id), with --xds-tls-key and --xds-tls-ca.")
@click.option("--xds-tls-key", type=click.Path(dir_okay=False), help="The key of --xds-tls-cert.")
@click.option("--xds-tls-ca", type=click.Path(dir_okay=False), help="The CA that signed the agent's certificate.")
@click.option("--output-file", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
def bootstrap_cmd(node_id: str, xds_address: str, admin_address: str, delta: bool, xds_tls_cert: str | None,
                  xds_tls_key: str | None, xds_tls_ca: str | None, output_file: str | None) -> None:
    """Print an Envoy bootstrap (JSON, which Envoy reads as YAML too) that takes
    its listeners and clusters from cilia over ADS (mutual TLS with --xds-tls-*)."""
    from pathlib import Path

    from ..envoy.bootstrap import XdsClientTls, build_bootstrap, to_json, write_bootstrap

    files = (xds_tls_cert, xds_tls_key, xds_tls_ca)
    if any(files) and not all(files):
        raise UsageError("--xds-tls-cert, --xds-tls-key and --xds-tls-ca go together")
    tls = XdsClientTls(*(Path(f).resolve() for f in files if f)) if all(files) else None
    try:
        bootstrap = build_bootstrap(node_id, xds_address, admin_address, delta=delta, xds_tls=tls)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if output_file:
        write_bootstrap(output_file, bootstrap)  # owner-only: it names the admin and xDS addresses
    else:
        click.echo(to_json(bootstrap))


register(cli, policy)
bpf_cmds.register(cli)
cluster_cmds.register(cli)
fqdn_cmds.register(cli)
service_cmds.register(cli)
cli.add_command(observe_cmds.observe_cmd)
cli.add_command(bugtool_cmds.bugtool_cmd)
completion_cmds.register(cli)
connectivity_cmds.register(cli)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="cilia", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)


if __name__ == "__main__":
    main()
