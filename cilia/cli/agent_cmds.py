"""Commands that run or talk to the agent: ``cilia agent``, ``status``, ``policy import|get|delete|wait``,
``endpoint add|list|delete``, ``identity list`` and ``observe``.

Every client command finds the agent's socket in ``--state-dir`` (or CILIA_STATE_DIR) and takes
``-o json``, which prints the API's answer unchanged. Exit codes: 0 done, 1 the agent refused or
the revision was not realized (the reason on stderr), 2 bad usage or no agent to talk to.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from ..policy import IdentityFileError
from ..specs import PortSpec, StateError
from ..bpf.paths import DEFAULT_PIN_DIR
from ..fqdn.config import DEFAULT_CT_IDLE, DEFAULT_GRACE, DEFAULT_MIN_TTL, FqdnConfig
from ..agent.client import AgentClient, APIError
from .common import (
    call_agent, emit, fail, label_filter, output_option, policy_notes, selector_option, state_dir_option, table,
)

# --- the agent itself ------------------------------------------------------------------------------

@click.command("agent")
@state_dir_option
@click.option("--xds-address", "xds_addresses", multiple=True,
              help="Also serve xDS here (HOST:PORT or unix:PATH); unix:<state-dir>/xds.sock is always served.")
@click.option("--envoy", "envoy_mode", type=click.Choice(["managed", "external", "none"]), default="managed",
              show_default=True, help="managed: run and supervise Envoy; external: Envoys connect to the xDS "
              "address; none: no proxy (policy is resolved only).")
@click.option("--node-id", default="cilia-node", show_default=True, help="Node id of the managed Envoy.")
@click.option("--datapath", type=click.Choice(["none", "bpf"]), default="none", show_default=True,
              help="bpf: enforce L3/L4 in the kernel on endpoint veths and redirect L7 ports to Envoy's "
              "transparent listeners (needs root); none: sidecar mode.")
@click.option("--bpf-pin-dir", default=DEFAULT_PIN_DIR, show_default=True,
              help="bpffs directory holding the datapath's maps (they outlive the agent).")
@click.option("--nodeport-device", "nodeport_devices", multiple=True, metavar="IFNAME",
              help="With --datapath bpf: a node-facing device where traffic from outside reaches NodePort "
              "services (load balanced in BPF, replies leave from the node's address). Repeatable.")
@click.option("--router-ip", help="Gateway address of endpoints the agent creates (--create-netns); added to lo "
              "if this node does not have it.")
@click.option("--flow-file", type=click.Path(dir_okay=False), help="Also append every flow to this file as JSON "
              "lines, rotated by size.")
@click.option("--flow-file-max-mb", type=click.IntRange(1), default=100, show_default=True)
@click.option("--flow-file-backups", type=click.IntRange(0), default=5, show_default=True)
@click.option("--l7-workers", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Run the Kafka/Cassandra/Memcached/plugin parsers in this many worker processes (0: in the "
              "agent's own process); Envoy spreads connections over them.")
@click.option("--l7-mode", type=click.Choice(["auto", "inproc", "extproc"]), default="auto", show_default=True,
              help="Where the Kafka/Cassandra/Memcached/plugin parsers run: inproc: inside Envoy (the cilia_l7 "
              "module, built by setup); extproc: in the agent behind network ext_proc; auto: inproc when the "
              "module is built for this Envoy, Envoy is managed and no --l7-workers are asked for.")
@click.option("--kubernetes", metavar="in-cluster|KUBECONFIG",
              help="Watch Pods, NetworkPolicy, CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy: in-cluster "
              "(the pod's service account) or a kubeconfig path ('default': $KUBECONFIG or ~/.kube/config).")
@click.option("--node-name", envvar="NODE_NAME", help="With --kubernetes: only the pods on this node "
              "(default: $NODE_NAME, else the host name).")
@click.option("--xds-tls-cert", type=click.Path(dir_okay=False), help="PEM certificate of the xDS server on "
              "TCP --xds-address (with --xds-tls-key and --xds-tls-ca): mutual TLS, the client certificate's "
              "subject CN is the node id it may speak for.")
@click.option("--xds-tls-key", type=click.Path(dir_okay=False), help="PEM private key of --xds-tls-cert.")
@click.option("--xds-tls-ca", type=click.Path(dir_okay=False), help="PEM CA bundle that signs the proxies' "
              "client certificates.")
@click.option("--xds-insecure", is_flag=True, help="Serve TCP --xds-address in plaintext without client "
              "authentication (anyone reaching the port may claim any node id). Refused without this flag.")
@click.option("--socket-group", metavar="GROUP", help="Make the agent's sockets (API, xDS, access log, L7) "
              "mode 0660 with this group (name or gid) instead of 0600 (the agent's user and root only).")
@click.option("--proxy-grace", type=click.FloatRange(0), default=30.0, show_default=True, metavar="SECONDS",
              help="A proxy (sidecar) whose xDS streams stay closed this long is gone: `policy wait` and health "
              "stop counting it; `cilia status` lists it as gone.")
@click.option("--prometheus-serve-addr", metavar="HOST:PORT", help="Serve Prometheus metrics at /metrics on this "
              "TCP address (Cilium's flag; \":9962\": port 9962 on every address).")
@click.option("--agent-health-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Serve GET /healthz for probes on this TCP port, every address (Cilium's is 9879; 0: off).")
@click.option("--kvstore", type=click.Choice(["none", "etcd"]), default="none", show_default=True,
              help="etcd: share identities, endpoint addresses and this node through etcd (v3 API) with the "
              "other agents; --node-id names this node and must be unique in the cluster.")
@click.option("--kvstore-endpoints", metavar="URL[,URL...]", help="The etcd members: http://HOST:PORT or "
              "https://HOST:PORT (with --kvstore-ca).")
@click.option("--kvstore-ca", type=click.Path(dir_okay=False), help="PEM CA bundle of the etcd members' "
              "certificates (https:// endpoints).")
@click.option("--kvstore-cert", type=click.Path(dir_okay=False), help="PEM client certificate for etcd.")
@click.option("--kvstore-key", type=click.Path(dir_okay=False), help="PEM private key of --kvstore-cert.")
@click.option("--kvstore-lease-ttl", type=click.IntRange(2, 3600), default=15, show_default=True,
              help="Seconds this node's records outlive it if it dies.")
@click.option("--node-ip", help="This node's address, announced to the cluster (--kvstore).")
@click.option("--pod-cidr", help="The prefix this node's endpoints are numbered from, announced (--kvstore).")
@click.option("--health-ip", help="This node's health endpoint address, announced (--kvstore).")
@click.option("--tofqdns-min-ttl", type=click.IntRange(0), default=DEFAULT_MIN_TTL, show_default=True,
              metavar="SECONDS", help="toFQDNs: a learned address is selected at least this long, whatever the DNS "
              "answer's TTL (Cilium's flag; 0 honours the server's TTL).")
@click.option("--tofqdns-grace", type=click.FloatRange(0), default=DEFAULT_GRACE, show_default=True, metavar="SECONDS",
              help="toFQDNs: an expired address stays selected this much longer, and after that while conntrack "
              "has a flow to it that is not idle.")
@click.option("--tofqdns-ct-idle", type=click.FloatRange(0), default=DEFAULT_CT_IDLE, show_default=True,
              metavar="SECONDS", help="toFQDNs: a conntrack flow with no packet for this long no longer keeps its "
              "expired address.")
@click.option("--tofqdns-proxy-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="--datapath bpf: the DNS proxy's port (UDP and TCP) on 127.0.0.1, where endpoints' DNS to "
              "egress dns rules is redirected (Cilium's flag; 0: any free port).")
@click.option("--dns-proxy-upstream-timeout", type=click.FloatRange(0.1), default=2.0, show_default=True,
              metavar="SECONDS", help="An allowed DNS query its server does not answer this long gets SERVFAIL.")
@click.option("--cluster-health-port", type=click.IntRange(0, 65535), default=4240, show_default=True,
              help="Cluster health (--kvstore): serve GET /hello on --health-ip (else --node-ip) at this port "
              "and probe every other node's (ICMP and HTTP) every second; `cilia health status` (0: off).")
@click.option("--tunnel", type=click.Choice(["disabled", "vxlan"]), default="disabled", show_default=True,
              help="With --datapath bpf and --kvstore --node-ip: reach other nodes' pods by direct routing "
              "(disabled) or through a VXLAN device whose VNI carries the sender's identity (vxlan).")
@click.option("--allow-localhost", type=click.Choice(["auto", "always", "policy"]), default="auto",
              show_default=True, help="always: the node itself (e.g. kubelet probes) reaches every endpoint "
              "whatever its policy; policy: the host is judged like any peer; auto: always with --kubernetes.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info", show_default=True)
def agent_cmd(state_dir: str, xds_addresses: Sequence[str], envoy_mode: str, node_id: str, datapath: str,
              bpf_pin_dir: str, nodeport_devices: Sequence[str], router_ip: str | None, flow_file: str | None,
              flow_file_max_mb: int,
              flow_file_backups: int, l7_workers: int, l7_mode: str, kubernetes: str | None,
              node_name: str | None, xds_tls_cert: str | None, xds_tls_key: str | None, xds_tls_ca: str | None,
              xds_insecure: bool, socket_group: str | None, prometheus_serve_addr: str | None,
              agent_health_port: int, kvstore: str, kvstore_endpoints: str | None, kvstore_ca: str | None,
              kvstore_cert: str | None, kvstore_key: str | None, kvstore_lease_ttl: int, node_ip: str | None,
              pod_cidr: str | None, health_ip: str | None, cluster_health_port: int, proxy_grace: float,
              tunnel: str, allow_localhost: str,
              tofqdns_min_ttl: int, tofqdns_grace: float, tofqdns_ct_idle: float, tofqdns_proxy_port: int,
              dns_proxy_upstream_timeout: float, log_level: str) -> None:
    """Run the agent until SIGTERM or Ctrl-C: load state, serve the REST API on
    <state-dir>/cilia.sock, serve xDS, supervise Envoy, receive its access logs; with
    --datapath bpf also load the BPF datapath. Stopping leaves the BPF programs enforcing the
    last policy (`cilia cleanup` removes them)."""
    from ..agent.api import APIServer
    from ..agent.daemon import Agent, AgentConfig
    from ..agent.metrics import LogCounter
    from ..agent.metrics_server import PROMETHEUS_PORT, parse_address, start_servers
    from ..bpf.loader import DatapathError, bpf_available
    from ..envoy.supervisor import EnvoyStartError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if prometheus_serve_addr:
        try:
            parse_address(prometheus_serve_addr, PROMETHEUS_PORT)
        except ValueError as e:
            click.echo(f"error: --prometheus-serve-addr: {e}", err=True)
            sys.exit(2)
    if tunnel == "vxlan" and (datapath != "bpf" or kvstore == "none" or not node_ip):
        click.echo("error: --tunnel vxlan needs --datapath bpf, --kvstore etcd and --node-ip", err=True)
        sys.exit(2)
    if datapath == "bpf" and (why := bpf_available()) is not None:
        click.echo(f"error: --datapath bpf: {why}", err=True)
        sys.exit(2)
    if nodeport_devices and datapath != "bpf":
        click.echo("error: --nodeport-device needs --datapath bpf", err=True)
        sys.exit(2)
    config = AgentConfig(Path(state_dir).resolve(), envoy_mode, tuple(xds_addresses), node_id,  # type: ignore[arg-type]
                         datapath=datapath, bpf_pin_dir=bpf_pin_dir, router_ip=router_ip,  # type: ignore[arg-type]
                         nodeport_devices=tuple(nodeport_devices),
                         flow_file=Path(flow_file).resolve() if flow_file else None,
                         flow_file_max_bytes=flow_file_max_mb << 20, flow_file_backups=flow_file_backups,
                         l7_workers=l7_workers, l7_mode=l7_mode,  # type: ignore[arg-type]
                         xds_tls=_xds_tls(xds_addresses, xds_tls_cert, xds_tls_key, xds_tls_ca, xds_insecure),
                         xds_insecure=xds_insecure, socket_group=_group_id(socket_group),
                         kvstore=_kvstore(kvstore, kvstore_endpoints, kvstore_ca, kvstore_cert, kvstore_key,
                                          kvstore_lease_ttl, node_ip, pod_cidr, health_ip, cluster_health_port),
                         proxy_grace=proxy_grace, tunnel=tunnel,  # type: ignore[arg-type]
                         allow_localhost="always" if allow_localhost == "always" or (
                             allow_localhost == "auto" and kubernetes) else "policy",
                         fqdn=FqdnConfig(tofqdns_min_ttl, tofqdns_grace, tofqdns_ct_idle),
                         dns_proxy_port=tofqdns_proxy_port, dns_upstream_timeout=dns_proxy_upstream_timeout)
    # Kubernetes without a kvstore (issue 13): CiliumIdentity/CiliumEndpoint objects are the shared store
    kube_api = _kubernetes_api(kubernetes) if kubernetes else None
    crd: Any = None
    if kube_api is not None and config.kvstore is None:
        import socket

        from ..k8s.crdmode import CRDMode

        crd = CRDMode(kube_api, node_name or socket.gethostname())
        config = replace(config, allocator=crd.allocator)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from ..kvstore.base import KVStoreError

    try:
        agent = Agent(config)
    except (StateError, IdentityFileError, OSError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KVStoreError as e:  # wrong endpoints or certificates, or no member answers
        click.echo(f"error: --kvstore etcd: {e}", err=True)
        sys.exit(1)
    logging.getLogger("cilia").addHandler(LogCounter(agent.metrics))
    api: APIServer | None = None
    watcher: Any = None
    tcp: list[Any] = []
    try:
        agent.start()
        api = APIServer(config.api_socket, agent)
        api.start()
        tcp = start_servers(agent, prometheus_serve_addr, agent_health_port or None)
        if kube_api is not None:
            if crd is not None:
                crd.attach(agent)
            watcher = _kubernetes_watcher(agent, kube_api, node_name, datapath, envoy_mode, crd)
            watcher.start()
        status = agent.status()
        envoy = status["envoy"]
        click.echo(f"cilia agent: revision {status['revision']}, {status['policies']} policies, "
                   f"{status['endpoints']} endpoints; API unix:{config.api_socket}; "
                   f"xDS {', '.join(status['xds']['addresses'])}; Envoy {envoy_mode}"
                   + (f" (pid {envoy.get('pid')})" if envoy.get("pid") else "")
                   + (f"; BPF datapath, maps in {bpf_pin_dir}" if datapath == "bpf" else "")
                   + "".join(f"; {', '.join(s.pages)} on TCP port {s.port}" for s in tcp), err=True)
        while not stop.wait(1.0):
            pass
    except EnvoyStartError as e:
        click.echo(f"error: Envoy did not start: {e}", err=True)
        sys.exit(1)
    except DatapathError as e:
        click.echo(f"error: the BPF datapath did not load: {e}", err=True)
        sys.exit(1)
    except OSError as e:  # a socket, namespace or address the agent could not set up
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    finally:
        if watcher is not None:
            watcher.stop()
        if crd is not None:
            crd.stop()
        for server in tcp:
            server.stop()
        if api is not None:
            api.stop()
        agent.stop()


def _xds_tls(addresses: Sequence[str], cert: str | None, key: str | None, ca: str | None,
             insecure: bool) -> Any:
    """The ServerTls for TCP xDS addresses (None without); exits 2 on an incomplete or unreadable set
    of files, or a TCP address with neither TLS nor --xds-insecure."""
    from ..xds import ServerTls

    given = {"--xds-tls-cert": cert, "--xds-tls-key": key, "--xds-tls-ca": ca}
    if any(given.values()) and not all(given.values()):
        missing = ", ".join(flag for flag, v in given.items() if not v)
        click.echo(f"error: mutual TLS for xDS needs --xds-tls-cert, --xds-tls-key and --xds-tls-ca ({missing} "
                   "missing)", err=True)
        sys.exit(2)
    if cert and insecure:
        click.echo("error: --xds-insecure and --xds-tls-* contradict each other: choose one", err=True)
        sys.exit(2)
    tcp = [a for a in addresses if not a.startswith("unix:")]
    if tcp and not cert and not insecure:
        click.echo(f"error: --xds-address {tcp[0]} is TCP: give --xds-tls-cert, --xds-tls-key and --xds-tls-ca "
                   "(mutual TLS; the client certificate's CN is the node id), or --xds-insecure to serve it in "
                   "plaintext to anyone who can reach it", err=True)
        sys.exit(2)
    if not cert:
        return None
    assert key is not None and ca is not None
    tls = ServerTls(Path(cert).resolve(), Path(key).resolve(), Path(ca).resolve())
    try:
        tls.credentials()  # read now: a bad file is an error at start, not when the first proxy connects
    except ValueError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    return tls


def _kvstore(backend: str, endpoints: str | None, ca: str | None, cert: str | None, key: str | None,
             lease_ttl: int, node_ip: str | None, pod_cidr: str | None, health_ip: str | None,
             health_port: int = 4240) -> Any:
    """The KVStoreConfig (None without --kvstore); exits 2 on options that do not fit together."""
    import ipaddress

    from ..agent.cluster import KVStoreConfig

    if backend == "none":
        given = [flag for flag, v in (("--kvstore-endpoints", endpoints), ("--kvstore-ca", ca),
                                      ("--kvstore-cert", cert), ("--kvstore-key", key)) if v]
        if given:
            click.echo(f"error: {given[0]} needs --kvstore etcd", err=True)
            sys.exit(2)
        return None
    if not endpoints:
        click.echo("error: --kvstore etcd needs --kvstore-endpoints http://HOST:PORT[,...]", err=True)
        sys.exit(2)
    if (cert is None) != (key is None) or (cert and not ca):
        click.echo("error: a kvstore client certificate needs --kvstore-cert, --kvstore-key and --kvstore-ca",
                   err=True)
        sys.exit(2)
    for flag, text in (("--node-ip", node_ip), ("--health-ip", health_ip), ("--pod-cidr", pod_cidr)):
        try:
            if text is not None:
                ipaddress.ip_network(text) if flag == "--pod-cidr" else ipaddress.ip_address(text)
        except ValueError as e:
            click.echo(f"error: {flag}: {e}", err=True)
            sys.exit(2)
    return KVStoreConfig("etcd", tuple(e.strip() for e in endpoints.split(",") if e.strip()),
                         Path(ca).resolve() if ca else None, Path(cert).resolve() if cert else None,
                         Path(key).resolve() if key else None, lease_ttl, node_ip=node_ip, pod_cidr=pod_cidr,
                         health_ip=health_ip, health_port=health_port)


def _group_id(group: str | None) -> int | None:
    """--socket-group as a gid (a name or a number); exits 2 for an unknown group."""
    import grp

    if group is None:
        return None
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        click.echo(f"error: --socket-group {group}: no such group", err=True)
        sys.exit(2)


def _kubernetes_api(kubernetes: str) -> Any:
    """The API client for --kubernetes; exits 2 if its config cannot be read."""
    from ..k8s import connect
    from ..k8s.watch import WatchError

    try:
        return connect(None if kubernetes in ("in-cluster", "default") else kubernetes, kubernetes == "in-cluster")
    except WatchError as e:
        click.echo(f"error: --kubernetes: {e}", err=True)
        sys.exit(2)


def _kubernetes_watcher(agent: Any, api: Any, node_name: str | None, datapath: str, envoy_mode: str,
                        crd: Any = None) -> Any:
    """The watcher feeding ``agent`` from the cluster (with CRD mode's watches when ``crd``)."""
    import socket

    from ..k8s import WatchConfig, Watcher

    # Named container ports give endpoints ports; without BPF an agent would put Envoy on them.
    from ..agent.api import InProcess

    config = WatchConfig(node_name=node_name or socket.gethostname(),
                         pod_ports=datapath == "bpf" or envoy_mode == "none")
    if crd is not None:
        return crd.watcher(agent, config)
    watcher = Watcher(api, InProcess(agent), config)
    agent.kubernetes = watcher
    return watcher


# --- status ---------------------------------------------------------------------------------------

def _l7_line(l7: dict[str, Any]) -> str:
    if l7.get("mode") != "inproc":
        return "L7 parsers:  ext_proc (in the agent)"
    its = l7.get("interpreters", [])
    return (f"L7 parsers:  in Envoy ({l7.get('module')}), {len(its)} interpreter(s)"
            + "".join(f"; pid {i['pid']}: {i.get('connections', 0)} connections, {i.get('errors', 0)} errors, "
                      f"{i.get('slow', 0)} slow, last report {i['last_report_s']}s ago"
                      + (" STALE" if i["stale"] else "") for i in its))


def _status_text(s: dict[str, Any]) -> str:
    envoy = s["envoy"]
    lines = [f"Health:      {'Ok' if s['healthy'] else 'Degraded'}",
             f"Revision:    {s['revision']}",
             f"Policies:    {s['policies']}   Endpoints: {s['endpoints']}"
             + (f" (+{len(s['waiting_for_identity'])} waiting for identity)" if s.get("waiting_for_identity") else "")
             + f"   Identities: {s['identities']}"
             + (f"   Services: {s['services']}" if s.get("services") else ""),
             f"Envoy:       {envoy['mode']}" + (f", {envoy['state']}, pid {envoy['pid']}, restarts {envoy['restarts']}"
                                               if "state" in envoy else "")
             + (f", last error: {envoy['last_error']}" if envoy.get("last_error") else ""),
             f"xDS:         {', '.join(s['xds']['addresses'])}",
             _l7_line(s.get("l7", {}))]
    for p in s["xds"]["proxies"]:
        state = f"NACK {p['nacked']}: {p['nack']}" if p["nack"] else f"acked {p['acked'] or '-'}"
        if p.get("stream", "open") != "open":
            state += f" (stream {p['stream']})"
        lines.append(f"  {p['node']:<16} {p['type']:<22} sent {p['sent'] or '-':<28} {state}")
    dp = s.get("datapath", {})
    if dp.get("mode") == "bpf":
        ports = ", ".join(f"{k} -> {v}" for k, v in sorted(dp.get("proxy_ports", {}).items())) or "none"
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(dp.get("drops", {}).items())) or "none"
        lines += [f"Datapath:    BPF, {'loaded' if dp.get('loaded') else 'NOT loaded'}, maps in {dp.get('pin_dir')}, "
                  f"{len(dp.get('attached', {}))} endpoint(s) attached"
                  + (f", error: {dp['error']}" if dp.get("error") else ""),
                  f"  proxy ports: {ports}",
                  f"  drops:       {drops}"]
    else:
        lines.append("Datapath:    none (sidecar mode)")
    if s.get("kubernetes"):
        from ..k8s import format_status

        lines.append(format_status(s["kubernetes"]))
    kv = s.get("kvstore")
    if kv:
        state = "connected" if kv["connected"] else "NOT connected: " + "; ".join(f"{k}: {v}" for k, v in
                                                                           kv["errors"].items())
        lines.append(f"KVStore:     {kv['backend']} {','.join(kv['endpoints'])} as node {kv['node']}, {state}, "
                     f"{kv['nodes']} node(s), {kv['remote_endpoints']} remote endpoint address(es)"
                     + (f", {kv['malformed']} malformed entries skipped" if kv["malformed"] else ""))
        if "health" in kv:
            h = kv["health"]
            lines.append(f"Cluster health: {h['reachable']}/{h['nodes']} other node(s) reachable"
                         + (f" (unreachable: {', '.join(h['unreachable'])})" if h["unreachable"] else "")
                         + (f"; {h['error']}" if h.get("error") else ""))
    lines += [f"Note:        {n}" for n in s["notes"]]
    lines += [f"Degraded:    {r}" for r in s.get("reasons", [])]
    return "\n".join(lines)


