"""HTTP enforcement benchmark: what cilia's Envoy policy costs a keep-alive HTTP load.

    .venv/bin/python bench/http_enforcement.py           # 5 interleaved rounds per case, ~9 minutes
    .venv/bin/python bench/http_enforcement.py --quick   # 1 short round, for smoke use (< 60 s)

A load generator (wrk for HTTP/1.1, h2load for HTTP/2) runs against a backend that is itself an
Envoy answering every request with a static ``200 Ship landed``: directly, and through one
enforcing Envoy (``LoopbackEnvoy``, fed over xDS, one worker) holding one listener per case: plain
tcp_proxy, an HTTP connection manager without RBAC, the Star Wars L3/L4 and L7 policies, 1,000 HTTP
rules with 10,000 source identities (and each dimension alone), and gRPC over HTTP/2.

Each round runs every case twice: saturating (req/s, p50, p99) and at a fixed offered rate
(h2load --rps), where the enforcing Envoy's CPU time per request gives its cost at equal load.
The enforcing Envoy is pinned to a CPU of its own. Prints a table and writes
bench/results/http_enforcement.json. Numbers compare within one run only; nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from envoy.config.listener.v3 import listener_pb2  # noqa: E402
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2  # noqa: E402
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: E402
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2  # noqa: E402
from xds.type.matcher.v3 import ip_pb2  # noqa: E402

from cilia.envoy.admin import AdminClient  # noqa: E402
from cilia.envoy.loopback import LoopbackEnvoy  # noqa: E402
from cilia.netutil import free_port  # noqa: E402
from cilia.envoy.supervisor import EnvoySupervisor  # noqa: E402
from cilia.envoy.translate import (  # noqa: E402
    PortMapping,
    ProxyResources,
    prefixes_by_identity,
    translate_ingress,
)
from cilia.policy import Endpoint, LabelSet, PolicyEngine, load_files, parse_text  # noqa: E402

SCALED = ("scale-l7", "rules-l7", "sources-l7")
RESULTS = HERE / "results" / "http_enforcement.json"
QUICK_RESULTS = HERE / "results" / "http_enforcement-quick.json"
STARWARS = REPO / "examples" / "starwars"
TARGET_COST = 0.10  # the target: L7 policy costs under 10% of Envoy's own throughput

# wrk and h2load cannot bind a source address, so the load always comes from 127.0.0.1 (the
# kernel's source for 127.0.0.0/8 on lo). The allowed client's endpoint therefore *is* 127.0.0.1;
# Envoy listens on deathstar's own address, and a second source (127.0.0.12) is never allowed.
LISTEN = "127.0.0.10"
CLIENT = "127.0.0.1"
STRANGER = "127.0.0.12"
BACKEND = "127.0.0.1"
BODY = "Ship landed\n"
DENIED_BODY = "Access denied\r\n"
DEATHSTAR_HOST = "deathstar.default.svc.cluster.local"
GRPC_PATH = "/pkg.Service/Method"


@dataclass(frozen=True)
class Case:
    """One load target: where the load goes and what it sends, and what it stands for."""

    name: str
    what: str
    protocol: str  # "h1" (wrk) or "h2" (h2load)
    host: str
    port: int
    method: str
    path: str
    denied: tuple[str, str] | None = None  # (method, path) this listener must answer with 403
    baseline: str | None = None  # the no-policy Envoy case its cost is measured against
    target: bool = False  # an L7 case, which the issue's < 10% target is about


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    errors: int
    forwarded: int = 0  # requests the backend answered during the run (warm-up included for h2load)
    proxy_cpu_us: float = 0.0  # enforcing Envoy's CPU time (all threads) per forwarded request
    proxy_busy: float = 0.0  # enforcing Envoy's CPU seconds per second of the run (1.0 = one core)
    backend_cpu_us: float = 0.0


@dataclass
class CaseResult:
    case: Case
    samples: list[Sample] = field(default_factory=list)  # saturating runs
    fixed: list[Sample] = field(default_factory=list)  # fixed-rate runs

    def median(self, attr: str, fixed: bool = False) -> float:
        samples = self.fixed if fixed else self.samples
        return float(statistics.median(getattr(s, attr) for s in samples)) if samples else 0.0


# --- the backend: a second Envoy with a direct_response ----------------------------------


def backend_bootstrap(port: int, admin_port: int) -> dict[str, Any]:
    """A static Envoy answering every HTTP/1.1 or HTTP/2 request with 200 ``Ship landed``."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "backend",
        "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{
            "name": "backend", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": BODY}}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "name": "backend",
            "address": {"socket_address": {"address": BACKEND, "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}],
        }]},
    }


