"""sllmctl ls: list the models in the store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sllmctl.commands._common import JsonOpt, QuietOpt
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
        "dtype": m.provenance.get("dtype"),
        "format": m.provenance.get("format"),
        "source": m.provenance.get("source"),
        "converted_at": m.provenance.get("converted_at"),
        "path": str(model.path),
    }


def command(json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """List stored models."""
    from sllmctl.store.store import Store

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
    for col in ("NAME", "PARAMS", "SIZE", "DTYPE", "FROM", "CONVERTED"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["name"], "-", "-", "-", "-", f"corrupt: {r['error']}")
            continue
        table.add_row(r["name"], human_count(r["parameters"]), human_size(r["bytes"]),
                      str(r["dtype"]), str(r["format"]), str(r["converted_at"] or ""))
    stdout_console().print(table)
