"""The KV cache types: the one list, derived from gguf-py's `GGMLQuantizationType`.

gguf-py keeps one enum as the single list of ggml types, with `GGML_QUANT_SIZES` giving each type's
block size and bytes per block; everything kvedge needs to know about a cache type (its name, whether
it is quantized, its bytes per value, its nominal bit width) is read from those two. What is kvedge's
own is the selection: the types llama.cpp's `--cache-type-k/-v` accepts.
"""

from __future__ import annotations

import re

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import KVTypeError

# llama.cpp's allow-list for `--cache-type-k/-v` (common/arg.cpp, `kv_cache_types`), in its order.
CACHE_TYPES: tuple[GGMLQuantizationType, ...] = (
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.IQ4_NL, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
)
NAMES: tuple[str, ...] = tuple(t.name.lower() for t in CACHE_TYPES)
_BY_NAME = dict(zip(NAMES, CACHE_TYPES))


def ggml_type(name: str) -> GGMLQuantizationType:
    """The ggml type of a cache type name (`q4_0`, `F16`, ...); KVTypeError for anything else."""
    t = _BY_NAME.get(name.strip().lower())
    if t is None:
        raise KVTypeError(f"unknown KV cache type {name!r}: llama.cpp accepts {', '.join(NAMES)}")
    return t


def check(name: str) -> str:
    """The canonical (lower-case) name of a cache type; KVTypeError for anything else."""
    return ggml_type(name).name.lower()


def block_size(name: str) -> int:
    return GGML_QUANT_SIZES[ggml_type(name)][0]


def bytes_per_value(name: str) -> float:
    block, size = GGML_QUANT_SIZES[ggml_type(name)]
    return size / block


def is_quantized(name: str) -> bool:
    """Block types (llama.cpp's `ggml_is_quantized`); f32, f16 and bf16 store one value per element."""
    return block_size(name) > 1


def nominal_bits(name: str) -> int:
    """The bit width a type is named for (q4_1 -> 4, bf16 -> 16): what an intN counterpart compares to."""
    return int(re.search(r"\d+", ggml_type(name).name).group())


QUANTIZED: tuple[str, ...] = tuple(n for n in NAMES if is_quantized(n))
UNQUANTIZED: tuple[str, ...] = tuple(n for n in NAMES if not is_quantized(n))
