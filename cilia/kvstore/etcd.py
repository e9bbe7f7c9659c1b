"""The etcd v3 backend, on aetcd (asyncio, grpcio) run in a thread of its own.

aetcd 1.0 brings etcd's generated protobuf modules (``etcdserverpb``) and async stubs; only it may
register them in this process (a second generated etcd client would clash in the protobuf
descriptor pool). Its ``Client.connect`` opens a plaintext channel to one ``host:port``, so
``_Client`` replaces only that step: a channel to every endpoint (gRPC's ``ipv4:``/``ipv6:``
address lists, round-robin: a stopped member is skipped) and TLS with a client certificate when
the endpoints are ``https://``. Every call of the synchronous interface runs on the loop thread
and waits at most ``timeout`` seconds; gRPC and aetcd errors become ``KVStoreUnavailable`` /
``WatchCompacted`` / ``KVStoreError`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import queue
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.utils
import grpc
from aetcd import rpc
from aetcd import watcher as aetcd_watcher

from .base import (
    ErrorCallback,
    EventKind,
    EventsCallback,
    KeyValue,
    KVStoreError,
    KVStoreUnavailable,
    Put,
    WatchCompacted,
    WatchEvent,
)

_log = logging.getLogger(__name__)
T = TypeVar("T")


class EndpointError(ValueError):
    """A --kvstore-endpoints value that cannot name an etcd member."""


@dataclass(frozen=True)
class ClientTls:
    """Files for TLS to etcd: the CA that signed the members' certificates and this client's own."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        try:
            ca = self.ca.read_bytes()
            cert = self.cert.read_bytes() if self.cert else None
            key = self.key.read_bytes() if self.key else None
        except OSError as e:
            raise KVStoreError(f"kvstore TLS: cannot read {e.filename}: {e.strerror}") from None
        if (cert is None) != (key is None):
            raise KVStoreError("kvstore TLS: a client certificate needs its key and a key its certificate")
        return grpc.ssl_channel_credentials(ca, key, cert)


@dataclass(frozen=True)
class Target:
    """Where the gRPC channel goes: ``uri`` and the TLS name to check (None: plaintext)."""

    uri: str
    tls_name: str | None


