# bash completion for sllmctl (generated from the code: sllmctl completion bash; do not edit)
_sllmctl_models() {
    local d="${SLLMCTL_HOME:-$HOME/.sllmctl}/models"
    [ -d "$d" ] && ls "$d" 2>/dev/null
}

_sllmctl() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    local cmd="" i w
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${COMP_WORDS[i]}"
        case " --name -n --dtype --home --lines --host --listen --dram-pool --measure-bytes --key --to --request --from --revision --file --quant --system --max-tokens --temperature --top-p --top-k --seed --stop --device --port --keep-alive --api-key --daemon-host --tier --gpu " in *" $w "*) ((i++)); continue ;; esac
        case "$w" in -*) continue ;; esac
        if [ -z "$cmd" ]; then
            cmd="$w"
            case " daemon hosts " in *" $w "*) ;; *) break ;; esac
        else
            cmd="$cmd $w"; break
        fi
    done
    case "$prev" in
        --dtype) COMPREPLY=($(compgen -W "bf16 f16 f32 f64" -- "$cur")); return ;;
        --device) COMPREPLY=($(compgen -W "cpu cuda" -- "$cur")); return ;;
        --tier) COMPREPLY=($(compgen -W "dram gpu" -- "$cur")); return ;;
    esac
    case " --home " in *" $prev "*)
        compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur")); return ;;
    esac
    case " --name -n --dtype --home --lines --host --listen --dram-pool --measure-bytes --key --to --request --from --revision --file --quant --system --max-tokens --temperature --top-p --top-k --seed --stop --device --port --keep-alive --api-key --daemon-host --tier --gpu " in *" $prev "*) COMPREPLY=(); return ;; esac
    if [ -z "$cmd" ]; then
        COMPREPLY=($(compgen -W "completion convert daemon demo hosts ls migrate ps pull rm run serve show status unload unserve verify warm --home --version --help" -- "$cur"))
        return
    fi
    case "$cmd" in
        daemon) COMPREPLY=($(compgen -W "keys logs reload restart start status stop --help" -- "$cur")); return ;;
        hosts) COMPREPLY=($(compgen -W "add key ls rm --help" -- "$cur")); return ;;
    esac
    local opts="" arg=none
    case "$cmd" in
        "completion") opts='--json --help'; arg=path ;;
        "convert") opts='--name -n --dtype --force --compress --no-compress --home --json --quiet -q --help'; arg=path ;;
        "daemon keys") opts='--show --json --quiet -q --help'; arg=none ;;
        "daemon logs") opts='--follow -f --lines -n --home --json --help'; arg=none ;;
        "daemon reload") opts='--host --json --quiet -q --help'; arg=none ;;
        "daemon restart") opts='--listen --dram-pool --measure-bytes --home --json --quiet -q --help'; arg=none ;;
        "daemon start") opts='--foreground --listen --dram-pool --measure-bytes --home --keys --insecure --json --quiet -q --help'; arg=none ;;
        "daemon status") opts='--host --json --quiet -q --help'; arg=none ;;
        "daemon stop") opts='--host --json --quiet -q --help'; arg=none ;;
        "demo") opts='--force --home --json --quiet -q --help'; arg=none ;;
        "hosts add") opts='--key --json --quiet -q --help'; arg=model ;;
        "hosts key") opts='--json --quiet -q --help'; arg=none ;;
        "hosts ls") opts='--json --quiet -q --help'; arg=none ;;
        "hosts rm") opts='--json --quiet -q --help'; arg=model ;;
        "ls") opts='--home --json --quiet -q --help'; arg=none ;;
        "migrate") opts='--to --request --dry-run --from --autostart --no-autostart --home --json --quiet -q --help'; arg=model ;;
        "ps") opts='--autostart --no-autostart --home --host --json --quiet -q --help'; arg=none ;;
        "pull") opts='--revision --name -n --dtype --compress --file --quant --force --detach --cancel --list --autostart --no-autostart --home --host --json --quiet -q --help'; arg=path ;;
        "rm") opts='--yes -y --dry-run --home --json --quiet -q --help'; arg=model ;;
        "run") opts='--system --max-tokens --temperature --top-p --top-k --seed --stop --device --home --no-pull --json --quiet -q --help'; arg=model ;;
        "serve") opts='--host --port --keep-alive --api-key --detach --autostart --no-autostart --home --daemon-host --no-pull --json --quiet -q --help'; arg=model ;;
        "show") opts='--tensors --home --json --quiet -q --help'; arg=model ;;
        "status") opts='--measure --autostart --no-autostart --home --host --json --quiet -q --help'; arg=none ;;
        "unload") opts='--tier --autostart --no-autostart --home --host --json --quiet -q --help'; arg=model ;;
        "unserve") opts='--home --host --json --quiet -q --help'; arg=model ;;
        "verify") opts='--home --json --quiet -q --help'; arg=model ;;
        "warm") opts='--tier --gpu --wait --no-wait --autostart --no-autostart --home --host --no-pull --json --quiet -q --help'; arg=model ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [ "$arg" = model ]; then
        COMPREPLY=($(compgen -W "$(_sllmctl_models)" -- "$cur"))
    elif [ "$arg" = path ]; then
        compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur"))
    fi
}
complete -F _sllmctl sllmctl
