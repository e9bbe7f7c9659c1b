"""A small client for Envoy's admin API on loopback.

The supervisor polls ``/ready`` with it, and ``cilia status`` and the tests read server info,
stats, listeners and the config dump through it. Plain ``http.client``: the admin API is HTTP/1.1
on a local port, and one short request at a time is all that is needed.

    AdminError                   base: any failure talking to the admin API (cause kept)
    ├── AdminUnavailable         nothing answered (refused, reset, timed out): Envoy is not up
    └── AdminResponseError       Envoy answered, but with an error status or a body we can't read
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AdminClient",
    "AdminError",
    "AdminResponseError",
    "AdminUnavailable",
    "ListenerInfo",
    "ServerInfo",
    "parse_address",
]


class AdminError(Exception):
    """Talking to Envoy's admin API failed."""


class AdminUnavailable(AdminError):
    """Nothing answered on the admin address (connection refused, reset or timed out)."""


class AdminResponseError(AdminError):
    """Envoy answered with an error status, or with a body that is not what the endpoint returns."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The parts of ``/server_info`` that cilia looks at; ``raw`` has the rest."""

    version: str  # the release, e.g. "1.40.0"
    build: str  # Envoy's full version string: "<sha>/1.40.0/Clean/RELEASE/BoringSSL"
    state: str  # LIVE, DRAINING, PRE_INITIALIZING or INITIALIZING
    uptime_seconds: int
    raw: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ListenerInfo:
    """One listener from ``/listeners``: its name and the address it is bound to."""

    name: str
    address: str  # "host:port", or the pipe path for a UNIX socket listener


def parse_address(text: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into its parts."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"admin address must be host:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class AdminClient:
    """Envoy's admin API at ``host:port``; every call is one request on a fresh connection."""

    def __init__(self, address: str, *, timeout: float = 5.0) -> None:
        self.address = address
        self._host, self._port = parse_address(address)
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"AdminClient({self.address!r})"

    def state(self) -> str:
        """The server state from ``/ready``: ``LIVE`` once Envoy serves (503 bodies name the rest)."""
        _status, body = self._request("GET", "/ready", ok=(200, 503))
        return body.decode("utf-8", "replace").strip()

    def ready(self) -> bool:
        """True when Envoy reports LIVE; raises AdminUnavailable when nothing answers."""
        return self.state() == "LIVE"

    def server_info(self) -> ServerInfo:
        raw = self._json("/server_info")
        build = str(raw.get("version", ""))
        parts = build.split("/")
        uptime = str(raw.get("uptime_current_epoch", "0s")).rstrip("s")
        return ServerInfo(
            version=parts[1] if len(parts) > 1 else build,
            build=build,
            state=str(raw.get("state", "")),
            uptime_seconds=int(uptime) if uptime.isdigit() else 0,
            raw=raw,
        )

    def config_dump(self, *, resource: str | None = None, include_eds: bool = False) -> dict[str, Any]:
        """``/config_dump`` as JSON; ``resource`` narrows it (e.g. ``dynamic_active_clusters``)."""
        query = []
        if resource:
            query.append(f"resource={resource}")
        if include_eds:
            query.append("include_eds")
        return self._json("/config_dump" + ("?" + "&".join(query) if query else ""))

    def stats(self) -> dict[str, int]:
        """Counters and gauges by name (histograms left out)."""
        raw = self._json("/stats?format=json")
        entries = raw.get("stats")
        if not isinstance(entries, list):
            raise AdminResponseError("/stats: no 'stats' list in the response")
        return {e["name"]: e["value"] for e in entries
                if isinstance(e, dict) and isinstance(e.get("value"), int) and "name" in e}

    def listeners(self) -> list[ListenerInfo]:
        raw = self._json("/listeners?format=json")
        found = []
        for entry in raw.get("listener_statuses", []):
            local = entry.get("local_address", {})
            if "socket_address" in local:
                sock = local["socket_address"]
                host = str(sock.get("address", ""))
                host = f"[{host}]" if ":" in host else host
                address = f"{host}:{sock.get('port_value', 0)}"
            else:
                address = str(local.get("pipe", {}).get("path", ""))
            found.append(ListenerInfo(name=str(entry.get("name", "")), address=address))
        return found

    def quit(self) -> None:
        """Ask Envoy to exit (``POST /quitquitquit``). A connection that drops after the
        request went out counts as success: Envoy may close it while shutting down."""
        try:
            self._request("POST", "/quitquitquit")
        except AdminUnavailable as exc:
            if isinstance(exc.__cause__, ConnectionRefusedError):
                raise

    def _json(self, path: str) -> dict[str, Any]:
        _status, body = self._request("GET", path)
        try:
            value = json.loads(body)
        except ValueError as exc:
            raise AdminResponseError(f"{path}: response is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise AdminResponseError(f"{path}: expected a JSON object, got {type(value).__name__}")
        return value

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,)) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            body = response.read()
        except (ConnectionError, TimeoutError, http.client.IncompleteRead) as exc:
            raise AdminUnavailable(f"Envoy admin at {self.address}: {method} {path}: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise AdminError(f"Envoy admin at {self.address}: {method} {path}: {exc}") from exc
        finally:
            conn.close()
        if response.status not in ok:
            text = body.decode("utf-8", "replace").strip()
            raise AdminResponseError(
                f"Envoy admin at {self.address}: {method} {path}: HTTP {response.status}: {text[:500]}",
                status=response.status)
        return response.status, body
