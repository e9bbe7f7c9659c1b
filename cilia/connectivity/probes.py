"""One request from a source address, answered by what happened: ``200``/``403``... for HTTP,
``echo`` for TCP, ``STORED``/``VALUE``/``access denied`` for memcached, ``answered``/``topic
authorization failed`` for Kafka, ``blocked`` (no answer, a reset or a close before it) or
``refused`` (nothing listening). With the BPF datapath each runs inside its client endpoint's
namespace."""

from __future__ import annotations

import http.client
import socket
import struct

TIMEOUT = 3.0  # a dropped SYN is a timeout; long enough for a loaded machine's proxy to answer


def http_get(src: str | None, dst: str, port: int, path: str) -> str:
    conn = http.client.HTTPConnection(dst, port, timeout=TIMEOUT, source_address=(src, 0) if src else None)
    try:
        conn.request("GET", path)
        return str(conn.getresponse().status)
    except ConnectionRefusedError:
        return "refused"
    except (OSError, http.client.HTTPException):
        return "blocked"
    finally:
        conn.close()


def _connect(src: str | None, dst: str, port: int) -> socket.socket:
    return socket.create_connection((dst, port), timeout=TIMEOUT, source_address=(src, 0) if src else None)


def tcp_echo(src: str | None, dst: str, port: int) -> str:
    try:
        with _connect(src, dst, port) as s:
            s.sendall(b"ping\n")
            return "echo" if s.makefile("rb").readline() == b"ping\n" else "blocked"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "blocked"


def memcache(src: str | None, dst: str, port: int, command: str, key: str) -> str:
    """``set KEY`` or ``get KEY`` in memcached's text protocol: STORED, VALUE (a hit), END (a miss),
    ``access denied`` (the proxy's CLIENT_ERROR), or blocked/refused."""
    request = f"set {key} 0 0 2\r\nok\r\n" if command == "set" else f"get {key}\r\n"
    try:
        with _connect(src, dst, port) as s:
            s.sendall(request.encode())
            line = s.makefile("rb").readline().decode(errors="replace").strip()
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "blocked"
    if not line:
        return "blocked"
    if line.startswith("CLIENT_ERROR") or line.startswith("SERVER_ERROR"):
        return "access denied" if "denied" in line else line
    return line.split()[0]


def _str16(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def _read_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def kafka_metadata(src: str | None, dst: str, port: int, topic: str) -> str:
    """A Kafka Metadata v1 request about ``topic``: ``answered`` (the broker's answer, whatever
    it says about the topic), ``topic authorization failed`` (error 29: the proxy denied it), or
    blocked/refused."""
    body = struct.pack(">hhi", 3, 1, 7) + _str16("cilia-connectivity") + struct.pack(">i", 1) + _str16(topic)
    try:
        with _connect(src, dst, port) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            size = struct.unpack(">i", _read_exact(s, 4))[0]
            data = _read_exact(s, size)
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "blocked"
    offset = 4  # correlation id
    (brokers,) = struct.unpack_from(">i", data, offset)
    offset += 4
    for _ in range(brokers):
        offset += 4  # node id
        (host_len,) = struct.unpack_from(">h", data, offset)
        offset += 2 + host_len + 4  # host, port
        (rack_len,) = struct.unpack_from(">h", data, offset)
        offset += 2 + max(rack_len, 0)
    offset += 4  # controller id
    (count,) = struct.unpack_from(">i", data, offset)
    offset += 4
    errors = {}
    for _ in range(count):  # the answer may hold other topics too (a broker answering about all)
        error, name_len = struct.unpack_from(">hh", data, offset)
        name = data[offset + 4:offset + 4 + name_len].decode(errors="replace")
        offset += 4 + name_len + 1  # is_internal
        (partitions,) = struct.unpack_from(">i", data, offset)
        offset += 4
        for _ in range(partitions):
            offset += 2 + 4 + 4  # error, partition, leader
            for _ in range(2):  # replicas, isr
                (n,) = struct.unpack_from(">i", data, offset)
                offset += 4 + 4 * n
        errors[name] = error
    if topic not in errors:
        return "no answer about the topic"
    return "topic authorization failed" if errors[topic] == 29 else "answered"


def _cql_frame(opcode: int, body: bytes) -> bytes:
    return struct.pack(">BBbBi", 0x01, 0, 1, opcode, len(body)) + body  # CQL v1: Cassandra 1.2's


def _cql_reply(s: socket.socket) -> tuple[int, bytes]:
    _, _, _, opcode, length = struct.unpack(">BBbBi", _read_exact(s, 8))
    return opcode, _read_exact(s, length)


def cassandra_query(src: str | None, dst: str, port: int, query: str) -> str:
    """A CQL v1 STARTUP then QUERY: ``rows`` (a result), ``unauthorized`` (error 0x2100: the proxy
    denied it), ``error 0xNNNN`` (another error), or blocked/refused."""
    startup = struct.pack(">h", 1) + _str16("CQL_VERSION") + _str16("3.0.0")
    text = query.encode()
    try:
        with _connect(src, dst, port) as s:
            s.sendall(_cql_frame(0x01, startup))
            opcode, _ = _cql_reply(s)
            if opcode != 0x02:  # READY
                return f"no READY (opcode {opcode:#x})"
            s.sendall(_cql_frame(0x07, struct.pack(">i", len(text)) + text + struct.pack(">h", 1)))
            opcode, body = _cql_reply(s)
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "blocked"
    if opcode == 0x08:  # RESULT
        return "rows"
    code = struct.unpack_from(">i", body)[0] if opcode == 0x00 and len(body) >= 4 else -1
    return "unauthorized" if code == 0x2100 else f"error {code:#06x}"
