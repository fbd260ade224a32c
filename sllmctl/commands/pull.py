"""sllmctl pull REPO_ID|NAME: a model from the Hugging Face Hub into the store, by the daemon.

Also the auto-pull of `serve`, `run` and `warm` (`ensure_model`): a name that is not in the
store but is a catalogue name or a repo id is pulled first, unless --no-pull or
SLLMCTL_PULL=never.
"""

from __future__ import annotations

import json as jsonlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Optional

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, QuietOpt
from sllmctl.commands._daemon_opts import AutostartOpt, HostOpt
from sllmctl.output import Out, human_size

NAME = "pull"
NoPullOpt = Annotated[bool, typer.Option("--no-pull", help="Never download: a model not in "
                                         "the store is an error (also SLLMCTL_PULL=never).")]


def _connect(autostart: bool | None) -> Any:
    from sllmctl.wire.client import connect

    return connect(autostart)


def command(
    model: Annotated[Optional[str], typer.Argument(  # noqa: UP045
        help="A Hub repo id (org/name) or a catalogue name (see --list).")] = None,
    revision: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Branch, tag or commit (default: the catalogue's, else main).")] = None,
    name: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--name", "-n", help="Name in the store (default: the catalogue name, or org--model)."
    )] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Cast floating-point weights: bf16, "  # noqa: UP045
                                                 "f16, f32.")] = None,
    compress: Annotated[bool, typer.Option("--compress", help="Store the data files "
                                           "compressed (see convert --compress).")] = False,
    file: Annotated[Optional[str], typer.Option("--file", help="A GGUF repo: the file to "  # noqa: UP045
                                                "take.")] = None,
    quant: Annotated[Optional[str], typer.Option("--quant", help="A GGUF repo: the "  # noqa: UP045
                                                 "quantization to take (Q4_K_M).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a stored model of that "
                                        "name.")] = False,
    detach: Annotated[bool, typer.Option("--detach", help="Return once the daemon has "
                                         "accepted the pull; it runs on.")] = False,
    cancel: Annotated[bool, typer.Option("--cancel", help="Cancel the pull of this model "
                                         "in flight.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the catalogue's short "
                                        "names.")] = False,
    autostart: AutostartOpt = None,
    home: HomeOpt = None,
    host: HostOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download a model from the Hugging Face Hub (HF_TOKEN, HF_ENDPOINT, HF_HUB_CACHE,
    HF_HUB_OFFLINE are honoured) and convert it into the store; Ctrl-C cancels, a rerun
    resumes."""
    from sllmctl.errors import UsageError

    out = Out(json, quiet)
    if list_:
        rows = catalogue_rows()
        out.result(rows, lambda: print("\n".join(
            f"{r['name']:<16} {r['repo']}@{r['revision']}" for r in rows)))
        return
    if model is None:
        raise UsageError("name a repo id or a catalogue name", hint="sllmctl pull --list")
    args = pull_args(model, name, revision, dtype, compress, file, quant, force)
    client = _connect(autostart)
    if cancel:
        result = client.call("pull", {**args, "cancel": True})
        out.result(result, lambda: print(f"cancelled the pull of {args['name']}" if
                                         result["cancelled"] else f"{result['waiting']} other "
                                         f"client(s) wait for {args['name']}: left running"))
        return
    if detach:
        client.call("pull", args, wait=False)
        out.result({"name": args["name"], "repo": args["repo"], "accepted": True},
                   lambda: print(f"pulling {args['repo']} as {args['name']} (sllmctl ps "
                                 "shows it)"))
        return
    result = run_pull(client, args, out)
    out.result(result, lambda: print(describe(result)))


def catalogue_rows() -> list[dict[str, Any]]:
    from sllmctl.catalogue import catalogue

    return [{"name": e.name, "repo": e.repo, "revision": e.revision, "file": e.file,
             "quant": e.quant, "source": e.source} for e in catalogue().values()]


def pull_args(model: str, name: str | None, revision: str | None, dtype: str | None,
              compress: bool, file: str | None, quant: str | None,
              force: bool = False) -> dict[str, Any]:
    """The pull request's arguments: the catalogue entry or repo id, the flags, and this
    shell's Hugging Face settings."""
    from sllmctl.catalogue import lookup
    from sllmctl.errors import UsageError
    from sllmctl.store.writer import parse_dtype

    entry = lookup(model)
    if entry is None:
        raise UsageError(f"{model!r} is neither a catalogue name nor a Hub repo id (org/name)",
                         hint="sllmctl pull --list shows the short names")
    dtype = dtype or entry.dtype
    return {"repo": entry.repo, "name": name or entry.name,
            "revision": revision or entry.revision,
            "dtype": (parse_dtype(dtype) or "").lower() or None,
            "compress": compress, "file": file or entry.file, "quant": quant or entry.quant,
            "force": force, **hub_env()}


