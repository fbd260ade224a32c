"""Chat templates, rendered the way transformers renders them.

jinja2 in an immutable sandbox with the globals, filters and extensions transformers sets up
(`transformers/utils/chat_template_utils.py`), so that a prompt here is the same string that
`AutoTokenizer.apply_chat_template(..., tokenize=False)` returns; plus where a model folder
keeps its template and how messages are prepared for it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sllmctl.errors import SllmError

# Names a message's reasoning may come under; templates read the first (transformers aliases them).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SllmError(f"cannot read {path}: {one_line(e)}") from e
    if not isinstance(data, dict):
        raise SllmError(f"cannot read {path}: not a JSON object")
    return data


def find_chat_template(files_dir: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The model's chat template(s). As in transformers, template files win over the config's
    entry; a model with several templates gets a dict of them by name."""
    templates: dict[str, str] = {}
    jinja_file = files_dir / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    else:
        from_json = read_json(files_dir / "chat_template.json").get("chat_template")
        if isinstance(from_json, str):
            templates["default"] = from_json
    extra_dir = files_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    entry = config.get("chat_template")
    if isinstance(entry, list):  # [{"name": ..., "template": ...}, ...]
        return {str(t["name"]): str(t["template"]) for t in entry}
    return entry if isinstance(entry, str) else None


# -- template rendering ------------------------------------------------------------------------


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def plain(value: Any) -> Any:
    """A deep copy of `value` built only of plain JSON types, so the sandboxed template never
    holds a caller's rich objects (transformers does the same); anything else becomes a
    placeholder naming its type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return plain(value.item())  # numpy scalars
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return plain(value.model_dump())
    return f"<{type(value).__name__}>"


def alias_reasoning(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill `reasoning_content` (and `thinking`) from whichever name a message's reasoning uses."""
    out = []
    for message in chat:
        reasoning = next(
            (message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None
        )
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)  # apply_chat_template makes it a one-line SllmError


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes HTML characters, which no prompt wants.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates, without the type itself (no class attribute tricks)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes, as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja2's signature trick: self may be a key
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template cannot set {name!r} on a namespace (underscore-prefixed)"
            )


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used by transformers to mark assistant
    tokens) and renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 reads a class attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise SllmError(f"chat template does not parse: {one_line(e)}") from e
