"""Compile and load ``datapath.c`` with bcc, attach it to endpoint veths with pyroute2, and own
the pinned maps (bpffs) that outlive the agent.

Pinned under ``pin_dir``: ``ipcache``, ``endpoints``, ``conntrack``, ``drop_counts``, the load
balancer's ``lb_*`` maps (declared by the program; bcc reuses them when they exist) and one
``policy_<EPID>`` trie per endpoint (made here). A restarted agent loads the program again,
reopens the same maps and replaces the filters in place: enforcement never stops in between,
since an attached program stays attached.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import bpfmap
from .bpfmap import Map
from .paths import BPFFS, DEFAULT_PIN_DIR
from .policykey import KEY_SIZE, VALUE_SIZE

SOURCE = Path(__file__).with_name("datapath.c")
# Spliced into datapath.c where it includes it: bcc rewrites map calls (``m.lookup(...)``) only in
# the text it is given, not in included headers.
LB_SOURCE = Path(__file__).with_name("lb_datapath.h")
LB_INCLUDE = b'#include "lb_datapath.h"'
POLICY_MAX = 16384  # entries per endpoint policy trie (Cilium's default)
# Load balancer sizes (see lb.py): service ids below LB_SERVICES_MAX, each with a row of
# LB_TABLE_SIZE slots (a prime, for Maglev) in one mmapped array; backends across all services.
LB_SERVICES_MAX = 16384
LB_TABLE_SIZE = 1021
LB_BACKENDS_MAX = 65536
ENDPOINT_PROGRAMS = ("from_endpoint", "to_endpoint")
NETDEV_PROGRAMS = ("from_netdev", "to_netdev")  # NodePort on a node-facing device
LB_MAPS = ("lb_services", "lb_backends", "lb_slots", "lb_ct", "lb_revnat", "lb_affinity", "lb_rr", "lb_counters")
# tc filter identity: ours are replaced in place on reload, never duplicated.
FILTER_PRIO = 1
FILTER_HANDLE = 0xC111A
INGRESS_PARENT = 0xFFFFFFF2
EGRESS_PARENT = 0xFFFFFFF3


class DatapathError(RuntimeError):
    pass


def bpf_available() -> str | None:
    """None when the BPF datapath can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
        import pyroute2  # noqa: F401
    except ImportError as e:
        return f"missing {e.name} (Debian python3-bpfcc, PyPI pyroute2)"
    if not Path(f"/lib/modules/{os.uname().release}/build").exists():
        return "no kernel headers for bcc (scripts/setup.sh links them)"
    return None


def ensure_bpffs() -> None:
    with open("/proc/mounts", encoding="utf-8") as f:
        if any(line.split()[1:3] == [BPFFS, "bpf"] for line in f):
            return
    os.makedirs(BPFFS, exist_ok=True)
    if os.system(f"mount -t bpf bpf {BPFFS}") != 0:
        raise DatapathError(f"cannot mount bpffs on {BPFFS}")


def program_text() -> bytes:
    text = SOURCE.read_bytes()
    if text.count(LB_INCLUDE) != 1:
        raise DatapathError(f"{SOURCE.name} must include {LB_SOURCE.name} once")
    return text.replace(LB_INCLUDE, LB_SOURCE.read_bytes())


