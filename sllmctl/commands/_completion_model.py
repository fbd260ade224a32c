"""What the completion scripts are written from: each command's options and arguments, read
from the CLI's own definitions (a module apart, so that the scripts and the command that prints
them both import it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODEL_ARGS = {"name", "names"}
# options with a fixed set of values: these are offered, never file names
CHOICES = {"--tier": ["dram", "gpu"], "--dtype": ["bf16", "f16", "f32", "f64"],
           "--device": ["cpu", "cuda"]}


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


def model(root: Any) -> tuple[list[Opt], list[Cmd]]:
    """The global options and the commands (groups with their subcommands) of the root
    command (the CLI's click group), sorted."""
    globals_ = [_opt(p) for p in root.params if getattr(p, "opts", None)]
    return globals_, [_cmd(n, c) for n, c in sorted(root.commands.items())]
