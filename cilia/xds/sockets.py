"""UNIX sockets with an explicit mode, whatever the process umask.

Who may connect to a pathname UNIX socket is decided by the kernel at ``connect()``: the caller
needs write permission on the socket file (unix(7)). So a socket owned by the server's user with
mode 0600 admits exactly that user and root (CAP_DAC_OVERRIDE); 0660 with a group adds the
group's members. That is how cilia checks a local peer's identity. grpcio cannot do it any other
way: it never hands out the accepted socket, so SO_PEERCRED cannot be read, and its "local"
credentials do not check the peer at all (grpc/grpc#15511, #28755: ``auth_context()`` of a UDS
stream names only the transport, never a uid).

``bind()`` creates the file with the umask's mode; a chmod afterwards would leave a window in
which anyone could connect (and such a connection stays accepted). So the socket is bound in a
fresh 0700 directory next to its final path, given its mode and group there, and only then renamed
into place: nobody else can reach it before it has its final mode.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

OWNER_ONLY = 0o600
OWNER_AND_GROUP = 0o660


def socket_mode(group: int | None) -> int:
    """0600, or 0660 when a group is configured."""
    return OWNER_ONLY if group is None else OWNER_AND_GROUP


def bind_unix(path: Path | str, bind: Callable[[str], T], group: int | None = None) -> T:
    """Call ``bind(staging_path)`` (which must create a listening UNIX socket there), give the
    socket mode 0600 (0660 and ``group`` when given), then move it to ``path``; returns what
    ``bind`` returned. A file already at ``path`` is replaced (a dead predecessor's socket)."""
    final = Path(path)
    staging_dir = Path(tempfile.mkdtemp(prefix=".bind-", dir=final.parent))  # mode 0700
    try:
        staging = staging_dir / "s"
        result = bind(str(staging))
        if not staging.exists():
            raise OSError(f"cannot listen on unix:{final}")
        if group is not None:
            os.chown(staging, -1, group)
        os.chmod(staging, socket_mode(group))
        os.replace(staging, final)
        return result
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