class Loader:
    """The loaded program and its maps. ``netns``: the namespace whose interfaces it attaches to
    (None: this process's)."""

    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, netns: str | None = None,
                 policy_max: int = POLICY_MAX, lb_services_max: int = LB_SERVICES_MAX,
                 lb_table_size: int = LB_TABLE_SIZE, lb_backends_max: int = LB_BACKENDS_MAX) -> None:
        self.pin_dir = pin_dir
        self.policy_max = policy_max
        self.lb_services_max = lb_services_max
        self.lb_table_size = lb_table_size
        self.lb_backends_max = lb_backends_max
        self.netns = netns
        self.bpf: Any = None  # bcc.BPF
        self._fns: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.maps: dict[str, Map] = {}
        self.policy_maps: dict[int, Map] = {}
        self.attached: set[str] = set()

    # -- load / unload ---------------------------------------------------------------

    def load(self) -> None:
        from bcc import BPF

        ensure_bpffs()
        os.makedirs(self.pin_dir, exist_ok=True)
        text = program_text()
        # bcc wants bytes throughout (str arguments raise DeprecationWarning).
        cflags = [f'-DPIN_DIR="{self.pin_dir}"', f"-DPOLICY_MAX={self.policy_max}",  # bcc encodes these itself
                  f"-DLB_SERVICES_MAX={self.lb_services_max}",
                  f"-DLB_TABLE_SIZE={self.lb_table_size}", f"-DLB_BACKENDS_MAX={self.lb_backends_max}"]
        try:
            self.bpf = BPF(text=text, cflags=cflags)
        except Exception as e:  # bcc raises plain Exception on compile/verifier errors
            raise DatapathError(f"loading {SOURCE.name}: {str(e)[:2000]}") from e
        for name in (*ENDPOINT_PROGRAMS, *NETDEV_PROGRAMS):
            self._fns[name] = self.bpf.load_func(name.encode(), BPF.SCHED_CLS)
        for name in ("ipcache", "endpoints", "conntrack", "drop_counts", *LB_MAPS):
            self.maps[name] = Map.open_pinned(f"{self.pin_dir}/{name}")
        # Endpoint policy tries that survived a restart go back into the new program's array.
        for entry in sorted(os.listdir(self.pin_dir)):
            if entry.startswith("policy_") and entry[7:].isdigit():
                ep_id = int(entry[7:])
                self.policy_maps[ep_id] = Map.open_pinned(f"{self.pin_dir}/{entry}")
                self._set_outer(ep_id, self.policy_maps[ep_id].fd)

    def _set_outer(self, ep_id: int, fd: int) -> None:
        assert self.bpf is not None
        table = self.bpf[b"policy_maps"]
        table[ctypes.c_int(ep_id)] = ctypes.c_int(fd)

    def close(self) -> None:
        """Drop this process's handles; attached programs and pinned maps stay."""
        for m in [*self.maps.values(), *self.policy_maps.values()]:
            m.close()
        self.maps.clear()
        self.policy_maps.clear()
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def remove_all(self) -> None:
        """Detach from every interface we attached to and delete the pinned maps."""
        for ifname in list(self.attached):
            self.detach(ifname)
        self.close()
        shutil.rmtree(self.pin_dir, ignore_errors=True)

    # -- per-endpoint policy tries -------------------------------------------------

    def policy_map(self, ep_id: int) -> Map:
        m = self.policy_maps.get(ep_id)
        if m is None:
            path = f"{self.pin_dir}/policy_{ep_id}"
            if os.path.exists(path):
                m = Map.open_pinned(path)
            else:
                m = Map.create(bpfmap.MAP_TYPE_LPM_TRIE, KEY_SIZE, VALUE_SIZE, self.policy_max,
                               flags=bpfmap.F_NO_PREALLOC, name=f"cilia_pol_{ep_id}")
                m.pin(path)
            self.policy_maps[ep_id] = m
            self._set_outer(ep_id, m.fd)
        return m

    def drop_policy_map(self, ep_id: int) -> None:
        m = self.policy_maps.pop(ep_id, None)
        if self.bpf is not None:
            table = self.bpf[b"policy_maps"]
            try:
                del table[ctypes.c_int(ep_id)]
            except KeyError:
                pass
        if m is not None:
            m.close()
        try:
            os.unlink(f"{self.pin_dir}/policy_{ep_id}")
        except FileNotFoundError:
            pass

    # -- tc attach ---------------------------------------------------------------------

    def _ipr(self) -> Any:
        from pyroute2 import IPRoute, NetNS

        return NetNS(self.netns) if self.netns else IPRoute()

    def attach(self, ifname: str, programs: tuple[str, str] = ENDPOINT_PROGRAMS) -> int:
        """Attach a program pair (tc ingress, tc egress) to ``ifname``, replacing ours if present:
        the endpoint pair, or NETDEV_PROGRAMS on a node-facing device; returns its ifindex."""
        with self._lock, self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                raise DatapathError(f"no interface {ifname}")
            ifindex = idx[0]
            try:
                ipr.tc("add", "clsact", ifindex)
            except Exception as e:  # NetlinkError: EEXIST when it is already there
                if getattr(e, "code", None) != 17:
                    raise
            for name, parent in zip(programs, (INGRESS_PARENT, EGRESS_PARENT), strict=True):
                fn = self._fns[name]
                ipr.tc("replace-filter", "bpf", ifindex, FILTER_HANDLE, fd=fn.fd,
                       name=f"cilia_{name}", parent=parent, prio=FILTER_PRIO, classid=1, direct_action=True,
                       protocol=0x0003)
            self.attached.add(ifname)
            return int(ifindex)

    def detach(self, ifname: str) -> None:
        with self._lock, self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            self.attached.discard(ifname)
            if not idx:
                return
            try:
                ipr.tc("del", "clsact", idx[0])
            except Exception:  # gone with the interface, or never added
                pass

    def attached_filters(self, ifname: str) -> list[str]:
        """Names of the BPF programs on ``ifname``'s clsact hooks (for status and tests)."""
        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                return []
            out = []
            for parent in (INGRESS_PARENT, EGRESS_PARENT):
                for msg in ipr.get_filters(index=idx[0], parent=parent):
                    opts = msg.get_attr("TCA_OPTIONS")
                    name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
                    if name:
                        out.append(str(name))
            return out

    def set_config(self, index: int, value: int) -> None:
        """Set a slot of the program's (unpinned) config array; see ``config`` in datapath.c."""
        if self.bpf is not None:
            self.bpf[b"config"][ctypes.c_int(index)] = ctypes.c_uint32(value)

    # -- events -----------------------------------------------------------------------

    def open_events(self, callback: Callable[[bytes], None], pages: int = 64) -> None:
        assert self.bpf is not None

        def raw(_cpu: int, data: int, size: int) -> None:
            callback(ctypes.string_at(data, size))

        self.bpf[b"events"].open_perf_buffer(raw, page_cnt=pages)

    def poll_events(self, timeout_ms: int = 200) -> None:
        assert self.bpf is not None
        self.bpf.perf_buffer_poll(timeout=timeout_ms)
