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


def private_dir(path: Path, group: int | None = None) -> None:
    """Make ``path`` (created with its parents if missing) a directory only its owner may change:
    mode 0700, or 0710 with ``group`` (members may reach the sockets inside, not list or replace
    them). Whoever may write to it could swap a socket for one of their own, which the proxies would
    then trust. A directory of another user is left as it is unless others may write to it: refused."""
    path.mkdir(parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid():
        if st.st_mode & 0o022:
            raise OSError(f"{path} belongs to uid {st.st_uid} and others may write to it (mode "
                          f"{st.st_mode & 0o777:o}): anyone could replace the sockets in it")
        return
    if group is not None:
        os.chown(path, -1, group)
    os.chmod(path, 0o710 if group is not None else 0o700)


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