@dataclass
class Backend:
    port: int
    admin: AdminClient
    pid: int

    def served(self) -> int:
        """Requests the backend has answered: the proxied ones, as a denied request never gets here."""
        return self.admin.stats().get("http.backend.downstream_rq_completed", 0)


@contextmanager
def backend_envoy() -> Iterator[Backend]:
    """Run the backend Envoy (one worker)."""
    with tempfile.TemporaryDirectory(prefix="cilia-bench-backend-") as tmp:
        port, admin_port = free_port(BACKEND), free_port()
        path = Path(tmp) / "backend.json"
        path.write_text(json.dumps(backend_bootstrap(port, admin_port)), encoding="utf-8")
        sup = EnvoySupervisor(path, f"127.0.0.1:{admin_port}", log_path=Path(tmp) / "backend.log",
                              concurrency=1, log_level="warning")
        with sup:
            pid = sup.status().pid
            assert pid is not None
            yield Backend(port, sup.admin, pid)


# --- policies -------------------------------------------------------------------------------


def starwars_engine(policy_file: str) -> PolicyEngine:
    """deathstar on LISTEN; tiefighter (org=empire) is the load generator's 127.0.0.1."""
    engine = PolicyEngine()
    for name, labels, ip in (("deathstar", "org=empire,class=deathstar", LISTEN),
                             ("tiefighter", "org=empire,class=tiefighter", CLIENT),
                             ("xwing", "org=alliance,class=xwing", STRANGER)):
        engine.upsert_endpoint(Endpoint(name, LabelSet.parse(labels), (ipaddress.ip_address(ip),)))
    engine.apply(load_files([STARWARS / policy_file]))
    return engine


def rule_path(i: int) -> str:
    """The path regex of synthetic rule ``i``; ``/api/rNNNN/items`` matches rule NNNN only."""
    return f"/api/r{i:04d}/[a-z]+"


def scale_policy_text(n_rules: int) -> str:
    rules = "\n".join(f'        - method: "GET"\n          path: "{rule_path(i)}"' for i in range(n_rules))
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: scale-http
spec:
  endpointSelector:
    matchLabels:
      app: server
  ingress:
  - fromEndpoints:
    - matchLabels:
        role: client
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      rules:
        http:
{rules}
"""


def scale_engine(n_rules: int, n_sources: int) -> PolicyEngine:
    """``n_rules`` HTTP rules (one path each) allowed from ``n_sources`` clients, each its own
    identity with its own /32; the last client is the load generator's 127.0.0.1."""
    loaded = parse_text(scale_policy_text(n_rules), "scale-http.yaml")
    assert loaded.ok, loaded.problems
    engine = PolicyEngine()
    with engine.batch():
        engine.upsert_endpoint(Endpoint("server", LabelSet.parse("app=server"), (ipaddress.ip_address(LISTEN),)))
        for i in range(n_sources):
            ip = ipaddress.ip_address(CLIENT) if i == n_sources - 1 else ipaddress.ip_address(0x0A000001 + i)
            engine.upsert_endpoint(Endpoint(f"client-{i}", LabelSet.parse(f"role=client,pod=client-{i}"), (ip,)))
        engine.apply(loaded.policies)
    return engine


def grpc_engine() -> PolicyEngine:
    """One gRPC method allowed from the load generator, nothing else."""
    text = f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: grpc-method
spec:
  endpointSelector:
    matchLabels:
      app: grpc-server
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: grpc-client
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      rules:
        http:
        - method: "POST"
          path: "{GRPC_PATH}"
