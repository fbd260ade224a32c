"""Script conventions through the real command line: JSON errors, -q, --home anywhere,
readable `show`, `ls` sizes, the typer dependency on public API only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_run import sllmctl
from safetensors.torch import save_file


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny checkpoint whose config ties the embeddings (no lm_head stored, as in SmolLM2)."""
    src = tmp_path / "src"
    src.mkdir()
    save_file({"model.embed_tokens.weight": torch.randn(32, 16)}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    return src


def test_json_errors_print_one_object_on_stdout(tmp_path: Path) -> None:
    r = sllmctl("show", "nope", "--json")
    assert r.returncode == 1
    err = json.loads(r.stdout)["error"]
    assert err["code"] == "not_found" and err["message"].startswith("no model named 'nope'")
    assert err["hint"] and r.stderr.startswith("error: no model named 'nope'")
    r = sllmctl("convert", str(tmp_path), "--json")  # --name missing: usage, exit 2
    assert r.returncode == 2
    assert json.loads(r.stdout)["error"]["code"] == "usage"
    r = sllmctl("show", "nope")  # without --json stdout stays empty
    assert r.returncode == 1 and r.stdout == ""


def test_ls_quiet_prints_names_and_ls_shows_size_on_disk(checkpoint: Path) -> None:
    for name in ("b-model", "a-model"):
        assert sllmctl("convert", str(checkpoint), "-n", name, "-q").returncode == 0
    assert sllmctl("convert", str(checkpoint), "-n", "z-small", "--compress", "-q").returncode == 0
    r = sllmctl("ls", "-q")
    assert r.returncode == 0 and r.stdout.splitlines() == ["a-model", "b-model", "z-small"]
    rows = {row["name"]: row for row in json.loads(sllmctl("ls", "--json").stdout)}
    assert rows["a-model"]["compressed"] is False
    assert rows["a-model"]["stored_bytes"] == rows["a-model"]["bytes"]
    assert rows["z-small"]["compressed"] is True
    table = sllmctl("ls").stdout.splitlines()
    assert "ON DISK" in table[0]
    assert "(compressed)" in next(line for line in table if line.startswith("z-small"))


def test_every_quiet_option_says_what_it_does() -> None:
    from typer.main import get_command

    from sllmctl.cli import app

    def walk(group: object) -> list[tuple[str, str]]:
        found = []
        for name, cmd in group.commands.items():  # type: ignore[attr-defined]
            if hasattr(cmd, "commands"):
                found += [(f"{name} {n}", h) for n, h in walk(cmd)]
                continue
            helps = [p.help for p in cmd.params if "--quiet" in getattr(p, "opts", [])]
            found += [(name, h) for h in helps]
        return found

    helps = dict(walk(get_command(app)))
    assert helps["ls"] == "Print model names only, one a line."
    assert "answer alone" in helps["run"] and "no streaming" in helps["run"]
    assert "names" in helps["ps"]
    assert all(h for h in helps.values())


def test_home_after_the_subcommand(checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert sllmctl("convert", str(checkpoint), "-n", "x", "-q", "--home", str(other)).returncode \
        == 0
    assert (other / "models" / "x").is_symlink()
    assert sllmctl("ls", "-q").stdout == ""  # SLLMCTL_HOME untouched
    assert sllmctl("ls", "--home", str(other), "-q").stdout == "x\n"
    (tmp_path / "config.toml").write_text(f'home = "{tmp_path / "nowhere"}"\n')
    assert sllmctl("ls", "-q", "--home", str(other)).stdout == "x\n"  # flag > config


def test_show_is_readable_and_knows_tied_embeddings(checkpoint: Path) -> None:
    assert sllmctl("convert", str(checkpoint), "-n", "tied", "-q").returncode == 0
    data = json.loads(sllmctl("show", "tied", "--json").stdout)
    assert data["tied_embeddings"] is True
    r = sllmctl("show", "tied", "--tensors")
    assert r.returncode == 0
    assert "embeddings:  tied" in r.stdout
    assert not any(c in r.stdout for c in "{}[]'"), r.stdout  # no Python reprs
    assert "32 x 16" in r.stdout


def test_show_formats_nested_provenance() -> None:
    from sllmctl.commands.show import readable

    assert readable({"Q4_1": 210, "F32": 61}) == "Q4_1 210, F32 61"
    assert readable([1, 2]) == "1, 2" and readable(None) == "-" and readable(True) == "yes"


def test_cli_uses_typer_public_api_only() -> None:
    src = (Path(__file__).resolve().parent.parent / "sllmctl" / "cli.py").read_text()
    assert "_click" not in src
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '"typer>=0.28"' in pyproject  # the first with a public TyperException


def test_a_failed_verify_prints_one_json_document(checkpoint: Path, home: Path) -> None:
    assert sllmctl("convert", str(checkpoint), "-n", "bad", "-q").returncode == 0
    data = next((home / "models" / ".data").glob("bad.*")) / "data-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[10] ^= 1
    data.write_bytes(bytes(raw))
    r = sllmctl("verify", "bad", "--json")
    assert r.returncode == 1 and r.stderr.startswith("error: model bad: data-00000.bin")
    [line] = r.stdout.splitlines()  # the report alone, no second (error) document
    assert json.loads(line)["ok"] is False
