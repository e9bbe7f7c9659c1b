"""One request from a source address, answered by what happened: ``200``/``403``... for HTTP,
``echo`` for TCP, ``STORED``/``VALUE``/``access denied`` for memcached, ``blocked`` (no answer,
a reset or a close before it) or ``refused`` (nothing listening). With the BPF datapath each
runs inside its client endpoint's namespace."""

from __future__ import annotations

import http.client
import socket

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