"""
    loaded = parse_text(text, "grpc-method.yaml")
    assert loaded.ok, loaded.problems
    engine = PolicyEngine()
    engine.upsert_endpoint(Endpoint("grpc-server", LabelSet.parse("app=grpc-server"), (ipaddress.ip_address(LISTEN),)))
    engine.upsert_endpoint(Endpoint("grpc-client", LabelSet.parse("app=grpc-client"), (ipaddress.ip_address(CLIENT),)))
    engine.apply(loaded.policies)
    return engine


def translate(name: str, engine: PolicyEngine, endpoint: str, listen_port: int, backend_port: int) -> ProxyResources:
    ep = engine.endpoint_policy(endpoint)
    res = translate_ingress(name, ep.map_state.ingress, [PortMapping(80, listen_port, backend_port)],
                            LISTEN, BACKEND, prefixes_by_identity(engine.ipcache.items()))
    assert res.notes == (), res.notes
    return res


# --- no-policy variants of a translated listener ---------------------------------------------


def _unpack(packed: any_pb2.Any, msg: Any) -> Any:
    assert packed.Unpack(msg), packed.type_url
    return msg


def without_rbac(res: ProxyResources) -> ProxyResources:
    """The same listeners minus both RBAC filters: an HCM that allows all, or a bare tcp_proxy.

    Everything else (HCM settings, local reply, cluster) stays as translated, so the difference
    to the translated listener is the policy alone."""
    listeners = []
    for li in res.listeners:
        out = listener_pb2.Listener()
        out.CopyFrom(li)
        chain = out.filter_chains[0]
        kept = [f for f in chain.filters if f.name != "envoy.filters.network.rbac"]
        for f in kept:
            if f.name == "envoy.filters.network.http_connection_manager":
                hcm = _unpack(f.typed_config, hcm_pb2.HttpConnectionManager())
                filters = [h for h in hcm.http_filters if h.name != "envoy.filters.http.rbac"]
                del hcm.http_filters[:]
                hcm.http_filters.extend(filters)
                f.typed_config.Pack(hcm)
        del chain.filters[:]
        chain.filters.extend(kept)
        listeners.append(out)
    return ProxyResources(tuple(listeners), res.clusters, res.notes)


def merge(parts: Sequence[ProxyResources]) -> ProxyResources:
    return ProxyResources(tuple(li for p in parts for li in p.listeners), tuple(c for p in parts for c in p.clusters))


def http_rbac(res: ProxyResources) -> http_rbac_pb2.RBAC:
    for f in res.listeners[0].filter_chains[0].filters:
        if f.name == "envoy.filters.network.http_connection_manager":
            hcm = _unpack(f.typed_config, hcm_pb2.HttpConnectionManager())
            for h in hcm.http_filters:
                if h.name == "envoy.filters.http.rbac":
                    rbac: http_rbac_pb2.RBAC = _unpack(h.typed_config, http_rbac_pb2.RBAC())
                    return rbac
    raise AssertionError("no HTTP RBAC filter")


def matcher_shape(res: ProxyResources, path: str) -> dict[str, int]:
    """How much work the HTTP RBAC matcher has for ``path``: source ranges in its IP trie, the
    HTTP rules of the largest policy, and how many of them a request for ``path`` tries (the
    1-based position of the first matching rule in the list it lands on: a plain rule list, or
    the ``:path`` prefix bucket cilia builds for many rules)."""
    tree = http_rbac(res).matcher.matcher_tree
    ipm = _unpack(tree.custom_match.typed_config, ip_pb2.IPMatcher())
    ranges = sum(len(r.ranges) for r in ipm.range_matchers)
    nested = [r.on_match.matcher for r in ipm.range_matchers if r.on_match.HasField("matcher")]
    if not nested:
        return {"source_ranges": ranges, "rules": 0, "matched_rule_position": 0}
    biggest = max(nested, key=lambda m: len(_rule_lists(m)))
    rules = {fm.predicate.SerializeToString(deterministic=True) for ml in _rule_lists(biggest) for fm in ml.matchers}
    tried = biggest.matcher_list
    if biggest.HasField("matcher_tree"):
        buckets = biggest.matcher_tree.prefix_match_map.map
        keys = [k for k in buckets if path.startswith(k)]
        tried = (buckets[max(keys, key=len)].matcher if keys else biggest.on_no_match.matcher).matcher_list
    position = 0
    for i, fm in enumerate(tried.matchers, 1):
        preds = fm.predicate.and_matcher.predicate or [fm.predicate]
        regexes = [p.single_predicate.value_match.safe_regex.regex for p in preds]
        if any(re.fullmatch(rx, path) for rx in regexes if rx.startswith("/")):
            position = i
            break
    return {"source_ranges": ranges, "rules": len(rules), "matched_rule_position": position}


def _rule_lists(m: Any) -> list[Any]:
    """Every rule list in a policy's matcher: the list itself, or each prefix bucket's."""
    if m.HasField("matcher_tree"):
        return [b.matcher.matcher_list for b in m.matcher_tree.prefix_match_map.map.values()]
    return [m.matcher_list]


# --- the rig: backend + enforcing Envoy with one listener per case -----------------------------


@dataclass
class Rig:
    cases: list[Case]
    envoy: LoopbackEnvoy
    backend: Backend
    setup: dict[str, Any]


@contextmanager
def rig(n_rules: int, n_sources: int, *, h2: bool = True) -> Iterator[Rig]:
    """Start the backend and the enforcing Envoy with every case's listener; stop both on exit."""
    with ExitStack() as stack:
        back = stack.enter_context(backend_envoy())
        backend = back.port
        setup: dict[str, Any] = {}
        ports = {n: free_port(LISTEN) for n in ("tcp", "hcm", "l4", "l7", "h2-hcm", "h2-l7", *SCALED)}
        sw_l7 = starwars_engine("sw_l3_l4_l7_policy.yaml")
        sw_l4 = starwars_engine("sw_l3_l4_policy.yaml")
        parts = [
            without_rbac(translate("tcp", sw_l4, "deathstar", ports["tcp"], backend)),
            without_rbac(translate("hcm", sw_l7, "deathstar", ports["hcm"], backend)),
            translate("l4", sw_l4, "deathstar", ports["l4"], backend),
            translate("l7", sw_l7, "deathstar", ports["l7"], backend),
        ]
        scaled: list[Case] = []
        # the full size, then each dimension alone, to tell what the cost grows with
        for name, rules, sources in (("scale-l7", n_rules, n_sources), ("rules-l7", n_rules, 1),
                                     ("sources-l7", 1, n_sources)):
            t0 = time.perf_counter()
            eng = scale_engine(rules, sources)
            t1 = time.perf_counter()
            res = translate(name, eng, "server", ports[name], backend)
            t2 = time.perf_counter()
            target = f"/api/r{rules - 1:04d}/items"  # the last rule the matcher tries
            setup[name] = {"rules": rules, "sources": sources, "identities": len(eng.ipcache.items()),
                           "engine_s": round(t1 - t0, 3), "translate_s": round(t2 - t1, 3),
                           "listener_bytes": res.listeners[0].ByteSize(), "path": target,
                           **matcher_shape(res, target)}
            parts.append(res)
            scaled.append(Case(name, f"{rules:,} HTTP rules, {sources:,} source identities", "h1", LISTEN,
                               ports[name], "GET", target, denied=("GET", f"/api/r{rules:04d}/items"),
                               baseline="envoy-hcm", target=True))
        landing = ("POST", "/v1/request-landing")
        cases = [
            Case("direct", "wrk -> backend Envoy", "h1", BACKEND, backend, *landing),
            Case("envoy-tcp", "tcp_proxy, no policy", "h1", LISTEN, ports["tcp"], *landing),
            Case("envoy-hcm", "HTTP connection manager, no RBAC", "h1", LISTEN, ports["hcm"], *landing),
            Case("sw-l3l4", "Star Wars L3/L4 policy (network RBAC + tcp_proxy)", "h1", LISTEN, ports["l4"],
                 *landing, baseline="envoy-tcp"),
            Case("sw-l7", "Star Wars L7 policy (network + HTTP RBAC)", "h1", LISTEN, ports["l7"], *landing,
                 denied=("PUT", "/v1/exhaust-port"), baseline="envoy-hcm", target=True),
            *scaled,
        ]
        if h2:
            grpc = translate("h2-l7", grpc_engine(), "grpc-server", ports["h2-l7"], backend)
            parts += [without_rbac(translate("h2-hcm", grpc_engine(), "grpc-server", ports["h2-hcm"], backend)), grpc]
            cases += [
                Case("h2-direct", "h2load -> backend Envoy", "h2", BACKEND, backend, "POST", GRPC_PATH),
                Case("h2-hcm", "HTTP/2, HCM without RBAC", "h2", LISTEN, ports["h2-hcm"], "POST", GRPC_PATH),
                Case("h2-l7", "HTTP/2, L7 rule on the gRPC method", "h2", LISTEN, ports["h2-l7"], "POST",
                     GRPC_PATH, denied=("POST", "/pkg.Service/Other"), baseline="h2-hcm", target=True),
            ]
        envoy = stack.enter_context(LoopbackEnvoy("http-bench", ack_timeout=60.0))
        t3 = time.perf_counter()
        envoy.start(merge(parts))
        setup["envoy_start_s"] = round(time.perf_counter() - t3, 3)
        yield Rig(cases, envoy, back, setup)


