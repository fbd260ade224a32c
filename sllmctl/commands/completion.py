"""sllmctl completion SHELL: print a completion script (bash, zsh or fish).

The scripts are static (no Python runs on TAB), made from the commands' own definitions;
model names are completed from the store's folder, `${SLLMCTL_HOME:-~/.sllmctl}/models`.
scripts/generate.py writes the same scripts into completions/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

NAME = "completion"
MODEL_ARGS = {"name", "names"}
# options with a fixed set of values: these are offered, never file names
CHOICES = {"--tier": ["dram", "gpu"], "--dtype": ["bf16", "f16", "f32", "f64"],
           "--device": ["cpu", "cuda"]}
SHELLS = ("bash", "zsh", "fish")


@dataclass
class Opt:
    names: list[str]
    help: str
    takes_value: bool
    is_path: bool

    @property
    def choices(self) -> list[str]:
        return next((CHOICES[n] for n in self.names if n in CHOICES), [])


@dataclass
class Cmd:
    name: str
    help: str
    opts: list[Opt]
    arg: str  # "model", "path" or ""
    subs: list[Cmd] = field(default_factory=list)


def _opt(p: Any) -> Opt:
    names = [*p.opts, *p.secondary_opts]
    td = getattr(p, "type_descriptor", None)  # typer's own parameter types, else click's
    kind = getattr(td, "annotation", None) if td is not None else type(p.type)
    return Opt(names, (p.help or "").split("\n")[0], not p.is_flag, "path" in str(kind).lower())


def _cmd(name: str, c: Any) -> Cmd:
    opts = [_opt(p) for p in c.params if p.param_type_name == "option"]
    args = [p for p in c.params if p.param_type_name == "argument"]
    arg = ("model" if args[0].name in MODEL_ARGS else "path") if args else ""
    subs = [_cmd(n, s) for n, s in sorted(getattr(c, "commands", {}).items())]
    return Cmd(name, (c.help or "").split("\n")[0].strip(), opts, arg, subs)


def model() -> tuple[list[Opt], list[Cmd]]:
    """The global options and the commands (groups with their subcommands), sorted."""
    from typer.main import get_command

    from sllmctl.cli import app

    root = get_command(app)
    globals_ = [_opt(p) for p in root.params if getattr(p, "opts", None)]
    return globals_, [_cmd(n, c) for n, c in sorted(root.commands.items())]  # type: ignore[attr-defined]


def command(
    shell: Annotated[str, typer.Argument(help="bash, zsh or fish.")],
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

    print(getattr(scripts, shell)(*model()), end="")
