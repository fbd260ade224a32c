"""sllmctl status / sllmctl ps: the daemon's tiers, resident models, loads in flight."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, QuietOpt, quiet_opt
from sllmctl.commands._daemon_opts import AutostartOpt, HostOpt, connect_telling
from sllmctl.durations import format_duration
from sllmctl.output import Out, human_size

NAME = "status"


def fetch(autostart: bool | None, measure: bool = False, quiet: bool = False) -> dict[str, Any]:
    client = connect_telling(autostart, quiet)
    if measure:
        client.call("measure")
    result: dict[str, Any] = client.call("status")
    return result


def command(
    measure: Annotated[bool, typer.Option("--measure", help="Measure the host's bandwidths "
                                          "again first.")] = False,
    autostart: AutostartOpt = None,
    home: HomeOpt = None,
    host: HostOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show the daemon: tier capacity and use, resident models, loads, GPUs, bandwidths."""
    s = fetch(autostart, measure, quiet)
    Out(json, quiet).result(s, lambda: _print_status(s))


QuietNames = Annotated[bool, quiet_opt(
    "Print the names of resident and served models only, one a line.")]


def ps(autostart: AutostartOpt = None, home: HomeOpt = None, host: HostOpt = None,
       json: JsonOpt = False, quiet: QuietNames = False) -> None:
    """List resident and served models (per tier, with keep-alive expiry) and loads in
    flight."""
    s = fetch(autostart, quiet=quiet and not json)
    rows = models(s)
    if quiet and not json:
        print("".join(f"{n}\n" for n in dict.fromkeys(r["name"] for r in rows)), end="")
        return
    Out(json, quiet).result({"models": rows, "jobs": s["jobs"]}, lambda: _print_ps(rows, s))


def expires_at(m: dict[str, Any]) -> float | None:
    """When a served model's keep-alive ends: the daemon's figure when it gives one, else
    its last use plus its keep-alive; None for ever or while it answers requests."""
    if "expires_at" in m:
        return m["expires_at"]
    if m["keep_alive"] < 0 or m.get("active"):
        return None
    return float(m["last_used"]) + float(m["keep_alive"])


def models(s: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for m in s.get("serving") or []:
        rows.append({"name": m["name"], "tier": "served", "where": "HTTP", "bytes": None,
                     "last_used": m["last_used"], "expires_at": expires_at(m),
                     "detail": {"requests": m["requests"], "active": m.get("active", 0),
                                "loaded_from": m["tier"], "load_seconds": m["load_seconds"],
                                "keep_alive": m["keep_alive"]}})
    for m in (s.get("gpu") or {}).get("models", []):
        rows.append({"name": m["name"], "tier": "gpu", "where": f"GPU {m['gpu']}",
                     "bytes": m["bytes"], "last_used": m["last_used"], "expires_at": None,
                     "detail": {"gpu": m["gpu"], "loaded_from": m["loaded_from"],
                                "load_seconds": m["load_seconds"]}})
    for m in (s.get("dram") or {}).get("models", []):
        rows.append({"name": m["name"], "tier": "dram", "where": "DRAM", "bytes": m["bytes"],
                     "last_used": m["last_used"], "expires_at": None,
                     "detail": {"ready": m["ready"]}})
    return rows


def _expiry(r: dict[str, Any], now: float) -> str:
    if r["tier"] != "served":
        return "-"
    if r["expires_at"] is not None:
        return f"in {format_duration(max(0.0, r['expires_at'] - now))}"
    return "in use" if r["detail"]["active"] and r["detail"]["keep_alive"] >= 0 else "never"


def _detail(r: dict[str, Any]) -> str:
    d = r["detail"]
    if r["tier"] == "served":
        return (f"{d['requests']} requests, loaded from {d['loaded_from']} in "
                f"{d['load_seconds']:.2f} s")
    if r["tier"] == "gpu":
        return f"from {d['loaded_from']} in {d['load_seconds']:.3f} s"
    return "" if d["ready"] else "loading"


def _print_ps(rows: list[dict[str, Any]], s: dict[str, Any]) -> None:
    from rich.table import Table

    from sllmctl.output import stdout_console

    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "TIER", "SIZE", "IDLE", "EXPIRES", "DETAIL"):
        table.add_column(col)
    now = time.time()
    for r in rows:
        table.add_row(r["name"], r["where"], human_size(r["bytes"]) if r["bytes"] else "-",
                      format_duration(max(0.0, now - r["last_used"])), _expiry(r, now),
                      _detail(r))
    stdout_console().print(table)
    for j in s["jobs"]:
        print(f"job {j['op']} {j['args'].get('name', '')}: {j['stage']} {human_size(j['done'])}"
              f" / {human_size(j['total'])}")


def _print_status(s: dict[str, Any]) -> None:
    d = s["daemon"]
    print(f"daemon:  {d['state']}, pid {d['pid']}, {d['endpoint']}, up {d['uptime_s']:.0f} s")
    log_file = d.get("log_file") or s.get("log_file")
    if log_file:
        print(f"log:     {log_file}")
    if s.get("http"):
        print(f"http:    {s['http']}/v1")
    if s["dram"]:
        r = s["dram"]
        pinned = "pinned" if r["pinned"] else "not pinned"
        print(f"dram:    {human_size(r['used'])} used of {human_size(r['capacity'])} "
              f"({human_size(r['allocated'])} allocated, {pinned})")
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
