"""llama.cpp LoRA adapters in GGUF: read, write, apply.

The format is the one llama.cpp's own LoRA converter writes and `llama_adapter_lora_init` reads:
`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, `general.architecture` equal to
the base model's, and for each adapted base tensor `<name>.lora_a` (numpy shape (rank, n_in)) and
`<name>.lora_b` (numpy shape (n_out, rank)). llama.cpp adds `(alpha / rank) * B @ A` to the base
weight, in the base tensor's own (GGUF) channel order, so an adapter trained on GGUF-layout weights
needs no permutation.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import ModelFileError


@dataclass(frozen=True)
class LoraPair:
    a: np.ndarray  # (rank, n_in)
    b: np.ndarray  # (n_out, rank)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self, alpha: float) -> np.ndarray:
        """The (n_out, n_in) update llama.cpp adds to the base weight."""
        return (alpha / self.rank) * (self.b.astype(np.float32) @ self.a.astype(np.float32))


@dataclass(frozen=True)
class LoraAdapter:
    architecture: str
    alpha: float
    pairs: Mapping[str, LoraPair]  # base tensor name -> (A, B)
    metadata: Mapping[str, str] = field(default_factory=dict)


def check_adapter(path: str | Path) -> Path:
    """A LoRA adapter must be a complete GGUF that says it is one; returns its resolved path."""
    from .model import read_metadata

    p = Path(path)
    md, _ = read_metadata(p)
    if md.get("general.type") != "adapter":
        raise ModelFileError(f"{p} is not a LoRA adapter GGUF (general.type is {md.get('general.type')!r})")
    return p.resolve()


def read_adapter(path: str | Path) -> LoraAdapter:
    from gguf import GGUFReader

    from .model import read_metadata

    md, tensors = read_metadata(Path(path))
    if md.get("general.type") != "adapter" or md.get("adapter.type") != "lora":
        raise ModelFileError(f"{path} is not a LoRA adapter GGUF")
    reader = GGUFReader(path, "r")
    halves: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        base, _, which = t.name.rpartition(".")
        if which not in ("lora_a", "lora_b"):
            continue
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        halves.setdefault(base, {})[which] = np.array(t.data, dtype=np.float32).reshape(shape)
    pairs = {}
    for base, h in halves.items():
        if set(h) != {"lora_a", "lora_b"}:
            raise ModelFileError(f"{path}: {base} lacks its lora_a or lora_b half")
        pairs[base] = LoraPair(h["lora_a"], h["lora_b"])
    extra = {k: str(v) for k, v in md.items() if k.startswith("kvedge.")}
    return LoraAdapter(str(md.get("general.architecture")), float(md.get("adapter.lora.alpha") or 0.0), pairs, extra)


def write_adapter(path: str | Path, adapter: LoraAdapter, dtype: type = np.float16) -> None:
    """Write atomically (temporary file, then rename), so a reader never sees half an adapter."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, adapter.architecture)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
        for k, v in sorted(adapter.metadata.items()):
            w.add_string(k, v)
        for name in sorted(adapter.pairs):
            pair = adapter.pairs[name]
            w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(pair.a, dtype=dtype))
            w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(pair.b, dtype=dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; an adapter is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
