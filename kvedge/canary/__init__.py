"""The embedded canary: a LoRA adapter that safety-tunes the default model, shipped with kvedge.

It exists so that the default audit measures a model that actually refuses (the bare SmolLM2-135M-
Instruct answers almost every harmful prompt). It is a test fixture and a demo, not a safe model. Its
recipe and data card are in the repository's `models/canary/`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CANARY_FILE = "smollm2-canary-lora.gguf"


def canary_adapter_path() -> Path | None:
    """The shipped adapter, or None in a checkout where it has not been trained yet."""
    p = Path(str(resources.files(__package__).joinpath(CANARY_FILE)))
    return p if p.is_file() else None
