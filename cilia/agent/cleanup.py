"""``cilia cleanup``: remove what an agent with the BPF datapath left on the node.

An agent that stops leaves its BPF programs attached and its maps pinned, so the kernel keeps
enforcing the last policy across restarts (as Cilium does). Cleaning up, with the agent stopped,
detaches the programs from every endpoint interface, removes the pinned maps, the proxy route,
the router address the agent added and the namespaces it created for endpoints; those endpoints
leave the state (they no longer exist), policies stay. In sidecar mode it removes the nftables
tables a crashed agent left (the guard of the applications' ports).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from ..bpf import node as bpf_node
from ..bpf.crossnode import underlay_devices
from ..bpf.netns import Namespace, del_host_address
from . import sidecar_guard
from .daemon import NODE_RECORD
from .state import load_state, save_state


class CleanupError(Exception):
    pass


def agent_running(state_dir: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(state_dir / "cilia.sock"))
        except OSError:
            return False
    return True


def cleanup(state_dir: Path) -> list[str]:
    """Remove it all; returns what was removed, one line each."""
    if agent_running(state_dir):
        raise CleanupError(f"the agent is running (it answers on {state_dir / 'cilia.sock'}): stop it first")
    record_path = state_dir / NODE_RECORD
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        record = {}
    except ValueError as e:
        raise CleanupError(f"{record_path}: unreadable: {e}") from None
    here = os.readlink("/proc/self/ns/net")
    if record.get("netns") and record["netns"] != here:
        raise CleanupError(f"the agent ran in network namespace {record['netns']}, this is {here}: run cleanup "
                           "where the agent ran (e.g. nsenter --net=...)")
    state = load_state(state_dir)
    done: list[str] = []
    # sidecar mode: the nftables tables that kept the applications' ports for Envoy alone (an agent
    # that stopped removed them, one that crashed did not)
    namespaces = [None, *sorted({s.netns for s in state.endpoints.values() if s.netns})]
    done += sidecar_guard.remove_left(str(state_dir), namespaces)
    interfaces = sorted({s.interface for s in state.endpoints.values() if s.interface}
                        | set(record.get("nodeport_devices") or ()))
    pin_dir = record.get("pin_dir")
    if pin_dir and record.get("node_ip"):  # issue 13: routes and tunnel to other nodes, the underlay's program
        done += bpf_node.cleanup_network(pin_dir, underlay_devices(record["node_ip"]))
    if pin_dir:
        bpf_node.cleanup(pin_dir, interfaces)
        done.append(f"detached the datapath from {len(interfaces)} interface(s), removed {pin_dir} and the "
                    "proxy route")
    for table in (state.endpoints, state.waiting):  # waiting: accepted without an identity (issue 13)
        for name, spec in sorted(table.items()):
            if spec.managed and spec.netns and spec.interface:
                ns = Namespace(spec.netns, spec.ips[0], spec.interface)
                ns.created = True
                ns.delete()
                del table[name]
                done.append(f"removed endpoint {name} and its namespace {spec.netns}")
    if record.get("router_ip"):
        del_host_address(record["router_ip"])
        done.append(f"removed the router address {record['router_ip']} from lo")
    state.endpoint_ids = {k: v for k, v in state.endpoint_ids.items() if k in state.endpoints or k in state.waiting}
    state.proxy_ports = {}
    save_state(state_dir, state)
    record_path.unlink(missing_ok=True)
    return done
