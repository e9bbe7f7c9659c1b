"""The CLI's client for the agent's REST API on its UNIX socket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import socket

import httpx


class APIError(Exception):
    """The agent refused a request (``status`` as it answered) or could not be reached (status 0)."""

    def __init__(self, message: str, status: int = 0, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.problems = problems or []


class AgentClient:
    def __init__(self, socket_path: str | Path, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self._client = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)),
                                    base_url="http://cilia", timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        self._check_reachable()
        try:
            resp = self._client.request(method, path, json=json, params=params,
                                        timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.TransportError as e:
            raise APIError(f"cannot reach the agent at {self.socket_path}: {e} "
                           "(is `cilia agent` running? see --state-dir / CILIA_STATE_DIR)") from None
        try:
            payload = resp.json()
        except ValueError:
            payload = {"error": resp.text}
        if resp.status_code >= 400:
            raise APIError(str(payload.get("error", resp.text)), resp.status_code, payload.get("problems", []))
        return payload

    def _check_reachable(self) -> None:
        # httpcore leaks its socket when a UNIX connect fails, so find out first on one we close.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2.0)
            try:
                probe.connect(str(self.socket_path))
            except OSError as e:
                raise APIError(f"cannot reach the agent at {self.socket_path}: {e.strerror or e} "
                               "(is `cilia agent` running? see --state-dir / CILIA_STATE_DIR)") from None

    def status(self) -> Any:
        return self.request("GET", "/v1/status")

    def metrics(self) -> str:
        """The Prometheus exposition text."""
        self._check_reachable()
        try:
            resp = self._client.get("/metrics")
        except httpx.TransportError as e:
            raise APIError(f"cannot reach the agent at {self.socket_path}: {e}") from None
        return resp.text

    def debug_info(self, flows: int = 1000) -> Any:
        return self.request("GET", "/v1/debuginfo", params={"flows": flows}, timeout=60)

    def healthz(self) -> tuple[int, Any]:
        self._check_reachable()
        resp = self._client.get("/healthz")
        return resp.status_code, resp.json()

    def import_policies(self, files: list[tuple[str, str]], audit: bool = False) -> Any:
        return self.request("POST", "/v1/policies", json={"files": [{"path": p, "text": t} for p, t in files],
                                                           "audit": audit})

    def diff_policies(self, files: list[tuple[str, str]], last: int | None = None) -> Any:
        body: dict[str, Any] = {"files": [{"path": p, "text": t} for p, t in files]}
        if last is not None:
            body["last"] = last
        return self.request("POST", "/v1/policies/diff", json=body)

    def trace(self, body: dict[str, Any]) -> Any:
        return self.request("POST", "/v1/policies/trace", json=body)

    def policies(self) -> Any:
        return self.request("GET", "/v1/policies")

    def delete_policies(self, name: str | None, namespace: str | None = None) -> Any:
        params: dict[str, Any] = {"all": "true"} if name is None else {"name": name}
        if namespace:
            params["namespace"] = namespace
        return self.request("DELETE", "/v1/policies", params=params)

    def wait(self, revision: int, timeout: float) -> Any:
        return self.request("GET", f"/v1/revisions/{revision}/wait", params={"timeout": timeout},
                            timeout=timeout + 10)

    def add_endpoint(self, spec: dict[str, Any]) -> Any:
        return self.request("POST", "/v1/endpoints", json=spec)

    def endpoints(self) -> Any:
        return self.request("GET", "/v1/endpoints")

    def remove_endpoint(self, name: str) -> Any:
        return self.request("DELETE", f"/v1/endpoints/{name}")

    def update_service(self, service: dict[str, Any]) -> Any:
        return self.request("POST", "/v1/services", json=service)

    def services(self) -> Any:
        return self.request("GET", "/v1/services")

    def service(self, service_id: int) -> Any:
        return self.request("GET", f"/v1/services/{service_id}")

    def delete_service(self, service_id: int) -> Any:
        return self.request("DELETE", f"/v1/services/{service_id}")

    def identities(self) -> Any:
        return self.request("GET", "/v1/identities")

    def fqdn_cache(self, name: str | None = None) -> Any:
        return self.request("GET", "/v1/fqdn/cache", params={"name": name} if name else None)

    def fqdn_clean(self, name: str | None = None) -> Any:
        return self.request("DELETE", "/v1/fqdn/cache", params={"name": name} if name else None)

    def nodes(self) -> Any:
        return self.request("GET", "/v1/nodes")

    def cluster_identities(self) -> Any:
        return self.request("GET", "/v1/cluster/identities")

    def cluster_health(self) -> Any:
        return self.request("GET", "/v1/cluster/health")

    def kvstore(self, key: str | None = None, prefix: str | None = None) -> Any:
        params = {"key": key} if key is not None else {"prefix": prefix}
        return self.request("GET", "/v1/kvstore", params=params)

    def bpf_policy(self, name: str) -> Any:
        return self.request("GET", f"/v1/endpoints/{name}/bpf-policy")

    def bpf_lb(self) -> Any:
        return self.request("GET", "/v1/bpf/lb")

    def monitor(self, since: int | None = None, limit: int | None = None, wait: int = 0, trace: bool = False) -> Any:
        params: dict[str, Any] = {k: v for k, v in (("since", since), ("limit", limit), ("wait", wait))
                                  if v is not None}
        if trace:
            params["trace"] = "true"
        return self.request("GET", "/v1/monitor", params=params, timeout=wait + 30)

    def flows(self, since: int | None = None, limit: int | None = None, **filters: Any) -> Any:
        """``filters``: GET /v1/flows's filter parameters (openapi.yaml): lists of strings, or
        since_time/until_time as UNIX times."""
        params: dict[str, Any] = {k: v for k, v in (("since", since), ("limit", limit)) if v is not None}
        params.update({k: v for k, v in filters.items() if v})
        return self.request("GET", "/v1/flows", params=params)
