"""The agent's REST API: JSON over HTTP/1.1 on a UNIX socket (documented in openapi.yaml).

Only local users who can open the socket (mode 0600: the agent's user and root; 0660 with
--socket-group: also that group) can change policy, as with Cilium's agent socket. Errors are
``{"error": TEXT, "problems": [...]}`` with the status the agent chose: 400 bad input, 404
unknown, 409 rejected (conflict or Envoy NACK), 504 not realized in time.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socketserver
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..xds.sockets import bind_unix
from .daemon import Agent, AgentError
from ..policy.selector_text import SelectorError
from ..services.model import Service
from ..services.validate import ServiceError, service_from_json
from ..specs import EndpointSpec, PolicyKey, StateError
from .flowquery import parse_http_status, parse_labels
from .flows import FlowFilter
from .render import render

_log = logging.getLogger(__name__)

MAX_BODY = 16 << 20  # 16 MiB of policy text is far more than any real import
MAX_WAIT = 600.0
MAX_POLL = 30  # seconds a monitor request may wait for the next event

Handler = Callable[[Agent, dict[str, str], dict[str, list[str]], Any], tuple[int, Any]]


def _query_int(query: dict[str, list[str]], name: str) -> int | None:
    values = query.get(name)
    if not values:
        return None
    try:
        return int(values[-1])
    except ValueError:
        raise AgentError(f"query parameter {name}: {values[-1]!r} is not an integer") from None


def _get_status(agent: Agent, _: dict[str, str], __: dict[str, list[str]], ___: Any) -> tuple[int, Any]:
    return 200, agent.status()


def _get_policies(agent: Agent, _: dict[str, str], __: dict[str, list[str]], ___: Any) -> tuple[int, Any]:
    return 200, agent.policies()


_FILES = '"files": [{"path": STRING, "text": STRING}, ...]'


def _policy_files(body: Any, expected: str) -> list[tuple[str, str]]:
    """The body's policy files as (path, text); ``expected`` is the body's shape for the error."""
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("text"), str) for f in files):
        raise AgentError(f"body: expected {expected}")
    return [(f["path"], f["text"]) for f in files]


def _post_policies(agent: Agent, _: dict[str, str], __: dict[str, list[str]], body: Any) -> tuple[int, Any]:
    started = time.monotonic()
    try:
        files = _policy_files(body, "{" + _FILES + "}")
        audit = body.get("audit", False)
        if not isinstance(audit, bool):
            raise AgentError("body: audit: expected true or false")
        result = agent.import_policies(files, audit)
    except AgentError:
        agent.metrics.policy_import_errors.inc()
        raise
    threading.Thread(target=_time_implementation, args=(agent, result.revision, started), daemon=True,
                     name="cilia-policy-delay").start()
    return 200, result


def _time_implementation(agent: Agent, revision: int, started: float) -> None:
    """cilia_policy_implementation_delay: from the import to every proxy's ACK of its revision."""
    try:
        agent.wait(revision, MAX_WAIT)
    except AgentError:
        return  # rejected or never realized: no delay to report (the NACK is counted by xDS)
    agent.metrics.policy_implementation_delay.labels("api").observe(time.monotonic() - started)


def _diff_policies(agent: Agent, _: dict[str, str], __: dict[str, list[str]], body: Any) -> tuple[int, Any]:
    files = _policy_files(body, "{" + _FILES + ', "last": N}')
    last = body.get("last")
    if last is not None and (not isinstance(last, int) or last < 1):
        raise AgentError("body: last: expected a positive integer")
    return 200, agent.diff_policies(files, last)


def _delete_policies(agent: Agent, _: dict[str, str], query: dict[str, list[str]], __: Any) -> tuple[int, Any]:
    name = query.get("name", [None])[-1]
    everything = query.get("all", ["false"])[-1] == "true"
    if (name is None) == (not everything):
        raise AgentError("give exactly one of the query parameters name=NAME or all=true")
    return 200, agent.delete_policies(name, query.get("namespace", [None])[-1])


