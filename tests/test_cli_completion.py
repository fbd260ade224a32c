"""Shell completion: `sllmctl completion SHELL` prints the generated scripts; the bash script
completes the daemon's subcommands and offers fixed values, not file names, for --tier and
--dtype."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cli_run import sllmctl

ROOT = Path(__file__).resolve().parent.parent



@pytest.mark.parametrize(("shell", "path"), [("bash", "sllmctl.bash"), ("zsh", "_sllmctl"),
                                             ("fish", "sllmctl.fish")])
def test_completion_prints_the_shipped_script(shell: str, path: str) -> None:
    r = sllmctl("completion", shell)
    assert r.returncode == 0 and r.stdout == (ROOT / "completions" / path).read_text()


def test_completion_json_carries_the_script() -> None:
    import json

    r = sllmctl("completion", "fish", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {
        "shell": "fish", "script": (ROOT / "completions" / "sllmctl.fish").read_text()}


def test_unknown_shell_is_a_usage_error() -> None:
    r = sllmctl("completion", "tcsh")
    assert r.returncode == 2 and r.stderr.startswith("error: no completion for 'tcsh'")


def complete(script: str, *words: str) -> list[str]:
    code = (f"source {script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)})\n"
            f"COMP_CWORD={len(words) - 1}\n_sllmctl\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    r = subprocess.run(["bash", "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT)
    return r.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completes_daemon_subcommands_and_fixed_values(tmp_path: Path) -> None:
    script = str(ROOT / "completions" / "sllmctl.bash")
    assert {"daemon", "unserve", "completion"} <= set(complete(script, "sllmctl", ""))
    assert complete(script, "sllmctl", "daemon", "") == [
        "keys", "logs", "reload", "restart", "start", "status", "stop", "--help"]
    assert "--dram-pool" in complete(script, "sllmctl", "daemon", "start", "--")
    assert "--follow" in complete(script, "sllmctl", "daemon", "logs", "-")
    assert complete(script, "sllmctl", "warm", "m", "--tier", "") == ["dram", "gpu"]
    assert complete(script, "sllmctl", "unload", "m", "--tier", "g") == ["gpu"]
    assert complete(script, "sllmctl", "convert", "x", "--dtype", "") == [
        "bf16", "f16", "f32", "f64"]
    assert complete(script, "sllmctl", "serve", "m", "--port", "") == []  # no file names
