"""sllmctl run NAME [PROMPT]: one answer, or a chat at a terminal, streamed as it comes."""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, quiet_opt
from sllmctl.commands.pull import NoPullOpt, ensure_model
from sllmctl.output import Out

NAME = "run"
QuietAnswer = Annotated[bool, quiet_opt(
    "Print the answer alone, once it is complete (no streaming, no load time).")]


def command(
    name: Annotated[str, typer.Argument(help="Model name, catalogue name or Hub repo id.")],
    prompt: Annotated[Optional[str], typer.Argument(help="The question; read from stdin "  # noqa: UP045
                                                     "when absent and stdin is not a terminal; "
                                                     "a chat when it is.")] = None,
    system: Annotated[Optional[str], typer.Option(help="A system message.")] = None,  # noqa: UP045
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 picks the likeliest token.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="0 turns it off.")] = 0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,  # noqa: UP045
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,  # noqa: UP045
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N "  # noqa: UP045
                                                  "(default: cuda if present).")] = None,
    home: HomeOpt = None,
    no_pull: NoPullOpt = False,
    json: JsonOpt = False,
    quiet: QuietAnswer = False,
) -> None:
    """Answer a prompt with a stored model (the engine runs in this process for now)."""
    from sllmctl.engine.chat import ChatModel, Params
    from sllmctl.errors import UsageError

    if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise UsageError("need --max-tokens >= 1, --temperature >= 0, 0 < --top-p <= 1, "
                         "--top-k >= 0")
    check_device(device)
    params = Params(max_tokens, temperature, top_p, top_k, seed, list(stop or []))
    interactive = prompt is None and sys.stdin.isatty() and not json
    if prompt is None and not interactive:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise UsageError("no prompt: give one as an argument or on stdin")
    out = Out(json, quiet)
    name = ensure_model(name, no_pull, out)  # pulls a catalogue name or repo id
    model = ChatModel.load(name, device)
    system_messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system \
        else []
    if prompt is None:
        if not quiet:
            print(f"{name} loaded in {model.load_seconds:.1f} s; /help for commands, "
                  "Ctrl-D or /bye to end", file=sys.stderr)
        chat(model, params, system_messages, stream=not quiet)
        return
    messages = [*system_messages, {"role": "user", "content": prompt}]
    done = model.chat(messages, params, None if (json or quiet) else stream_to_stdout)
    if json:
        Out(json, quiet).result({"model": name, **done.to_dict(),
                                 "load_seconds": round(model.load_seconds, 3)})
    else:  # streamed already, or -q: the answer alone
        print(done.text if quiet else "")


def check_device(device: str | None) -> None:
    """cpu, cuda or cuda:N that this host has; a one-line error otherwise."""
    if device is None or device == "cpu":
        return
    from sllmctl.errors import SllmError, UsageError

    index = device.removeprefix("cuda").removeprefix(":")
    if not device.startswith("cuda") or (device != "cuda" and not (
            device.startswith("cuda:") and index.isdigit())):
        raise UsageError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise SllmError(f"--device {device}: this host has no CUDA GPU that torch can use",
                        hint="leave out --device, or use --device cpu")
    if index and int(index) >= count:
        raise SllmError(f"--device {device}: this host has {count} GPU(s) (cuda:0 to "
                        f"cuda:{count - 1})", hint="use one of them, or --device cpu")


HELP = """/bye     end the chat (as Ctrl-D does)
/clear   forget the conversation so far (the system message stays)
/help    this list"""


def chat(model: Any, params: Any, system_messages: list[dict[str, Any]],
         stream: bool = True) -> None:
    """A chat at the terminal: one answer per line, slash commands for the chat itself."""
    messages = list(system_messages)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if not line:
            continue
        if line.startswith("/"):
            word = line.split()[0]
            if word == "/bye":
                return
            if word == "/clear":
                messages = list(system_messages)
                print("(conversation cleared)", file=sys.stderr)
            elif word in ("/help", "/?"):
                print(HELP, file=sys.stderr)
            else:
                print(f"unknown command {word}; /help lists them", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        done = model.chat(messages, params, stream_to_stdout if stream else None)
        print("" if stream else done.text)
        messages.append({"role": "assistant", "content": done.text})


def stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