def _status_verbose(s: dict[str, Any], endpoints: dict[str, Any], metrics: str) -> str:
    lines = [_status_text(s)]
    envoy = s["envoy"]
    if "ready" in envoy:
        lines.append(f"Envoy admin: {envoy['admin']}, ready {envoy['ready']}, version {envoy.get('version', '?')}, "
                     f"uptime {envoy.get('uptime_s', '?')}s" + (f", {envoy['admin_error']}" if envoy.get("admin_error")
                                                               else ""))
    controllers = s.get("controllers", [])
    ok = sum(c["status"] == "ok" for c in controllers)
    lines.append(f"Controllers: {ok}/{len(controllers)} healthy")
    for c in controllers:
        lines.append(f"  {c['name']:<18} {c['status']}" + (f": {c['last_error']}" if c["last_error"] else ""))
    lines.append("Endpoints:")
    for e in endpoints["endpoints"]:
        lines.append(f"  {e['name']:<16} identity {str(_identity_cell(e)):<6} ingress {_enforcement(e, 'ingress'):<8} "
                     f"egress {_enforcement(e, 'egress'):<8} {','.join(e['ips']) or '-'}"
                     + (f" on {e['interface']}" if e.get("interface") else ""))
    l7 = [line for line in metrics.splitlines() if line.startswith("cilia_policy_l7_total{")]
    if l7:
        lines.append("L7 requests:")
        lines += [f"  {line.removeprefix('cilia_policy_l7_total')}" for line in l7]
    errors = s.get("errors", [])
    lines.append(f"Last errors: {len(errors) or 'none'}")
    lines += [f"  {e['time'][:19]} {e['component']}: {e['message']}" for e in errors[-10:]]
    return "\n".join(lines)


