"""Endpoint plumbing: a network namespace joined to the host by a veth pair (needs root).

``Namespace`` creates the named network namespace NAME (as ``ip netns add`` would) with one
address on its end of a veth pair and a host route to that address over the host end, so traffic
between the endpoint and addresses local to the host keeps its real source address. ``delete``
removes everything it created (deleting the namespace deletes the veth pair). ``run_in`` runs a
function on a thread that entered the namespace, so sockets it opens live there.

Links, addresses, routes and namespaces are made through pyroute2 (netlink). Work inside another
namespace runs on a thread that entered only its network namespace, never the mount namespace
(``ip netns exec`` remounts /sys, which would hide the bpffs pins); sysctls are written under
/proc/sys from such a thread, which the kernel resolves in that thread's network namespace.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
RTPROT_BOOT = 3  # the protocol iproute2 gives the routes it adds


class NetnsError(OSError):
    pass


def _ns_path(netns: str) -> str:
    """A namespace's bind-mount path: a name lives under NETNS_DIR, a path is kept as it is."""
    return netns if "/" in netns else os.path.join(NETNS_DIR, netns)


def netns_exists(netns: str) -> bool:
    return os.path.exists(_ns_path(netns))


@contextmanager
def netlink(what: str) -> Iterator[Any]:
    """An rtnetlink socket (pyroute2 ``IPRoute``) of the calling thread's network namespace;
    netlink failures come out as NetnsError naming ``what``."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as e:
        raise NetnsError(e.code, f"{what}: {os.strerror(e.code) if e.code > 0 else e}") from None


def _index(ipr: Any, ifname: str, where: str = "") -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetnsError(errno.ENODEV, f"no interface {ifname}{' in ' + where if where else ''}")
    return int(found[0])


def _write_sysctl(parts: Sequence[str], value: str) -> bool:
    """Set /proc/sys/PARTS (parts, not a dotted name: interface names may hold dots) in the
    calling thread's network namespace; False if the kernel has no such setting or refused."""
    try:
        with open(os.path.join("/proc/sys", *parts), "w", encoding="ascii") as f:
            f.write(f"{value}\n")
        return True
    except OSError:
        return False


def _open_netns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise NetnsError(e.errno, f"network namespace {path}: {e.strerror}") from None


def _in(netns: str | None, fn: Callable[[], T]) -> T:
    return fn() if netns is None else run_in_netns(netns, fn)


def run_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """``fn()`` on a thread that entered the network namespace ``netns`` (a name under NETNS_DIR
    or a path); its result or exception is passed back."""
    libc = ctypes.CDLL(None, use_errno=True)
    path = _ns_path(netns)
    out: list[T] = []
    err: list[BaseException] = []

    def target() -> None:
        try:
            fd = _open_netns(path)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise NetnsError(code, f"setns({netns}): {os.strerror(code)}")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as e:  # handed to the caller's thread
            err.append(e)

    # the thread ends, so its namespace goes with it
    thread = threading.Thread(target=target, name=f"netns-{os.path.basename(path)}")
    thread.start()
    thread.join()
    if err:
        raise err[0]
    return out[0]


# -- namespaces ------------------------------------------------------------------------------

def create_netns(name: str) -> None:
    """A new named network namespace with its loopback up; NetnsError if it exists."""
    from pyroute2 import netns

    try:
        netns.create(name)
    except OSError as e:
        raise NetnsError(e.errno, f"create network namespace {name}: {e.strerror or e}") from None

    def lo_up() -> None:
        with netlink(f"loopback of {name}") as ipr:
            ipr.link("set", index=_index(ipr, "lo", name), state="up")

    try:
        run_in_netns(name, lo_up)
    except BaseException:
        delete_netns(name)
        raise


def delete_netns(name: str) -> bool:
    """Remove a named network namespace; False if there was none."""
    from pyroute2 import netns

    try:
        netns.remove(name)
    except OSError:
        return False
    return True


