"""What the CLI's command modules share: the ``--state-dir`` and ``-o`` options, calling the
agent (an API error becomes a message on stderr and an exit code), printing a payload as JSON or
text, and aligned tables."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from ..agent.client import AgentClient, APIError

DEFAULT_STATE_DIR = "/var/run/cilia"


def state_dir_option(f: Any) -> Any:
    return click.option("--state-dir", envvar="CILIA_STATE_DIR", default=DEFAULT_STATE_DIR, show_default=True,
                        type=click.Path(file_okay=False), help="The agent's state directory (holds cilia.sock).")(f)


def output_option(f: Any) -> Any:
    return click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
                        show_default=True, help="Output format.")(f)


def call_agent(state_dir: str, fn: Callable[[AgentClient], Any]) -> Any:
    """``fn`` on a client of the agent in ``state_dir``; exits 2 (bad usage, no agent) or 1 (the
    agent refused) with the reason on stderr."""
    client = AgentClient(Path(state_dir) / "cilia.sock")
    try:
        return fn(client)
    except APIError as e:
        click.echo(f"error: {e}", err=True)
        for p in e.problems:
            click.echo(p, err=True)
        sys.exit(2 if e.status in (0, 400, 404, 405) else 1)
    finally:
        client.close()


def emit(output: str, payload: Any, text: Callable[[Any], str]) -> None:
    """``payload`` as the API gave it (``-o json``) or as ``text`` renders it."""
    click.echo(json.dumps(payload, indent=2) if output == "json" else text(payload))


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)
