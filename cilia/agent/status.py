"""The agent's health as operators read it: ``cilia status``, ``/healthz``, ``bugtool``.

Each moving part is a controller (as in Cilium), ok or failing with why; the agent is healthy
when no controller fails and no proxy's rejection of a config still stands.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..bpf.datapath import DROP_REASONS
from ..envoy.admin import AdminClient, AdminError
from ..xds import LISTENER, AckState, version_key
from .render import render

if TYPE_CHECKING:
    from .daemon import Agent


def status(agent: Agent) -> dict[str, Any]:
    with agent.lock:
        revision = agent.revision
        counts = {"policies": len(agent.engine.policies()), "endpoints": len(agent.state.endpoints),
                  "identities": len(agent.engine.identities()), "services": len(agent.state.services)}
    notes = list(agent.notes)
    proxies = _proxies(agent)
    envoy: dict[str, Any] = {"mode": agent.config.envoy}
    if agent.envoy is not None:
        es = agent.envoy.status()
        envoy.update(state=es.state.value, pid=es.pid, restarts=es.restarts, last_exit_code=es.last_exit_code,
                     last_error=es.last_error, admin=agent.admin_address)
    datapath: dict[str, Any] = {"mode": agent.config.datapath}
    node = agent.node
    if node is not None:
        with agent.lock:
            datapath.update(loaded=node.started, pin_dir=node.pin_dir, attached=node.attached(),
                            proxy_ports=dict(agent.state.proxy_ports),
                            dns_proxy=({"port": agent.dns_proxy.port, "running": agent.dns_proxy.running,
                                        **agent.dns_proxy.counters()} if agent.dns_proxy is not None else None),
                            error=agent.realizer.errors.get("bpf-datapath", ""),
                            drops={DROP_REASONS.get(r, str(r)): n for r, n in node.drop_counts().items()}
                            if node.started else {})
    if agent.envoy is not None and agent.admin_address and envoy.get("state") == "running":
        envoy.update(_envoy_admin(agent.admin_address))
    controllers = _controllers(agent, envoy, datapath)
    k8s = agent.kubernetes.status() if agent.kubernetes is not None else None
    if k8s is not None:
        controllers.append({"name": "kubernetes-watch", "status": "ok" if k8s["connected"] else "failing",
                            "last_error": "" if k8s["connected"] else "; ".join(
                                f"{n}: {r['last_error'] or 'not connected'}" for n, r in k8s["resources"].items()
                                if not r["connected"])})
    kvstore = agent.cluster.status() if agent.cluster is not None else None
    if kvstore is not None:
        controllers.append({"name": "kvstore", "status": "ok" if kvstore["connected"] else "failing",
                            "last_error": "; ".join(f"{k}: {v}" for k, v in kvstore["errors"].items())})
    waiting = agent.waiting_endpoints()  # issue 13: accepted without a cluster-wide identity, traffic dropped
    if waiting:
        why = dict(agent.pending.errors)
        controllers.append({"name": "endpoint-identities", "status": "failing",
                            "last_error": f"{len(waiting)} endpoint(s) waiting for a cluster-wide identity "
                                          "(all their traffic dropped): "
                                          + ", ".join(f"{n} ({why[n]})" if n in why else n for n in waiting)})
    reasons = [f"proxy {p['node']} rejected {p['type']} {p['nacked']}: {p['nack']}" for p in proxies
               if p["nack"] and p["stream"] != "gone"]
    reasons += [f"{c['name']}: {c['last_error'] or c['status']}" for c in controllers if c["status"] != "ok"]
    return {"healthy": not reasons, "reasons": reasons, "revision": revision, **counts, "envoy": envoy,
            "datapath": datapath,
            "xds": {"addresses": [f"unix:{agent.config.xds_socket}", *agent.config.xds_addresses],
                    "proxies": proxies},
            "controllers": controllers, "errors": list(agent.errors),
            "l7": agent.l7_inproc.status() if agent.l7_inproc is not None else {"mode": "extproc"},
            **({"kubernetes": k8s} if k8s is not None else {}),
            **({"kvstore": kvstore} if kvstore is not None else {}),
            "waiting_for_identity": waiting,
            "uptime_s": round(time.time() - agent.started, 1), "notes": notes,
            "state_dir": str(agent.config.state_dir)}


def debug_info(agent: Agent, flows: int = 1000) -> dict[str, Any]:
    """Everything ``cilia bugtool`` packs: status, config, policies with their source text,
    endpoints, identities, recent flows and datapath events, the policy maps in the kernel,
    Envoy's config dump and the tail of its log."""
    from .daemon import AgentError

    out: dict[str, Any] = {"status": status(agent), "policies": render(agent.policies()),
                           "endpoints": render(agent.endpoints()), "identities": render(agent.identities()),
                           "services": render(agent.services()),
                           "flows": agent.flows(limit=flows),
                           "monitor": agent.monitor(None, flows, 0.0)}
    out["config"] = {k: _plain(v) for k, v in vars(agent.config).items()}
    with agent.lock:
        out["sources"] = [{"path": src.path, "text": src.text, "audit": src.audit,
                           "policies": sorted("/".join(k) for k in src.keys)} for src in agent.state.sources]
    bpf: dict[str, Any] = {}
    if agent.node is not None and agent.node.started:
        for name in sorted(agent.node.attached()):
            try:
                bpf[name] = agent.bpf_policy(name)
            except AgentError as e:
                bpf[name] = {"error": str(e)}
    out["bpf_policy"] = bpf
    if agent.envoy is not None and agent.admin_address:
        try:
            out["envoy_config_dump"] = AdminClient(agent.admin_address, timeout=3.0).config_dump()
        except AdminError as e:
            out["envoy_config_dump"] = {"error": str(e)}
    log = agent.config.state_dir / "envoy.log"
    try:
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - (1 << 20)))
            out["envoy_log"] = f.read().decode("utf-8", "replace")  # the last MiB
    except OSError:
        out["envoy_log"] = ""
    return out


