"""llama.cpp LoRA adapters in GGUF: read, write, apply.

The format is the one llama.cpp's own LoRA converter writes and `llama_adapter_lora_init` reads:
`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, `general.architecture` equal to
the base model's, and for each adapted base tensor `<name>.lora_a` (numpy shape (rank, n_in)) and
`<name>.lora_b` (numpy shape (n_out, rank)). llama.cpp adds `(alpha / rank) * B @ A` to the base
weight, in the base tensor's own (GGUF) channel order, so an adapter trained on GGUF-layout weights
needs no permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import ModelFileError
from ..io import atomic_path
from .header import TensorInfo

if TYPE_CHECKING:
    from .model import ModelInfo


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


# Element types llama.cpp's LoRA converter writes (convert_lora_to_gguf.py --outtype), all of which its
# matrix products take; anything else is refused before llama.cpp sees it.
ADAPTER_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                           GGMLQuantizationType.Q8_0})
_HALVES = (".lora_a", ".lora_b")


def check_adapter(path: str | Path, base: "ModelInfo") -> Path:
    """A LoRA adapter GGUF that llama.cpp can apply to `base`, checked from the two headers alone (bounded
    reads, nothing loaded); returns its resolved path. llama.cpp's own loader checks less than it uses:
    an adapter whose halves are missing, of another rank or width, of another architecture, or of a type
    its matrix product does not take crashed the process. Every such adapter is a ModelFileError here."""
    from .header import read_header

    p = Path(path)
    head = read_header(p)
    md = head.fields

    def bad(what: str) -> ModelFileError:
        return ModelFileError(f"LoRA adapter {p} {what}")

    if md.get("general.type") != "adapter" or md.get("adapter.type") != "lora":
        raise bad(f"is not a LoRA adapter GGUF (general.type {md.get('general.type')!r}, "
                  f"adapter.type {md.get('adapter.type')!r})")
    if md.get("general.architecture") != base.architecture:
        raise bad(f"is for architecture {md.get('general.architecture')!r}, the model is {base.architecture!r}")
    alpha = md.get("adapter.lora.alpha", 0.0)
    if "adapter.lora.alpha" in md and head.types["adapter.lora.alpha"] != GGUFValueType.FLOAT32 \
            or not math.isfinite(alpha):
        raise bad(f"has adapter.lora.alpha {alpha!r}: llama.cpp reads a finite float32")
    model = read_header(base.path).tensors
    halves: dict[str, dict[str, TensorInfo]] = {}
    for t in head.tensors.values():
        stem, half = next(((t.name[:-len(h)], h) for h in _HALVES if t.name.endswith(h)), (t.name, ""))
        if not half:
            if t.name.endswith("_norm.weight"):
                continue  # llama.cpp skips these
            raise bad(f"holds {t.name!r}, which is neither a .lora_a nor a .lora_b half")
        halves.setdefault(stem, {})[half] = t
    if not halves:
        raise bad("holds no LoRA tensors")
    for stem, pair in halves.items():
        if len(pair) != 2:
            raise bad(f"lacks the {'lora_b' if '.lora_a' in pair else 'lora_a'} half of {stem!r}")
        a, b = pair[".lora_a"], pair[".lora_b"]
        w = model.get(stem)
        if w is None:
            raise bad(f"adapts {stem!r}, which the model does not have: made for another base?")
        for t in (a, b):
            if t.ggml_type not in ADAPTER_TYPES:
                raise bad(f"stores {t.name!r} as ggml type {t.ggml_type}; llama.cpp applies "
                          f"{', '.join(sorted(x.name for x in ADAPTER_TYPES))}")
            if len(t.shape) != 2:
                raise bad(f"has {t.name!r} of shape {t.shape}: LoRA halves are matrices")
        if len(w.shape) > 2:
            raise bad(f"adapts {stem!r} of shape {w.shape}: llama.cpp adapts matrices")
        # ggml shapes: A is (n_in, rank) and B (rank, n_out); token_embd's are (rank, n_vocab) and
        # (rank, n_embd): llama.cpp looks rows of A up by token, then multiplies by B
        if stem.endswith("token_embd.weight"):
            rank, fits = a.dim(0), a.dim(1) == w.dim(1) and b.dim(1) == w.dim(0) and b.dim(0) == a.dim(0)
        else:
            rank, fits = a.dim(1), a.dim(0) == w.dim(0) and b.dim(1) == w.dim(1) and b.dim(0) == a.dim(1)
        if not fits or rank < 1:
            raise bad(f"does not fit {stem!r} {w.shape}: lora_a {a.shape} and lora_b {b.shape} need its widths "
                      "and one rank (made for another base?)")
    return p.resolve()


def read_adapter(path: str | Path) -> LoraAdapter:
    """The adapter's matrices in float32, whatever type they are stored in (the torch side applies them)."""
    from gguf.quants import dequantize

    from .model import read_metadata

    md, tensors = read_metadata(Path(path))
    if md.get("general.type") != "adapter" or md.get("adapter.type") != "lora":
        raise ModelFileError(f"{path} is not a LoRA adapter GGUF")
    halves: dict[str, dict[str, np.ndarray]] = {}
    for t in tensors:
        base, _, which = t.name.rpartition(".")
        if which not in ("lora_a", "lora_b"):
            continue
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        values = dequantize(np.asarray(t.data), t.tensor_type)
        halves.setdefault(base, {})[which] = np.asarray(values, dtype=np.float32).reshape(shape)
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

    with atomic_path(path) as tmp:
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
