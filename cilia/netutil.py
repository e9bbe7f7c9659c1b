"""Small socket helpers shared by the agent, the demo and the test harnesses."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS considers free on ``host`` now (it may be taken before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
