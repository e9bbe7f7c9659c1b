"""``cilia bugtool``: one archive with what a bug report needs, like ``cilium-bugtool``."""

from __future__ import annotations

import io
import json
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from .common import call_agent, emit, output_option, state_dir_option

# file in the archive -> the part of the agent's debug info it holds
_JSON_PARTS = {"status.json": "status", "config.json": "config", "policies.json": "policies",
               "endpoints.json": "endpoints", "identities.json": "identities", "services.json": "services",
               "bpf-policy.json": "bpf_policy", "envoy-config-dump.json": "envoy_config_dump",
               "policy-sources.json": "sources"}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def write_archive(info: dict[str, Any], path: Path, root: str) -> list[str]:
    """The archive at ``path``, every file under ``root/``; returns the file names."""
    names = []
    with tarfile.open(path, "w:gz") as tar:
        for name, key in _JSON_PARTS.items():
            if key in info:
                _add(tar, f"{root}/{name}", json.dumps(info[key], indent=1).encode())
                names.append(name)
        for name, key, items in (("flows.jsonl", "flows", "flows"), ("monitor.jsonl", "monitor", "events")):
            lines = [json.dumps(x) for x in info.get(key, {}).get(items, [])]
            _add(tar, f"{root}/{name}", ("\n".join(lines) + "\n").encode())
            names.append(name)
        for source in info.get("sources", []):  # the policy files as they were imported
            name = "policies/" + source["path"].lstrip("/").replace("..", "_")
            _add(tar, f"{root}/{name}", source["text"].encode())
            names.append(name)
        _add(tar, f"{root}/envoy.log", str(info.get("envoy_log", "")).encode())
        names.append("envoy.log")
    return names


@click.command("bugtool")
@click.option("--archive", type=click.Path(dir_okay=False),
              help="Where to write the archive (default: cilia-bugtool-<time>.tar.gz here).")
@click.option("--flows", type=click.IntRange(1), default=1000, show_default=True,
              help="How many recent flows and datapath events to include.")
@state_dir_option
@output_option
def bugtool_cmd(archive: str | None, flows: int, state_dir: str, output: str) -> None:
    """Write one archive for a bug report: status, config, policies and their files, endpoints,
    identities, services, recent flows and datapath events, the kernel's policy maps, Envoy's config
    dump and log. -o json prints the archive's path and files."""
    info = call_agent(state_dir, lambda c: c.debug_info(flows))
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    root = f"cilia-bugtool-{stamp}"
    path = Path(archive or f"{root}.tar.gz")
    names = write_archive(info, path, root)
    emit(output, {"archive": str(path), "files": names}, lambda p: f"wrote {p['archive']} ({len(p['files'])} files)")