def _policy_notes_text(policies: dict[str, Any]) -> str:
    noted = [p for p in policies["policies"] if p.get("notes")]
    if not noted:
        return ""
    lines = ["Policy notes (accepted, not enforced: traffic they would allow is dropped):"]
    for p in noted:
        lines.append(f"  {'/'.join(x for x in (p['namespace'], p['name']) if x)}:")
        lines += [f"    {n}" for n in p["notes"]]
    return "\n".join(lines)


def _wait_healthy(state_dir: str, seconds: float) -> dict[str, Any]:
    """The agent's status once it answers and is healthy, polling like ``cilium status --wait``;
    exits 1 with the last reason when ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    last = "the agent did not answer"
    while True:
        client = AgentClient(Path(state_dir) / "cilia.sock", timeout=max(1.0, min(10.0, seconds)))
        try:
            status: dict[str, Any] = client.status()
            if status["healthy"]:
                return status
            last = "degraded: " + "; ".join(status.get("reasons", [])) if status.get("reasons") else "degraded"
        except APIError as e:
            last = str(e)
        finally:
            client.close()
        if time.monotonic() >= deadline:
            click.echo(f"error: the agent is not healthy after {seconds:g}s: {last}", err=True)
            sys.exit(1)
        time.sleep(0.5)


@click.command("status")
@click.option("--verbose", "-v", is_flag=True, help="Also controllers, Envoy's admin view, endpoints, L7 counts and "
              "the last errors.")
@click.option("--wait", "wait", is_flag=True, help="Wait until the agent answers and is healthy (as `cilium status "
              "--wait`); exit 1 if it is not within --wait-duration.")
@click.option("--wait-duration", type=click.FloatRange(0), default=300.0, show_default=True,
              help="Seconds --wait waits.")
@click.option("--cluster", is_flag=True, help="Also each other node's answers to this node's health probes "
              "(as `cilia health status`; agents with --kvstore).")
@state_dir_option
@output_option
def status_cmd(verbose: bool, wait: bool, wait_duration: float, cluster: bool, state_dir: str, output: str) -> None:
    """The agent's health, revision, Envoy, the datapath, each proxy's ACK/NACK state and the
    policy features accepted but not enforced."""
    payload = _wait_healthy(state_dir, wait_duration) if wait else call_agent(state_dir, lambda c: c.status())
    policies = call_agent(state_dir, lambda c: c.policies()) if output not in ("json", "yaml") else None
    if verbose and output not in ("json", "yaml"):
        endpoints = call_agent(state_dir, lambda c: c.endpoints())
        metrics = call_agent(state_dir, lambda c: c.metrics())
        text = _status_verbose(payload, endpoints, metrics)
    else:
        text = _status_text(payload)
    if policies is not None and (notes := _policy_notes_text(policies)):
        text += "\n" + notes
    if cluster:
        from .cluster_cmds import health_text

        health = call_agent(state_dir, lambda c: c.cluster_health())
        payload = {**payload, "cluster_health": health}
        text += "\n" + health_text(health)
    emit(output, payload, lambda _: text)
    if not payload["healthy"]:
        sys.exit(1)


# --- policy ---------------------------------------------------------------------------------------

@click.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--audit", is_flag=True, help="Audit mode: the endpoints these policies select let through what "
              "they would drop and report it as AUDIT (import again without --audit to enforce).")
@state_dir_option
@output_option
def policy_import_cmd(files: Sequence[str], audit: bool, state_dir: str, output: str) -> None:
    """Add or replace the policies in FILES (all or none; CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy or Kubernetes NetworkPolicy); prints the new revision, and on
    stderr the same notes as `cilia policy validate` for what is accepted but not enforced."""
    from ..policy import load_paths

    texts = [(f, Path(f).read_text(encoding="utf-8")) for f in files]
    payload = call_agent(state_dir, lambda c: c.import_policies(texts, audit))
    notes = policy_notes(load_paths(files))
    if output in ("json", "yaml"):
        emit(output, {**payload, "notes": notes}, str)
        return
    click.echo(f"Revision: {payload['revision']}")
    for n in notes:
        click.echo(f"note: {n}", err=True)


@click.command("diff")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--last", type=click.IntRange(1), help="Replay only the newest N recorded flows (default: all kept).")
@state_dir_option
@output_option
def policy_diff_cmd(files: Sequence[str], last: int | None, state_dir: str, output: str) -> None:
    """Replay the recorded flows against the policies in FILES (added, or replacing those of the
    same name) and show which flows would change verdict; nothing is applied."""
    from .observe_cmds import flow_line

    texts = [(f, Path(f).read_text(encoding="utf-8")) for f in files]
    payload = call_agent(state_dir, lambda c: c.diff_policies(texts, last))

    def text(p: Any) -> str:
        lines = [f"{c['now']:>7} -> {c['candidate']:<7} {flow_line(c['flow'])}"
                 + (f"\n{'':>18}with the candidate: {c['rule'] or c['reason']}" if c["rule"] or c["reason"] else "")
                 for c in p["changed"]]
        lines.append(f"{len(p['changed'])} of {p['replayed']} replayed flows would change verdict"
                     + (f" ({p['skipped']} of {p['considered']} recorded could not be replayed)" if p["skipped"]
                        else ""))
        return "\n".join(lines)

    emit(output, payload, text)


def _policy_rows(p: dict[str, Any]) -> list[tuple[object, ...]]:
    return [(x["kind"], x["namespace"] or "-", x["name"], x["rules"], "audit" if x.get("audit") else "enforce",
             f"{x['file']}:{x['line']}") for x in p["policies"]]


_POLICY_HEADER = ["KIND", "NAMESPACE", "NAME", "RULES", "MODE", "SOURCE"]


@click.command("get")
@click.argument("name", required=False)
@click.option("--namespace", "-n", help="Only policies of this namespace.")
@selector_option
@state_dir_option
@output_option
def policy_get_cmd(name: str | None, namespace: str | None, selector: str | None, state_dir: str,
                   output: str) -> None:
    """List the policies the agent holds (or the policy NAME), with the file and line each came
    from; -l: those whose labels match (metadata labels, Cilium's io.cilium.k8s.policy.* ones and
    rule labels); -o wide adds the notes (what is accepted but not enforced)."""
    matches = label_filter(selector)
    payload = call_agent(state_dir, lambda c: c.policies())
    chosen = [x for x in payload["policies"] if (name is None or x["name"] == name)
              and (namespace is None or x["namespace"] == namespace) and matches(x.get("labels", []))]
    if name is not None and not chosen:
        fail(f"no policy named {name}" + (f" in namespace {namespace}" if namespace else ""))
    payload = {**payload, "policies": chosen}
    emit(output, payload,
         lambda p: table(_POLICY_HEADER, _policy_rows(p)) + f"\nRevision: {p['revision']}",
         lambda p: table([*_POLICY_HEADER, "NOTES"], [(*r, "; ".join(x.get("notes", [])) or "-")
                                                      for r, x in zip(_policy_rows(p), p["policies"])])
         + f"\nRevision: {p['revision']}")


@click.command("delete")
@click.argument("name", required=False)
@click.option("--all", "everything", is_flag=True, help="Delete every policy.")
@click.option("--namespace", "-n", help="Only the policy in this namespace.")
@state_dir_option
@output_option
def policy_delete_cmd(name: str | None, everything: bool, namespace: str | None, state_dir: str, output: str) -> None:
    """Delete the policy NAME, or every policy with --all; prints the new revision."""
    if (name is None) == (not everything):
        raise click.UsageError("give a policy NAME or --all")
    payload = call_agent(state_dir, lambda c: c.delete_policies(name, namespace))
    emit(output, payload, lambda p: f"Revision: {p['revision']}")


@click.command("wait")
@click.argument("revision", type=click.IntRange(1))
@click.option("--timeout", type=click.FloatRange(0), default=60.0, show_default=True, help="Seconds.")
@state_dir_option
@output_option
def policy_wait_cmd(revision: int, timeout: float, state_dir: str, output: str) -> None:
    """Block until every proxy realized REVISION (waiting for it to be committed if it is not yet);
    fails with Envoy's NACK text if one rejected it, and when REVISION was rejected and reverted."""
    payload = call_agent(state_dir, lambda c: c.wait(revision, timeout))
    emit(output, payload, lambda p: f"Revision {p['revision']} realized by "
                                     f"{', '.join(p['proxies']) or 'no proxies (none connected)'}")


