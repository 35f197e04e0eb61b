"""The architectures kvedge's torch forward (kvedge.pcr.torch.gguf_torch) reproduces, and how: one place
that `kvedge pcr`, `sweep`, `export` and `doctor` ask, without importing torch.

Each was measured against llama.cpp (tests/e2e/test_architectures.py: a synthetic model of each layout;
tests/e2e/test_calib_forward.py: the default model, for llama). Any other architecture is refused by name,
never simulated with a graph that might be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedArchitecture


@dataclass(frozen=True)
class ArchSpec:
    name: str
    rope_neox: bool  # RoPE pairs (i, i + n_rot/2) instead of adjacent channels (2i, 2i+1)
    verified: bool  # fidelity to llama.cpp measured by kvedge's tests


ARCHS: dict[str, ArchSpec] = {
    # llama's converter permutes Q/K rows so that llama.cpp's "normal" RoPE pairs adjacent channels
    "llama": ArchSpec("llama", rope_neox=False, verified=True),
    "mistral3": ArchSpec("mistral3", rope_neox=False, verified=True),
    "qwen2": ArchSpec("qwen2", rope_neox=True, verified=True),
    "qwen3": ArchSpec("qwen3", rope_neox=True, verified=True),
    "phi3": ArchSpec("phi3", rope_neox=True, verified=True),
    "gemma3": ArchSpec("gemma3", rope_neox=True, verified=True),
}


def check_architecture(arch_name: Any) -> ArchSpec:
    arch = ARCHS.get(str(arch_name))
    if arch is None:
        raise UnsupportedArchitecture(
            f"no torch forward for architecture {arch_name!r}: kvedge's PCR supports {', '.join(ARCHS)}"
        )
    return arch
