"""sllmctl show NAME: one model's manifest, summarized."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from sllmctl.commands._common import JsonOpt, QuietOpt
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
        "provenance": m.provenance,
    }
    if tensors:
        data["tensor_list"] = [
            {"name": k, "dtype": e.dtype, "shape": e.shape, "file": e.file, "offset": e.offset}
            for k, e in m.tensors.items()
        ]
    return data


def command(
    name: Annotated[str, typer.Argument(help="Model name.")],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
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
        f"tensors:     {d['tensors']} ({len(d['aliases'])} tied)",
        f"dtypes:      {dtypes}",
        f"files:       {', '.join(d['extra_files']) or '-'}",
    ]
    lines += [f"{k + ':':<12} {v}" for k, v in d["provenance"].items()]
    lines.append(f"path:        {d['path']}")
    print("\n".join(lines))
    for t in d.get("tensor_list", []):
        print(f"  {t['name']}  {t['dtype']}  {t['shape']}")
