"""sllmctl demo: the main job on the embedded demo model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

from typing import Annotated

import typer

from sllmctl.commands._common import JsonOpt, QuietOpt
from sllmctl.commands.convert import convert_and_report
from sllmctl.commands.ls import command as ls_command
from sllmctl.commands.show import describe, print_model
from sllmctl.output import Out

NAME = "demo"


def command(
    force: Annotated[bool, typer.Option("--force", help="Convert it again.")] = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert the embedded demo model (SmolLM2-135M-Instruct GGUF) and show it."""
    from sllmctl.demo import DEMO_NAME, demo_gguf
    from sllmctl.store.store import Store

    out = Out(json, quiet)
    source = demo_gguf()
    converted = None
    if force or not Store().exists(DEMO_NAME):
        out.info(f"converting {source.name} into the store as {DEMO_NAME}")
        converted = convert_and_report(out, source, DEMO_NAME, None, force)
    data = {"converted": converted, "model": describe(DEMO_NAME, tensors=False)}
    if json or quiet:
        out.result(data)
        return
    if converted:
        print(f"converted in {converted['seconds']:.1f} s\n")
    print("$ sllmctl ls")
    ls_command()
    print(f"\n$ sllmctl show {DEMO_NAME}")
    print_model(describe(DEMO_NAME, tensors=False))
