"""The DNS cache on disk, in the agent's state directory: a snapshot plus a journal.

Every answer that brings a new address appends one line to ``fqdn-journal.jsonl`` before the
proxy releases it (O(1), whatever the cache's size); ``fqdn-cache.json`` is the whole cache,
rewritten atomically now and then (and at stop). A save first moves the journal aside
(``fqdn-journal.old.jsonl``: answers learned meanwhile go to a new one, never waiting for the
disk), writes the snapshot, then deletes the old journal. Reading back is the snapshot, then the
old journal, then the journal, in order (a line read twice changes nothing). A restarted agent
thus selects every address a client may still be using, so its open flows keep working. The
files are owner-only. A line cut short by a crash is a journal's last and is skipped; anything
else unreadable is an error naming the file and line (guessing would drop addresses in use).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from ..envoy.private_file import write_private
from .cache import FqdnCache

SNAPSHOT = "fqdn-cache.json"
JOURNAL = "fqdn-journal.jsonl"
OLD_JOURNAL = "fqdn-journal.old.jsonl"
FORMAT = 1


class CacheFileError(Exception):
    """A persisted DNS cache that cannot be read back; the message names the file and line."""


class CacheStore:
    def __init__(self, state_dir: Path) -> None:
        self.snapshot_path = state_dir / SNAPSHOT
        self.journal_path = state_dir / JOURNAL
        self.old_journal_path = state_dir / OLD_JOURNAL
        self._lock = threading.Lock()  # the journal
        self._save_lock = threading.Lock()  # one save at a time
        self._journal: Any = None
        self.journal_lines = 0

    def load(self, cache: FqdnCache) -> int:
        """Fill ``cache`` from disk; returns how many names it holds afterwards."""
        try:
            text = self.snapshot_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = None
        except OSError as e:
            raise CacheFileError(f"{self.snapshot_path}: {e}") from None
        if text is not None:
            try:
                data = json.loads(text)
                if data.get("format") != FORMAT:
                    raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
                for name, item in data["names"].items():
                    cache.restore(name, item["ips"], item.get("endpoint", ""))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CacheFileError(f"{self.snapshot_path}: {type(e).__name__}: {e}") from None
        for path in (self.old_journal_path, self.journal_path):
            self.journal_lines = self._replay(path, cache)
        return len(cache)

    @staticmethod
    def _replay(path: Path, cache: FqdnCache) -> int:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise CacheFileError(f"{path}: {e}") from None
        for n, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
                cache.restore(item["name"], item["ips"], item.get("endpoint", ""))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                if n == len(lines):
                    break  # the write a crash cut short
                raise CacheFileError(f"{path}:{n}: {type(e).__name__}: {e}") from None
        return len(lines)

    def append(self, name: str, ips: dict[str, float], endpoint: str) -> None:
        """Journal one learned answer (flushed to the kernel: it survives the agent's crash)."""
        line = json.dumps({"name": name, "ips": ips, "endpoint": endpoint}, separators=(",", ":")) + "\n"
        with self._lock:
            if self._journal is None:
                fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._journal = os.fdopen(fd, "a", encoding="utf-8")
            self._journal.write(line)
            self._journal.flush()
            self.journal_lines += 1

    def save(self, cache: FqdnCache) -> None:
        """Write the whole cache; the journal so far is then no longer needed."""
        with self._save_lock:
            with self._lock:  # what the snapshot holds is exactly what the moved journal recorded, or more
                data = cache.snapshot()
                if self._journal is not None:
                    self._journal.close()
                    self._journal = None
                # a leftover old journal (a crash during the last save) is in the cache, so in this
                # snapshot: keep the journal in place then, and let the next save move it
                if self.journal_path.exists() and not self.old_journal_path.exists():
                    os.replace(self.journal_path, self.old_journal_path)
                self.journal_lines = 0
            write_private(self.snapshot_path, json.dumps({"format": FORMAT, **data}, separators=(",", ":")))
            self.old_journal_path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
