"""The DNS cache on disk, in the agent's state directory: a snapshot plus a journal.

Every answer that brings a new address appends one line to ``fqdn-journal.jsonl`` before the
proxy releases it (O(1), whatever the cache's size); ``fqdn-cache.json`` is the whole cache,
rewritten atomically now and then (and at stop), which empties the journal. Reading back is the
snapshot, then the journal's lines in order. A restarted agent thus selects every address a
client may still be using, so its open flows keep working. Both files are owner-only.
A line cut short by a crash is the journal's last and is skipped; anything else unreadable is an
error naming the file and line (guessing would drop addresses live flows use).
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
FORMAT = 1


class CacheFileError(Exception):
    """A persisted DNS cache that cannot be read back; the message names the file and line."""


class CacheStore:
    def __init__(self, state_dir: Path) -> None:
        self.snapshot_path = state_dir / SNAPSHOT
        self.journal_path = state_dir / JOURNAL
        self._lock = threading.Lock()
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
        try:
            lines = self.journal_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        except OSError as e:
            raise CacheFileError(f"{self.journal_path}: {e}") from None
        for n, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
                cache.restore(item["name"], item["ips"], item.get("endpoint", ""))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                if n == len(lines):
                    break  # the write a crash cut short
                raise CacheFileError(f"{self.journal_path}:{n}: {type(e).__name__}: {e}") from None
        self.journal_lines = len(lines)
        return len(cache)

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
        """Write the whole cache and start an empty journal."""
        with self._lock:
            data = cache.snapshot()
            write_private(self.snapshot_path, json.dumps({"format": FORMAT, **data}, separators=(",", ":")))
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            self.journal_path.unlink(missing_ok=True)
            self.journal_lines = 0

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
