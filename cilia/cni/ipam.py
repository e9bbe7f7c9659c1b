"""The plugin's own IPAM: one address per (container, interface) from a subnet, kept as files.

Like CNI's host-local plugin: a directory per network holds one file per allocated address whose
content names its owner, created with O_EXCL so two plugins running at once never hand out the
same address; a lock file serialises the scan. Allocating again for the same owner returns the
same address (ADD may be retried); releasing an address nobody holds is not an error (DEL must
be idempotent).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class IPAMError(Exception):
    pass


@dataclass(frozen=True)
class Pool:
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    range_start: ipaddress.IPv4Address
    range_end: ipaddress.IPv4Address
    data_dir: Path

    @classmethod
    def from_config(cls, ipam: dict[str, object], network: str) -> Pool:
        try:
            subnet = ipaddress.IPv4Network(str(ipam["subnet"]))
            gateway = ipaddress.IPv4Address(str(ipam["gateway"]))
            hosts = list(subnet.hosts()) or [subnet.network_address]
            start = ipaddress.IPv4Address(str(ipam.get("rangeStart", hosts[0])))
            end = ipaddress.IPv4Address(str(ipam.get("rangeEnd", hosts[-1])))
        except KeyError as e:
            raise IPAMError(f"ipam.{e.args[0]}: required") from None
        except ValueError as e:
            raise IPAMError(f"ipam: {e}") from None
        if start not in subnet or end not in subnet or start > end:
            raise IPAMError(f"ipam: range {start}-{end} is not inside {subnet}")
        data_dir = Path(str(ipam.get("dataDir", f"/var/lib/cni/networks/{network}")))
        return cls(subnet, gateway, start, end, data_dir)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "lock", "w", encoding="ascii") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def allocate(self, owner: str) -> ipaddress.IPv4Address:
        with self._locked():
            held = self.held_by(owner)
            if held is not None:
                return held
            addr = self.range_start
            while addr <= self.range_end:
                if addr != self.gateway:
                    try:
                        fd = os.open(self.data_dir / str(addr), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    except FileExistsError:
                        addr += 1
                        continue
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(owner)
                    return addr
                addr += 1
        raise IPAMError(f"no free address in {self.range_start}-{self.range_end}")

    def held_by(self, owner: str) -> ipaddress.IPv4Address | None:
        for entry in self.data_dir.iterdir():
            if entry.name == "lock":
                continue
            try:
                if entry.read_text(encoding="utf-8") == owner:
                    return ipaddress.IPv4Address(entry.name)
            except (OSError, ValueError):
                continue
        return None

    def release(self, owner: str) -> ipaddress.IPv4Address | None:
        if not self.data_dir.exists():
            return None
        with self._locked():
            held = self.held_by(owner)
            if held is not None:
                (self.data_dir / str(held)).unlink(missing_ok=True)
            return held
