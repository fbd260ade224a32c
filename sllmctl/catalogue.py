"""Short model names: the catalogue shipped in the package (catalogue.toml), extended or
overridden by `[catalogue.NAME]` tables in the config file, and Hub repo ids.

`lookup` turns what a user typed into where it comes from and the name it is stored under:
a catalogue name is stored under itself; a repo id `org/model` under `org--model` (the name
the HF cache gives its folder, less the `models--`), since a store name has no `/`.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from sllmctl import paths
from sllmctl.errors import SllmError

REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
KEYS = {"repo", "revision", "file", "quant", "dtype", "description"}


@dataclass(frozen=True)
class Entry:
    name: str  # the name in the store
    repo: str
    revision: str = "main"
    file: str | None = None  # a GGUF repo's file
    quant: str | None = None  # or its quantization (Q4_K_M)
    dtype: str | None = None
    source: str = "catalogue"  # catalogue | config | repo id


@cache
def shipped() -> dict[str, dict[str, Any]]:
    text = resources.files("sllmctl").joinpath("catalogue.toml").read_text()
    return dict(tomllib.loads(text).get("models", {}))


def catalogue() -> dict[str, Entry]:
    """Every short name: the shipped ones, then the config file's on top, key by key."""
    extra = paths.config().get("catalogue", {})
    if not isinstance(extra, dict):
        raise SllmError(f"config file {paths.config_path()}: [catalogue] must be a table of "
                        "tables", hint="see docs/pull.md")
    out: dict[str, Entry] = {}
    for name in {**shipped(), **extra}:
        over = extra.get(name, {})
        if not isinstance(over, dict) or set(over) - KEYS:
            raise SllmError(f"config file {paths.config_path()}: [catalogue.{name}] may set "
                            + ", ".join(sorted(KEYS)), hint="see docs/pull.md")
        fields = {**shipped().get(name, {}), **over}
        if "repo" not in fields or not REPO_RE.fullmatch(str(fields["repo"])):
            raise SllmError(f"catalogue entry {name!r} needs repo = \"org/name\"")
        fields.pop("description", None)
        out[name] = Entry(name=name, source="config" if name in extra else "catalogue",
                          **{k: str(v) for k, v in fields.items()})
    return out


def stored_name(repo: str) -> str:
    """The store name of a model pulled by repo id: org/model -> org--model."""
    return repo.replace("/", "--")


def lookup(ref: str) -> Entry | None:
    """A catalogue name, or a repo id (org/model), as an Entry; None for anything else."""
    entries = catalogue()
    if ref in entries:
        return entries[ref]
    if REPO_RE.fullmatch(ref) and ".." not in ref:
        return Entry(name=stored_name(ref), repo=ref, source="repo id")
    return None
