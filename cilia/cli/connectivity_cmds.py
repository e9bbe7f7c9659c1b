"""``cilia connectivity test``: check a running agent's L3/L4/L7 allow and deny paths end to end
(like ``cilium connectivity test``); the work is in ``cilia.connectivity``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..agent.client import AgentClient, APIError
from .common import emit, fail, output_option, state_dir_option, table


def register(cli: click.Group) -> None:
    @cli.group("connectivity")
    def connectivity() -> None:
        """Check that policy is enforced end to end."""

    @connectivity.command("test")
    @click.option("--subnet", help="Where the test endpoints' addresses come from (.10 server, .11 client, .12 "
                  "other). Default: 127.0.77.0/24 in sidecar mode (loopback addresses of this host, where Envoy "
                  "listens), 10.199.77.0/24 with the BPF datapath (each endpoint in a namespace of its own).")
    @state_dir_option
    @output_option
    def test_cmd(subnet: str | None, state_dir: str, output: str) -> None:
        """Create test endpoints (namespaces with the BPF datapath, loopback addresses in sidecar
        mode) and servers (HTTP, TCP echo, and memcached when it is installed), check that all
        traffic passes without policy, apply a policy and check each L3, L4 and L7 allow and deny
        path; print a table, clean up, and exit 1 if any check failed (2 if the test could not
        run)."""
        from ..connectivity.run import ConnectivityError, run

        client = AgentClient(Path(state_dir) / "cilia.sock", timeout=90)
        try:
            status = client.status()
            bpf = status.get("datapath", {}).get("mode") == "bpf"
            quiet = output in ("json", "yaml")
            checks, problems = run(client, bpf, subnet or ("10.199.77.0/24" if bpf else "127.0.77.0/24"),
                                   (lambda _: None) if quiet else (lambda m: click.echo(f"-- {m}", err=True)))
        except (APIError, ConnectivityError, OSError) as e:
            fail(f"connectivity test: {e}")
        finally:
            client.close()
        failed = [c for c in checks if not c.passed]
        protocols = sorted({c.name.split()[1] for c in checks if c.name.startswith("L7 ")})
        payload = {"mode": "bpf" if bpf else "sidecar", "l7_protocols": protocols,
                   "checks": [c.to_json() for c in checks],
                   "passed": len(checks) - len(failed), "failed": len(failed), "cleanup_problems": problems}
        emit(output, payload, lambda p: table(
            ["CHECK", "FROM", "TO", "EXPECT", "RESULT", ""],
            [(c.name, c.source, c.destination, c.expect, c.result, "ok" if c.passed else "FAIL") for c in checks])
            + f"\n{p['passed']}/{len(checks)} checks passed ({p['mode']} mode; L7: {', '.join(protocols)})"
            + "".join(f"\ncleanup: {x}" for x in problems))
        if failed or problems:
            sys.exit(1)
