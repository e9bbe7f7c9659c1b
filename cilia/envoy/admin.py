"""A small client for Envoy's admin API, on a UNIX socket (``unix:PATH``) or ``host:port``.

The supervisor polls ``/ready`` with it, and ``cilia status`` and the tests read server info,
stats, listeners and the config dump through it. Plain ``http.client``: the admin API is HTTP/1.1,
and one short request at a time is all that is needed. The agent's own Envoy has its admin on an
owner-only UNIX socket in the state directory: on TCP any local user could dump the policy, drain
the listeners or stop Envoy.

    AdminError                   base: any failure talking to the admin API (cause kept)
    ├── AdminUnavailable         nothing answered (refused, reset, timed out): Envoy is not up
    └── AdminResponseError       Envoy answered, but with an error status or a body we can't read
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AdminClient",
    "AdminError",
    "AdminResponseError",
    "AdminUnavailable",
    "ListenerInfo",
    "ListenerState",
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


@dataclass(frozen=True, slots=True)
class ListenerState:
    """One dynamic listener as Envoy's config dump shows it: which of its states exist.

    A listener Envoy serves has ``active``; ``warming`` waits for its dependencies; ``draining``
    is an old version still finishing connections; ``error`` is Envoy's message for the last
    update of it that failed (the active version, if any, is then an older one)."""

    name: str
    active: bool
    warming: bool
    draining: bool
    error: str | None


def parse_address(text: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into its parts."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"admin address must be host:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a UNIX stream socket; ``host`` only fills the Host header."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


# Nothing serves at the address: refused, reset, timed out, or (UNIX) no socket file.
_UNAVAILABLE = (ConnectionError, TimeoutError, FileNotFoundError, http.client.IncompleteRead)


class AdminClient:
    """Envoy's admin API at ``unix:PATH`` or ``host:port``; every call is one request on a fresh
    connection."""

    def __init__(self, address: str, *, timeout: float = 5.0) -> None:
        self.address = address
        self._timeout = timeout
        self._unix_path: str | None = None
        if address.startswith("unix:"):
            self._unix_path = address.removeprefix("unix:")
            if not self._unix_path:
                raise ValueError(f"admin address unix:PATH needs a path, got {address!r}")
        else:
            self._host, self._port = parse_address(address)

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

    def stats(self, pattern: str | None = None) -> dict[str, int]:
        """Counters and gauges by name (histograms left out); only the names the RE2 regex
        ``pattern`` finds, if given."""
        query = "" if pattern is None else "&filter=" + urllib.parse.quote(pattern, safe="")
        raw = self._json("/stats?format=json" + query)
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

    def listener_states(self) -> dict[str, ListenerState]:
        """Every dynamic (xDS) listener Envoy knows, by name, from a config dump narrowed by a
        field mask to names, versions and error messages (the full dump carries every RBAC
        table). Static listeners are not included."""
        mask = ",".join(("name", "active_state.version_info", "warming_state.version_info",
                         "draining_state.version_info", "error_state.details"))
        raw = self._json(f"/config_dump?resource=dynamic_listeners&mask={mask}")
        configs = raw.get("configs", [])
        if not isinstance(configs, list):
            raise AdminResponseError("/config_dump: 'configs' is not a list")
        found: dict[str, ListenerState] = {}
        for entry in configs:
            # Envoy also lists each failed update once more without a name; the named entry
            # carries the same message.
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not name:
                continue
            error = entry.get("error_state")
            message = None
            if isinstance(error, dict):
                message = str(error.get("details") or "update failed")
            found[name] = ListenerState(name=name, active="active_state" in entry, warming="warming_state" in entry,
                                        draining="draining_state" in entry, error=message)
        return found

    def drain_listeners(self) -> None:
        """``POST /drain_listeners``: Envoy stops every listener for good (a new Envoy is the only
        way back). For tests and for stopping traffic on purpose."""
        self._request("POST", "/drain_listeners")

    def quit(self) -> None:
        """Ask Envoy to exit (``POST /quitquitquit``). A connection that drops after the
        request went out counts as success: Envoy may close it while shutting down."""
        try:
            self._request("POST", "/quitquitquit")
        except AdminUnavailable as exc:
            if isinstance(exc.__cause__, (ConnectionRefusedError, FileNotFoundError)):
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
        conn = (_UnixHTTPConnection(self._unix_path, self._timeout) if self._unix_path is not None
                else http.client.HTTPConnection(self._host, self._port, timeout=self._timeout))
        try:
            conn.request(method, path)
            response = conn.getresponse()
            body = response.read()
        except _UNAVAILABLE as exc:
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
