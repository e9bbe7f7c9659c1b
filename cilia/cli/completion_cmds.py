"""``cilia completion bash|zsh|fish``: the shell completion script, from click's own completion
support (commands, options, choices and file names complete; the script asks ``cilia`` itself).

    bash:  cilia completion bash > /etc/bash_completion.d/cilia   (or: eval "$(cilia completion bash)")
    zsh:   cilia completion zsh > "${fpath[1]}/_cilia"              (or: eval "$(cilia completion zsh)")
    fish:  cilia completion fish > ~/.config/fish/completions/cilia.fish
"""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

COMPLETE_VAR = "_CILIA_COMPLETE"  # what the script sets when it asks cilia for completions


def register(cli: click.Group) -> None:
    @cli.command("completion")
    @click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
    def completion_cmd(shell: str) -> None:
        """Print the completion script for SHELL.

        \b
        bash:  eval "$(cilia completion bash)"   (in ~/.bashrc), or save it in /etc/bash_completion.d/cilia
        zsh:   eval "$(cilia completion zsh)"    (in ~/.zshrc, after compinit)
        fish:  cilia completion fish > ~/.config/fish/completions/cilia.fish
        """
        cls = get_completion_class(shell)
        assert cls is not None  # the choice lists only shells click supports
        click.echo(cls(cli, {}, "cilia", COMPLETE_VAR).source())
