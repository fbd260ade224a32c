"""sllmctl run NAME [PROMPT]: one answer, or a chat at a terminal, streamed as it comes."""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer

from sllmctl.commands._common import JsonOpt, QuietOpt
from sllmctl.commands.pull import NoPullOpt, ensure_model
from sllmctl.output import Out

NAME = "run"


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
    no_pull: NoPullOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Answer a prompt with a stored model (the engine runs in this process for now)."""
    from sllmctl.engine.chat import ChatModel, Params
    from sllmctl.errors import UsageError

    if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise UsageError("need --max-tokens >= 1, --temperature >= 0, 0 < --top-p <= 1, "
                         "--top-k >= 0")
    out = Out(json, quiet)
    params = Params(max_tokens, temperature, top_p, top_k, seed, list(stop or []))
    interactive = prompt is None and sys.stdin.isatty() and not json
    if prompt is None and not interactive:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise UsageError("no prompt: give one as an argument or on stdin")
    name = ensure_model(name, no_pull, out)  # pulls a catalogue name or repo id
    model = ChatModel.load(name, device)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    if not interactive:
        assert prompt is not None
        messages.append({"role": "user", "content": prompt})
        done = model.chat(messages, params, None if (json or quiet) else stream_to_stdout)
        if json:
            out.result({"model": name, **done.to_dict(),
                        "load_seconds": round(model.load_seconds, 3)})
        else:  # streamed already, or -q: the answer alone
            print(done.text if quiet else "")
        return
    print(f"{name} loaded in {model.load_seconds:.1f} s; Ctrl-D to end", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        done = model.chat(messages, params, stream_to_stdout)
        print()
        messages.append({"role": "assistant", "content": done.text})


def stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
