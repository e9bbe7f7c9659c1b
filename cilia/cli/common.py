"""What the CLI's command modules share: the ``--state-dir``, ``-o`` and ``-l`` options, calling
the agent (an API error becomes a message on stderr and an exit code), printing a payload as JSON,
YAML or text, aligned tables, and one-line usage errors (exit 2, never a traceback)."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from ..agent.client import AgentClient, APIError
from ..policy import LoadResult, compile_policy
from .selectors import SelectorError, parse_selector

DEFAULT_STATE_DIR = "/var/run/cilia"
EXIT_USAGE = 2

# text and table are one format (aligned columns); wide adds columns on listings.
OUTPUT_FORMATS = ("text", "table", "wide", "json", "yaml")


class UsageError(click.UsageError):
    """Bad command-line input: one line on stderr, exit 2."""

    exit_code = EXIT_USAGE


def fail(message: str) -> NoReturn:
    """Print ``error: message`` and exit 2 (bad input, something named that does not exist)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def state_dir_option(f: Any) -> Any:
    return click.option("--state-dir", envvar="CILIA_STATE_DIR", default=DEFAULT_STATE_DIR, show_default=True,
                        type=click.Path(file_okay=False), help="The agent's state directory (holds cilia.sock).")(f)


def output_option(f: Any) -> Any:
    return click.option("-o", "--output", type=click.Choice(OUTPUT_FORMATS), default="text",
                        show_default=True, help="Output format: text (= table), wide (more columns), json "
                        "or yaml (the API's answer unchanged).")(f)


def selector_option(f: Any) -> Any:
    return click.option("-l", "--selector", help="Label selector, as kubectl takes it: k=v, k!=v, "
                        "'k in (a,b)', 'k notin (a)', k, !k, comma-separated (all must match). A key "
                        "without a source (k8s:, reserved:...) matches any source.")(f)


def label_filter(selector: str | None) -> Callable[[Sequence[str]], bool]:
    """A predicate on label lists (``source:key=value`` strings) for ``-l``; exits 2 on bad syntax."""
    if selector is None:
        return lambda _: True
    try:
        return parse_selector(selector)
    except SelectorError as e:
        fail(f"-l/--selector {selector!r}: {e}")


def policy_notes(res: LoadResult) -> list[str]:
    """What the loaded policies ask for that is accepted but not enforced (each fails closed), and
    what a translation changed to accept them (a NetworkPolicy's masked ipBlock): ``file:line: text``."""
    compiled = {str(n) for p in res.policies for r in compile_policy(p) for n in r.notes}
    return sorted(compiled | set(res.notes))


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


def to_yaml(payload: Any) -> str:
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    out = io.StringIO()
    yaml.dump(payload, out)
    return out.getvalue().rstrip("\n")


def emit(output: str, payload: Any, text: Callable[[Any], str], wide: Callable[[Any], str] | None = None) -> None:
    """``payload`` as the API gave it (``-o json|yaml``) or as ``text`` (``wide``) renders it."""
    if output == "json":
        click.echo(json.dumps(payload, indent=2))
    elif output == "yaml":
        click.echo(to_yaml(payload))
    elif output == "wide" and wide is not None:
        click.echo(wide(payload))
    else:
        click.echo(text(payload))


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)
