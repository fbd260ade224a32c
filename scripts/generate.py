"""Regenerate what is made from the CLI: docs/cli.md and completions/ (bash, zsh, fish).

    python scripts/generate.py          write the files
    python scripts/generate.py --check  exit 1 if any is out of date

The completion scripts are those `sllmctl completion SHELL` prints
(sllmctl/commands/completion.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sllmctl.cli import app
from sllmctl.commands import _completion_scripts as scripts
from sllmctl.commands._completion_model import model

ROOT = Path(__file__).resolve().parent.parent


def cli_docs() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "typer", "sllmctl.cli", "utils", "docs", "--name", "sllmctl"],
        capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout


def main() -> int:
    check = "--check" in sys.argv
    from typer.main import get_command

    globals_, cmds = model(get_command(app))
    files = {
        ROOT / "completions" / "sllmctl.bash": scripts.bash(globals_, cmds),
        ROOT / "completions" / "_sllmctl": scripts.zsh(globals_, cmds),
        ROOT / "completions" / "sllmctl.fish": scripts.fish(globals_, cmds),
        ROOT / "docs" / "cli.md": cli_docs(),
    }
    stale = []
    for path, text in files.items():
        current = path.read_text() if path.exists() else None
        if current != text:
            stale.append(str(path.relative_to(ROOT)))
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if check and stale:
        print(f"out of date: {', '.join(stale)}; run: python scripts/generate.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