# --- endpoints and identities ---------------------------------------------------------------------

@click.command("add")
@click.option("--name", required=True)
@click.option("--labels", required=True, help="k=v,k2=v2 (source k8s unless given as source:k=v).")
@click.option("--ip", "ips", multiple=True, help="Endpoint address (repeatable). Sidecar mode: an address of "
              "this host (Envoy listens on it); BPF mode: the namespace's address.")
@click.option("--port", "ports", multiple=True,
              help="[NAME=]PORT[/PROTO][:APP_PORT] (repeatable): a port the endpoint serves. Needed in sidecar mode "
                   "(--datapath none): Envoy listens on IP:PORT and forwards to the app on IP:APP_PORT. With "
                   "--datapath bpf only to name ports for policies' named ports (the kernel enforces every port "
                   "and redirects L7 ports itself).")
@click.option("--create-netns", is_flag=True,
              help="BPF datapath: make a network namespace for the endpoint joined to the node by a veth pair "
                   "(removed with the endpoint).")
@click.option("--netns", help="The namespace's name (with --create-netns; default cilia-NAME).")
@click.option("--interface", help="BPF datapath: the host end of the endpoint's veth (adopted as it is, or the "
              "name to give it with --create-netns).")
@click.option("--audit", is_flag=True, help="Audit mode: what its policy would drop is let through and reported "
              "as AUDIT.")