def _wait_revision(agent: Agent, path: dict[str, str], query: dict[str, list[str]], _: Any) -> tuple[int, Any]:
    timeout = query.get("timeout", ["60"])[-1]
    try:
        seconds = min(float(timeout), MAX_WAIT)
    except ValueError:
        raise AgentError(f"query parameter timeout: {timeout!r} is not a number") from None
    return 200, agent.wait_for(int(path["revision"]), seconds)


def _trace_policies(agent: Agent, _: dict[str, str], __: dict[str, list[str]], body: Any) -> tuple[int, Any]:
    return 200, agent.trace_flow(body)


def _get_endpoints(agent: Agent, _: dict[str, str], __: dict[str, list[str]], ___: Any) -> tuple[int, Any]:
    return 200, agent.endpoints()


def _post_endpoints(agent: Agent, _: dict[str, str], __: dict[str, list[str]], body: Any) -> tuple[int, Any]:
    try:
        spec = EndpointSpec.from_json(body)
    except StateError as e:
        raise AgentError(str(e)) from None
    return 200, agent.add_endpoint(spec)


def _delete_endpoint(agent: Agent, path: dict[str, str], _: dict[str, list[str]], __: Any) -> tuple[int, Any]:
    return 200, agent.remove_endpoint(path["name"])


def _get_services(agent: Agent, _: dict[str, str], __: dict[str, list[str]], ___: Any) -> tuple[int, Any]:
    return 200, agent.services()


def _post_services(agent: Agent, _: dict[str, str], __: dict[str, list[str]], body: Any) -> tuple[int, Any]:
    try:
        service = service_from_json(body)
    except ServiceError as e:
        raise AgentError(f"service: {e}; nothing was applied") from None
    return 200, agent.update_service(service)


def _get_service(agent: Agent, path: dict[str, str], _: dict[str, list[str]], __: Any) -> tuple[int, Any]:
    service_id = int(path["id"])
    found = [s for s in agent.services().services if s.id == service_id]
    if not found:
        raise AgentError(f"no service with id {service_id}", 404)
    return 200, found[0]


def _delete_service(agent: Agent, path: dict[str, str], _: dict[str, list[str]], __: Any) -> tuple[int, Any]:
    return 200, agent.delete_service(int(path["id"]))


def _get_identities(agent: Agent, _: dict[str, str], __: dict[str, list[str]], ___: Any) -> tuple[int, Any]:
    return 200, agent.identities()


def _get_fqdn_cache(agent: Agent, _: dict[str, str], query: dict[str, list[str]], __: Any) -> tuple[int, Any]:
    return 200, agent.fqdn_cache(query.get("name", [None])[-1])


def _delete_fqdn_cache(agent: Agent, _: dict[str, str], query: dict[str, list[str]], __: Any) -> tuple[int, Any]:
    return 200, agent.fqdn_clean(query.get("name", [None])[-1])


def _cluster(agent: Agent) -> Any:
    if agent.cluster is None:
        raise AgentError("this agent has no kvstore (cilia agent --kvstore etcd --kvstore-endpoints ...)", 409)
    return agent.cluster


def _get_nodes(agent: Agent, _: dict[str, str], __: dict[str, list[str]], ___: Any) -> tuple[int, Any]:
    return 200, _cluster(agent).node_list()


def _get_cluster_identities(agent: Agent, _: dict[str, str], __: dict[str, list[str]], ___: Any) -> tuple[int, Any]:
    return 200, _cluster(agent).identity_list()


def _get_cluster_health(agent: Agent, _: dict[str, str], __: dict[str, list[str]], ___: Any) -> tuple[int, Any]:
    return 200, _cluster(agent).health()


