"""A load generator of simulated Envoys: SotW ADS clients that subscribe and ACK like Envoy.

Each client opens its own gRPC connection, asks for clusters and then listeners as a wildcard
(as Envoy does on start), and ACKs every response with its version and nonce at once. It notes
when it acked each version, so a benchmark can tell when every client holds a given version.

The clients run in separate processes (asyncio + grpc.aio, many clients per process), so their
CPU is not charged to the xDS server under test. Clocks are ``time.monotonic()``, which is
system-wide on Linux, so times compare across processes.

    with AdsLoad("127.0.0.1:port", [f"sim-{i}" for i in range(1000)]) as load:
        load.wait_ready(60)                      # every client acked its first CDS and LDS
        ...change the cache...
        acks = load.report({LISTENER: version})  # node -> type -> ack time (None: not received)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"

Report = dict[str, dict[str, float | None]]  # node -> type URL -> when it acked the asked version


@dataclass
class _Client:
    node_id: str
    acked: dict[tuple[str, str], float] = field(default_factory=dict)  # (type URL, version) -> time
    latest: dict[str, str] = field(default_factory=dict)  # type URL -> latest version acked
    responses: int = 0
    bytes: int = 0
    error: str = ""


async def _run_client(client: _Client, address: str, types: Sequence[str], ready: asyncio.Event,
                      all_ready: asyncio.Event, counter: list[int]) -> None:
    import grpc
    from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse

    # A private subchannel pool: every client gets its own connection, as separate Envoys would.
    channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        call = channel.stream_stream(ADS_METHOD, request_serializer=DiscoveryRequest.SerializeToString,
                                     response_deserializer=DiscoveryResponse.FromString)()
        first = DiscoveryRequest(type_url=types[0])
        first.node.id = client.node_id
        await call.write(first)
        for t in types[1:]:
            await call.write(DiscoveryRequest(type_url=t))
        while True:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                client.error = client.error or "stream ended"
                return
            await call.write(DiscoveryRequest(type_url=resp.type_url, version_info=resp.version_info,
                                              response_nonce=resp.nonce))
            now = time.monotonic()
            client.acked.setdefault((resp.type_url, resp.version_info), now)
            client.latest[resp.type_url] = resp.version_info
            client.responses += 1
            client.bytes += resp.ByteSize()
            if not ready.is_set() and all(t in client.latest for t in types):
                ready.set()
                counter[0] += 1
                if counter[0] == counter[1]:
                    all_ready.set()
    except grpc.aio.AioRpcError as exc:
        client.error = f"{exc.code().name}: {exc.details()}"
    except asyncio.CancelledError:
        pass
    finally:
        await channel.close(None)


async def _worker(address: str, node_ids: Sequence[str], types: Sequence[str],
                  conn: multiprocessing.connection.Connection) -> None:
    loop = asyncio.get_running_loop()
    clients = [_Client(n) for n in node_ids]
    all_ready = asyncio.Event()
    counter = [0, len(clients)]
    tasks = [asyncio.create_task(_run_client(c, address, types, asyncio.Event(), all_ready, counter))
             for c in clients]

    async def announce_ready() -> None:
        await all_ready.wait()
        conn.send(("ready", len(clients)))

    announcer = asyncio.create_task(announce_ready())
    try:
        while True:
            cmd, arg = await loop.run_in_executor(None, conn.recv)
            if cmd == "stop":
                return
            if cmd == "report":
                targets: Mapping[str, str] = arg
                out: Report = {c.node_id: {t: c.acked.get((t, v)) for t, v in targets.items()} for c in clients}
                stats = {"responses": sum(c.responses for c in clients), "bytes": sum(c.bytes for c in clients),
                         "errors": {c.node_id: c.error for c in clients if c.error}}
                conn.send(("report", (out, stats)))
            if cmd == "status":
                conn.send(("status", {"ready": counter[0], "errors": {c.node_id: c.error for c in clients
                                                                       if c.error}}))
    finally:
        announcer.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _worker_main(address: str, node_ids: Sequence[str], types: Sequence[str],
                 conn: multiprocessing.connection.Connection) -> None:
    asyncio.run(_worker(address, node_ids, types, conn))


class AdsLoad:
    """``len(node_ids)`` simulated Envoys spread over ``processes`` worker processes."""

    def __init__(self, address: str, node_ids: Sequence[str], *, processes: int = 2,
                 types: Sequence[str] = (CLUSTER, LISTENER)) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork: the parent runs gRPC threads
        self._workers: list[tuple[Any, multiprocessing.connection.Connection]] = []
        processes = max(1, min(processes, len(node_ids)))
        for i in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(address, list(node_ids[i::processes]), tuple(types), child),
                               name=f"ads-load-{i}", daemon=True)
            self._workers.append((proc, parent))
        self.node_ids = list(node_ids)

    def start(self) -> AdsLoad:
        for proc, _ in self._workers:
            proc.start()
        return self

    def wait_ready(self, timeout: float) -> None:
        """Block until every client acked its first response of every type."""
        deadline = time.monotonic() + timeout
        for proc, conn in self._workers:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                conn.send(("status", None))
                status = conn.recv()[1] if conn.poll(5) else "no answer"
                raise TimeoutError(f"{proc.name}: clients not ready after {timeout}s: {status}")
            kind, _ = conn.recv()
            assert kind == "ready", kind

    def report(self, targets: Mapping[str, str]) -> tuple[Report, dict[str, Any]]:
        """When each client acked each target version (None if it never received it), and totals."""
        out: Report = {}
        stats: dict[str, Any] = {"responses": 0, "bytes": 0, "errors": {}}
        for _, conn in self._workers:
            conn.send(("report", dict(targets)))
        for _, conn in self._workers:
            kind, (part, st) = conn.recv()
            out.update(part)
            stats["responses"] += st["responses"]
            stats["bytes"] += st["bytes"]
            stats["errors"].update(st["errors"])
        return out, stats

    def wait_acked(self, targets: Mapping[str, str], timeout: float, poll: float = 0.05) -> Report:
        """Poll until every client acked every target version; returns the ack times."""
        deadline = time.monotonic() + timeout
        while True:
            acks, stats = self.report(targets)
            if all(t is not None for per in acks.values() for t in per.values()):
                return acks
            if time.monotonic() > deadline:
                missing = sum(1 for per in acks.values() if any(t is None for t in per.values()))
                raise TimeoutError(f"{missing} clients did not ack {dict(targets)}; errors: "
                                   f"{list(stats['errors'].items())[:3]}")
            time.sleep(poll)

    def stop(self) -> None:
        for proc, conn in self._workers:
            if proc.is_alive():
                try:
                    conn.send(("stop", None))
                except OSError:
                    pass
        for proc, conn in self._workers:
            if proc.pid is None:
                continue
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            conn.close()

    def __enter__(self) -> AdsLoad:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