@state_dir_option
@output_option
def endpoint_add_cmd(name: str, labels: str, ips: Sequence[str], ports: Sequence[str], create_netns: bool,
                     netns: str | None, interface: str | None, audit: bool, state_dir: str, output: str) -> None:
    """Add (or replace) an endpoint; prints its identity and the new revision (-o json: the
    endpoint as the agent holds it, with identity and revision)."""
    try:
        specs = [PortSpec.parse(p).to_json() for p in ports]
    except StateError as e:
        raise click.UsageError(f"--port: {e}") from None
    if netns and not create_netns:
        raise click.UsageError("--netns names the namespace --create-netns makes")
    body: dict[str, Any] = {"name": name, "labels": [x for x in labels.split(",") if x], "ips": list(ips),
                            "ports": specs, "create": create_netns, "audit": audit}
    body.update({k: v for k, v in (("netns", netns), ("interface", interface)) if v})
    payload = call_agent(state_dir, lambda c: c.add_endpoint(body))
    emit(output, payload, lambda p: f"Endpoint {p['endpoint']['name']}: identity {_identity_cell(p['endpoint'])}\n"
                                     f"Revision: {p['revision']}")


def _identity_cell(e: dict[str, Any]) -> object:
    """The identity, or the endpoint's state while it has none (issue 13: waiting-for-identity)."""
    return e["identity"] if e["identity"] is not None else e.get("state", "-")


