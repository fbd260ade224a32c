"""sllmctl convert SRC --name NAME: turn a checkpoint into the loading-optimized format."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, QuietOpt
from sllmctl.output import Out, human_count, human_size

NAME = "convert"


def command(
    src: Annotated[Path, typer.Argument(help="Model folder, .safetensors, .bin or .gguf file.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name in the store.")],
    dtype: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Cast floating-point weights: bf16, f16, f32 (GGUF default: bf16)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a model of that name.")] = False,
    compress: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        "--compress/--no-compress",
        help="Store the exponent bytes zstd-compressed: about 30 % fewer bytes to read for "
             "bf16/f16 weights, for disks slower than decoding (about 0.7-1 GB/s per core). "
             "Default: off; SLLMCTL_COMPRESS=1 or `compress = true` in the config file.")
    ] = None,
    home: HomeOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a checkpoint (safetensors, PyTorch .bin, GGUF) into the store."""
    out = Out(json, quiet)
    from sllmctl import paths

    data = convert_and_report(out, src, name, dtype, force,
                              paths.switch("compress", "SLLMCTL_COMPRESS", False, compress))
    stored = (f" ({human_size(data['stored_bytes'])} on disk)"
              if data["stored_bytes"] != data["bytes"] else "")
    out.result(data, lambda: print(
        f"converted {data['name']}: {human_count(data['parameters'])} parameters, "
        f"{human_size(data['bytes'])}{stored} in {data['files']} file(s), "
        f"{data['seconds']:.1f} s"
    ))


def convert_and_report(out: Out, src: Path, name: str, dtype: str | None,
                       force: bool, compress: bool = False) -> dict[str, Any]:
    from sllmctl.store.writer import convert

    start = time.perf_counter()
    with out.progress(f"converting {name}") as bar:
        manifest = convert(src, name, dtype=dtype, force=force, progress=bar.advance,
                           on_total=bar.set_total, compress=compress)
    return {
        "name": manifest.name,
        "tensors": len(manifest.tensors),
        "parameters": manifest.parameters,
        "bytes": manifest.total_bytes,
        "stored_bytes": sum(f.on_disk for f in manifest.files),
        "files": len(manifest.files),
        "seconds": round(time.perf_counter() - start, 3),
        "provenance": manifest.provenance,
    }
