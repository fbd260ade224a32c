"""sllmctl show NAME: one model's manifest, summarized."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, QuietOpt
from sllmctl.output import Out, human_count, human_size

NAME = "show"


def describe(name: str, tensors: bool) -> dict[str, Any]:
    from sllmctl.catalogue import stored_name
    from sllmctl.store.store import Store

    name = stored_name(name)  # a repo id names the model pulled as org--model
    model = Store().get(name)
    m = model.manifest
    by_dtype: dict[str, int] = {}
    for e in m.tensors.values():
        by_dtype[e.dtype] = by_dtype.get(e.dtype, 0) + e.nbytes
    data: dict[str, Any] = {
        "name": name,
        "path": str(model.path),
        "format_version": m.format_version,
        "parameters": m.parameters,
        "bytes": m.total_bytes,
        "tensors": len(m.tensors),
        "aliases": m.aliases,
        "dtypes": by_dtype,
        "files": [{"path": f.path, "size": f.size, "chunks": len(f.checksums),
                   "encoding": f.encoding, "stored_size": f.on_disk} for f in m.files],
        "extra_files": sorted(m.extra_files),
        "tied_embeddings": _ties_embeddings(model.path, m.aliases),
        "provenance": m.provenance,
    }
    if tensors:
        data["tensor_list"] = [
            {"name": k, "dtype": e.dtype, "shape": e.shape, "file": e.file, "offset": e.offset}
            for k, e in m.tensors.items()
        ]
    return data


def _ties_embeddings(path: Path, aliases: dict[str, str]) -> bool:
    """Whether the output head shares the input embedding: said by the model's config (a
    tied head is usually not stored at all), or seen as an alias of the stored tensors."""
    try:
        config = json.loads((path / "files" / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict) and config.get("tie_word_embeddings") is not None:
        return bool(config["tie_word_embeddings"])
    return any("lm_head" in k or "embed" in v for k, v in aliases.items())


def readable(value: Any) -> str:
    """A provenance value for people: no Python reprs."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {readable(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(readable(v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else str(value)


def command(
    name: Annotated[str, typer.Argument(help="Model name.")],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
    home: HomeOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show a stored model: size, dtypes, files, provenance."""
    out = Out(json, quiet)
    data = describe(name, tensors)
    out.result(data, lambda: print_model(data))


def print_model(d: dict[str, Any]) -> None:
    dtypes = ", ".join(f"{k} {human_size(v)}" for k, v in d["dtypes"].items())
    on_disk = sum(f["stored_size"] for f in d["files"])
    stored = (f", {human_size(on_disk)} on disk (compressed)" if on_disk != d["bytes"]
              else "")
    lines = [
        f"name:        {d['name']}",
        f"parameters:  {human_count(d['parameters'])} ({d['parameters']})",
        f"size:        {human_size(d['bytes'])} in {len(d['files'])} data file(s)" + stored,
        f"tensors:     {d['tensors']}" + (f" ({len(d['aliases'])} more names share their "
                                           "storage)" if d["aliases"] else ""),
        "embeddings:  " + ("tied (the output head is the input embedding)"
                           if d["tied_embeddings"] else "untied"),
        f"dtypes:      {dtypes}",
        f"files:       {', '.join(d['extra_files']) or '-'}",
    ]
    lines += [f"{k + ':':<12} {readable(v)}" for k, v in d["provenance"].items()]
    lines.append(f"path:        {d['path']}")
    print("\n".join(lines))
    for t in d.get("tensor_list", []):
        shape = " x ".join(str(n) for n in t["shape"]) or "scalar"
        print(f"  {t['name']}  {t['dtype']}  {shape}")
