"""CLI wiring: output streams, --json, exit codes, no torch at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_run import sllmctl
from safetensors.torch import save_file


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": torch.randn(64, 64), "b": torch.randn(64)}, src / "model.safetensors")
    (src / "config.json").write_text("{}")
    return src


def test_help_does_not_import_torch() -> None:
    code = ("import sys; from sllmctl.cli import app; "
            "from typer.main import get_command; get_command(app); "
            "print(sorted(m for m in ('torch', 'numpy', 'safetensors', 'rich') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    r = sllmctl("--help")
    assert r.returncode == 0 and "convert" in r.stdout


def test_convert_ls_show_verify_rm_json(checkpoint: Path) -> None:
    r = sllmctl("convert", str(checkpoint), "--name", "tiny", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["name"] == "tiny" and data["parameters"] == 64 * 64 + 64
    assert r.stderr == ""  # no progress bar without a terminal

    rows = json.loads(sllmctl("ls", "--json").stdout)
    assert [row["name"] for row in rows] == ["tiny"]
    assert rows[0]["format"] == "safetensors"

    shown = json.loads(sllmctl("show", "tiny", "--json", "--tensors").stdout)
    assert {t["name"] for t in shown["tensor_list"]} == {"w", "b"}
    assert shown["extra_files"] == ["config.json"]

    v = sllmctl("verify", "tiny", "--json")
    assert v.returncode == 0 and json.loads(v.stdout)["ok"] is True

    human = sllmctl("ls")
    assert "tiny" in human.stdout and "NAME" in human.stdout


def test_rm_needs_yes_without_a_terminal(checkpoint: Path) -> None:
    assert sllmctl("convert", str(checkpoint), "--name", "tiny", "-q").returncode == 0
    r = sllmctl("rm", "tiny", input="")
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["error: rm needs --yes when not run from a terminal",
                                     "hint: sllmctl rm tiny --yes"]
    assert json.loads(sllmctl("rm", "tiny", "--dry-run", "--json").stdout)["would_remove"] == [
        "tiny"]
    assert sllmctl("rm", "tiny", "--yes").returncode == 0
    assert json.loads(sllmctl("ls", "--json").stdout) == []


def test_errors_are_one_line_with_exit_codes(checkpoint: Path, tmp_path: Path) -> None:
    r = sllmctl("show", "nope")
    assert r.returncode == 1
    assert r.stderr.startswith("error: no model named 'nope'")
    assert "Traceback" not in r.stderr
    r = sllmctl("convert", str(tmp_path / "missing"), "--name", "x")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) <= 2
    r = sllmctl("convert", str(checkpoint))  # --name missing: a usage error
    assert r.returncode == 2
    sllmctl("convert", str(checkpoint), "--name", "tiny", "-q")
    r = sllmctl("convert", str(checkpoint), "--name", "tiny")
    assert r.returncode == 1 and "hint: add --force" in r.stderr


def test_verify_reports_corruption(checkpoint: Path, home: Path) -> None:
    sllmctl("convert", str(checkpoint), "--name", "tiny", "-q")
    data = next((home / "models" / ".data").glob("tiny.*")) / "data-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    r = sllmctl("verify", "tiny")
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == ("error: model tiny: data-00000.bin: chunk 0 fails its "
                                        "checksum")


def test_home_flag_and_config_file(checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-home"
    r = sllmctl("--home", str(other), "convert", str(checkpoint), "-n", "x", "-q")
    assert r.returncode == 0
    assert (other / "models" / "x").is_symlink()
    assert json.loads(sllmctl("ls", "--json").stdout) == []  # SLLMCTL_HOME is untouched
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'home = "{other}"\n')
    env_home = os.environ.pop("SLLMCTL_HOME")
    try:
        assert [r["name"] for r in json.loads(sllmctl("ls", "--json").stdout)] == ["x"]
    finally:
        os.environ["SLLMCTL_HOME"] = env_home
