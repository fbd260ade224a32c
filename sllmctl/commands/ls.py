"""sllmctl ls: list the models in the store."""

from __future__ import annotations

from typing import Any

from sllmctl.commands._common import JsonOpt, QuietOpt
from sllmctl.errors import SllmError
from sllmctl.output import Out, human_count, human_size, stdout_console

NAME = "ls"


def model_summary(name: str) -> dict[str, Any]:
    from sllmctl.store.store import Store

    model = Store().get(name)
    m = model.manifest
    return {
        "name": name,
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
    for name in Store().names():
        try:
            rows.append(model_summary(name))
        except SllmError as e:  # one damaged model must not hide the others
            rows.append({"name": name, "error": e.message})
    out.result(rows, lambda: _table(rows))


def _table(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "PARAMS", "SIZE", "DTYPE", "FROM", "CONVERTED"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["name"], "-", "-", "-", "-", f"damaged: {r['error']}")
            continue
        table.add_row(r["name"], human_count(r["parameters"]), human_size(r["bytes"]),
                      str(r["dtype"]), str(r["format"]), str(r["converted_at"] or ""))
    stdout_console().print(table)
