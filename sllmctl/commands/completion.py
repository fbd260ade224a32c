"""sllmctl completion SHELL: print a completion script (bash, zsh or fish).

The scripts are static (no Python runs on TAB), made from the commands' own definitions;
model names are completed from the store's folder, `${SLLMCTL_HOME:-~/.sllmctl}/models`.
scripts/generate.py writes the same scripts into completions/.
"""

from __future__ import annotations

from typing import Annotated

import typer

from sllmctl.commands._common import JsonOpt
from sllmctl.output import Out

NAME = "completion"
SHELLS = ("bash", "zsh", "fish")


def command(
    ctx: typer.Context,
    shell: Annotated[str, typer.Argument(help="bash, zsh or fish.")],
    json: JsonOpt = False,
) -> None:
    """Print the shell completion script for bash, zsh or fish.

    bash: `sllmctl completion bash > ~/.local/share/bash-completion/completions/sllmctl`;
    zsh: `sllmctl completion zsh > "${fpath[1]}/_sllmctl"`;
    fish: `sllmctl completion fish > ~/.config/fish/completions/sllmctl.fish`.
    """
    from sllmctl.errors import UsageError

    if shell not in SHELLS:
        raise UsageError(f"no completion for {shell!r}", hint="use bash, zsh or fish")
    from sllmctl.commands import _completion_scripts as scripts
    from sllmctl.commands._completion_model import model

    script = getattr(scripts, shell)(*model(ctx.find_root().command))
    if json:
        Out(json).result({"shell": shell, "script": script})
    else:
        print(script, end="")
