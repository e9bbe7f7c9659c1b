"""Paths shared by the tests (tests/ is on sys.path through its conftest)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STARWARS = REPO / "examples" / "starwars"


def cilium_examples_dir() -> Path:
    """Cilium's example policies (shared reference, beside the repo). Tests that
    need them fail, not skip, when the directory is missing."""
    default = REPO.parent / "shared" / "reference" / "cilium-examples"
    return Path(os.environ.get("CILIA_CILIUM_EXAMPLES", default))
