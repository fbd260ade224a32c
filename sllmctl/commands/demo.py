"""sllmctl demo: the main job on the embedded demo model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import shlex
from typing import Annotated, Any

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, quiet_opt
from sllmctl.commands.convert import convert_and_report
from sllmctl.commands.ls import command as ls_command
from sllmctl.commands.run import stream_to_stdout
from sllmctl.commands.show import describe, print_model
from sllmctl.output import Out

NAME = "demo"
QUESTION = "What is the capital of France?"
QuietAnswer = Annotated[bool, quiet_opt("Print the answer alone.")]


def command(
    force: Annotated[bool, typer.Option("--force", help="Convert it again.")] = False,
    home: HomeOpt = None,
    json: JsonOpt = False,
    quiet: QuietAnswer = False,
) -> None:
    """Convert the embedded demo model (SmolLM2-135M-Instruct GGUF), show it, ask it a
    question."""
    from sllmctl.demo import DEMO_NAME, demo_gguf
    from sllmctl.store.store import Store

    out = Out(json, quiet)
    source = demo_gguf()
    converted = None
    if force or not Store().exists(DEMO_NAME):
        out.info(f"converting {source.name} into the store as {DEMO_NAME}")
        converted = convert_and_report(out, source, DEMO_NAME, None, force)
    from sllmctl.engine.chat import ChatModel, Params

    data: dict[str, Any] = {"converted": converted, "model": describe(DEMO_NAME, tensors=False)}
    if not (json or quiet):
        if converted:
            print(f"converted in {converted['seconds']:.1f} s\n")
        print("$ sllmctl ls")
        ls_command()
        print(f"\n$ sllmctl show {DEMO_NAME}")
        print_model(data["model"])
        print(f"\n$ sllmctl run {DEMO_NAME} {shlex.quote(QUESTION)}", flush=True)
    model = ChatModel.load(DEMO_NAME)
    stream = None if (json or quiet) else stream_to_stdout
    done = model.chat([{"role": "user", "content": QUESTION}], Params(max_tokens=64), stream)
    data["question"], data["answer"] = QUESTION, {**done.to_dict(),
                                                  "load_seconds": model.load_seconds}
    if json:
        out.result(data)
    else:  # streamed already, or -q: the answer alone
        print(done.text if quiet else "")