# --- checks: the policy really is enforced on the listener under load ------------------------


def request(case: Case, method: str, path: str, source: str = CLIENT) -> tuple[int, str]:
    """One HTTP/1.1 request (HCM's AUTO codec takes it on the h2 listeners too): the status and
    body, or for a gRPC request the grpc-status and grpc-message (Envoy answers gRPC requests'
    local replies, its 403 included, as a trailers-only 200 with grpc-status 7)."""
    conn = http.client.HTTPConnection(case.host, case.port, timeout=5, source_address=(source, 0))
    try:
        headers = {"Host": DEATHSTAR_HOST}
        if case.protocol == "h2":
            headers["Content-Type"] = "application/grpc"
        conn.request(method, path, body=b"", headers=headers)
        resp = conn.getresponse()
        body = resp.read().decode()
        if case.protocol == "h2":
            return int(resp.getheader("grpc-status", "-1")), urllib.parse.unquote(resp.getheader("grpc-message", ""))
        return resp.status, body
    finally:
        conn.close()


def refused(case: Case, source: str) -> bool:
    """True if the listener drops ``source`` before any HTTP answer (the network RBAC)."""
    try:
        request(case, case.method, case.path, source)
    except (ConnectionError, http.client.RemoteDisconnected, TimeoutError):
        return True
    return False


