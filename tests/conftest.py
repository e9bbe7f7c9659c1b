"""Session hygiene. An agent in sidecar mode keeps its nftables guard table (``cilia_guard_*``) after
it stops, on purpose (the app ports stay closed to everyone but Envoy); the tables the test agents
made in this network namespace are removed when the session ends."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from cilia.agent.sidecar_guard import TABLE_PREFIX


def _guard_tables() -> set[str]:
    if shutil.which("nft") is None:
        return set()
    done = subprocess.run(["nft", "-j", "list", "tables", "inet"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return set()
    items = json.loads(done.stdout or "{}").get("nftables", [])
    return {t["table"]["name"] for t in items if "table" in t and t["table"]["name"].startswith(TABLE_PREFIX)}


@pytest.fixture(autouse=True, scope="session")
def remove_sidecar_guard_tables() -> Iterator[None]:
    before = _guard_tables()
    yield
    for name in sorted(_guard_tables() - before):
        subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True, check=False)