def _get_kvstore(agent: Agent, _: dict[str, str], query: dict[str, list[str]], __: Any) -> tuple[int, Any]:
    from ..kvstore.base import KVStoreError

    key, prefix = query.get("key", [None])[-1], query.get("prefix", [None])[-1]
    if (key is None) == (prefix is None):
        raise AgentError("give exactly one of the query parameters key and prefix")
    try:
        return 200, _cluster(agent).read(key, prefix)
    except ValueError as e:
        raise AgentError(str(e)) from None
    except KVStoreError as e:
        raise AgentError(str(e), 503) from None


def _query_time(query: dict[str, list[str]], name: str) -> float | None:
    value = query.get(name, [None])[-1]
    try:
        return float(value) if value is not None else None
    except ValueError:
        raise AgentError(f"query parameter {name}: {value!r} is not a UNIX time") from None


def flow_filter(query: dict[str, list[str]]) -> FlowFilter:
    """GET /v1/flows's filter parameters (Hubble's names; repeat a parameter for alternatives)."""
    def strings(name: str) -> tuple[str, ...]:
        return tuple(v for v in query.get(name, []) if v)

    def numbers(name: str, upper: int) -> frozenset[int]:
        out = set()
        for v in strings(name):
            if not v.isdigit() or int(v) > upper:
                raise AgentError(f"query parameter {name}: {v!r} is not a number from 0 to {upper}")
            out.add(int(v))
        return frozenset(out)

    try:
        selectors = {name: tuple(parse_labels(v) for v in strings(name))
                     for name in ("label", "from_label", "to_label")}
        statuses = tuple(parse_http_status(v) for v in strings("http_status"))
        paths = tuple(re.compile(v) for v in strings("http_path"))
        for address in strings("ip"):
            ipaddress.ip_address(address)
    except (SelectorError, ValueError, re.error) as e:
        raise AgentError(f"flow filter: {e}") from None
    return FlowFilter(
        from_labels=selectors["from_label"], to_labels=selectors["to_label"], labels=selectors["label"],
        verdicts=frozenset(v.upper() for v in strings("verdict")),
        protocols=frozenset(v.lower() for v in strings("protocol")),
        since=_query_time(query, "since_time"), until=_query_time(query, "until_time"),
        pods=strings("pod"), from_pods=strings("from_pod"), to_pods=strings("to_pod"),
        namespaces=frozenset(strings("namespace")), ips=frozenset(strings("ip")),
        ports=numbers("port", 65535), identities=numbers("identity", 2**32 - 1),
        types=frozenset(v.lower() for v in strings("type")), http_status=statuses,
        http_methods=frozenset(v.upper() for v in strings("http_method")), http_paths=paths)


def _get_flows(agent: Agent, _: dict[str, str], query: dict[str, list[str]], __: Any) -> tuple[int, Any]:
    return 200, agent.flows(_query_int(query, "since"), _query_int(query, "limit"), flow_filter(query))


def _get_bpf_policy(agent: Agent, path: dict[str, str], _: dict[str, list[str]], __: Any) -> tuple[int, Any]:
    return 200, agent.bpf_policy(path["name"])


def _get_bpf_lb(agent: Agent, _: dict[str, str], __: dict[str, list[str]], ___: Any) -> tuple[int, Any]:
    return 200, agent.bpf_lb()


def _get_monitor(agent: Agent, _: dict[str, str], query: dict[str, list[str]], __: Any) -> tuple[int, Any]:
    wait = _query_int(query, "wait") or 0
    return 200, agent.monitor(_query_int(query, "since"), _query_int(query, "limit"), min(max(wait, 0), MAX_POLL),
                              query.get("trace", ["false"])[-1] == "true")


@dataclass(frozen=True)
class _Raw:
    """A payload sent as it is, with its own content type."""

    data: bytes
    content_type: str


def _get_debuginfo(agent: Agent, _: dict[str, str], query: dict[str, list[str]], __: Any) -> tuple[int, Any]:
    return 200, agent.debug_info(_query_int(query, "flows") or 1000)