def parse_endpoints(endpoints: Sequence[str]) -> Target:
    """``http://A:2379,https://B:2379`` → one gRPC target. All endpoints share one scheme; several
    endpoints become an address list (host names are resolved now)."""
    if not endpoints:
        raise EndpointError("no kvstore endpoint given")
    schemes, hosts = set(), []
    for raw in endpoints:
        url = urlsplit(raw.strip())
        if url.scheme not in ("http", "https") or not url.hostname:
            raise EndpointError(f"kvstore endpoint {raw!r}: expected http://HOST:PORT or https://HOST:PORT")
        try:
            port = url.port or 2379
        except ValueError:
            raise EndpointError(f"kvstore endpoint {raw!r}: bad port") from None
        if url.path not in ("", "/"):
            raise EndpointError(f"kvstore endpoint {raw!r}: unexpected path {url.path!r}")
        schemes.add(url.scheme)
        hosts.append((url.hostname, port))
    if len(schemes) > 1:
        raise EndpointError("kvstore endpoints mix http:// and https://")
    tls_name = hosts[0][0] if schemes == {"https"} else None
    if len(hosts) == 1:
        host, port = hosts[0]
        return Target(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", tls_name)
    addresses = []
    for host, port in hosts:
        try:
            addresses.append((ipaddress.ip_address(host), port))
        except ValueError:
            try:
                info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as e:
                raise EndpointError(f"kvstore endpoint {host}: {e}") from None
            addresses.append((ipaddress.ip_address(info[0][4][0]), port))
    families = {a.version for a, _ in addresses}
    if families == {4}:
        return Target("ipv4:" + ",".join(f"{a}:{p}" for a, p in addresses), tls_name)
    if families == {6}:
        return Target("ipv6:" + ",".join(f"[{a}]:{p}" for a, p in addresses), tls_name)
    raise EndpointError("kvstore endpoints mix IPv4 and IPv6 members")


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client with our channel: several members, TLS."""

    def __init__(self, target: Target, tls: ClientTls | None, timeout: float) -> None:
        options: dict[str, Any] = {"grpc.lb_policy_name": "round_robin",
                                   "grpc.keepalive_time_ms": 10_000, "grpc.keepalive_timeout_ms": 5_000}
        if target.tls_name is not None:
            options["grpc.ssl_target_name_override"] = target.tls_name
            options["grpc.default_authority"] = target.tls_name
        super().__init__(timeout=timeout, options=options)
        self._target = target
        self._credentials = tls.credentials() if tls is not None else None
        if target.tls_name is not None and self._credentials is None:
            raise KVStoreError("kvstore endpoints are https:// but no CA was given (--kvstore-ca)")

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        items = list(self._options.items())
        if self._credentials is not None:
            self.channel = grpc.aio.secure_channel(self._target.uri, self._credentials, options=items)
        else:
            self.channel = grpc.aio.insecure_channel(self._target.uri, options=items)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd_watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout)
        self._connected.set()


def _translate(e: BaseException) -> KVStoreError:
    if isinstance(e, KVStoreError):
        return e
    if isinstance(e, aetcd.RevisionCompactedError):
        return WatchCompacted(e.compacted_revision)
    if isinstance(e, (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, TimeoutError,
                      asyncio.TimeoutError)):
        return KVStoreUnavailable(f"etcd unreachable: {e or type(e).__name__}")
    if isinstance(e, grpc.aio.AioRpcError):
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return KVStoreUnavailable(f"etcd unreachable: {e.details()}")
        return KVStoreError(f"etcd: {e.code().name}: {e.details()}")
    if isinstance(e, aetcd.ClientError):
        cause = e.__cause__
        if isinstance(cause, grpc.aio.AioRpcError):
            return _translate(cause)
        return KVStoreError(f"etcd: {e}")
    return KVStoreError(f"etcd: {type(e).__name__}: {e}")


class _EtcdWatch:
    """One watch: events are read on the loop and handed to a thread of the watch's own, so a
    consumer that waits (for a lock held by a thread that waits for the store) never blocks the
    loop every call of the store runs on."""

    def __init__(self, store: EtcdKVStore, on_events: EventsCallback, on_error: ErrorCallback) -> None:
        self._store = store
        self._on_events = on_events
        self._on_error = on_error
        self.queue: queue.Queue[list[WatchEvent] | Exception | None] = queue.Queue()
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False
        self._thread = threading.Thread(target=self._deliver, name="etcd-watch", daemon=True)
        self._thread.start()

    def _deliver(self) -> None:
        while True:
            item = self.queue.get()
            if item is None or self.cancelled:
                return
            if isinstance(item, Exception):
                self._on_error(item)
                return
            self._on_events(item)

    def cancel(self) -> None:
        self.cancelled = True
        self.queue.put(None)
        task = self.task
        if task is not None and not self._store.closed:
            self._store._loop.call_soon_threadsafe(task.cancel)


class EtcdKVStore:
    """The store on etcd. ``endpoints``: ``http[s]://host:port`` of the members."""

    def __init__(self, endpoints: Sequence[str], tls: ClientTls | None = None, timeout: float = 5.0) -> None:
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        target = parse_endpoints(endpoints)
        self.closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="etcd-client", daemon=True)
        self._thread.start()
        try:
            self._client: _Client = self._run_plain(self._make(target, tls))
        except BaseException:
            self._stop_loop()
            raise

    async def _make(self, target: Target, tls: ClientTls | None) -> _Client:
        client = _Client(target, tls, self.timeout)
        await client.connect()
        return client

    @property
    def description(self) -> str:
        return "etcd " + ",".join(self.endpoints)

    # ------------------------------------------------------------------ plumbing

    def _run_plain(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout + 5)

    def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call()`` on the loop; a member that is gone or a leader election in progress is
        retried (with a short backoff) until ``timeout``, then reported as ``KVStoreUnavailable``."""
        if self.closed:
            raise KVStoreError("kvstore client is closed")
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking kvstore call on the client's own loop would wait for itself")

        async def guarded() -> T:
            deadline = asyncio.get_running_loop().time() + self.timeout
            delay = 0.05
            while True:
                left = deadline - asyncio.get_running_loop().time()
                try:
                    return await asyncio.wait_for(call(), max(left, 0.01))
                except asyncio.CancelledError:
                    raise
                except BaseException as e:
                    error = _translate(e)
                    if not isinstance(error, KVStoreUnavailable) or left <= delay:
                        raise error from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

        future: Future[T] = asyncio.run_coroutine_threadsafe(guarded(), self._loop)
        return future.result(self.timeout + 5)

    # ------------------------------------------------------------------ keys

    def get(self, key: str) -> KeyValue | None:
        got = self._run(lambda: self._client.get(key.encode()))
        return None if got is None else _kv(got)

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        got = self._run(lambda: self._client.get_prefix(prefix.encode(), sort_order="ascend"))
        return [_kv(kv) for kv in got], int(got.header.revision)

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        done = self._run(lambda: self._client.put(key.encode(), value, lease=lease or None))
        return int(done.header.revision)

    def create(self, puts: Sequence[Put]) -> bool:
        t = self._client.transactions
        compare = [t.create(p.key.encode()) == 0 for p in puts]
        success = [t.put(p.key.encode(), p.value, lease=p.lease or None) for p in puts]
        ok, _ = self._run(lambda: self._client.transaction(compare=compare, success=success, failure=[]))
        return bool(ok)

    def delete(self, key: str, mod_revision: int | None = None) -> bool:
        t = self._client.transactions
        k = key.encode()
        compare = [t.mod(k) == mod_revision] if mod_revision is not None else [t.version(k) > 0]
        ok, _ = self._run(lambda: self._client.transaction(compare=compare, success=[t.delete(k)], failure=[]))
        return bool(ok)

    def delete_prefix(self, prefix: str) -> int:
        done = self._run(lambda: self._client.delete_prefix(prefix.encode()))
        return int(done.deleted)

    def delete_unchanged(self, keys: Sequence[tuple[str, int]], unless_prefix: str = "") -> bool:
        t = self._client.transactions
        compare = [t.mod(k.encode()) == rev for k, rev in keys]
        if unless_prefix:
            start = unless_prefix.encode()
            # a range compare holds for an empty range (version 0) and fails if any key exists
            compare.append(t.version(start, aetcd.utils.prefix_range_end(start)) == 0)
        deletes = [t.delete(k.encode()) for k, _ in keys]
        ok, _ = self._run(lambda: self._client.transaction(compare=compare, success=deletes, failure=[]))
        return bool(ok)

    def revision(self) -> int:
        """The current revision: a linearizable read of an empty range."""
        rng = self._run(lambda: self._client.get_prefix(b"\0cilia-revision-probe", keys_only=True))
        return int(rng.header.revision)

    # ------------------------------------------------------------------ leases

    def grant_lease(self, ttl: int) -> int:
        lease = self._run(lambda: self._client.lease(ttl))
        return int(lease.id)

    def keep_alive(self, lease: int) -> bool:
        reply = self._run(lambda: self._client.refresh_lease(lease))
        return reply is not None and int(reply.TTL) > 0

    def revoke_lease(self, lease: int) -> None:
        try:
            self._run(lambda: self._client.revoke_lease(lease))
        except KVStoreError as e:
            if "lease not found" not in str(e):
                raise

    # ------------------------------------------------------------------ watches

    def watch_prefix(self, prefix: str, start_revision: int, on_events: EventsCallback,
                     on_error: ErrorCallback) -> _EtcdWatch:
        handle = _EtcdWatch(self, on_events, on_error)

        async def run() -> None:
            try:
                watch = await asyncio.wait_for(
                    self._client.watch_prefix(prefix.encode(), start_revision=start_revision or None),
                    self.timeout)
                try:
                    async for event in watch:
                        kind = EventKind.PUT if event.kind == "PUT" else EventKind.DELETE
                        kv = event.kv
                        handle.queue.put([WatchEvent(kind, kv.key.decode("utf-8", "replace"),
                                                     kv.value if kind is EventKind.PUT else b"",
                                                     int(kv.mod_revision))])
                finally:
                    if not self.closed:
                        await watch.cancel()
            except asyncio.CancelledError:
                return
            except Exception as e:  # the stream ended: the owner relists or retries
                handle.queue.put(_translate(e))
                return
            handle.queue.put(KVStoreUnavailable("etcd watch stream ended"))

        handle.task = asyncio.run_coroutine_threadsafe(_start(run()), self._loop).result(self.timeout)
        return handle

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._run_plain(self._client.close())
        except Exception:  # closing a channel to a dead cluster: nothing to save
            _log.debug("closing the etcd client", exc_info=True)
        self.closed = True
        self._stop_loop()

    def _stop_loop(self) -> None:
        async def cancel_all() -> None:
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()


async def _start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro)


def _kv(kv: Any) -> KeyValue:
    return KeyValue(kv.key.decode("utf-8", "replace"), bytes(kv.value), int(kv.mod_revision), int(kv.lease))
