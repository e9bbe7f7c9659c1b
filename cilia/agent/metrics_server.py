"""The agent's TCP endpoints for the cluster's tools: ``/metrics`` for Prometheus
(``--prometheus-serve-addr``, Cilium's flag, port 9962) and, for kubelet probes on
``--agent-health-port`` (Cilium's 9879), ``/healthz`` (200 healthy, 503 degraded, with reasons)
and ``/livez`` (200 whenever the agent answers). Read-only: the REST API (which can change policy)
stays on the UNIX socket.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

_log = logging.getLogger(__name__)

PROMETHEUS_PORT = 9962
HEALTH_PORT = 9879

Page = Callable[[], tuple[int, str, bytes]]  # status, content type, body


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (every address), ``[v6]:PORT`` or ``HOST`` (the default port)."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        host, port = text, str(default_port)
    host = host.strip("[]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT (or :PORT)")
    return host, int(port)


class _Handler(BaseHTTPRequestHandler):
    server: TcpPages

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        page = self.server.pages.get(self.path.split("?", 1)[0])
        if page is None:
            status, ctype, body = 404, "text/plain", f"no such path; try {', '.join(self.server.pages)}\n".encode()
        else:
            try:
                status, ctype, body = page()
            except Exception as e:  # answer, keep serving
                _log.exception("GET %s failed", self.path)
                status, ctype, body = 500, "text/plain", f"internal error: {e}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's signature)
        _log.debug("http: " + format, *args)


class TcpPages(ThreadingHTTPServer):
    """A few read-only pages on a TCP address, served on a thread of their own."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], pages: dict[str, Page]) -> None:
        if ":" in address[0]:
            self.address_family = __import__("socket").AF_INET6
        self.pages = pages
        super().__init__(address, _Handler)
        self._thread = threading.Thread(target=self.serve_forever, name=f"cilia-http-{address[1]}", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def metrics_page(agent: Any) -> Page:
    agent.metrics.watch_agent(agent)
    return lambda: (200, CONTENT_TYPE_LATEST, agent.metrics.exposition())


def health_page(agent: Any) -> Page:
    """200 while the agent is healthy, 503 with the reasons when it is not (as the API's /healthz)."""
    def page() -> tuple[int, str, bytes]:
        status = agent.status()
        if status["healthy"]:
            return 200, "application/json", b'{"status": "ok"}\n'
        body = {"status": "degraded", "reasons": status["reasons"]}
        return 503, "application/json", json.dumps(body).encode() + b"\n"
    return page


def live_page(agent: Any) -> Page:
    """200 whenever the agent answers its status at all (liveness: restart only a hung agent)."""
    def page() -> tuple[int, str, bytes]:
        agent.status()
        return 200, "application/json", b'{"status": "alive"}\n'
    return page


def start_servers(agent: Any, prometheus_address: str | None, health_port: int | None) -> list[TcpPages]:
    """The TCP servers the agent was asked for, started; stop() each when the agent stops."""
    servers: list[TcpPages] = []
    try:
        if prometheus_address:
            servers.append(TcpPages(parse_address(prometheus_address, PROMETHEUS_PORT),
                                    {"/metrics": metrics_page(agent)}))
        if health_port:
            servers.append(TcpPages(("", health_port), {"/healthz": health_page(agent), "/livez": live_page(agent)}))
    except BaseException:
        for s in servers:
            s.server_close()
        raise
    for s in servers:
        s.start()
    return servers