def can_create_namespaces() -> bool:
    """Root, and namespaces can be made (false in unprivileged containers)."""
    if os.geteuid() != 0:
        return False
    probe = f"cilia-probe-{os.getpid()}"
    try:
        create_netns(probe)
    except OSError:
        delete_netns(probe)
        return False
    delete_netns(probe)
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

    def create(self, gateway: str) -> None:
        """Create the namespace and wire it; ``gateway`` is a host address the endpoint routes to."""
        create_netns(self.name)
        self.created = True
        wire_veth(_ns_path(self.name), self.host_if, str(self.address), gateway, node=self.node)

    def delete(self) -> None:
        """Remove the namespace (and with it the veth pair and the host route). Safe to repeat."""
        if self.created:
            delete_netns(self.name)
            delete_link(self.host_if, self.node)  # gone with the namespace; make sure
            self.created = False

    def run_in(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a thread inside the namespace; its result or exception is passed back."""
        return run_in_netns(self.name, fn)


# -- links and addresses -----------------------------------------------------------------------

def wire_veth(netns_path: str, host_if: str, address: str, gateway: str, ifname: str = "eth0",
              node: str | None = None) -> None:
    """Join the namespace at ``netns_path`` to the node by a veth pair: ``ifname`` inside with
    ``address`` (a host route) and a default route via ``gateway``, ``host_if`` on the node
    (``node``: a named namespace; None: this process's) with a route to ``address``."""
    if len(host_if) > 15:
        raise ValueError(f"interface name {host_if!r} is longer than 15 characters")
    addr = ipaddress.ip_address(address)
    gw = ipaddress.ip_address(gateway)
    bits = 32 if addr.version == 4 else 128
    peer = host_if[:13] + "-e"
    quiet_ipv6 = addr.version == 4  # no IPv6 chatter on an IPv4 endpoint, nor on its host end: the datapath drops it

    def host_end() -> None:
        with netlink(f"veth {host_if} for {netns_path}") as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer=peer)
            try:
                _move_link(ipr, peer, netns_path)
                if quiet_ipv6:
                    _write_sysctl(("net", "ipv6", "conf", host_if, "disable_ipv6"), "1")
                ipr.link("set", index=_index(ipr, host_if), state="up")
            except BaseException:
                ipr.link("del", index=_index(ipr, host_if))
                raise

    def inside() -> None:
        if quiet_ipv6:
            for scope in ("all", "default"):
                _write_sysctl(("net", "ipv6", "conf", scope, "disable_ipv6"), "1")
        with netlink(f"{ifname} in {netns_path}") as ipr:
            ipr.link("set", index=_index(ipr, "lo", netns_path), state="up")
            idx = _index(ipr, peer, netns_path)
            ipr.link("set", index=idx, ifname=ifname)
            ipr.addr("add", index=idx, address=str(addr), prefixlen=bits)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst=f"{gw}/{gw.max_prefixlen}", oif=idx, scope="link", proto=RTPROT_BOOT)
            ipr.route("add", dst="0.0.0.0/0" if gw.version == 4 else "::/0", gateway=str(gw), oif=idx,
                      flags=["onlink"], proto=RTPROT_BOOT)

    def host_route() -> None:
        with netlink(f"route to {addr} over {host_if}") as ipr:
            ipr.route("replace", dst=f"{addr}/{bits}", oif=_index(ipr, host_if), proto=RTPROT_BOOT)

    _in(node, host_end)
    try:
        run_in_netns(netns_path, inside)
        _in(node, host_route)
    except BaseException:
        delete_link(host_if, node)  # takes the peer along: nothing half-made is left
        raise


def _move_link(ipr: Any, ifname: str, netns_path: str) -> None:
    fd = _open_netns(netns_path)
    try:
        ipr.link("set", index=_index(ipr, ifname), net_ns_fd=fd)
    finally:
        os.close(fd)


def delete_link(ifname: str, netns: str | None = None) -> bool:
    """Delete an interface (of ``netns``; None: this namespace); a veth takes its peer along.
    False if it was gone."""
    def go() -> bool:
        with netlink(f"delete {ifname}") as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return False
            ipr.link("del", index=found[0])
            return True

    try:
        return _in(netns, go)
    except OSError:  # gone meanwhile, or its namespace is
        return False


def link_exists(ifname: str, netns: str | None = None) -> bool:
    """Whether ``netns`` (None: this namespace) has an interface named ``ifname``."""
    def go() -> bool:
        with netlink(f"look up {ifname}") as ipr:
            return bool(ipr.link_lookup(ifname=ifname))

    return _in(netns, go)


def link_mac(ifname: str, netns: str | None = None) -> str:
    """The hardware address of ``ifname`` ("" if it has none or is missing)."""
    def go() -> str:
        with netlink(f"look up {ifname}") as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return ""
            return str(ipr.get_links(found[0])[0].get("address") or "")

    return _in(netns, go)


def addresses(ifname: str | None = None, netns: str | None = None,
              family: socket.AddressFamily = socket.AF_INET) -> list[str]:
    """The addresses of ``ifname`` (None: of every interface) in ``netns`` (None: this one),
    without prefix lengths; [] if the interface is missing."""
    def go() -> list[str]:
        with netlink(f"addresses of {ifname or 'every interface'}") as ipr:
            if ifname is None:
                msgs = ipr.get_addr(family=family)
            else:
                found = ipr.link_lookup(ifname=ifname)
                msgs = ipr.get_addr(family=family, index=found[0]) if found else []
            return [str(m.get("local") or m.get("address")) for m in msgs]

    return _in(netns, go)


def add_host_address(address: str) -> bool:
    """Put ``address`` on the host's loopback (so the host owns it); False if it was already there."""
    from pyroute2.netlink.exceptions import NetlinkError

    ip = ipaddress.ip_address(address)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    if str(ip) in addresses(family=family):
        return False
    with netlink(f"add {ip}/{ip.max_prefixlen} to lo") as ipr:
        try:
            ipr.addr("add", index=_index(ipr, "lo"), address=str(ip), prefixlen=ip.max_prefixlen)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                return False
            raise
    return True


def del_host_address(address: str) -> None:
    ip = ipaddress.ip_address(address)
    try:
        with netlink(f"delete {ip} from lo") as ipr:
            ipr.addr("del", index=_index(ipr, "lo"), address=str(ip), prefixlen=ip.max_prefixlen)
    except NetnsError:
        pass  # not there
