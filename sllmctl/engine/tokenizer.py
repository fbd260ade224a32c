"""Text in and out of a stored model: tokenizer, chat template, streaming detokenizer, stop strings.

A stored model keeps its Hugging Face tokenizer files under `<model folder>/files/`. This module
reads them without transformers: `tokenizers` does the byte-pair work, and the chat template is
rendered as transformers renders it (sllmctl/engine/chat_template.py).

Streaming text goes token by token through a `StreamDecoder` (one per request), then through a
`StopChecker` that holds back what may be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

from sllmctl.engine.chat_template import (
    alias_reasoning,
    compile_template,
    find_chat_template,
    one_line,
    plain,
    read_json,
)
from sllmctl.errors import SllmError

# The named special tokens a chat template sees as variables
# (transformers' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Tokens of context decoded before the first new one, so that its leading space comes out right.
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Tokenizer:
    """A model's tokenizer and chat template, read from its `files/` folder."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | dict[str, str] | None = None,
        eos_ids: Iterable[int] = (),
        bos_id: int | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
    ) -> None:
        self.backend = backend
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.chat_template = chat_template
        self.bos_id = bos_id
        self.eos_ids: set[int] = set(eos_ids)
        self.pad_id = self.token_to_id(self.special_tokens.get("pad_token"))
        # tokenizer.json's post-processor decides what `add_special_tokens` adds; the config flags
        # only count where it has none (as in transformers).
        self._has_post_processor = backend.post_processor is not None
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token

    @classmethod
    def from_folder(cls, files_dir: Path) -> Tokenizer:
        files_dir = Path(files_dir)
        tokenizer_file = files_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise SllmError(
                f"no tokenizer.json in {files_dir}",
                hint="convert the model again from a source that has a tokenizer",
            )
        try:
            backend = _HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:
            raise SllmError(f"cannot read {tokenizer_file}: {one_line(e)}") from e
        config = read_json(files_dir / "tokenizer_config.json")
        gen_config = read_json(files_dir / "generation_config.json")

        tokens: dict[str, Any] = {k: config[k] for k in SPECIAL_TOKEN_NAMES if config.get(k)}
        if "added_tokens_decoder" not in config:  # legacy file, read as transformers does
            legacy = read_json(files_dir / "special_tokens_map.json")
            tokens.update({k: legacy[k] for k in SPECIAL_TOKEN_NAMES if legacy.get(k)})
        # A named special token missing from tokenizer.json is added, as transformers does.
        for value in tokens.values():
            content = _token_content(value)
            if backend.token_to_id(content) is None:
                backend.add_special_tokens([_added_token(value)])
        special = {k: _token_content(v) for k, v in tokens.items()}

        eos_ids: set[int] = set()
        gen_eos = gen_config.get("eos_token_id")
        for i in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if isinstance(i, int):
                eos_ids.add(i)
        eos = backend.token_to_id(special["eos_token"]) if "eos_token" in special else None
        if eos is not None:
            eos_ids.add(eos)
        bos = backend.token_to_id(special["bos_token"]) if "bos_token" in special else None
        if bos is None and isinstance(gen_config.get("bos_token_id"), int):
            bos = gen_config["bos_token_id"]

        return cls(
            backend,
            special_tokens=special,
            chat_template=find_chat_template(files_dir, config),
            eos_ids=eos_ids,
            bos_id=bos,
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
        )

    # -- tokens --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Like transformers, `add_special_tokens` defaults to True; pass
        False for a prompt rendered by `apply_chat_template`, which already holds its specials."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and not self._has_post_processor:
            eos = self.token_to_id(self.special_tokens.get("eos_token"))
            if self.add_bos_token and self.bos_id is not None:
                ids = [self.bos_id, *ids]
            if self.add_eos_token and eos is not None:
                ids = [*ids, eos]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. transformers' `clean_up_tokenization_spaces` is not applied: it is off
        by default and transformers itself ignores it for BPE vocabularies."""
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    # -- chat ----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt for `messages`, exactly as transformers'
        `apply_chat_template(..., tokenize=False)` renders it.

        Extra keyword arguments are template variables (they override the special tokens).
        `chat_template` is a template, or the name of one where the model has several.
        """
        template = self._pick_template(chat_template, tools)
        if not messages:
            raise SllmError("cannot render an empty conversation", hint="send at least one message")
        for tool in tools or []:
            if not isinstance(tool, dict):
                raise SllmError(f"a tool must be a JSON schema (a dict), got {type(tool).__name__}")
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise SllmError(f"a chat message must be a dict, got {type(message).__name__}")
            # Keys set to None are dropped: templates handle a missing key, not a None one.
            chat.append(plain({k: v for k, v in message.items() if v is not None}))
        variables = {**self.special_tokens, **plain(kwargs)}
        compiled = compile_template(template)
        try:
            return compiled.render(
                messages=alias_reasoning(chat),
                tools=plain(tools),
                documents=plain(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise SllmError(f"chat template error: {one_line(e)}") from e
        except Exception as e:  # a template is code: any failure in it is the template's
            raise SllmError(f"chat template error: {type(e).__name__}: {one_line(e)}") from e

    def _pick_template(self, name_or_template: str | None, tools: object) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if name_or_template is not None and name_or_template in templates:
                return templates[name_or_template]
            if name_or_template is not None:
                return name_or_template
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise SllmError(
                f"this model has several chat templates and none is the default: "
                f"{', '.join(sorted(templates))}",
                hint="pass the name of one as chat_template",
            )
        if name_or_template is not None:
            return name_or_template
        if templates is None:
            raise SllmError(
                "this model has no chat template",
                hint="send a plain prompt instead of chat messages, or pass a chat_template",
            )
        return templates


class StreamDecoder:
    """Turns generated token ids into text deltas, one request at a time.

    Each step decodes a short window of recent tokens and emits what it adds to the text decoded
    before the newest ones (as vLLM and TGI do), so that spaces that depend on the previous token
    come out right, and a character whose UTF-8 bytes span several tokens comes out once whole,
    never as U+FFFD halves. The deltas joined equal `decode(all_ids)` once `flush()` is called.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # A few prompt tokens as context: the first new token's leading space then decodes as it
        # does after the prompt, not as the start of a text.
        self.ids: list[int] = list(prompt_ids or [])[-PROMPT_CONTEXT_TOKENS:]
        self._prefix = 0  # the window starts here
        self._read = len(self.ids)  # text up to here is emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the new text (empty while a character is incomplete)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The text still held back at the end of the stream (bytes that never completed)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(prefix_text) :]

    def to_dict(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "prefix": self._prefix, "read": self._read,
                "skip_special_tokens": self.skip_special_tokens}

    @classmethod
    def from_dict(cls, tokenizer: Tokenizer, d: Mapping[str, Any]) -> StreamDecoder:
        decoder = cls(tokenizer, skip_special_tokens=bool(d["skip_special_tokens"]))
        decoder.ids, decoder._prefix, decoder._read = list(d["ids"]), d["prefix"], d["read"]
        return decoder

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


class StopChecker:
    """Cuts streamed text at the first stop string, which is not emitted.

    Text that may be the start of a stop string is held back until the next delta settles it;
    `flush()` releases it at the end of the stream.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.stopped = False
        self.stop: str | None = None  # the stop string that matched
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add streamed text; return the text safe to emit and whether a stop string was met."""
        if self.stopped:
            return "", True
        text = self._held + delta
        found = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            index, self.stop = min(found, key=lambda f: f[0])
            self.stopped, self._held = True, ""
            return text[:index], True
        keep = max((self._partial(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of a stream that met no stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def to_dict(self) -> dict[str, Any]:
        return {"stops": list(self.stops), "stopped": self.stopped, "stop": self.stop,
                "held": self._held}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StopChecker:
        checker = cls(d["stops"])
        checker.stopped, checker.stop, checker._held = d["stopped"], d["stop"], d["held"]
        return checker

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """The length of the longest end of `text` that begins `stop` (but is not all of it)."""
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return k
        return 0


# -- files -------------------------------------------------------------------------------------


def _token_content(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value)


def _added_token(value: Any) -> AddedToken:
    if isinstance(value, dict):
        fields = ("single_word", "lstrip", "rstrip", "normalized")
        options = {k: bool(value[k]) for k in fields if k in value}
        return AddedToken(str(value.get("content", "")), special=True, **options)
    return AddedToken(str(value), special=True, normalized=False)