def _get_healthz(agent: Agent, _: dict[str, str], __: dict[str, list[str]], ___: Any) -> tuple[int, Any]:
    status = agent.status()
    if status["healthy"]:
        return 200, {"status": "ok"}
    return 503, {"status": "degraded", "reasons": status["reasons"]}


def _get_metrics(agent: Agent, _: dict[str, str], __: dict[str, list[str]], ___: Any) -> tuple[int, Any]:
    return 200, _Raw(agent.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")


def _get_openapi(_: Agent, __: dict[str, str], ___: dict[str, list[str]], ____: Any) -> tuple[int, Any]:
    return 200, resources.files(__package__).joinpath("openapi.yaml").read_text(encoding="utf-8")


# (method, path template) -> handler; templates use {name} for one path segment.
ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/v1/status"): _get_status,
    ("GET", "/v1/policies"): _get_policies,
    ("POST", "/v1/policies"): _post_policies,
    ("DELETE", "/v1/policies"): _delete_policies,
    ("POST", "/v1/policies/diff"): _diff_policies,
    ("POST", "/v1/policies/trace"): _trace_policies,
    ("GET", "/v1/revisions/{revision}/wait"): _wait_revision,
    ("GET", "/v1/endpoints"): _get_endpoints,
    ("POST", "/v1/endpoints"): _post_endpoints,
    ("DELETE", "/v1/endpoints/{name}"): _delete_endpoint,
    ("GET", "/v1/endpoints/{name}/bpf-policy"): _get_bpf_policy,
    ("GET", "/v1/bpf/lb"): _get_bpf_lb,
    ("GET", "/v1/monitor"): _get_monitor,
    ("GET", "/v1/services"): _get_services,
    ("POST", "/v1/services"): _post_services,
    ("GET", "/v1/services/{id}"): _get_service,
    ("DELETE", "/v1/services/{id}"): _delete_service,
    ("GET", "/v1/identities"): _get_identities,
    ("GET", "/v1/flows"): _get_flows,
    ("GET", "/v1/fqdn/cache"): _get_fqdn_cache,
    ("DELETE", "/v1/fqdn/cache"): _delete_fqdn_cache,
    ("GET", "/v1/nodes"): _get_nodes,
    ("GET", "/v1/cluster/identities"): _get_cluster_identities,
    ("GET", "/v1/kvstore"): _get_kvstore,
    ("GET", "/v1/cluster/health"): _get_cluster_health,
    ("GET", "/v1/openapi.yaml"): _get_openapi,
    ("GET", "/metrics"): _get_metrics,
    ("GET", "/healthz"): _get_healthz,
    ("GET", "/v1/debuginfo"): _get_debuginfo,
}

