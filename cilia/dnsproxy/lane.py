"""The DNS proxy's fast lane (``lane.c``): built by setup into this venv, loaded if there.

Python in the proxy costs ~60 us per UDP query (measured: bench/dns_proxy.py, py-spy), so one
interpreter thread tops out near a quarter of what the DNS server answers directly. The lane
passes on, in C, the datagrams Python has already judged (the same query bytes from the same
client to the same server: a route) and the answers Python has already released (the same answer
bytes on that route), and hands everything else to Python whole. Without the compiled module the
proxy does everything in Python, as before.

    python -m cilia.dnsproxy.lane          # build (setup runs it); prints the module's path
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import sys
import sysconfig
from pathlib import Path
from typing import Any

from ..cbuild import BuildError, compile_shared

SOURCE = Path(__file__).with_name("lane.c")
NAME = "_dnslane"


def module_dir() -> Path:
    """Where the module goes: inside this venv (``<prefix>/lib/cilia-dnslane``)."""
    return Path(sys.prefix) / "lib" / "cilia-dnslane"


def _target(directory: Path) -> Path:
    """The module's file, named by the source's hash: a changed lane.c is never loaded stale."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return directory / f"{NAME}-{digest}{sysconfig.get_config_var('EXT_SUFFIX')}"


def build(directory: Path | None = None) -> Path:
    """Compile ``lane.c`` for this interpreter (nothing done if the current source's build is there)."""
    directory = directory or module_dir()
    out = _target(directory)
    if out.exists():
        return out
    compile_shared(SOURCE, out, [f"-I{sysconfig.get_paths()['include']}"])
    for old in directory.glob(f"{NAME}-*"):  # builds of earlier sources
        if old != out:
            old.unlink(missing_ok=True)
    return out


def load(directory: Path | None = None) -> Any | None:
    """The compiled module for the current source, or None (not built: the proxy stays in Python)."""
    path = _target(directory or module_dir())
    if not path.exists():
        return None
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
    spec = importlib.util.spec_from_file_location(NAME, path, loader=loader)
    if spec is None:
        return None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def main() -> int:
    try:
        print(build())
    except BuildError as e:
        print(f"cilia.dnsproxy.lane: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
