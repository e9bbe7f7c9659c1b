"""BPF maps held by fd, through libbcc's exported map functions: create, pin, open, edit, walk.

bcc compiles and loads the programs; the per-endpoint policy maps are made here, because each
endpoint needs its own pinned map (like Cilium's ``cilium_policy_<EPID>``) and bcc only creates
maps a program declares. Keys and values are bytes; ``maps.py`` gives them meaning. libbcc (and
the libbpf it links) issues the bpf(2) calls, so nothing here depends on the architecture.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# enum bpf_map_type and map flags (kernel ABI values, as bcc.table names them)
MAP_TYPE_HASH = 1
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_LPM_TRIE = 11
F_NO_PREALLOC = 1
ANY = 0  # update flag: create or replace


class BpfError(OSError):
    pass


class _MapInfo(ctypes.Structure):
    """The head of ``struct bpf_map_info``; the kernel fills as much as ``info_len`` says."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16)]


@dataclass(frozen=True)
class _Lib:
    create_map: Any
    obj_pin: Any
    obj_get: Any
    obj_get_info: Any
    update_elem: Any
    lookup_elem: Any
    delete_elem: Any
    get_first_key: Any
    get_next_key: Any


@functools.cache
def _lib() -> _Lib:
    """libbcc as bcc's Python package loads it. bcc declares the element functions; the ones it
    does not (declared in bcc's libbpf.h) get prototypes of their own here, leaving bcc's alone."""
    from bcc.libbcc import lib

    def proto(name: str, *argtypes: Any) -> Any:
        return ctypes.CFUNCTYPE(ctypes.c_int, *argtypes, use_errno=True)((name, lib))

    c_int, c_char_p, c_void_p = ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p
    return _Lib(
        create_map=proto("bcc_create_map", c_int, c_char_p, c_int, c_int, c_int, c_int),
        obj_pin=proto("bpf_obj_pin", c_int, c_char_p),
        obj_get=proto("bpf_obj_get", c_char_p),
        obj_get_info=proto("bpf_obj_get_info", c_int, c_void_p, ctypes.POINTER(ctypes.c_uint32)),
        update_elem=lib.bpf_update_elem,
        lookup_elem=lib.bpf_lookup_elem,
        delete_elem=lib.bpf_delete_elem,
        get_first_key=lib.bpf_get_first_key,
        get_next_key=lib.bpf_get_next_key,
    )


def _check(ret: int, what: str) -> int:
    """libbcc returns a negative value on failure with errno set (libbpf also returns -errno)."""
    if ret < 0:
        err = ctypes.get_errno() or -ret
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def _missing(ret: int) -> bool:
    return ret < 0 and (ctypes.get_errno() or -ret) == errno.ENOENT


class Map:
    """A BPF map held by fd. ``close()`` drops this process's reference; a pinned map lives on."""

    def __init__(self, fd: int, key_size: int, value_size: int, name: str = "", map_type: int = 0,
                 max_entries: int = 0) -> None:
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.name = name
        self.map_type = map_type  # 0 (unspec) when not known
        self.max_entries = max_entries  # for the agent's bpf_map_pressure; 0 when not known

    @classmethod
    def create(cls, map_type: int, key_size: int, value_size: int, max_entries: int, *,
               flags: int = 0, name: str = "") -> Map:
        fd = _check(_lib().create_map(map_type, name.encode()[:15], key_size, value_size, max_entries, flags),
                    f"create map {name}")
        return cls(fd, key_size, value_size, name, map_type, max_entries)

    @classmethod
    def open_pinned(cls, path: str) -> Map:
        lib = _lib()
        fd = _check(lib.obj_get(path.encode()), f"open {path}")
        info = _MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        try:  # sizes come from the kernel, not the caller
            _check(lib.obj_get_info(fd, ctypes.byref(info), ctypes.byref(size)), f"info {path}")
        except BpfError:
            os.close(fd)
            raise
        return cls(fd, info.key_size, info.value_size, info.name.decode(errors="replace"), info.type,
                   info.max_entries)

    def pin(self, path: str) -> None:
        _check(_lib().obj_pin(self.fd, path.encode()), f"pin {path}")

    def update(self, key: bytes, value: bytes, flags: int = ANY) -> None:
        self._check(key, value)
        kbuf = ctypes.create_string_buffer(key, self.key_size)
        vbuf = ctypes.create_string_buffer(value, self.value_size)
        _check(_lib().update_elem(self.fd, kbuf, vbuf, flags), f"update {self.name}")

    def lookup(self, key: bytes) -> bytes | None:
        kbuf = ctypes.create_string_buffer(key, self.key_size)
        vbuf = ctypes.create_string_buffer(self.value_size)
        ret = _lib().lookup_elem(self.fd, kbuf, vbuf)
        if _missing(ret):
            return None
        _check(ret, f"lookup {self.name}")
        return vbuf.raw

    def delete(self, key: bytes) -> bool:
        kbuf = ctypes.create_string_buffer(key, self.key_size)
        ret = _lib().delete_elem(self.fd, kbuf)
        if _missing(ret):
            return False
        _check(ret, f"delete {self.name}")
        return True

    def keys(self) -> Iterator[bytes]:
        """Every key (a snapshot walk: entries added meanwhile may be missed)."""
        lib = _lib()
        out: list[bytes] = []
        cur = ctypes.create_string_buffer(self.key_size)
        ret = lib.get_first_key(self.fd, cur, self.key_size)
        while not _missing(ret):
            _check(ret, f"walk {self.name}")
            out.append(cur.raw)
            nxt = ctypes.create_string_buffer(self.key_size)
            ret = lib.get_next_key(self.fd, cur, nxt)
            cur = nxt
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
