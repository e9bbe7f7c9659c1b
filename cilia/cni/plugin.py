"""``cilia-cni``: a CNI 1.0 plugin (ADD, DEL, CHECK, VERSION) for container runtimes.

A runtime runs it in the node's network namespace with the command and container in ``CNI_*``
environment variables and the network configuration as JSON on stdin::

    {"cniVersion": "1.0.0", "name": "cilia", "type": "cilia-cni",
     "agentSocket": "/var/run/cilia/cilia.sock",
     "ipam": {"type": "cilia", "subnet": "10.0.0.0/24", "gateway": "10.0.0.1"},
     "args": {"cni": {"labels": [{"key": "app", "value": "web"}]}}}

ADD gives the container an address from ``ipam``. With ``type`` "cilia" (or no ``type``: the
configurations written before delegation keep working) it is this plugin's own allocator
(``ipam.py``); with any other ``type`` it is the IPAM plugin of that name in ``CNI_PATH``
(``host-local``, ``static``, ``dhcp``...; ``delegate.py``), whose DEL runs on DEL and whenever a
later step of ADD fails. Either way the address's gateway is the agent's ``--router-ip``. ADD joins
the container to the node by a veth pair (``CNI_IFNAME`` inside, ``lxc…`` on the node) and
registers it with the agent as an endpoint that adopts that interface, named after the pod
(``K8S_POD_NAME.K8S_POD_NAMESPACE`` from ``CNI_ARGS``, else the container id) and labelled from
``args.cni.labels`` and the pod's namespace. If any step fails, what the earlier steps made is
removed. DEL removes the endpoint, the veth pair and the address, and succeeds when they are gone
already. CHECK verifies all three (and asks a delegated IPAM plugin's CHECK from 0.4.0 on). Errors
are CNI error objects on stdout with a non-zero exit; a delegated plugin's errors keep its code and
name it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ..agent.client import AgentClient, APIError
from ..bpf.netns import NetnsError, add_host_address, addresses, delete_link, link_exists, link_mac, wire_veth
from .delegate import DelegatedIPAM, IPAMPluginError
from .ipam import IPAMError, Pool
from .result import Lease

CNI_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
DEFAULT_SOCKET = "/var/run/cilia/cilia.sock"
OWN_IPAM = "cilia"  # ipam.type of this plugin's own allocator (also when type is left out)

# CNI's well-known error codes; 100 and up are the plugin's own
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_AGENT = 100
ERR_CHECK = 101


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self) -> dict[str, Any]:
        return {"cniVersion": CNI_VERSION, "code": self.code, "msg": self.msg, "details": self.details}


@dataclass(frozen=True)
class Request:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: Mapping[str, str]
    config: Mapping[str, Any]
    env: Mapping[str, str] = field(default_factory=dict)  # handed on to a delegated IPAM plugin

    @property
    def network(self) -> str:
        return str(self.config.get("name") or "cilia")

    @property
    def owner(self) -> str:
        return f"{self.container_id}/{self.ifname}"

    @property
    def host_if(self) -> str:
        return f"lxc{zlib.crc32(self.owner.encode()):08x}"

    @property
    def endpoint_name(self) -> str:
        pod, namespace = self.args.get("K8S_POD_NAME"), self.args.get("K8S_POD_NAMESPACE")
        if pod:
            return f"{pod}.{namespace or 'default'}"
        return self.container_id[:12]

    def labels(self) -> list[str]:
        out = []
        for item in self.config.get("args", {}).get("cni", {}).get("labels", []) or []:
            if not isinstance(item, dict) or "key" not in item:
                raise CNIError(ERR_INVALID_CONFIG, "args.cni.labels: expected [{\"key\": K, \"value\": V}, ...]")
            out.append(f"{item['key']}={item.get('value', '')}")
        namespace = self.args.get("K8S_POD_NAMESPACE")
        if namespace:
            out.append(f"io.kubernetes.pod.namespace={namespace}")
        return out

    def client(self) -> AgentClient:
        return AgentClient(str(self.config.get("agentSocket") or DEFAULT_SOCKET), timeout=30)

    def ipam(self) -> Pool | DelegatedIPAM:
        """The allocator ``ipam.type`` names: this plugin's own, or an IPAM plugin to run."""
        ipam = self.config.get("ipam")
        if not isinstance(ipam, dict):
            raise CNIError(ERR_INVALID_CONFIG, "ipam: required (an object with a type)")
        kind = ipam.get("type", OWN_IPAM)
        if kind == OWN_IPAM:
            return self.pool()
        if not isinstance(kind, str):
            raise CNIError(ERR_INVALID_CONFIG, f"ipam.type {kind!r}: expected the name of an IPAM plugin")
        try:
            return DelegatedIPAM(kind, self.env, self.config)
        except IPAMPluginError as e:
            raise CNIError(e.code, e.msg, e.details) from None

    def pool(self) -> Pool:
        ipam = self.config.get("ipam")
        if not isinstance(ipam, dict):
            raise CNIError(ERR_INVALID_CONFIG, "ipam: required (an object with subnet and gateway)")
        try:
            return Pool.from_config(ipam, self.network)
        except IPAMError as e:
            raise CNIError(ERR_INVALID_CONFIG, str(e)) from None


