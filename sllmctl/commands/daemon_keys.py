"""sllmctl daemon keys [--show] / daemon reload: the host's CURVE key pair and allow-list."""

from __future__ import annotations

from typing import Annotated

import typer

from sllmctl.commands._common import JsonOpt, QuietOpt
from sllmctl.commands._daemon_opts import HostOpt
from sllmctl.output import Out


def keys(
    show: Annotated[bool, typer.Option("--show", help="Print the existing public key; never "
                                       "make one.")] = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Make this host's key pair once (secret 0600, under the store home) and print its public
    key, for the hosts files of the clients (`sllmctl hosts add NAME tcp://ADDR:PORT --key`)."""
    from sllmctl.daemon import guard
    from sllmctl.wire import keys as wire_keys

    out = Out(json, quiet)
    folder = guard.keys_dir()
    if show:
        pair, made = wire_keys.load_keys(folder), False
    else:
        pair, made = guard.make_keys()
    allow = folder / wire_keys.ALLOW_LIST
    data = {"public": pair.public, "fingerprint": pair.fingerprint, "made": made,
            "key_file": str(folder / "host.key"), "allow_list": str(allow)}
    if made:
        out.info(f"made this host's key pair in {folder}; clients it admits go in {allow}")
    out.result(data, lambda: print(pair.public))


def reload(host: HostOpt = None, json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Make the daemon read its allow-list again (as SIGHUP does); a key removed loses its
    rights at once, also on a connection that stays open."""
    from sllmctl.wire.client import connect

    result = connect(autostart=False).call("reload")
    Out(json, quiet).result(result, lambda: print(
        f"allow-list {result['allow_list']} reloaded: {result['keys']} key(s)"))