def _enforcement(e: dict[str, Any], direction: str) -> str:
    if e.get("state", "ready") != "ready":
        return "Closed"  # no identity yet: everything dropped
    if e.get("audit_mode", {}).get(direction):
        return "Audit"
    return "Enabled" if e["enforcement"][direction] else "Disabled"


_ENDPOINT_HEADER = ["ENDPOINT", "IDENTITY", "INGRESS", "EGRESS", "IPS", "PORTS", "INTERFACE", "LABELS"]


def _endpoint_row(e: dict[str, Any]) -> tuple[object, ...]:
    return (e["name"], _identity_cell(e), _enforcement(e, "ingress"), _enforcement(e, "egress"),
            ",".join(e["ips"]) or "-", ",".join(str(PortSpec.from_json(x)) for x in e["ports"]) or "-",
            e.get("interface") or "-", ",".join(e["identity_labels"]))


def _endpoint_wide(e: dict[str, Any]) -> tuple[object, ...]:
    return (*_endpoint_row(e), e.get("netns") or "-",
            ",".join(x for x in e["labels"] if x not in e["identity_labels"]) or "-")


def _endpoints_of(state_dir: str, selector: str | None) -> dict[str, Any]:
    matches = label_filter(selector)
    payload = call_agent(state_dir, lambda c: c.endpoints())
    return {**payload, "endpoints": [e for e in payload["endpoints"] if matches(e["identity_labels"])]}