def hub_env() -> dict[str, Any]:
    """HF_ENDPOINT, the token (HF_TOKEN or `hf auth login`'s), the HF cache and
    HF_HUB_OFFLINE as this shell has them; None where unset (the daemon's own then)."""
    from huggingface_hub import get_token

    env = os.environ
    cache = env.get("HF_HUB_CACHE") or (env["HF_HOME"] + "/hub" if env.get("HF_HOME") else None)
    offline = env.get("HF_HUB_OFFLINE")
    return {"endpoint": env.get("HF_ENDPOINT") or None, "token": get_token(),
            "cache_dir": os.path.abspath(os.path.expanduser(cache)) if cache else None,
            "offline": None if offline is None else offline.strip().upper() in
            ("1", "ON", "YES", "TRUE")}


def run_pull(client: Any, args: dict[str, Any], out: Out) -> dict[str, Any]:
    """The pull, with a bar on stderr (or JSON Lines under --json); Ctrl-C cancels it."""
    with _events(out, args["name"]) as on_event:
        try:
            result: dict[str, Any] = client.call("pull", args, on_event=on_event)
        except KeyboardInterrupt as e:
            from sllmctl.output import fail

            try:
                client.call("pull", {**args, "cancel": True})
            finally:
                out.info(f"cancelled the pull of {args['name']}; a rerun resumes it")
            # exit 130 here: typer, run with standalone_mode=False, turns a KeyboardInterrupt
            # into a return value that cli.main drops (exit 0)
            fail(e)
    return result


@contextmanager
def _events(out: Out, name: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    if out.json:
        def line(ev: dict[str, Any]) -> None:
            sys.stdout.write(jsonlib.dumps({"event": "progress", "stage": ev.get("stage"),
                                            "done": ev.get("done"), "total": ev.get("total")})
                             + "\n")
            sys.stdout.flush()

        yield line
        return
    if not out.interactive:
        yield lambda ev: None
        return
    from sllmctl.output import byte_progress

    with byte_progress() as bar:
        tasks: dict[str, Any] = {}

        def update(ev: dict[str, Any]) -> None:
            stage = str(ev.get("stage"))
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{stage} {name}", total=ev.get("total") or None)
            bar.update(tasks[stage], completed=ev.get("done") or 0,
                       total=ev.get("total") or None)

        yield update


def describe(r: dict[str, Any]) -> str:
    where = f"{r['repo']}@{r['commit'][:12]}"
    if r.get("up_to_date"):
        return f"{r['name']}: up to date ({where})"
    return (f"pulled {where} as {r['name']}: {human_size(r['downloaded'])} downloaded, "
            f"{human_size(r['cached'])} from the HF cache, {human_size(r['bytes'])} stored, "
            f"{r['seconds']:.1f} s")


def pull_allowed(no_pull: bool) -> bool:
    from sllmctl import paths

    value = paths.setting("pull", "SLLMCTL_PULL", "missing").strip().lower()
    return not no_pull and value not in ("never", "0", "false", "no", "off")


def ensure_model(ref: str, no_pull: bool, out: Out, autostart: bool | None = None) -> str:
    """The store name for `ref`, pulling it first when it is a catalogue name or repo id the
    store lacks (and pulls are allowed)."""
    from sllmctl.catalogue import lookup
    from sllmctl.errors import NotFound
    from sllmctl.store.store import Store

    entry = lookup(ref)
    if entry is None or Store().exists(entry.name):
        return entry.name if entry is not None else ref
    if not pull_allowed(no_pull):
        raise NotFound(f"model {entry.name} is not in the store (pulls are off)",
                       hint=f"sllmctl pull {ref}")
    from sllmctl.wire.client import connect

    out.info(f"{entry.name} is not in the store: pulling {entry.repo}@{entry.revision}")
    args = pull_args(ref, None, None, None, False, None, None)
    result = run_pull(connect(autostart), args, Out(False, out.quiet or out.json))
    out.info(describe(result))
    return entry.name
