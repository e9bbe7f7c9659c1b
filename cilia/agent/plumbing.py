"""Endpoint plumbing the agent does itself (BPF datapath): a namespace and veth pair for an
endpoint added with ``--create-netns``, an adopted interface checked to exist, and the endpoint
ids that index the BPF policy maps."""

from __future__ import annotations

import re
import socket
import zlib
from collections.abc import Iterable
from dataclasses import replace

from ..bpf.netns import Namespace, NetnsError
from ..specs import EndpointSpec

MAX_ENDPOINT_ID = 4095  # the program's array of policy maps holds 4096


class PlumbingError(Exception):
    """The endpoint's namespace, interface or id cannot be had; nothing was made."""


def plumb(spec: EndpointSpec, previous: EndpointSpec | None, router_ip: str | None
          ) -> tuple[EndpointSpec, Namespace | None]:
    """``spec`` as it will be kept, and the namespace made for it (None when nothing was made).

    ``spec.create``: make its namespace and veth pair, or keep the ones made for its previous
    version. ``spec.interface`` alone: the interface must exist on this node."""
    if not spec.create:
        if spec.interface is not None:
            try:
                socket.if_nametoindex(spec.interface)
            except OSError:
                raise PlumbingError(f"interface {spec.interface}: no such interface on this node") from None
        return spec, None
    if previous is not None and previous.managed:
        if previous.ips != spec.ips:
            raise PlumbingError(f"its namespace was made for {', '.join(previous.ips)}; "
                                "delete the endpoint to give it another address")
        return replace(spec, create=False, managed=True, netns=previous.netns, interface=previous.interface), None
    if not router_ip:
        raise PlumbingError("create: the agent has no --router-ip to route a new namespace through")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", spec.name)
    netns = spec.netns or f"cilia-{safe}"[:64]
    ifname = spec.interface or f"lxc{zlib.crc32(spec.name.encode()):08x}"
    ns = Namespace(netns, spec.ips[0], ifname)
    try:
        ns.create(router_ip)
    except (NetnsError, ValueError) as e:
        ns.delete()
        raise PlumbingError(f"cannot create its namespace: {e}") from None
    return replace(spec, create=False, managed=True, netns=netns, interface=ifname), ns


def unplumb(spec: EndpointSpec) -> None:
    """Remove the namespace and veth pair the agent made for ``spec`` (nothing if it made none)."""
    if spec.managed and spec.netns and spec.interface:
        ns = Namespace(spec.netns, spec.ips[0], spec.interface)
        ns.created = True
        ns.delete()


def free_endpoint_id(used: Iterable[int]) -> int:
    taken = set(used)
    for n in range(1, MAX_ENDPOINT_ID + 1):
        if n not in taken:
            return n
    raise PlumbingError(f"no free endpoint id: {MAX_ENDPOINT_ID} endpoints have the datapath")