GRPC_UNKNOWN, GRPC_PERMISSION_DENIED = 2, 7


def check(case: Case) -> None:
    """The loaded request reaches the backend; a denied one gets Envoy's 403 (grpc-status 7 for
    gRPC); a source no rule allows (on policy listeners) gets no answer at all."""
    # The backend's direct_response to a gRPC request is a trailers-only grpc-status 2 (UNKNOWN).
    ok, denied = ((GRPC_UNKNOWN, BODY), (GRPC_PERMISSION_DENIED, DENIED_BODY)) if case.protocol == "h2" else \
        ((200, BODY), (403, DENIED_BODY))
    got = request(case, case.method, case.path)
    if got != ok:
        raise AssertionError(f"{case.name}: {case.method} {case.path} -> {got}, expected {ok}")
    if case.denied is not None:
        got = request(case, *case.denied)
        if got != denied:
            raise AssertionError(f"{case.name}: {case.denied} -> {got}, expected {denied}")
    if case.baseline is not None and not refused(case, STRANGER):
        raise AssertionError(f"{case.name}: {STRANGER} was not refused")


# --- load generators ------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> Sample:
    def find(pattern: str, default: str | None = None) -> str:
        m = re.search(pattern, out)
        if m is None:
            if default is None:
                raise ValueError(f"wrk output lacks {pattern!r}:\n{out}")
            return default
        return m.group(1)

    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Sample(
        rps=float(find(r"Requests/sec:\s+([\d.]+)")),
        p50_ms=_ms(find(r"\n\s+50%\s+(\S+)")),
        p99_ms=_ms(find(r"\n\s+99%\s+(\S+)")),
        requests=int(find(r"(\d+) requests in")),
        non_2xx=int(find(r"Non-2xx or 3xx responses: (\d+)", "0")),
        errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def run_wrk(case: Case, duration: float, connections: int, tmp: Path, prefix: Sequence[str] = ()) -> Sample:
    script = tmp / f"{case.name}.lua"
    lua = f'wrk.method = "{case.method}"\nwrk.headers["Host"] = "{DEATHSTAR_HOST}"\n'
    script.write_text(lua, encoding="utf-8")
    seconds = max(1, round(duration))  # wrk takes whole seconds
    cmd = [*prefix, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
           f"http://{case.host}:{case.port}{case.path}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=duration + 30).stdout
    return parse_wrk(out)


def parse_h2load(out: str, log: str) -> Sample:
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                     out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if done is None or codes is None or rps is None:
        raise ValueError(f"unexpected h2load output:\n{out}")
    # the log has one line per request: start time, status, elapsed microseconds
    lat = sorted(float(line.split()[2]) / 1e3 for line in log.splitlines() if line.strip())
    if not lat:
        raise ValueError("h2load logged no requests")
    return Sample(
        rps=float(rps.group(1)),
        p50_ms=lat[len(lat) // 2],
        p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        requests=int(done.group(2)),
        non_2xx=int(done.group(2)) - int(codes.group(1)),
        errors=int(done.group(4)) + int(done.group(5)),
    )


def run_h2load(case: Case, duration: float, connections: int, streams: int, tmp: Path,
               prefix: Sequence[str] = (), rate: int | None = None) -> Sample:
    """h2load for ``duration`` seconds: HTTP/2 with a gRPC-shaped POST for h2 cases, HTTP/1.1 (one
    request at a time per connection, as wrk) for h1 ones; at ``rate`` req/s in all, if given."""
    log = tmp / f"{case.name}.h2load.log"
    cmd = [*prefix, "h2load", "-t1", f"-c{connections}", f"-D{max(1, round(duration))}", "--warm-up-time=200ms",
           "-H", f"host: {DEATHSTAR_HOST}", "--log-file", str(log)]
    if case.protocol == "h2":
        body = tmp / "grpc-frame"
        body.write_bytes(b"\x00\x00\x00\x00\x00")  # an empty gRPC message: no compression, length 0
        cmd += [f"-m{streams}", "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    else:
        cmd += ["--h1", "-m1"]
        # a bodiless request as from wrk (h2load's HTTP/1.1 client hangs on -d bodies)
        cmd += ["-H", f":method: {case.method}"]
    if rate is not None:
        cmd.append(f"--rps={max(1, rate // connections)}")
    cmd.append(f"http://{case.host}:{case.port}{case.path}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=duration + 30).stdout
    return parse_h2load(out, log.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Load:
    duration: float = 5.0  # the saturating run (wrk for h1, h2load for h2)
    fixed_duration: float = 3.0  # the fixed-rate run (h2load --rps)
    fixed_rate: int = 1600  # req/s offered in the fixed-rate run, below every case's capacity
    rounds: int = 5
    connections: int = 16
    h2_connections: int = 4
    h2_streams: int = 4
    warmup: float = 1.0


def pin(pid: int, cpus: set[int]) -> None:
    """Move every thread of process ``pid`` (one of ours) onto ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def cpu_seconds(pid: int) -> float:
    """CPU time process ``pid`` has run, summed over its threads (schedstat: nanoseconds, where
    /proc/PID/stat counts 10 ms ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return total / 1e9


def measure(cases: Sequence[Case], load: Load, backend: Backend, proxy_pid: int,
            log: Any = sys.stderr, *, pinned: bool = False) -> list[CaseResult]:
    """Each round runs every case once, in order, so slow drift in the machine hits all alike.

    A sample whose requests did not all reach the backend was (partly) answered by Envoy itself,
    a denial, and measures the wrong thing: ``unforwarded`` in the summary counts them.

    Besides what the load generator sees, each sample records the CPU time the enforcing Envoy
    spent per request. On a core of its own, Envoy's throughput is its inverse.

    ``pinned``: the enforcing Envoy gets the last CPU to itself, and the load generator and the
    backend share the others, so that Envoy, when it is the bottleneck, is measured alone."""
    prefix: list[str] = []
    if pinned:
        cpus = sorted(os.sched_getaffinity(0))
        rest = set(cpus[:-1])
        pin(proxy_pid, {cpus[-1]})
        pin(backend.pid, rest)
        prefix = ["taskset", "-c", ",".join(map(str, sorted(rest)))]
    results = [CaseResult(c) for c in cases]
    with tempfile.TemporaryDirectory(prefix="cilia-bench-load-") as tmp_name:
        tmp = Path(tmp_name)

        def one(case: Case, duration: float, fixed: bool = False) -> Sample:
            conns = load.connections if case.protocol == "h1" else load.h2_connections
            before = backend.served()
            cpu0, back0, t0 = cpu_seconds(proxy_pid), cpu_seconds(backend.pid), time.monotonic()
            if fixed:
                sample = run_h2load(case, duration, conns, load.h2_streams, tmp, prefix, rate=load.fixed_rate)
            elif case.protocol == "h1":
                sample = run_wrk(case, duration, conns, tmp, prefix)
            else:
                sample = run_h2load(case, duration, conns, load.h2_streams, tmp, prefix)
            cpu1, back1, t1 = cpu_seconds(proxy_pid), cpu_seconds(backend.pid), time.monotonic()
            sample.forwarded = backend.served() - before
            per_req = 1e6 / max(1, sample.forwarded)
            sample.proxy_cpu_us = (cpu1 - cpu0) * per_req if case.host == LISTEN else 0.0
            sample.proxy_busy = (cpu1 - cpu0) / (t1 - t0) if case.host == LISTEN else 0.0
            sample.backend_cpu_us = (back1 - back0) * per_req
            return sample

        if load.warmup > 0:
            for case in cases:
                one(case, load.warmup)
        for rnd in range(load.rounds):
            for res in results:
                sample = one(res.case, load.duration)
                res.samples.append(sample)
                fixed = one(res.case, load.fixed_duration, fixed=True) if load.fixed_duration > 0 else None
                if fixed is not None:
                    res.fixed.append(fixed)
                print(f"round {rnd + 1}/{load.rounds} {res.case.name:10} {sample.rps:8.0f} req/s "
                      f"p50 {sample.p50_ms:.3f} ms p99 {sample.p99_ms:.3f} ms envoy {sample.proxy_cpu_us:.1f} us/req"
                      + (f" | at {fixed.rps:.0f} req/s: envoy {fixed.proxy_cpu_us:.1f} us/req "
                         f"p50 {fixed.p50_ms:.3f} ms" if fixed else ""), file=log, flush=True)
    return results


# --- report -----------------------------------------------------------------------------------


def summarize(results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """Medians over rounds, and each case against its baseline (the same Envoy without policy).

    Saturating runs: ``cost`` is the req/s lost, ``cost_paired`` the median over rounds of each
    round's loss (less exposed to drift between rounds). Fixed-rate runs: ``cpu_cost`` is the
    capacity lost by Envoy's CPU per request at the same offered load, ``1 - cpu(baseline) /
    cpu(case)``: the req/s that would be lost were Envoy alone on its core and the bottleneck."""
    by_name = {r.case.name: r for r in results}
    rows = []
    for r in results:
        rps = r.median("rps")
        row: dict[str, Any] = {
            "case": r.case.name, "what": r.case.what, "protocol": r.case.protocol, "method": r.case.method,
            "path": r.case.path, "baseline": r.case.baseline, "target": r.case.target,
            "rps": round(rps, 1), "p50_ms": round(r.median("p50_ms"), 4), "p99_ms": round(r.median("p99_ms"), 4),
            "proxy_cpu_us": round(r.median("proxy_cpu_us"), 2), "proxy_busy": round(r.median("proxy_busy"), 3),
            "backend_cpu_us": round(r.median("backend_cpu_us"), 2),
            "requests": sum(s.requests for s in r.samples),
            "non_2xx": sum(s.non_2xx for s in [*r.samples, *r.fixed]),
            "errors": sum(s.errors for s in [*r.samples, *r.fixed]),
            "unforwarded": sum(max(0, s.requests - s.forwarded) for s in [*r.samples, *r.fixed]),
        }
        if r.fixed:
            row["fixed"] = {"rps": round(r.median("rps", True), 1), "p50_ms": round(r.median("p50_ms", True), 4),
                            "p99_ms": round(r.median("p99_ms", True), 4),
                            "proxy_cpu_us": round(r.median("proxy_cpu_us", True), 2),
                            "proxy_busy": round(r.median("proxy_busy", True), 3),
                            "backend_cpu_us": round(r.median("backend_cpu_us", True), 2)}
        base = by_name.get(r.case.baseline or ("envoy-hcm" if r.case.protocol == "h1" else "h2-hcm"))
        if base is not None and base is not r:
            row["vs_envoy"] = round(rps / base.median("rps"), 4)
        direct = by_name.get("direct" if r.case.protocol == "h1" else "h2-direct")
        if direct is not None:
            row["vs_direct"] = round(rps / direct.median("rps"), 4)
        if r.case.baseline is not None and base is not None:
            row["cost"] = round(1 - rps / base.median("rps"), 4)
            row["cost_paired"] = round(statistics.median(
                1 - s.rps / b.rps for s, b in zip(r.samples, base.samples)), 4)
            fixed = bool(r.fixed and base.fixed)
            if r.median("proxy_cpu_us", fixed) > 0:
                row["cpu_cost"] = round(1 - base.median("proxy_cpu_us", fixed) / r.median("proxy_cpu_us", fixed), 4)
                row["cpu_added_us"] = round(r.median("proxy_cpu_us", fixed) - base.median("proxy_cpu_us", fixed), 2)
            row["p50_added_ms"] = round(r.median("p50_ms") - base.median("p50_ms"), 4)
        row["samples"] = [asdict(s) for s in r.samples]
        row["fixed_samples"] = [asdict(s) for s in r.fixed]
        rows.append(row)
    return rows


def table(rows: Sequence[dict[str, Any]], fixed_rate: int) -> str:
    head = (f"{'':10} {'saturating (wrk / h2load)':^46} | {f'fixed {fixed_rate} req/s (h2load)':^35} |\n"
            f"{'case':10} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'vs envoy':>8} {'cost':>6} {'paired':>6} | "
            f"{'us/req':>7} {'p50 ms':>7} {'p99 ms':>7} {'cpu cost':>8} |  what (vs baseline)")
    lines = [head, "-" * len(head.splitlines()[1])]

    def pct(r: dict[str, Any], key: str) -> str:
        return f"{r[key]:+.0%}" if key in r else "-"

    for r in rows:
        vs_envoy = f"{r['vs_envoy']:.3f}" if "vs_envoy" in r else "-"
        f = r.get("fixed", {})
        cpu = f"{f['proxy_cpu_us']:.1f}" if f.get("proxy_cpu_us") else "-"
        fixed = f"{cpu:>7} {f.get('p50_ms', 0):7.3f} {f.get('p99_ms', 0):7.3f}" if f else f"{'-':>7} {'-':>7} {'-':>7}"
        bad = f"  [{r['non_2xx']} non-2xx, {r['errors']} errors, {r['unforwarded']} unforwarded]" \
            if r["non_2xx"] or r["errors"] or r["unforwarded"] else ""
        lines.append(f"{r['case']:10} {r['rps']:7.0f} {r['p50_ms']:7.3f} {r['p99_ms']:7.3f} {vs_envoy:>8} "
                     f"{pct(r, 'cost'):>6} {pct(r, 'cost_paired'):>6} | {fixed} {pct(r, 'cpu_cost'):>8} |  "
                     f"{r['what']} (vs {r['baseline'] or '-'}){bad}")
    return "\n".join(lines)


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s per case, < 60 s in all")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=float, help="seconds per run")
    ap.add_argument("--connections", type=int, default=16, help="wrk connections (one wrk thread)")
    ap.add_argument("--fixed-rate", type=int, default=1600, help="req/s offered in the fixed-rate runs")
    ap.add_argument("--fixed-duration", type=float, help="seconds per fixed-rate run (0: none)")
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--sources", type=int, default=10000)
    ap.add_argument("--no-h2", action="store_true", help="skip the HTTP/2 (h2load) cases")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not give the enforcing Envoy a CPU of its own (pinning needs 2+ CPUs and taskset)")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args(argv)
    for tool in ("wrk", "h2load"):
        if shutil.which(tool) is None and not (tool == "h2load" and args.no_h2):
            print(f"{tool} is not installed (apt-get install {'wrk' if tool == 'wrk' else 'nghttp2-client'})",
                  file=sys.stderr)
            return 2
    load = Load(duration=args.duration or (1.0 if args.quick else 5.0),
                rounds=args.rounds or (1 if args.quick else 5),
                fixed_duration=args.fixed_duration if args.fixed_duration is not None else (1.0 if args.quick else 3.0),
                fixed_rate=args.fixed_rate, connections=args.connections, warmup=0.0 if args.quick else 1.0)
    output = args.output or (QUICK_RESULTS if args.quick else RESULTS)
    pinned = not args.no_pin and len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset") is not None
    started = time.perf_counter()
    print(f"setting up: {args.rules:,} rules x {args.sources:,} sources ...", file=sys.stderr, flush=True)
    with rig(args.rules, args.sources, h2=not args.no_h2) as r:
        print(f"setup: {json.dumps(r.setup)}", file=sys.stderr, flush=True)
        for case in r.cases:
            check(case)
        assert r.envoy.pid is not None
        results = measure(r.cases, load, r.backend, r.envoy.pid, pinned=pinned)
        for case in r.cases:  # still enforcing after the load
            check(case)
    rows = summarize(results)
    print(table(rows, load.fixed_rate))
    targeted = {c.name for c in r.cases if c.target}
    # judged on Envoy's CPU per request at equal load: req/s on a shared machine move with the neighbours
    verdicts = {row["case"]: row["cpu_cost"] < TARGET_COST for row in rows if row["case"] in targeted}
    print("target: L7 policy costs < 10% of Envoy's own throughput (by Envoy CPU per request): " +
          ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in verdicts.items()))
    report = {
        "benchmark": "http_enforcement",
        "quick": args.quick,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "wrk": tool_version(["wrk", "-v"]), "h2load": tool_version(["h2load", "--version"])},
        "load": asdict(load),
        "envoy": {"concurrency": 1, "note": "enforcing and backend Envoy run one worker each",
                  "pinned": pinned, "pinning": "enforcing Envoy alone on the last CPU; load generator and "
                                               "backend Envoy on the others" if pinned else None},
        "source_address_note": f"wrk/h2load cannot bind a source; the allowed client's endpoint IP is {CLIENT}",
        "setup": r.setup,
        "target_cost": TARGET_COST,
        "target_met": verdicts,
        "cases": rows,
        "total_s": round(time.perf_counter() - started, 1),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {output.relative_to(REPO) if output.is_relative_to(REPO) else output} "
          f"in {report['total_s']} s", file=sys.stderr)
    return 0 if all(row["non_2xx"] == 0 and row["errors"] == 0 and row["unforwarded"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
