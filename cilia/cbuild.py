"""Compiling the project's C parts (the L7 module inside Envoy, the DNS proxy's fast lane) into
shared objects with the machine's cc. The file is written beside its place and moved in, so a
process that mapped the old one keeps it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


class BuildError(Exception):
    """The module cannot be built here; the message says why and what would fix it."""


def compile_shared(source: Path, out: Path, flags: Sequence[str] = (), link: Sequence[str] = ()) -> Path:
    """``source`` compiled (warnings are errors) into the shared object ``out``."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BuildError("no C compiler (cc) on PATH: apt-get install gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", *flags, "-o", tmp, str(source), *link]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"compiling {source.name} failed:\n{done.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out
