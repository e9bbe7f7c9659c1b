"""The key-value store agents coordinate through (etcd), behind a small interface.

``base`` defines it, ``memory`` is the in-memory test double; the etcd backend is
``cilia.kvstore.etcd`` (imported only where it is used: it loads grpc and etcd's protos).
"""

from .base import (
    EventKind,
    KeyValue,
    KVStore,
    KVStoreError,
    KVStoreUnavailable,
    Put,
    WatchCompacted,
    WatchEvent,
)
from .memory import MemoryKVStore

__all__ = ["EventKind", "KeyValue", "KVStore", "KVStoreError", "KVStoreUnavailable", "MemoryKVStore", "Put",
           "WatchCompacted", "WatchEvent"]
