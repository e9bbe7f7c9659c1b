"""``cilia fqdn cache list [--name N]`` and ``cilia fqdn cache clean [--name N]``: the names the
DNS proxy learned for toFQDNs, their addresses and when each answer expires (as Cilium's
``cilium fqdn cache``). Both take ``-o json``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click

from .common import call_agent, emit, output_option, state_dir_option, table


def _rows(payload: dict[str, Any]) -> str:
    rows = []
    for e in payload["entries"]:
        for item in e["ips"]:
            expires = datetime.fromtimestamp(item["expires"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            rows.append((e["endpoint"] or "-", e["name"], str(item["ttl"]), expires, item["ip"],
                         "yes" if e["selected"] else "no"))
    if not rows:
        return "(no learned names)"
    return table(["ENDPOINT", "FQDN", "TTL LEFT", "EXPIRES", "IP", "SELECTED"], rows)


@click.command("list")
@click.option("--name", help="Only this DNS name (case and a trailing dot do not matter).")
@state_dir_option
@output_option
def cache_list_cmd(name: str | None, state_dir: str, output: str) -> None:
    """List learned names with their addresses, expiry and whether a toFQDNs selector matches."""
    payload = call_agent(state_dir, lambda c: c.fqdn_cache(name))
    emit(output, payload, _rows)


@click.command("clean")
@click.option("--name", help="Only this DNS name (default: every name).")
@state_dir_option
@output_option
def cache_clean_cmd(name: str | None, state_dir: str, output: str) -> None:
    """Forget learned names: their addresses stop being selected now (new connections to them are
    dropped until the name is looked up again)."""
    payload = call_agent(state_dir, lambda c: c.fqdn_clean(name))
    emit(output, payload, lambda p: f"removed {p['removed']} name(s); revision {p['revision']}")


def register(cli: click.Group) -> None:
    @cli.group("fqdn")
    def fqdn() -> None:
        """toFQDNs: what the DNS proxy learned."""

    @fqdn.group("cache")
    def cache() -> None:
        """The DNS cache toFQDNs selectors select from."""

    cache.add_command(cache_list_cmd)
    cache.add_command(cache_clean_cmd)


__all__ = ["register"]
