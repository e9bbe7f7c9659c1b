"""An append-only journal of JSON records beside a snapshot file, for state that changes a little
at a time: a change appends one record (its cost independent of the state's size) and is on disk
(fsync) before the call returns.

One record per line: ``<crc32 of the JSON, 8 hex digits> <JSON>\\n``. The first record is the
header ``{"generation": G}``: the journal extends the snapshot of generation G only, so a crash
between writing a new snapshot and starting its empty journal leaves a journal that is ignored
(its records are in that snapshot already). A torn last record (a crash mid-append: no newline,
a checksum that does not match) is ignored and cut off before the next append; a bad record with
good ones after it is damage, not a crash, and is an error naming the file and line.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from ..envoy.private_file import write_private
from ..specs import StateError


def _line(record: dict[str, Any]) -> bytes:
    text = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(text), text)


def _parse(line: bytes) -> dict[str, Any] | None:
    """The record of a whole line (with its newline), or None when it is torn or damaged."""
    if len(line) < 10 or not line.endswith(b"\n") or line[8:9] != b" ":
        return None
    text = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(text):
            return None
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read(path: Path, generation: int) -> tuple[list[dict[str, Any]], int]:
    """The records (header excluded) of the journal at ``path`` if it extends snapshot
    ``generation`` (else none), and the length of its intact part."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    records: list[dict[str, Any]] = []
    offset = 0
    lines = data.splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        record = _parse(line)
        if record is None:
            if number < len(lines):
                raise StateError(f"{path}:{number}: damaged journal record (records follow it: not a torn "
                                 "write); move the file away to start from the last snapshot")
            break  # torn by a crash mid-append: that change was never acknowledged
        offset += len(line)
        if number == 1:
            if record.get("generation") != generation:
                return [], 0  # a journal of an older snapshot, folded into the current one
            continue
        records.append(record)
    return records, offset


class Journal:
    """Appends records to the journal at ``path`` extending snapshot ``generation``."""

    def __init__(self, path: Path, generation: int) -> None:
        self.path = path
        self.generation = generation
        self.size = 0
        self._fd: int | None = None

    def open(self) -> None:
        """Continue the journal (cut after its intact part), or start it anew if it extends
        another snapshot or is not there."""
        _, intact = read(self.path, self.generation)
        if intact == 0:
            self.restart(self.generation)
            return
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)  # appends go to its end
        os.fchmod(self._fd, 0o600)
        os.ftruncate(self._fd, intact)
        self.size = intact

    def restart(self, generation: int) -> None:
        """An empty journal for snapshot ``generation`` (just written), replacing this one whole."""
        self.close()
        header = _line({"generation": generation})
        write_private(self.path, header.decode("utf-8"))
        self.generation = generation
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.size = len(header)

    def append(self, record: dict[str, Any], sync: bool = True) -> None:
        """Append ``record`` and sync it: on return it survives a crash (``sync`` False: a crash of
        the process, not of the machine; the next synced record syncs it too)."""
        if self._fd is None:
            self.open()
        assert self._fd is not None
        data = _line(record)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
            if sync:
                os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, self.size)  # no half record for the next one to follow (disk full)
            raise
        self.size += len(data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
