"""Security identities: a label set maps to a number, as in Cilium.

Reserved identities 1-10 are fixed; endpoint identities are allocated from 256;
world prefixes referenced by policy get local CIDR identities with bit 24 set
(16777216 + n), as Cilium's local CIDR identities do.

``IdentityAllocator`` is the seam for a distributed backend; ``FileAllocator``
(the embedded default) persists to ``<state-dir>/identities.json`` so an agent
restart maps every label set back to the same number.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
import threading
from contextlib import AbstractContextManager, contextmanager
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from .labels import SOURCE_CIDR, SOURCE_RESERVED, Label, LabelSet
from .model import IPNetwork

ANY_IDENTITY = 0
MIN_ALLOCATED = 256
MAX_ALLOCATED = 65535
LOCAL_CIDR_BASE = 1 << 24


class IdentityKind(str, Enum):
    RESERVED = "reserved"
    ENDPOINT = "endpoint"
    CIDR = "cidr"


#: name -> (number, extra reserved labels)
RESERVED: dict[str, tuple[int, tuple[str, ...]]] = {
    "host": (1, ()),
    "world": (2, ()),
    "unmanaged": (3, ()),
    "health": (4, ()),
    "init": (5, ()),
    "remote-node": (6, ()),
    "kube-apiserver": (7, ()),
    "ingress": (8, ()),
    # Dual-stack world identities (as modern Cilium); unknown outside addresses map here.
    "world-ipv4": (9, ("world",)),
    "world-ipv6": (10, ("world",)),
}


@dataclass(frozen=True, slots=True)
class Identity:
    id: int
    labels: LabelSet
    kind: IdentityKind
    prefix: IPNetwork | None = None  # CIDR identities and the world-ipv4/6 identities

    def has_reserved(self, name: str) -> bool:
        label = self.labels.get(name)
        return label is not None and label.source == SOURCE_RESERVED

    def is_endpoint(self) -> bool:
        return self.kind is IdentityKind.ENDPOINT

    def is_world(self) -> bool:
        return self.has_reserved("world")

    def __str__(self) -> str:
        return f"{self.id} ({self.labels})"


def _reserved_identity(name: str) -> Identity:
    number, extra = RESERVED[name]
    labels = LabelSet([Label(SOURCE_RESERVED, name)] + [Label(SOURCE_RESERVED, e) for e in extra])
    prefix: IPNetwork | None = None
    if name == "world-ipv4":
        prefix = ipaddress.ip_network("0.0.0.0/0")
    elif name == "world-ipv6":
        prefix = ipaddress.ip_network("::/0")
    return Identity(number, labels, IdentityKind.RESERVED, prefix)


RESERVED_IDENTITIES: dict[int, Identity] = {
    RESERVED[name][0]: _reserved_identity(name) for name in RESERVED
}


def cidr_labels(prefix: IPNetwork) -> LabelSet:
    family = "world-ipv4" if prefix.version == 4 else "world-ipv6"
    return LabelSet([
        Label(SOURCE_CIDR, str(prefix)),
        Label(SOURCE_RESERVED, "world"),
        Label(SOURCE_RESERVED, family),
    ])


class IdentityUnavailable(RuntimeError):
    """No identity can be allocated now (a cluster-wide allocator cannot reach its store); the
    endpoint must wait: a node-local number would mean something else on other nodes."""


class IdentityAllocator(Protocol):
    """Allocates numeric identities for label sets; the same labels always get
    the same number while allocated."""

    def allocate(self, labels: LabelSet) -> Identity: ...

    def allocate_cidr(self, prefix: IPNetwork) -> Identity: ...

    def release(self, identity_id: int) -> None: ...

    def get(self, identity_id: int) -> Identity | None: ...

    def lookup(self, labels: LabelSet) -> Identity | None: ...

    def __iter__(self) -> Iterator[Identity]: ...

    def batch(self) -> AbstractContextManager[None]: ...


class MemoryAllocator:
    """In-process allocator; the base of FileAllocator and what traces use."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._by_id: dict[int, Identity] = dict(RESERVED_IDENTITIES)
        self._by_labels: dict[LabelSet, Identity] = {i.labels: i for i in RESERVED_IDENTITIES.values()}
        for ident in RESERVED_IDENTITIES.values():
            # `reserved:world-ipv4` alone also names identity 9.
            self._by_labels.setdefault(LabelSet([Label(SOURCE_RESERVED, ident.labels.labels()[-1].key)]), ident)
        self._next = MIN_ALLOCATED
        self._next_cidr = LOCAL_CIDR_BASE + 1

    @classmethod
    def copy_of(cls, identities: Iterable[Identity]) -> MemoryAllocator:
        """An allocator holding ``identities`` (an agent's), so a trace shows the numbers the agent
        uses while what it allocates stays private to the trace."""
        copy = cls()
        for ident in identities:
            if ident.id not in copy._by_id:
                copy._add(ident)
        return copy

    def allocate(self, labels: LabelSet) -> Identity:
        with self._lock:
            found = self._by_labels.get(labels)
            if found is not None:
                return found
            if labels.has_source(SOURCE_RESERVED):
                raise ValueError(f"labels {labels} name a reserved identity that does not exist")
            number = self._free_number()
            ident = Identity(number, labels, IdentityKind.ENDPOINT)
            self._add(ident)
            return ident

    def allocate_cidr(self, prefix: IPNetwork) -> Identity:
        labels = cidr_labels(prefix)
        with self._lock:
            found = self._by_labels.get(labels)
            if found is not None:
                return found
            number = self._next_cidr
            while number in self._by_id:
                number += 1
            self._next_cidr = number + 1
            ident = Identity(number, labels, IdentityKind.CIDR, prefix)
            self._add(ident)
            return ident

    def _free_number(self) -> int:
        number = self._next
        while number in self._by_id:
            number += 1
        if number > MAX_ALLOCATED:
            number = next((n for n in range(MIN_ALLOCATED, MAX_ALLOCATED + 1) if n not in self._by_id), 0)
            if not number:
                raise RuntimeError("identity space 256-65535 is exhausted")
        self._next = number + 1
        return number

    def _add(self, ident: Identity) -> None:
        self._by_id[ident.id] = ident
        self._by_labels[ident.labels] = ident
        self._changed()

    def release(self, identity_id: int) -> None:
        with self._lock:
            ident = self._by_id.get(identity_id)
            if ident is None or ident.kind is IdentityKind.RESERVED:
                return
            del self._by_id[identity_id]
            del self._by_labels[ident.labels]
            self._changed()

    def get(self, identity_id: int) -> Identity | None:
        return self._by_id.get(identity_id)

    def lookup(self, labels: LabelSet) -> Identity | None:
        return self._by_labels.get(labels)

    def __iter__(self) -> Iterator[Identity]:
        with self._lock:
            return iter(sorted(self._by_id.values(), key=lambda i: i.id))

    def _changed(self) -> None:
        """Hook for persistence."""

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group many changes (a no-op here; FileAllocator writes once at the end)."""
        yield


def _payload(identities: list[Identity], next_id: int, next_cidr: int) -> str:
    items = [
        {"id": i.id, "labels": i.labels.to_list(), "kind": i.kind.value,
         "prefix": str(i.prefix) if i.prefix else None}
        for i in sorted(identities, key=lambda i: i.id)
        if i.kind is not IdentityKind.RESERVED
    ]
    return json.dumps({"next": next_id, "next_cidr": next_cidr, "identities": items}, indent=1)


class IdentityFileError(Exception):
    """identities.json cannot be read back; the message names the file and what is wrong."""


class FileAllocator(MemoryAllocator):
    """Persists allocations to ``<state_dir>/identities.json`` (atomic rename).

    Every change is written at once, except inside ``batch()``, which writes
    once at the end (bulk endpoint restores allocate thousands at a time).
    """

    FILENAME = "identities.json"

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self._path = Path(state_dir) / self.FILENAME
        self._loading = True
        self._batch_depth = 0
        self._defer_depth = 0
        self._dirty = False
        self._seq = self._stored = 0  # snapshots taken, and the newest written
        self._io_lock = threading.Lock()
        super().__init__()
        self._load()
        self._loading = False

    @contextmanager
    def batch(self) -> Iterator[None]:
        with self._lock:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
                if self._batch_depth == 0 and self._dirty:
                    self._write()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Changes made inside are written by the next ``flush()`` (or any later write), not at
        once: for the node-local CIDR identities of addresses the DNS proxy learns, where a write
        of every identity per answer would cost more than the answer may wait. Losing them (a
        crash before the flush) only renumbers them at the next start."""
        with self._lock:
            self._defer_depth += 1
            try:
                yield
            finally:
                self._defer_depth -= 1

    def flush(self) -> None:
        """Write deferred changes; the file is written without holding the allocator's lock, so
        allocations (the next learned address) do not wait for the disk."""
        with self._lock:
            if not self._dirty:
                return
            seq, taken = self._snapshot()
        self._store(seq, _payload(*taken))

    def _load(self) -> None:
        """Read the file back; anything unreadable in it is an error naming it, never a fresh start
        (new numbers for the same labels would change every peer's identity under live policy)."""
        try:
            text = self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as e:
            raise IdentityFileError(f"{self._path}: cannot read the identities: {e}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise IdentityFileError(f"{self._path}: not JSON ({e}); restore it from a backup or remove it "
                                    "to allocate every identity anew") from None
        if not isinstance(data, dict) or not isinstance(data.get("identities"), list):
            raise IdentityFileError(f"{self._path}: expected an object with an \"identities\" list")
        for n, item in enumerate(data["identities"]):
            try:
                labels = LabelSet.parse(item["labels"], default_source="unspec")
                kind = IdentityKind(item["kind"])
                prefix = ipaddress.ip_network(item["prefix"]) if item.get("prefix") else None
                self._add(Identity(int(item["id"]), labels, kind, prefix))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise IdentityFileError(f"{self._path}: identities[{n}]: {type(e).__name__}: {e}") from None
        try:
            self._next = max(MIN_ALLOCATED, int(data.get("next", MIN_ALLOCATED)))
            self._next_cidr = max(LOCAL_CIDR_BASE + 1, int(data.get("next_cidr", LOCAL_CIDR_BASE + 1)))
        except (TypeError, ValueError) as e:
            raise IdentityFileError(f"{self._path}: next/next_cidr: {e}") from None

    def _changed(self) -> None:
        if self._loading:
            return
        self._dirty = True
        if self._batch_depth == 0 and self._defer_depth == 0:
            self._write()

    def _write(self) -> None:
        seq, taken = self._snapshot()
        self._store(seq, _payload(*taken))

    def _snapshot(self) -> tuple[int, tuple[list[Identity], int, int]]:
        """What to write now (lock held; cheap: the text is made after), numbered so that an older
        snapshot never replaces a newer."""
        self._dirty = False
        self._seq += 1
        return self._seq, (list(self._by_id.values()), self._next, self._next_cidr)

    def _store(self, seq: int, payload: str) -> None:
        with self._io_lock:
            if seq <= self._stored:
                return
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".identities.")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())  # on disk before it replaces the last one
            os.replace(tmp, self._path)
            self._stored = seq
