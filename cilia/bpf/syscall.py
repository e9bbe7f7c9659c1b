"""The few bpf(2) commands cilia needs outside bcc: create, pin, open and edit maps by fd.

bcc compiles and loads the programs; the per-endpoint policy maps are made here, because each
endpoint needs its own pinned map (like Cilium's ``cilium_policy_<EPID>``) and bcc only creates
maps a program declares. Keys and values are bytes; ``maps.py`` gives them meaning.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_BPF = 321  # x86_64

# enum bpf_cmd
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
OBJ_PIN, OBJ_GET = 6, 7
OBJ_GET_INFO_BY_FD = 15

# enum bpf_map_type
MAP_TYPE_LPM_TRIE = 11
F_NO_PREALLOC = 1
ANY = 0  # update flag: create or replace


class BpfError(OSError):
    pass


class _MapCreate(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16),
                ("map_ifindex", ctypes.c_uint32), ("btf_fd", ctypes.c_uint32),
                ("btf_key_type_id", ctypes.c_uint32), ("btf_value_type_id", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32), ("map_extra", ctypes.c_uint64)]


class _MapElem(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjPin(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _InfoByFd(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16)]


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    ret = _libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


class Map:
    """A BPF map held by fd. ``close()`` drops this process's reference; a pinned map lives on."""

    def __init__(self, fd: int, key_size: int, value_size: int, name: str = "") -> None:
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.name = name

    @classmethod
    def create(cls, map_type: int, key_size: int, value_size: int, max_entries: int, *,
               flags: int = 0, name: str = "") -> Map:
        attr = _MapCreate(map_type=map_type, key_size=key_size, value_size=value_size,
                          max_entries=max_entries, map_flags=flags, map_name=name.encode()[:15])
        return cls(_bpf(MAP_CREATE, attr, f"create map {name}"), key_size, value_size, name)

    @classmethod
    def open_pinned(cls, path: str) -> Map:
        raw = path.encode()
        attr = _ObjPin(pathname=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0)
        fd = _bpf(OBJ_GET, attr, f"open {path}")
        info = _MapInfo()
        req = _InfoByFd(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
        _bpf(OBJ_GET_INFO_BY_FD, req, f"info {path}")  # sizes come from the kernel, not the caller
        return cls(fd, info.key_size, info.value_size, info.name.decode(errors="replace"))

    def pin(self, path: str) -> None:
        raw = path.encode()
        attr = _ObjPin(pathname=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0, bpf_fd=self.fd)
        _bpf(OBJ_PIN, attr, f"pin {path}")

    def _elem(self, key: bytes, value: ctypes.Array[ctypes.c_char] | None, flags: int = 0) -> tuple[_MapElem, object]:
        kbuf = ctypes.create_string_buffer(key, self.key_size)
        attr = _MapElem(map_fd=self.fd, key=ctypes.addressof(kbuf),
                        value=ctypes.addressof(value) if value is not None else 0, flags=flags)
        return attr, kbuf

    def update(self, key: bytes, value: bytes, flags: int = ANY) -> None:
        self._check(key, value)
        vbuf = ctypes.create_string_buffer(value, self.value_size)
        attr, _keep = self._elem(key, vbuf, flags)
        _bpf(MAP_UPDATE_ELEM, attr, f"update {self.name}")

    def lookup(self, key: bytes) -> bytes | None:
        vbuf = ctypes.create_string_buffer(self.value_size)
        attr, _keep = self._elem(key, vbuf)
        try:
            _bpf(MAP_LOOKUP_ELEM, attr, f"lookup {self.name}")
        except BpfError as e:
            if e.errno == 2:  # ENOENT
                return None
            raise
        return vbuf.raw

    def delete(self, key: bytes) -> bool:
        attr, _keep = self._elem(key, None)
        try:
            _bpf(MAP_DELETE_ELEM, attr, f"delete {self.name}")
        except BpfError as e:
            if e.errno == 2:
                return False
            raise
        return True

    def keys(self) -> Iterator[bytes]:
        """Every key (a snapshot walk: entries added meanwhile may be missed)."""
        nbuf = ctypes.create_string_buffer(self.key_size)
        attr = _MapElem(map_fd=self.fd, key=0, value=ctypes.addressof(nbuf))
        out: list[bytes] = []
        while True:
            try:
                _bpf(MAP_GET_NEXT_KEY, attr, f"walk {self.name}")
            except BpfError as e:
                if e.errno == 2:
                    break
                raise
            out.append(nbuf.raw)
            cur = ctypes.create_string_buffer(nbuf.raw, self.key_size)
            attr = _MapElem(map_fd=self.fd, key=ctypes.addressof(cur), value=ctypes.addressof(nbuf))
        yield from out

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def _check(self, key: bytes, value: bytes) -> None:
        if len(key) != self.key_size or len(value) != self.value_size:
            raise ValueError(f"{self.name}: key/value of {len(key)}/{len(value)} bytes, map has "
                             f"{self.key_size}/{self.value_size}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
