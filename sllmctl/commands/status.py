"""sllmctl status / sllmctl ps: the daemon's tiers, resident models, loads in flight."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from sllmctl.commands._common import JsonOpt, QuietOpt
from sllmctl.commands._daemon_opts import AutostartOpt, HostOpt
from sllmctl.output import Out, human_size

NAME = "status"


def fetch(autostart: bool | None, measure: bool = False) -> dict[str, Any]:
    from sllmctl.wire.client import connect

    client = connect(autostart)
    if measure:
        client.call("measure")
    result: dict[str, Any] = client.call("status")
    return result


def command(
    measure: Annotated[bool, typer.Option("--measure", help="Measure the host's bandwidths "
                                          "again first.")] = False,
    autostart: AutostartOpt = None,
    host: HostOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show the daemon: tier capacity and use, resident models, loads, GPUs, bandwidths."""
    s = fetch(autostart, measure)
    Out(json, quiet).result(s, lambda: _print_status(s))


def ps(autostart: AutostartOpt = None, host: HostOpt = None, json: JsonOpt = False,
       quiet: QuietOpt = False) -> None:
    """List resident models (per tier) and loads in flight."""
    s = fetch(autostart)
    rows = models(s)
    Out(json, quiet).result({"models": rows, "jobs": s["jobs"]}, lambda: _print_ps(rows, s))


def models(s: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for m in s.get("serving") or []:
        keep = "for ever" if m["keep_alive"] < 0 else f"keep-alive {m['keep_alive']:.0f} s"
        rows.append({"name": m["name"], "tier": "served", "where": "HTTP", "bytes": None,
                     "last_used": m["last_used"],
                     "detail": f"{m['requests']} requests, loaded from {m['tier']} in "
                               f"{m['load_seconds']:.2f} s, {keep}"})
    for m in (s.get("gpu") or {}).get("models", []):
        rows.append({"name": m["name"], "tier": "gpu", "where": f"GPU {m['gpu']}",
                     "bytes": m["bytes"], "last_used": m["last_used"],
                     "detail": f"from {m['loaded_from']} in {m['load_seconds']:.3f} s"})
    for m in (s.get("dram") or {}).get("models", []):
        rows.append({"name": m["name"], "tier": "dram", "where": "DRAM", "bytes": m["bytes"],
                     "last_used": m["last_used"], "detail": "" if m["ready"] else "loading"})
    return rows


def _print_ps(rows: list[dict[str, Any]], s: dict[str, Any]) -> None:
    from rich.table import Table

    from sllmctl.output import stdout_console

    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "TIER", "SIZE", "IDLE", ""):
        table.add_column(col)
    now = time.time()
    for r in rows:
        table.add_row(r["name"], r["where"], human_size(r["bytes"]) if r["bytes"] else "",
                      f"{now - r['last_used']:.0f} s", r["detail"])
    stdout_console().print(table)
    for j in s["jobs"]:
        print(f"job {j['op']} {j['args'].get('name', '')}: {j['stage']} {human_size(j['done'])}"
              f" / {human_size(j['total'])}")


def _print_status(s: dict[str, Any]) -> None:
    d = s["daemon"]
    print(f"daemon:  {d['state']}, pid {d['pid']}, {d['endpoint']}, up {d['uptime_s']:.0f} s")
    if s.get("http"):
        print(f"http:    {s['http']}/v1")
    if s["dram"]:
        r = s["dram"]
        print(f"dram:    {human_size(r['used'])} used of {human_size(r['capacity'])} "
              f"({human_size(r['allocated'])} allocated, pinned: {r['pinned']})")
    for g in (s["gpu"] or {}).get("gpus", []):
        stale = " (last known; the driver is busy)" if g.get("stale") else ""
        print(f"gpu {g['index']}:   {g['name']}, {human_size(g['free'])} free of "
              f"{human_size(g['total'])}{stale}")
    if s["gpu"] is not None and not s["gpu"]["gpus"]:
        print("gpus:    none")
    bw = s.get("bandwidth")
    if bw:
        h2d = ", ".join(f"GPU {k} {v} GB/s" for k, v in bw.get("h2d_GBps", {}).items())
        print(f"measured: disk {bw['disk']['GBps']} GB/s"
              f"{' (O_DIRECT)' if bw['disk']['o_direct'] else ''}"
              + (f"; pinned host->GPU {h2d}" if h2d else ""))
    rows = models(s)
    if rows or s["jobs"]:
        print()
        _print_ps(rows, s)
