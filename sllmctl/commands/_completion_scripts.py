"""The completion scripts for bash, zsh and fish, written from the commands' model
(sllmctl.commands._completion_model.model); generated, static, no Python on TAB."""

from __future__ import annotations

from sllmctl.commands._completion_model import Cmd, Opt

HEADER = "completion for sllmctl (generated from the code: sllmctl completion {shell}; do not edit)"


def _q(s: str) -> str:
    return s.replace("'", "").replace(":", "\\:").replace("[", "(").replace("]", ")")


def _leaves(cmds: list[Cmd], prefix: str = "") -> list[tuple[str, Cmd]]:
    out = []
    for c in cmds:
        out += _leaves(c.subs, f"{prefix}{c.name} ") if c.subs else [(prefix + c.name, c)]
    return out


def _uniq(names: list[str]) -> str:
    return " ".join(dict.fromkeys(names))


def _bash_parts(globals_: list[Opt], cmds: list[Cmd]) -> dict[str, str]:
    every = [o for _, c in _leaves(cmds) for o in c.opts] + globals_
    return {
        "valued": _uniq([n for o in every if o.takes_value for n in o.names]),
        "paths": _uniq([n for o in every if o.is_path for n in o.names]),
        "choices": "\n".join(f"        {'|'.join(o.names)}) COMPREPLY=($(compgen -W "
                              f"\"{' '.join(o.choices)}\" -- \"$cur\")); return ;;"
                              for o in {o.names[0]: o for o in every if o.choices}.values()),
        "groups": " ".join(c.name for c in cmds if c.subs),
        "group_cases": "\n".join(
            f"        {c.name}) COMPREPLY=($(compgen -W \"{' '.join(s.name for s in c.subs)} "
            "--help\" -- \"$cur\")); return ;;" for c in cmds if c.subs),
        "cases": "\n".join(
            f"        \"{key}\") opts='"
            f"{_uniq([n for o in c.opts for n in o.names] + ['--help'])}'; "
            f"arg={c.arg or 'none'} ;;" for key, c in _leaves(cmds)),
        "top": _uniq([c.name for c in cmds] + [n for o in globals_ for n in o.names]
                     + ["--help"]),
    }


def bash(globals_: list[Opt], cmds: list[Cmd]) -> str:
    p = _bash_parts(globals_, cmds)
    valued, paths, groups = p["valued"], p["paths"], p["groups"]
    choices, group_cases, cases, top = p["choices"], p["group_cases"], p["cases"], p["top"]
    return f"""# bash {HEADER.format(shell="bash")}
_sllmctl_models() {{
    local d="${{SLLMCTL_HOME:-$HOME/.sllmctl}}/models"
    [ -d "$d" ] && ls "$d" 2>/dev/null
}}

_sllmctl() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local cmd="" i w
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        case " {valued} " in *" $w "*) ((i++)); continue ;; esac
        case "$w" in -*) continue ;; esac
        if [ -z "$cmd" ]; then
            cmd="$w"
            case " {groups} " in *" $w "*) ;; *) break ;; esac
        else
            cmd="$cmd $w"; break
        fi
    done
    case "$prev" in
{choices}
    esac
    case " {paths} " in *" $prev "*)
        compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur")); return ;;
    esac
    case " {valued} " in *" $prev "*) COMPREPLY=(); return ;; esac
    if [ -z "$cmd" ]; then
        COMPREPLY=($(compgen -W "{top}" -- "$cur"))
        return
    fi
    case "$cmd" in
{group_cases}
    esac
    local opts="" arg=none
    case "$cmd" in
{cases}
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [ "$arg" = model ]; then
        COMPREPLY=($(compgen -W "$(_sllmctl_models)" -- "$cur"))
    elif [ "$arg" = path ]; then
        compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -F _sllmctl sllmctl
"""


