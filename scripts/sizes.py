#!/usr/bin/env python3
"""House limits on the package: every file under 400 lines, every function under 60 (STYLE.md;
tests and benchmarks are exempt). Prints each breach and exits 1 if there is one."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_FILE, MAX_FUNCTION = 400, 60


def breaches(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        if lines >= MAX_FILE:
            found.append(f"{path}: {lines} lines (limit {MAX_FILE})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION:
                    found.append(f"{path}:{node.lineno}: {node.name}() is {n} lines "
                                 f"(limit {MAX_FUNCTION})")
    return found


def main() -> int:
    root = Path(__file__).resolve().parent.parent / "sllmctl"
    found = breaches(root)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