@click.command("list")
@selector_option
@state_dir_option
@output_option
def endpoint_list_cmd(selector: str | None, state_dir: str, output: str) -> None:
    """List endpoints with identity, policy enforcement, addresses, ports and labels (-l: those
    whose labels match; -o wide adds the namespace and the labels left out of the identity)."""
    payload = _endpoints_of(state_dir, selector)
    emit(output, payload, lambda p: table(_ENDPOINT_HEADER, [_endpoint_row(e) for e in p["endpoints"]]),
         lambda p: table([*_ENDPOINT_HEADER, "NETNS", "OTHER LABELS"], [_endpoint_wide(e) for e in p["endpoints"]]))


def _endpoint_detail(e: dict[str, Any]) -> str:
    rows = [("Name", e["name"]), ("Identity", _identity_cell(e)), ("State", e.get("state", "ready")),
            ("Ingress", _enforcement(e, "ingress")),
            ("Egress", _enforcement(e, "egress")), ("IPs", ", ".join(e["ips"]) or "-"),
            ("Ports", ", ".join(str(PortSpec.from_json(x)) for x in e["ports"]) or "-"),
            ("Interface", e.get("interface") or "-"), ("Netns", e.get("netns") or "-"),
            ("Labels", ", ".join(e["labels"])), ("Identity labels", ", ".join(e["identity_labels"]))]
    return "\n".join(f"{k + ':':<17}{v}" for k, v in rows)


