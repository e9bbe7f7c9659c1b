"""Delegated IPAM: running another CNI plugin (host-local, static, dhcp, ...) for the address.

As CNI plugins conventionally do, the IPAM plugin named by ``ipam.type`` is looked up in the
directories of ``CNI_PATH`` and run with this plugin's own environment (only ``CNI_COMMAND`` is
set to the command at hand: ADD, DEL or CHECK) and the same network configuration on stdin. ADD
prints a CNI result, read by ``result.parse_result``. A failure is the plugin's own CNI error
object, kept with its code and details, its message prefixed with the plugin's name; a plugin
that fails without one, prints no result, or is not installed is reported as ``ERR_IPAM``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .result import Lease, ResultError, parse_result

ERR_IPAM = 102  # the plugin's own error code: the IPAM plugin is missing or misbehaved


class IPAMPluginError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


class DelegatedIPAM:
    """The IPAM plugin ``name`` for one invocation of ``cilia-cni`` (its environment and config)."""

    def __init__(self, name: str, env: Mapping[str, str], config: Mapping[str, Any]) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise IPAMPluginError(ERR_IPAM, f"ipam.type {name!r}: expected the file name of an IPAM plugin")
        self.name = name
        self.env = env
        self.stdin = json.dumps(config).encode()

    def find(self) -> Path:
        dirs = [d for d in self.env.get("CNI_PATH", "").split(os.pathsep) if d]
        for d in dirs:
            path = Path(d) / self.name
            if path.is_file() and os.access(path, os.X_OK):
                return path
        raise IPAMPluginError(ERR_IPAM, f"ipam plugin {self.name}: not found in CNI_PATH",
                              f"searched: {', '.join(dirs) or '(CNI_PATH is empty)'}")

    def add(self) -> Lease:
        out = self._run("ADD")
        try:
            return parse_result(json.loads(out))
        except ValueError as e:  # ResultError, or not JSON at all
            what = str(e) if isinstance(e, ResultError) else "its output is not a JSON result"
            raise IPAMPluginError(ERR_IPAM, f"ipam plugin {self.name}: {what}", out.decode(errors="replace")[:2000]
                                  ) from None

    def delete(self) -> None:
        self._run("DEL")

    def check(self) -> None:
        self._run("CHECK")

    def _run(self, command: str) -> bytes:
        path = self.find()
        env = {**self.env, "CNI_COMMAND": command}
        try:
            res = subprocess.run([str(path)], input=self.stdin, env=env, capture_output=True, check=False)
        except OSError as e:
            raise IPAMPluginError(ERR_IPAM, f"ipam plugin {self.name}: cannot run {path}: {e}") from None
        if res.returncode == 0:
            return res.stdout
        raise self._failure(command, res)

    def _failure(self, command: str, res: subprocess.CompletedProcess[bytes]) -> IPAMPluginError:
        try:
            err = json.loads(res.stdout)
        except ValueError:
            err = None
        if isinstance(err, dict) and isinstance(err.get("code"), int) and "msg" in err:
            return IPAMPluginError(err["code"], f"ipam plugin {self.name} {command}: {err['msg']}",
                                   str(err.get("details") or ""))
        output = (res.stderr or res.stdout).decode(errors="replace").strip()[:2000]
        return IPAMPluginError(ERR_IPAM, f"ipam plugin {self.name} {command}: exited with {res.returncode}", output)
