"""sllmctl hosts add|ls|rm|key: the daemons this client knows (hosts.toml), like known_hosts."""

from __future__ import annotations

from typing import Annotated

import typer

from sllmctl.commands._common import JsonOpt, QuietOpt
from sllmctl.output import Out

NAME = "hosts"
app = typer.Typer(help="The daemons this client talks to with --host NAME.",
                  no_args_is_help=True)


def _row(h: object) -> dict[str, str]:
    from sllmctl.wire.keys import fingerprint

    name, endpoint, key = (getattr(h, a) for a in ("name", "endpoint", "key"))
    return {"name": name, "endpoint": endpoint, "key": key, "fingerprint": fingerprint(key)}


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="A name for the daemon (letters, digits, - _).")],
    endpoint: Annotated[str, typer.Argument(help="tcp://ADDR:PORT it listens on.")],
    key: Annotated[str, typer.Option("--key", help="Its public key (`sllmctl daemon keys "
                                     "--show` there).")],
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Add a daemon (the same entry again changes nothing; another key for a known name is
    refused: remove it first)."""
    from sllmctl.wire import hosts

    row = _row(hosts.add(name, endpoint, key))
    Out(json, quiet).result(row, lambda: print(
        f"{row['name']}: {row['endpoint']}, key {row['fingerprint']}"))


@app.command("ls")
def ls(json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """List the known daemons."""
    from sllmctl.wire import hosts

    rows = [_row(h) for h in sorted(hosts.load().values(), key=lambda h: h.name)]

    def human() -> None:
        for r in rows:
            print(f"{r['name']}\t{r['endpoint']}\t{r['fingerprint']}\t{r['key']}")

    Out(json, quiet).result({"hosts": rows, "file": str(hosts.hosts_path())}, human)


@app.command("rm")
def rm(name: Annotated[str, typer.Argument(help="The host's name.")],
       json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Forget a daemon."""
    from sllmctl.wire import hosts

    row = _row(hosts.remove(name))
    Out(json, quiet).result({"removed": row}, lambda: print(f"removed {row['name']}"))


@app.command("key")
def key(json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Print this client's public key (made on first use), for a daemon's allow-list."""
    from sllmctl import paths
    from sllmctl.wire import keys

    pair = keys.client_keys(paths.config_path().parent)
    Out(json, quiet).result({"public": pair.public, "fingerprint": pair.fingerprint},
                            lambda: print(pair.public))
