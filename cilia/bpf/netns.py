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

    def create(self, gateway: str) -> None:
        """Create the namespace and wire it; ``gateway`` is a host address the endpoint routes to."""
        ip("netns", "add", self.name)
        self.created = True
        wire_veth(os.path.join(NETNS_DIR, self.name), self.host_if, str(self.address), gateway, node=self.node)

    def delete(self) -> None:
        """Remove the namespace (and with it the veth pair and the host route). Safe to repeat."""
        if self.created:
            ip("netns", "del", self.name, check=False)
            self._host("link", "del", self.host_if, check=False)  # gone with the namespace; make sure
            self.created = False

    def run_in(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a thread inside the namespace; its result or exception is passed back."""
        return run_in_netns(self.name, fn)


def in_netns(path: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the network namespace at ``path`` (only the network namespace is entered)."""
    res = subprocess.run(["nsenter", f"--net={path}", *cmd], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} in {path}: {res.stderr.strip() or res.returncode}")
    return res


def wire_veth(netns_path: str, host_if: str, address: str, gateway: str, ifname: str = "eth0",
              node: str | None = None) -> None:
    """Join the namespace at ``netns_path`` to the node by a veth pair: ``ifname`` inside with
    ``address`` (a host route) and a default route via ``gateway``, ``host_if`` on the node
    (``node``: a named namespace; None: this process's) with a route to ``address``."""
    if len(host_if) > 15:
        raise ValueError(f"interface name {host_if!r} is longer than 15 characters")
    addr = ipaddress.ip_address(address)
    bits = 32 if addr.version == 4 else 128
    peer = host_if[:13] + "-e"

    def host(*args: str) -> None:
        ip(*(["-n", node] if node else []), *args)

    host("link", "add", host_if, "type", "veth", "peer", "name", peer)
    _move_link(peer, netns_path, node)
    if addr.version == 4:  # no IPv6 chatter on an IPv4 endpoint, nor on its host end: the datapath drops it
        in_netns(netns_path, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                 "net.ipv6.conf.default.disable_ipv6=1", check=False)
        subprocess.run([*(["ip", "netns", "exec", node] if node else []), "sysctl", "-qw",
                        f"net.ipv6.conf.{host_if}.disable_ipv6=1"], capture_output=True, check=False)
    host("link", "set", host_if, "up")
    in_netns(netns_path, "ip", "link", "set", "lo", "up")
    in_netns(netns_path, "ip", "link", "set", peer, "name", ifname)
    in_netns(netns_path, "ip", "addr", "add", f"{addr}/{bits}", "dev", ifname)
    in_netns(netns_path, "ip", "link", "set", ifname, "up")
    in_netns(netns_path, "ip", "route", "add", gateway, "dev", ifname, "scope", "link")
    in_netns(netns_path, "ip", "route", "add", "default", "via", gateway, "dev", ifname, "onlink")
    host("route", "replace", f"{addr}/{bits}", "dev", host_if)


def _move_link(ifname: str, netns_path: str, node: str | None) -> None:
    from pyroute2 import IPRoute, NetNS

    fd = os.open(netns_path, os.O_RDONLY)
    try:
        with NetNS(node) if node else IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                raise NetnsError(f"no interface {ifname} to move into {netns_path}")
            ipr.link("set", index=idx[0], net_ns_fd=fd)
    finally:
        os.close(fd)


def delete_link(ifname: str) -> bool:
    """Delete an interface of this namespace (a veth takes its peer along); False if it was gone."""
    return ip("link", "del", ifname, check=False).returncode == 0


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
