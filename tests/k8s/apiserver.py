"""A test server for the Kubernetes API's list and watch protocol (no API server can run here).

``KubeTestServer`` serves, over plain HTTP on 127.0.0.1, what the official client reads from a
real API server for /api/v1/pods, /api/v1/namespaces, /apis/networking.k8s.io/v1/networkpolicies,
/apis/cilium.io/v2/ciliumnetworkpolicies, /apis/cilium.io/v2/ciliumclusterwidenetworkpolicies,
/api/v1/services, /apis/discovery.k8s.io/v1/endpointslices, and CRD mode's
/apis/cilium.io/v2/ciliumidentities and /apis/cilium.io/v2/ciliumendpoints:

- lists: ``kind: PodList`` etc. with ``metadata.resourceVersion`` (one counter for every
  resource, as etcd's revision), ``limit``/``continue`` paging over a snapshot, and
  ``fieldSelector`` (``spec.nodeName=NODE``); built-in kinds' items carry no kind/apiVersion,
  custom resources' do, as the real server answers;
- watches (``?watch=1&resourceVersion=N``): a chunked stream of newline-delimited JSON events
  ADDED/MODIFIED/DELETED after N (a field selector turns a MODIFIED that enters or leaves it into
  ADDED/DELETED), BOOKMARK when asked for (``allowWatchBookmarks``) and ``bookmark()`` is called,
  and ``timeoutSeconds``; a resourceVersion older than the last ``expire()`` gets 410 Gone (as an
  ERROR event on a 200 stream, as kube-apiserver does, or as the HTTP status with
  ``gone="http"``), and ``expire()`` also ends every open stream with that ERROR event.

Agents write CRD mode's two resources (``WRITABLE``): POST to the collection (409 AlreadyExists
when the name is taken), GET, PUT (409 Conflict on a stale ``metadata.resourceVersion``) and
DELETE of one object (``/apis/cilium.io/v2/ciliumidentities/NAME``,
``/apis/cilium.io/v2/namespaces/NS/ciliumendpoints/NAME``), and lists take a ``labelSelector`` of
``key=value`` terms. ``writes`` counts them by resource and verb.

The test changes objects with ``add``/``modify``/``patch``/``delete``, cuts streams without a
clean end (``drop_watches``), holds events back (``pause``/``resume``) and makes requests fail
(``fail``). It validates nothing, has no authentication and keeps all history until ``expire``.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Resource:
    name: str
    path: str
    api_version: str
    kind: str
    namespaced: bool
    builtin: bool


RESOURCES = {r.name: r for r in (
    Resource("pods", "/api/v1/pods", "v1", "Pod", True, True),
    Resource("namespaces", "/api/v1/namespaces", "v1", "Namespace", False, True),
    Resource("networkpolicies", "/apis/networking.k8s.io/v1/networkpolicies", "networking.k8s.io/v1",
             "NetworkPolicy", True, True),
    Resource("ciliumnetworkpolicies", "/apis/cilium.io/v2/ciliumnetworkpolicies", "cilium.io/v2",
             "CiliumNetworkPolicy", True, False),
    Resource("ciliumclusterwidenetworkpolicies", "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies",
             "cilium.io/v2", "CiliumClusterwideNetworkPolicy", False, False),
    Resource("services", "/api/v1/services", "v1", "Service", True, True),
    Resource("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1", "EndpointSlice",
             True, True),
    Resource("ciliumidentities", "/apis/cilium.io/v2/ciliumidentities", "cilium.io/v2", "CiliumIdentity", False,
             False),
    Resource("ciliumendpoints", "/apis/cilium.io/v2/ciliumendpoints", "cilium.io/v2", "CiliumEndpoint", True,
             False),
)}
WRITABLE = ("ciliumidentities", "ciliumendpoints")
_BY_PATH = {r.path: r for r in RESOURCES.values()}

Obj = dict[str, Any]


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str
    old: Obj | None
    new: Obj


def _field(obj: Obj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def _selector(text: str) -> Callable[[Obj], bool]:
    """A field selector: ``a.b=v``, ``a.b==v``, ``a.b!=v``, comma-separated (all must hold)."""
    terms = []
    for term in filter(None, text.split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            terms.append((key, value, False))
        else:
            key, value = term.replace("==", "=").split("=", 1)
            terms.append((key, value, True))
    return lambda obj: all((_field(obj, k) == v) == equal for k, v, equal in terms)


def _labels_match(text: str) -> Callable[[Obj], bool]:
    """A label selector of ``key=value`` terms, comma-separated (all must hold)."""
    terms = [tuple(t.replace("==", "=").split("=", 1)) for t in filter(None, text.split(","))]
    return lambda obj: all(((obj.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in terms)


def _status(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class KubeTestServer:
    """A test server speaking the Kubernetes list/watch protocol (see the module docstring)."""

    def __init__(self, gone: str = "event") -> None:
        self.gone = gone  # "event": 200 + ERROR event (kube-apiserver); "http": a 410 response
        self._cond = threading.Condition()
        self._rv = 1
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {name: {} for name in RESOURCES}
        self._history: dict[str, list[_Event]] = {name: [] for name in RESOURCES}
        self._compacted = 0  # watches from a resourceVersion below this get 410 Gone
        self._drops = 0  # drop_watches() count: open streams cut
        self._expiries = 0  # expire() count: open streams end with 410
        self._bookmarks = 0
        self._paused = False
        self._stopping = False
        self._failures: dict[str, list[int]] = {}
        self._snapshots: dict[str, tuple[int, list[Obj]]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (resource, "list"|"watch", query)
        self.writes: dict[tuple[str, str], int] = {}  # (resource, verb) -> requests (CRD mode's writes)
        self._write_failures: dict[str, int] = {}  # resource -> writes still to fail with 503
        self.open_watches: dict[str, int] = {name: 0 for name in RESOURCES}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.kube = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kube-test-server", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> KubeTestServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig pointing at this server, for ``cilia.k8s.connect``."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }), encoding="utf-8")
        return path

    # ------------------------------------------------------------------ objects

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def add(self, resource: str, obj: Obj) -> Obj:
        r = RESOURCES[resource]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if r.namespaced:
            meta.setdefault("namespace", "default")
        key = (meta.get("namespace", ""), meta["name"])
        with self._cond:
            if key in self._objects[resource]:
                raise KeyError(f"{resource} {key} exists")
            self._rv += 1
            meta.update(resourceVersion=str(self._rv), uid=meta.get("uid") or str(uuid.uuid4()),
                        creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            obj = {"apiVersion": r.api_version, "kind": r.kind, **obj}
            self._objects[resource][key] = obj
            self._record(resource, "ADDED", None, obj)
            return copy.deepcopy(obj)

    def _key(self, resource: str, name: str, namespace: str | None) -> tuple[str, str]:
        """An object's key; without a namespace, the one object of that name in any namespace."""
        if not RESOURCES[resource].namespaced:
            return ("", name)
        if namespace is not None:
            return (namespace, name)
        found = [k for k in self._objects[resource] if k[1] == name]
        if len(found) != 1:
            raise KeyError(f"{resource} {name}: {len(found)} objects of that name; give the namespace")
        return found[0]

    def get(self, resource: str, name: str, namespace: str | None = None) -> Obj:
        with self._cond:
            return copy.deepcopy(self._objects[resource][self._key(resource, name, namespace)])

    def modify(self, resource: str, obj: Obj) -> Obj:
        """Replace an object (like PUT); uid and creationTimestamp are kept."""
        r = RESOURCES[resource]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", "default") if r.namespaced else "", meta["name"])
        with self._cond:
            old = self._objects[resource][key]
            self._rv += 1
            meta.update(resourceVersion=str(self._rv), uid=old["metadata"]["uid"],
                        creationTimestamp=old["metadata"]["creationTimestamp"])
            if r.namespaced:
                meta["namespace"] = key[0]
            obj = {"apiVersion": r.api_version, "kind": r.kind, **obj}
            self._objects[resource][key] = obj
            self._record(resource, "MODIFIED", old, obj)
            return copy.deepcopy(obj)

    def patch(self, resource: str, name: str, change: Callable[[Obj], None], namespace: str | None = None) -> Obj:
        obj = self.get(resource, name, namespace)
        change(obj)
        return self.modify(resource, obj)

    def delete(self, resource: str, name: str, namespace: str | None = None) -> Obj:
        with self._cond:
            old = self._objects[resource].pop(self._key(resource, name, namespace))
            self._rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._record(resource, "DELETED", old, gone)
            return copy.deepcopy(gone)

    def _record(self, resource: str, kind: str, old: Obj | None, new: Obj) -> None:
        self._history[resource].append(_Event(self._rv, kind, copy.deepcopy(old), copy.deepcopy(new)))
        self._cond.notify_all()

    # ------------------------------------------------------------------ what a test does to the streams

    def expire(self) -> None:
        """Compact history: watches from an older resourceVersion get 410 Gone, and every open
        stream ends with an ERROR 410 event (its position is too old now)."""
        with self._cond:
            self._rv += 1
            self._compacted = self._rv
            for events in self._history.values():
                events.clear()
            self._expiries += 1
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch stream without ending it (a broken connection)."""
        with self._cond:
            self._drops += 1
            self._cond.notify_all()

    def bookmark(self) -> None:
        """Send a BOOKMARK (at the current resourceVersion) on every stream that asked for them."""
        with self._cond:
            self._bookmarks += 1
            self._cond.notify_all()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold events back from every stream (they stay open) until the block ends."""
        with self._cond:
            self._paused = True
        try:
            yield
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify_all()

    def fail(self, resource: str, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` requests for ``resource`` with ``status``."""
        with self._cond:
            self._failures.setdefault(resource, []).extend([status] * times)

    def fail_writes(self, resource: str, times: int) -> None:
        """The next ``times`` writes (POST/PUT/DELETE) of ``resource`` answer 503, as an API server
        that cannot reach its etcd."""
        with self._cond:
            self._write_failures[resource] = times

    def count(self, resource: str, what: str) -> int:
        """How many list or watch requests ``resource`` had."""
        with self._cond:
            return sum(1 for r, w, _ in self.requests if r == resource and w == what)

    def wait_watching(self, resource: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.open_watches[resource] == 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no watch on {resource}")
                self._cond.wait(left)

    # ------------------------------------------------------------------ serving (called by _Handler)

    def _failure(self, resource: str) -> int | None:
        queue = self._failures.get(resource)
        return queue.pop(0) if queue else None

    def serve_list(self, r: Resource, q: dict[str, str]) -> tuple[int, Obj]:
        with self._cond:
            self.requests.append((r.name, "list", q))
            failed = self._failure(r.name)
            if failed is not None:
                return failed, _status(failed, "InternalError", "injected failure")
            token = q.get("continue")
            if token:
                if token not in self._snapshots:
                    return 410, _status(410, "Expired", "the provided continue parameter is too old")
                rv, items = self._snapshots.pop(token)
            else:
                match, labelled = _selector(q.get("fieldSelector", "")), _labels_match(q.get("labelSelector", ""))
                rv = self._rv
                items = [copy.deepcopy(o) for _, o in sorted(self._objects[r.name].items())
                         if match(o) and labelled(o)]
            limit = int(q.get("limit") or 0)
            meta: Obj = {"resourceVersion": str(rv)}
            if limit and len(items) > limit:
                token = uuid.uuid4().hex
                self._snapshots[token] = (rv, items[limit:])
                items = items[:limit]
                meta["continue"] = token
        if r.builtin:
            for item in items:
                item.pop("kind", None)
                item.pop("apiVersion", None)
        return 200, {"kind": f"{r.kind}List", "apiVersion": r.api_version, "metadata": meta, "items": items}

    def serve_watch(self, r: Resource, q: dict[str, str], out: _Handler) -> None:
        rv = int(q.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(q.get("timeoutSeconds") or 1800)
        bookmarks_wanted = q.get("allowWatchBookmarks") == "true"
        match = _selector(q.get("fieldSelector", ""))
        with self._cond:
            self.requests.append((r.name, "watch", q))
            failed = self._failure(r.name)
            too_old = bool(rv) and rv < self._compacted
            drops, expiries, bookmarks = self._drops, self._expiries, self._bookmarks
            if failed is None and not (too_old and self.gone == "http"):
                self.open_watches[r.name] += 1
                self._cond.notify_all()
        if failed is not None:
            out.send_json(failed, _status(failed, "InternalError", "injected failure"))
            return
        if too_old and self.gone == "http":
            out.send_json(410, _status(410, "Expired", f"too old resource version: {rv} ({self._compacted})"))
            return
        try:
            out.start_stream()
            if too_old:
                out.chunk({"type": "ERROR", "object": _status(410, "Expired",
                                                              f"too old resource version: {rv} ({self._compacted})")})
                out.end_stream()
                return
            position = rv
            if not rv:  # resourceVersion 0 or none: the current objects first, as ADDED
                with self._cond:
                    position = self._rv
                    current = [copy.deepcopy(o) for _, o in sorted(self._objects[r.name].items()) if match(o)]
                for obj in current:
                    out.chunk({"type": "ADDED", "object": obj})
            while True:
                pending: list[_Event] = []
                with self._cond:
                    while True:
                        if self._stopping or drops != self._drops:
                            action = "drop"
                        elif expiries != self._expiries:
                            action = "expire"
                        elif time.monotonic() >= deadline:
                            action = "end"
                        elif not self._paused and (pending := [e for e in self._history[r.name]
                                                               if e.rv > position]):
                            action = "events"
                        elif not self._paused and bookmarks_wanted and bookmarks != self._bookmarks:
                            bookmarks, position, action = self._bookmarks, self._rv, "bookmark"
                        else:
                            self._cond.wait(max(0.01, min(0.2, deadline - time.monotonic())))
                            continue
                        break
                if action == "drop":
                    out.drop()
                    return
                if action == "expire":
                    out.chunk({"type": "ERROR", "object": _status(410, "Expired", "too old resource version")})
                    out.end_stream()
                    return
                if action == "end":
                    out.end_stream()
                    return
                if action == "bookmark":
                    out.chunk({"type": "BOOKMARK", "object": {"kind": r.kind, "apiVersion": r.api_version,
                                                              "metadata": {"resourceVersion": str(position)}}})
                for event in pending:
                    shown = _filtered(event, match)
                    if shown is not None:
                        out.chunk({"type": shown[0], "object": shown[1]})
                    position = event.rv
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        finally:
            with self._cond:
                self.open_watches[r.name] -= 1
                self._cond.notify_all()


def _filtered(event: _Event, match: Callable[[Obj], bool]) -> tuple[str, Obj] | None:
    """An event as a watch with a field selector sees it."""
    was = event.old is not None and match(event.old)
    if event.type == "DELETED":
        return ("DELETED", event.new) if was else None
    now = match(event.new)
    if now:
        return ("MODIFIED" if was else "ADDED", event.new)
    return ("DELETED", event.new) if was else None


def _object_path(path: str) -> tuple[Resource, str | None, str | None] | None:
    """(resource, namespace, name) of a writable resource's collection or object path."""
    parts = path.strip("/").split("/")
    if parts[:3] != ["apis", "cilium.io", "v2"]:
        return None
    rest = parts[3:]
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or rest[0] not in WRITABLE or len(rest) > 2:
        return None
    r = RESOURCES[rest[0]]
    if r.namespaced != (namespace is not None):
        return None
    return r, namespace, rest[1] if len(rest) == 2 else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _body(self) -> Obj:
        length = int(self.headers.get("Content-Length") or 0)
        data = json.loads(self.rfile.read(length) or b"{}")
        return data if isinstance(data, dict) else {}

    def _write(self, verb: str) -> None:
        kube: KubeTestServer = self.server.kube  # type: ignore[attr-defined]
        where = _object_path(urlsplit(self.path).path)
        body = self._body() if verb in ("create", "replace") else {}
        if where is None or (verb == "create") != (where[2] is None):
            self.send_json(404, _status(404, "NotFound", f"the server could not find {self.path}"))
            return
        r, namespace, name = where
        with kube._cond:
            kube.writes[(r.name, verb)] = kube.writes.get((r.name, verb), 0) + 1
            failing = verb != "get" and kube._write_failures.get(r.name, 0) > 0
            if failing:
                kube._write_failures[r.name] -= 1
        if failing:
            self.send_json(503, _status(503, "ServiceUnavailable", "injected failure"))
            return
        try:
            if verb == "create":
                meta = body.setdefault("metadata", {})
                if namespace is not None:
                    meta["namespace"] = namespace
                try:
                    self.send_json(201, kube.add(r.name, body))
                except KeyError:
                    self.send_json(409, _status(409, "AlreadyExists", f"{r.name} {meta.get('name')!r} already exists"))
                return
            assert name is not None
            if verb == "get":
                self.send_json(200, kube.get(r.name, name, namespace or ""))
            elif verb == "delete":
                self.send_json(200, kube.delete(r.name, name, namespace or ""))
            else:
                current = kube.get(r.name, name, namespace or "")
                wanted = (body.get("metadata") or {}).get("resourceVersion")
                if wanted and wanted != current["metadata"]["resourceVersion"]:
                    self.send_json(409, _status(409, "Conflict", "the object has been modified"))
                    return
                body.setdefault("metadata", {}).update(name=name, **({"namespace": namespace} if namespace else {}))
                self.send_json(200, kube.modify(r.name, body))
        except KeyError:
            self.send_json(404, _status(404, "NotFound", f"{r.name} {name!r} not found"))

    def do_POST(self) -> None:  # noqa: N802 (the base class's name)
        self._write("create")

    def do_PUT(self) -> None:  # noqa: N802 (the base class's name)
        self._write("replace")

    def do_DELETE(self) -> None:  # noqa: N802 (the base class's name)
        self._write("delete")

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        kube: KubeTestServer = self.server.kube  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        r = _BY_PATH.get(url.path)
        where = _object_path(url.path) if r is None else None
        if where is not None and where[2] is not None:
            self._write("get")
            return
        if r is None:
            self.send_json(404, _status(404, "NotFound", f"the server could not find {url.path}"))
            return
        if q.get("watch") in ("1", "true"):
            kube.serve_watch(r, q, self)
        else:
            self.send_json(*kube.serve_list(r, q))

    def send_json(self, status: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def chunk(self, event: Obj) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's signature)
        pass