def parse_request(env: Mapping[str, str], stdin: str) -> Request:
    command = env.get("CNI_COMMAND", "")
    if command not in ("ADD", "DEL", "CHECK", "VERSION"):
        raise CNIError(ERR_INVALID_ENV, f"CNI_COMMAND {command!r}: expected ADD, DEL, CHECK or VERSION")
    try:
        config = json.loads(stdin) if stdin.strip() else {}
    except ValueError as e:
        raise CNIError(ERR_DECODE, f"network configuration on stdin is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise CNIError(ERR_DECODE, "network configuration on stdin: expected a JSON object")
    if command != "VERSION":
        version = str(config.get("cniVersion", ""))
        if version not in SUPPORTED_VERSIONS:
            raise CNIError(ERR_INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported",
                           f"supported: {', '.join(SUPPORTED_VERSIONS)}")
        for name in ("CNI_CONTAINERID", "CNI_IFNAME") + (("CNI_NETNS",) if command != "DEL" else ()):
            if not env.get(name):
                raise CNIError(ERR_INVALID_ENV, f"{name} is not set")
    args = dict(kv.split("=", 1) for kv in env.get("CNI_ARGS", "").split(";") if "=" in kv)
    return Request(command, env.get("CNI_CONTAINERID", ""), env.get("CNI_NETNS", ""), env.get("CNI_IFNAME", ""),
                   args, config, env)


def cmd_add(req: Request) -> dict[str, Any]:
    if not os.path.exists(req.netns):
        raise CNIError(ERR_UNKNOWN_CONTAINER, f"CNI_NETNS {req.netns}: no such network namespace")
    ipam = req.ipam()
    lease = _lease(req, ipam)
    address, gateway = lease.address, lease.gateway
    wired = False
    try:
        if gateway is None:  # only a delegated plugin can leave it out
            name = ipam.name if isinstance(ipam, DelegatedIPAM) else OWN_IPAM
            raise CNIError(ERR_INVALID_CONFIG, f"ipam plugin {name} gave {address} no gateway: configure one in "
                           "ipam (the agent's --router-ip)")
        add_host_address(str(gateway))  # the endpoints' gateway must be an address of the node
        if not link_exists(req.host_if):
            wire_veth(req.netns, req.host_if, str(address), str(gateway), req.ifname)
        wired = True
        _register(req, str(address))
    except BaseException as e:
        if wired:
            delete_link(req.host_if)
        leaked = ""
        try:
            _release(req, ipam)
        except CNIError as failed:
            leaked = f"releasing {address} failed too: {failed.msg} {failed.details}".strip()
        if isinstance(e, NetnsError | OSError | ValueError):
            e = CNIError(ERR_IO, f"plumbing {req.ifname} of {req.container_id[:12]}: {e}")
        if isinstance(e, CNIError):
            e.details = "; ".join(d for d in (e.details, leaked) if d)
            raise e from None
        raise
    mac = _mac(req)
    return {
        "cniVersion": str(req.config.get("cniVersion", CNI_VERSION)),
        "interfaces": [{"name": req.host_if}, {"name": req.ifname, "mac": mac, "sandbox": req.netns}],
        "ips": [{"address": f"{address}/32", "gateway": str(gateway), "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": str(gateway)}],
        "dns": req.config.get("dns") or lease.dns,  # the network's own DNS settings win over the IPAM's
    }


def _lease(req: Request, ipam: Pool | DelegatedIPAM) -> Lease:
    """An address for the container from the allocator ``ipam.type`` names."""
    try:
        if isinstance(ipam, Pool):
            return Lease(ipam.allocate(req.owner), ipam.gateway)
        return ipam.add()
    except IPAMError as e:
        raise CNIError(ERR_TRY_AGAIN, str(e)) from None
    except IPAMPluginError as e:
        raise CNIError(e.code, e.msg, e.details) from None


def _release(req: Request, ipam: Pool | DelegatedIPAM) -> None:
    """Give the container's address back (releasing twice is fine)."""
    try:
        if isinstance(ipam, Pool):
            ipam.release(req.owner)
        else:
            ipam.delete()
    except IPAMPluginError as e:
        raise CNIError(e.code, e.msg, e.details) from None
    except OSError as e:
        raise CNIError(ERR_IO, f"releasing the address of {req.owner}: {e}") from None


def _register(req: Request, address: str) -> None:
    client = req.client()
    try:
        client.add_endpoint({"name": req.endpoint_name, "labels": req.labels(), "ips": [address],
                             "interface": req.host_if})
    except APIError as e:
        raise CNIError(ERR_AGENT, f"the agent refused endpoint {req.endpoint_name}: {e}",
                       "; ".join(e.problems)) from None
    finally:
        client.close()


def _mac(req: Request) -> str:
    try:
        return link_mac(req.ifname, req.netns)
    except OSError:  # the namespace cannot be entered: no MAC to report
        return ""


def _addresses_inside(req: Request) -> list[str]:
    try:
        return addresses(req.ifname, req.netns)
    except OSError:  # the namespace is gone or cannot be entered: it has none
        return []


def cmd_del(req: Request) -> None:
    client = req.client()
    try:
        client.remove_endpoint(req.endpoint_name)
    except APIError as e:
        if e.status != 404:  # gone already is fine; an agent that cannot be reached is not
            raise CNIError(ERR_AGENT, f"removing endpoint {req.endpoint_name}: {e}") from None
    finally:
        client.close()
    delete_link(req.host_if)
    if isinstance(req.config.get("ipam"), dict):
        _release(req, req.ipam())


def cmd_check(req: Request) -> None:
    prev = req.config.get("prevResult")
    if not isinstance(prev, dict) or not prev.get("ips"):
        raise CNIError(ERR_INVALID_CONFIG, "CHECK needs prevResult with the ips ADD returned")
    want = str(ipaddress.ip_interface(prev["ips"][0]["address"]).ip)
    if not link_exists(req.host_if):
        raise CNIError(ERR_CHECK, f"host interface {req.host_if} is missing")
    if want not in _addresses_inside(req):
        raise CNIError(ERR_CHECK, f"{req.ifname} in {req.netns} does not have {want}")
    client = req.client()
    try:
        endpoints = {e["name"]: e for e in client.endpoints()["endpoints"]}
    except APIError as e:
        raise CNIError(ERR_AGENT, f"asking the agent: {e}") from None
    finally:
        client.close()
    ep = endpoints.get(req.endpoint_name)
    if ep is None or ep.get("interface") != req.host_if or want not in ep.get("ips", []):
        raise CNIError(ERR_CHECK, f"the agent has no endpoint {req.endpoint_name} on {req.host_if} with {want}")
    ipam = req.ipam()
    if isinstance(ipam, DelegatedIPAM) and req.config.get("cniVersion") not in ("0.3.0", "0.3.1"):  # CHECK is 0.4.0+
        try:
            ipam.check()
        except IPAMPluginError as e:
            raise CNIError(e.code, e.msg, e.details) from None


def run(env: Mapping[str, str], stdin: str) -> tuple[int, dict[str, Any] | None]:
    """One plugin invocation: (exit code, JSON to print or None)."""
    try:
        req = parse_request(env, stdin)
        if req.command == "VERSION":
            return 0, {"cniVersion": CNI_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}
        if req.command == "ADD":
            return 0, cmd_add(req)
        if req.command == "DEL":
            cmd_del(req)
        else:
            cmd_check(req)
        return 0, None
    except CNIError as e:
        return 1, e.to_json()


def main() -> NoReturn:
    code, out = run(os.environ, sys.stdin.read())
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
    sys.exit(code)
