"""sllmctl ls: list the models in the store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from sllmctl.commands._common import HomeOpt, JsonOpt, quiet_opt
from sllmctl.output import Out, human_count, human_size, stdout_console

if TYPE_CHECKING:
    from sllmctl.store.store import StoredModel

NAME = "ls"


def model_summary(model: StoredModel) -> dict[str, Any]:
    m = model.manifest
    return {
        "name": model.name,
        "parameters": m.parameters,
        "bytes": m.total_bytes,
        "stored_bytes": sum(f.on_disk for f in m.files),
        "compressed": any(f.encoding is not None for f in m.files),
        "dtype": m.provenance.get("dtype"),
        "format": m.provenance.get("format"),
        "source": m.provenance.get("source"),
        "converted_at": m.provenance.get("converted_at"),
        "path": str(model.path),
    }


QuietNames = Annotated[bool, quiet_opt("Print model names only, one a line.")]


def command(home: HomeOpt = None, json: JsonOpt = False, quiet: QuietNames = False) -> None:
    """List stored models: parameters, size, size on disk (and whether compressed)."""
    from sllmctl.store.store import Store

    if quiet and not json:
        print("".join(f"{n}\n" for n in Store().names()), end="", flush=True)
        return
    out = Out(json, quiet)
    rows = []
    for entry in Store().entries():  # one damaged model must not hide the others
        if entry.model is None:
            rows.append({"name": entry.name, "status": "corrupt", "error": entry.error})
        else:
            rows.append(model_summary(entry.model))
    out.result(rows, lambda: _table(rows))


def _table(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "PARAMS", "SIZE", "ON DISK", "DTYPE", "FROM", "CONVERTED"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["name"], "-", "-", "-", "-", "-", f"corrupt: {r['error']}")
            continue
        on_disk = human_size(r["stored_bytes"]) + (" (compressed)" if r["compressed"] else "")
        table.add_row(r["name"], human_count(r["parameters"]), human_size(r["bytes"]), on_disk,
                      r["dtype"] or "-", r["format"] or "-", r["converted_at"] or "")
    stdout_console().print(table)