@click.command("get")
@click.argument("name")
@state_dir_option
@output_option
def endpoint_get_cmd(name: str, state_dir: str, output: str) -> None:
    """One endpoint: identity, enforcement, addresses, ports, interface and labels."""
    found = [e for e in call_agent(state_dir, lambda c: c.endpoints())["endpoints"] if e["name"] == name]
    if not found:
        fail(f"no endpoint named {name}")
    emit(output, found[0], _endpoint_detail)


@click.command("delete")
@click.argument("name")
@state_dir_option
@output_option
def endpoint_delete_cmd(name: str, state_dir: str, output: str) -> None:
    """Remove an endpoint; prints the new revision."""
    payload = call_agent(state_dir, lambda c: c.remove_endpoint(name))
    emit(output, payload, lambda p: f"Revision: {p['revision']}")


_IDENTITY_HEADER = ["ID", "KIND", "LABELS"]


@click.command("list")
@click.option("--cluster", is_flag=True, help="The cluster-wide identities in the kvstore, with the nodes "
              "referencing each (agents with --kvstore).")
@selector_option
@state_dir_option
@output_option
def identity_list_cmd(cluster: bool, selector: str | None, state_dir: str, output: str) -> None:
    """List identities: reserved, endpoint and CIDR ones this agent knows (--cluster: the kvstore's);
    -l: those whose labels match; -o wide adds the CIDR prefix."""
    matches = label_filter(selector)
    if cluster:
        shared = call_agent(state_dir, lambda c: c.cluster_identities())
        shared = {**shared, "identities": [i for i in shared["identities"] if matches(i["labels"])]}
        emit(output, shared, lambda p: table(
            ["ID", "NODES", "LABELS"],
            [(i["id"], ",".join(i["nodes"]) or "-", ",".join(i["labels"])) for i in p["identities"]]))
        return
    payload = call_agent(state_dir, lambda c: c.identities())
    payload = {**payload, "identities": [i for i in payload["identities"] if matches(i["labels"])]}
    emit(output, payload, lambda p: table(_IDENTITY_HEADER, [(i["id"], i["kind"], ",".join(i["labels"]))
                                                             for i in p["identities"]]),
         lambda p: table([*_IDENTITY_HEADER, "PREFIX"], [(i["id"], i["kind"], ",".join(i["labels"]),
                                                          i.get("prefix") or "-") for i in p["identities"]]))


@click.command("get")
@click.argument("identity", type=click.IntRange(0))
@state_dir_option
@output_option
def identity_get_cmd(identity: int, state_dir: str, output: str) -> None:
    """One identity: its kind, labels and (a CIDR identity) prefix."""
    found = [i for i in call_agent(state_dir, lambda c: c.identities())["identities"] if i["id"] == identity]
    if not found:
        fail(f"no identity {identity}")
    emit(output, found[0], lambda i: "\n".join(
        f"{k + ':':<8}{v}" for k, v in (("ID", i["id"]), ("Kind", i["kind"]), ("Labels", ", ".join(i["labels"])),
                                         ("Prefix", i.get("prefix") or "-"))))


def register(cli: click.Group, policy: click.Group) -> None:
    cli.add_command(agent_cmd)
    cli.add_command(status_cmd)
    for cmd in (policy_import_cmd, policy_get_cmd, policy_delete_cmd, policy_wait_cmd, policy_diff_cmd):
        policy.add_command(cmd)

    @cli.group("endpoint")
    def endpoint() -> None:
        """Endpoints the agent enforces policy for."""

    for cmd in (endpoint_add_cmd, endpoint_list_cmd, endpoint_get_cmd, endpoint_delete_cmd):
        endpoint.add_command(cmd)

    @cli.group("identity")
    def identity() -> None:
        """Security identities."""

    identity.add_command(identity_list_cmd)
    identity.add_command(identity_get_cmd)