def _zsh_opt(o: Opt) -> str:
    value = ""
    if o.takes_value:
        value = (f":value:({' '.join(o.choices)})" if o.choices else
                 ":file:_files" if o.is_path else ":value: ")
    if len(o.names) == 1:
        return f"'{o.names[0]}[{_q(o.help)}]{value}'"
    return f"'({' '.join(o.names)})'{{{','.join(o.names)}}}'[{_q(o.help)}]{value}'"


def _zsh_func(fname: str, globals_: list[Opt], cmds: list[Cmd]) -> list[str]:
    described = "\n".join(f"        '{c.name}:{_q(c.help)}'" for c in cmds)
    cases, more = [], []
    for c in cmds:
        if c.subs:
            cases.append(f"        {c.name}) {fname}_{c.name} ;;")
            more += _zsh_func(f"{fname}_{c.name}", [], c.subs)
            continue
        arg = {"model": "'*:model:_sllmctl_models'", "path": "'1:source:_files'", "": ""}[c.arg]
        specs = " ".join([*(_zsh_opt(o) for o in c.opts), "'--help[Show help]'", arg]).strip()
        cases.append(f"        {c.name}) _arguments {specs} ;;")
    gl = " ".join(_zsh_opt(o) for o in globals_)
    nl = "\n"
    return [*more, f"""{fname}() {{
    local -a commands
    commands=(
{described}
    )
    _arguments -C {gl + ' ' if gl else ''}'--help[Show help]' '1:command:->cmd' '*::arg:->args'
    case $state in
    cmd) _describe command commands ;;
    args)
        case $words[1] in
{nl.join(cases)}
        esac ;;
    esac
}}
"""]


def zsh(globals_: list[Opt], cmds: list[Cmd]) -> str:
    funcs = "\n".join(_zsh_func("_sllmctl", globals_, cmds))
    return f"""#compdef sllmctl
# zsh {HEADER.format(shell="zsh")}
_sllmctl_models() {{
    local d="${{SLLMCTL_HOME:-$HOME/.sllmctl}}/models"
    local -a models
    models=(${{(f)"$(ls "$d" 2>/dev/null)"}})
    compadd -a models
}}

{funcs}
_sllmctl "$@"
"""


def _fish_opt(cond: str, o: Opt) -> str:
    parts = [f"complete -c sllmctl -n '{cond}'"]
    for n in o.names:
        parts.append(f"-l {n[2:]}" if n.startswith("--") else f"-s {n[1:]}")
    if o.takes_value:
        parts.append("-r" + (f" -a '{' '.join(o.choices)}'" if o.choices else
                             " -F" if o.is_path else ""))
    parts.append(f"-d '{_q(o.help)}'")
    return " ".join(parts)


def _fish_cmd(lines: list[str], when: str, c: Cmd) -> None:
    lines.append(f"complete -c sllmctl -n '{when}' -a {c.name} -d '{_q(c.help)}'")


def fish(globals_: list[Opt], cmds: list[Cmd]) -> str:
    lines = [f"# fish {HEADER.format(shell='fish')}",
             "function __sllmctl_models",
             "    set -l home $SLLMCTL_HOME",
             "    test -n \"$home\"; or set home ~/.sllmctl",
             "    ls $home/models 2>/dev/null",
             "end",
             "complete -c sllmctl -f"]
    lines += [_fish_opt("__fish_use_subcommand", o) for o in globals_]
    for c in cmds:
        _fish_cmd(lines, "__fish_use_subcommand", c)
        seen = f"__fish_seen_subcommand_from {c.name}"
        if c.subs:
            names = " ".join(s.name for s in c.subs)
            for s in c.subs:
                _fish_cmd(lines, f"{seen}; and not __fish_seen_subcommand_from {names}", s)
                lines += [_fish_opt(f"{seen}; and __fish_seen_subcommand_from {s.name}", o)
                          for o in s.opts]
            continue
        lines += [_fish_opt(seen, o) for o in c.opts]
        if c.arg == "model":
            lines.append(f"complete -c sllmctl -n '{seen}' -a '(__sllmctl_models)'")
        elif c.arg == "path":
            lines.append(f"complete -c sllmctl -n '{seen}' -F")
    return "\n".join(lines) + "\n"