_PARAM_PATTERNS = {"revision": r"(?P<revision>\d+)", "name": r"(?P<name>[^/]+)", "id": r"(?P<id>\d{1,9})"}
_COMPILED = [(method, re.compile("^" + re.sub(r"\{(\w+)\}", lambda m: _PARAM_PATTERNS[m[1]], tmpl) + "$"), h)
             for (method, tmpl), h in ROUTES.items()]


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: APIServer

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        allowed = []
        for method, pattern, handler in _COMPILED:
            m = pattern.match(url.path)
            if m is None:
                continue
            allowed.append(method)
            if method != self.command:
                continue
            try:
                body = self._body()
                status, payload = handler(self.server.agent, m.groupdict(), parse_qs(url.query), body)
            except AgentError as e:
                status, payload = e.status, {"error": str(e), "problems": [str(p) for p in e.problems]}
            except Exception as e:  # answer, and keep serving: one bad request must not end the agent
                _log.exception("API %s %s failed", self.command, self.path)
                status, payload = 500, {"error": f"internal error: {e}", "problems": []}
            self._send(status, payload)
            return
        if allowed:
            self._send(405, {"error": f"{self.command} not allowed on {url.path} (use {', '.join(allowed)})",
                             "problems": []})
        else:
            self._send(404, {"error": f"no such API path: {url.path}", "problems": []})

    def _body(self) -> Any:
        header = (self.headers.get("Content-Length") or "0").strip()
        if not (header.isascii() and header.isdigit()):  # a negative length would read to the stream's end
            self.close_connection = True  # where this request's body ends is unknown
            raise AgentError(f"Content-Length: {header[:40]!r} is not a number of bytes")
        length = int(header)
        if length > MAX_BODY:
            raise AgentError(f"request body over {MAX_BODY} bytes", 413)
        if not length:
            return None
        try:
            return json.loads(self.rfile.read(length))
        except ValueError as e:
            raise AgentError(f"request body is not JSON: {e}") from None
        except RecursionError:
            raise AgentError("request body is not JSON this agent reads: it nests too deeply") from None

    def _send(self, status: int, payload: Any) -> None:
        payload = render(payload)
        if isinstance(payload, _Raw):
            data, ctype = payload.data, payload.content_type
        elif isinstance(payload, str):
            data, ctype = payload.encode(), "application/yaml"
        else:
            data, ctype = json.dumps(payload, indent=1).encode() + b"\n", "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _dispatch  # noqa: N815 (http.server's naming)

    def address_string(self) -> str:
        return "unix"  # a UNIX socket peer has no address; the base class would index an empty string

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's signature)
        _log.debug("api: " + format, *args)


class APIServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: a burst of clients (probes, CNI at node start) waits, none refused

    def __init__(self, path: Path, agent: Agent) -> None:
        self.agent = agent
        agent.metrics.watch_agent(agent)  # /metrics here shows the state gauges too
        super().__init__(str(path), _RequestHandler, bind_and_activate=False)

        def listen(staging: str) -> None:
            self.server_address = staging
            self.server_bind()
            self.server_activate()

        try:  # 0600 (0660 with the agent's socket group) from the first moment, whatever the umask
            bind_unix(path, listen, agent.config.socket_group)
        except BaseException:
            self.server_close()
            raise
        self.server_address = str(path)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="cilia-api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        Path(str(self.server_address)).unlink(missing_ok=True)


class InProcess:
    """The agent's operations with the REST API's JSON answers, without the socket: what an
    in-process caller written against the API's shapes (the Kubernetes watcher) uses."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def add_endpoint(self, spec: EndpointSpec) -> dict[str, Any]:
        return render(self.agent.add_endpoint(spec))  # type: ignore[no-any-return]

    def remove_endpoint(self, name: str) -> dict[str, Any]:
        return render(self.agent.remove_endpoint(name))  # type: ignore[no-any-return]

    def endpoints(self) -> dict[str, Any]:
        return render(self.agent.endpoints())  # type: ignore[no-any-return]

    def import_policies(self, files: Sequence[tuple[str, str]], audit: bool = False) -> dict[str, Any]:
        return render(self.agent.import_policies(files, audit))  # type: ignore[no-any-return]

    def delete_policies(self, name: str | None, namespace: str | None = None) -> dict[str, Any]:
        return render(self.agent.delete_policies(name, namespace))  # type: ignore[no-any-return]

    def delete_policy_keys(self, keys: Sequence[PolicyKey]) -> dict[str, Any]:
        return render(self.agent.delete_policy_keys(keys))  # type: ignore[no-any-return]

    def policies(self) -> dict[str, Any]:
        return render(self.agent.policies())  # type: ignore[no-any-return]

    def services(self) -> dict[str, Any]:
        return render(self.agent.services())  # type: ignore[no-any-return]

    def replace_named_services(self, namespace: str, name: str, services: Sequence[Service]) -> dict[str, Any] | None:
        """A Kubernetes Service's cilia services (see ``Agent.replace_named_services``); None: no change."""
        done = self.agent.replace_named_services(namespace, name, services)
        return render(done) if done is not None else None
