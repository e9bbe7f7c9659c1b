"""Endpoint plumbing: a network namespace joined to the host by a veth pair (needs root).

``Namespace`` creates ``ip netns`` NAME with one address on its end of a veth pair and a host
route to that address over the host end, so traffic between the endpoint and addresses local to
the host keeps its real source address. ``delete`` removes everything it created (deleting the
namespace deletes the veth pair). ``run_in`` runs a function on a thread that entered the
namespace, so sockets it opens live there.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


class NetnsError(OSError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run iproute2's ``ip``; raise NetnsError with its message on failure."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


def can_create_namespaces() -> bool:
    """Root with a working ``ip netns`` (false in unprivileged containers)."""
    if os.geteuid() != 0:
        return False
    probe = f"cilia-probe-{os.getpid()}"
    if ip("netns", "add", probe, check=False).returncode != 0:
        return False
    ip("netns", "del", probe, check=False)
    return True


class Namespace:
    """One endpoint namespace: ``address`` on the namespace end of a veth pair ``host_if``."""

    def __init__(self, name: str, address: str, host_if: str, node: str | None = None) -> None:
        if len(host_if) > 15:
            raise ValueError(f"interface name {host_if!r} is longer than 15 characters")
        self.name = name
        self.address = ipaddress.ip_address(address)
        self.host_if = host_if
        self.node = node  # the namespace holding the host end (None: this process's)
        self.created = False

    def _host(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return ip(*(["-n", self.node] if self.node else []), *args, check=check)

    def _host_sysctl(self, setting: str) -> None:
        prefix = ["ip", "netns", "exec", self.node] if self.node else []
        subprocess.run([*prefix, "sysctl", "-qw", setting], capture_output=True, check=False)

    def create(self, gateway: str) -> None:
        """Create the namespace and wire it; ``gateway`` is a host address the endpoint routes to."""
        peer = self.host_if[:13] + "-e"
        bits = 32 if self.address.version == 4 else 128
        ip("netns", "add", self.name)
        self.created = True
        if self.address.version == 4:  # no IPv6 link-local chatter on an IPv4 endpoint
            subprocess.run(["ip", "netns", "exec", self.name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                            "net.ipv6.conf.default.disable_ipv6=1"], capture_output=True, check=False)
        self._host("link", "add", self.host_if, "type", "veth", "peer", "name", peer, "netns", self.name)
        if self.address.version == 4:  # nor on its host end, whose IPv6 the datapath would drop
            self._host_sysctl(f"net.ipv6.conf.{self.host_if}.disable_ipv6=1")
        self._host("link", "set", self.host_if, "up")
        ip("-n", self.name, "link", "set", "lo", "up")
        ip("-n", self.name, "link", "set", peer, "name", "eth0")
        ip("-n", self.name, "addr", "add", f"{self.address}/{bits}", "dev", "eth0")
        ip("-n", self.name, "link", "set", "eth0", "up")
        ip("-n", self.name, "route", "add", gateway, "dev", "eth0", "scope", "link")
        ip("-n", self.name, "route", "add", "default", "via", gateway, "dev", "eth0", "onlink")
        self._host("route", "replace", f"{self.address}/{bits}", "dev", self.host_if)

    def delete(self) -> None:
        """Remove the namespace (and with it the veth pair and the host route). Safe to repeat."""
        if self.created:
            ip("netns", "del", self.name, check=False)
            self._host("link", "del", self.host_if, check=False)  # gone with the namespace; make sure
            self.created = False

    def run_in(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a thread inside the namespace; its result or exception is passed back."""
        return run_in_netns(self.name, fn)


def run_in_netns(name: str, fn: Callable[[], T]) -> T:
    libc = ctypes.CDLL(None, use_errno=True)
    out: list[T] = []
    err: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise NetnsError(errno, f"setns({name}): {os.strerror(errno)}")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as e:  # handed to the caller's thread
            err.append(e)

    thread = threading.Thread(target=target, name=f"netns-{name}")  # ends, so its namespace goes with it
    thread.start()
    thread.join()
    if err:
        raise err[0]
    return out[0]


def add_host_address(address: str) -> bool:
    """Put ``address`` on the host's loopback (so the host owns it); False if it was already there."""
    bits = 32 if ipaddress.ip_address(address).version == 4 else 128
    if ip("-o", "addr", "show", "to", f"{address}/{bits}", check=False).stdout.strip():
        return False
    res = ip("addr", "add", f"{address}/{bits}", "dev", "lo", check=False)
    if res.returncode != 0 and "File exists" not in res.stderr:
        raise NetnsError(f"ip addr add {address}/{bits} dev lo: {res.stderr.strip()}")
    return res.returncode == 0


def del_host_address(address: str) -> None:
    bits = 32 if ipaddress.ip_address(address).version == 4 else 128
    ip("addr", "del", f"{address}/{bits}", "dev", "lo", check=False)