def _proxies(agent: Agent) -> list[dict[str, Any]]:
    """Each proxy's standing per type, and its stream: "open", "closed" (within the grace period: its
    last answer still counts) or "gone" (closed longer: no longer waited for, nor part of health)."""
    closed, departed = agent.tracker.gone(), agent.departed_proxies()
    out = []
    for (node_id, type_url), st in sorted(agent.tracker.states().items()):
        stream = "gone" if node_id in departed else "closed" if node_id in closed else "open"
        out.append({"node": node_id, "type": type_url.rsplit(".", 1)[-1], "sent": st.sent, "acked": st.acked,
                    "nacked": st.nacked, "nack": st.nack_message if nack_stands(st) else "", "stream": stream})
    return out


def _envoy_admin(address: str) -> dict[str, Any]:
    """Envoy's own view, from its admin endpoint: ready or not, version, uptime."""
    try:
        client = AdminClient(address, timeout=1.0)
        info = client.server_info()
        return {"ready": client.ready(), "version": info.version, "server_state": info.state,
                "uptime_s": info.uptime_seconds}
    except AdminError as e:
        return {"ready": False, "admin_error": str(e)}


def _controllers(agent: Agent, envoy: Mapping[str, Any], datapath: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The agent's moving parts, like Cilium's controllers: each ok or failing, with why."""
    def ctl(name: str, ok: bool, error: str = "", **extra: Any) -> dict[str, Any]:
        return {"name": name, "status": "ok" if ok else "failing", "last_error": "" if ok else error, **extra}

    servers = agent.servers
    out = [ctl("xds-server", servers.xds is not None, "not serving"),
           ctl("accesslog-server", servers.als is not None, "not serving"),
           ctl("l7-server", servers.l7 is not None or servers.l7_pool is not None, "not serving")]
    if agent.l7_inproc is not None:
        problem = agent.l7_inproc.problem()
        out.append(ctl("l7-inproc", not problem, problem))
    if servers.l7_pool is not None:
        pool = servers.l7_pool
        serving = pool.ready()  # listening, not merely running: Envoy's connections need the socket
        out.append(ctl("l7-workers", serving == len(pool.addresses), f"{serving}/{len(pool.addresses)} workers serving",
                       restarts=pool.restarts))
    if agent.envoy is not None:
        running = envoy.get("state") == "running" and envoy.get("ready", True) is not False
        out.append(ctl("envoy-supervisor", running, str(envoy.get("last_error") or envoy.get("admin_error")
                                                        or f"Envoy is {envoy.get('state')}"),
                       restarts=envoy.get("restarts", 0)))
        if running:
            problems = _listener_problems(agent)
            out.append(ctl("envoy-listeners", not problems, "; ".join(problems)))
    if agent.node is not None:
        error = agent.realizer.errors.get("bpf-datapath", "")
        out.append(ctl("bpf-datapath", bool(datapath.get("loaded")) and not error, error or "not loaded"))
    for sink, error in sorted(agent.realizer.errors.items()):
        if sink != "bpf-datapath":
            out.append(ctl(f"realize-{sink}", False, error))
    return out


def _listener_problems(agent: Agent) -> list[str]:
    """Does the managed Envoy serve exactly the listeners it acked? An ACK alone does not say: a
    listener whose port another process holds, or an Envoy drained through its admin API, serve
    nothing while the ACKs stand. Checked only when Envoy has acked the current version (an update
    in flight would show its new listeners as missing; a rejected one is reported as a NACK)."""
    assert agent.envoy is not None
    current = agent.cache.version(LISTENER)
    if agent.tracker.state(agent.config.node_id, LISTENER).acked != current:
        return []
    sent = set(agent.cache.snapshot(agent.config.node_id).get(LISTENER, {}))
    if agent.cache.version(LISTENER) != current:
        return []  # moved meanwhile: the next status tells
    return agent.envoy.listener_problems(sent)


def nack_stands(st: AckState) -> bool:
    """True while the proxy has acked nothing newer than the version it rejected."""
    if not st.nacked:
        return False
    nacked, acked = version_key(st.nacked), version_key(st.acked)
    return acked is None or nacked is None or acked[0] != nacked[0] or acked[1] < nacked[1]


def _plain(value: Any) -> Any:
    """A config value as JSON holds it: nested settings (dataclasses) as objects, paths and
    anything else JSON has no type for as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
