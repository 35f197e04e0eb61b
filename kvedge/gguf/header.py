"""A GGUF file's header, walked with bounded reads and checked before anything else parses the file.

Model and adapter files come from the internet. gguf-py's GGUFReader trusts the header: it loops over
every declared count and builds numpy views per string, so a header declaring 2**60 tensors, or an array
of 2**40 strings, makes it loop or allocate without end; its callers then turn every array into a Python
list. This walker reads each count and length, checks it against what is left of the file and against
caps far above any real model, and stops at the first violation with a `ModelFileError` that names it.
Only a file that passes is handed to GGUFReader (model.py) or llama.cpp.

The structural rules are llama.cpp's own reader's (ggml/src/gguf.cpp, `gguf_init_from_file_impl`):
version 2 or 3, unique non-empty keys, no nested arrays, `general.alignment` a uint32 power of two,
tensor names under 64 bytes and unique, at most 4 dimensions, a known ggml type whose block size divides
the row, each tensor's data exactly where the previous one's padded data ends, and (llama.cpp's loader)
all of it inside the file. The caps are kvedge's: see the constants below.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFValueType

from ..errors import ModelFileError

VERSIONS = (2, 3)  # llama.cpp reads these; v1 is no longer supported there either
MAX_TENSORS = 1 << 16  # the largest published models hold a few thousand
MAX_KV = 1 << 16  # real models hold tens to a few hundred
MAX_STRING = 1 << 24  # bytes in one string: a vocabulary entry or a chat template is far shorter
MAX_ARRAY_ELEMENTS = 1 << 22  # all arrays together: a 256k vocabulary with scores and types is ~0.8M
MAX_HEADER_BYTES = 1 << 27  # metadata and tensor infos together: a large vocabulary takes ~10 MB
MAX_NAME = 63  # tensor name bytes (ggml's GGML_MAX_NAME, with its terminating NUL)
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
KEEP_STRING = 256  # string values up to this length are kept (types, names); longer ones by length only

_SCALAR = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_U64 = struct.Struct("<Q")
_TYPE_SIZES = {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}  # ggml type -> (block, bytes)


@dataclass(frozen=True)
class ArrayValue:
    """An array field, described but not read: its element type and count."""

    element_type: GGUFValueType
    count: int


@dataclass(frozen=True)
class LongString:
    """A string field longer than KEEP_STRING, described by its length in bytes."""

    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (numpy's last axis)
    ggml_type: int
    offset: int  # from the start of the data section
    n_bytes: int

    def dim(self, i: int) -> int:
        """ggml's ne[i]: 1 past the tensor's own dimensions, as ggml pads them."""
        return self.shape[i] if i < len(self.shape) else 1


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    file_size: int
    version: int
    alignment: int
    data_offset: int
    fields: Mapping[str, Any]  # numbers, bools, short strings; ArrayValue / LongString otherwise
    types: Mapping[str, GGUFValueType]  # each field's type: readers such as llama.cpp's assert it
    tensors: Mapping[str, TensorInfo]


class _Reader:
    """Little-endian reads from a buffer that fail cleanly at its end."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"corrupt GGUF ({what}): {self.path}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise ModelFileError(f"truncated GGUF: {what} at byte {self.pos} needs {n} bytes, the file has "
                                 f"{self.size - self.pos} left: {self.path}")
        if self.pos + n > MAX_HEADER_BYTES:
            raise self.fail(f"header longer than {MAX_HEADER_BYTES} bytes")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str, keep: int | None) -> str | int:
        """The string's text (when `keep` is None or it is at most `keep` bytes), else its length."""
        n = self.scalar("Q", f"length of {what}")
        if n > MAX_STRING:
            raise self.fail(f"{what} declares {n} bytes, more than the cap of {MAX_STRING}")
        self.need(n, what)
        start, self.pos = self.pos, self.pos + n
        if keep is not None and n > keep:
            return n
        raw = bytes(self.buf[start:start + n])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if keep is None:  # keys and tensor names must be text: gguf-py decodes them strictly
                raise self.fail(f"{what} at byte {start} is not UTF-8") from None
            return raw.decode("utf-8", "replace")


def _value_type(r: _Reader, what: str) -> GGUFValueType:
    code = r.scalar("I", what)
    try:
        return GGUFValueType(code)
    except ValueError:
        raise r.fail(f"{what} is {code}, not a GGUF value type") from None


def _read_value(r: _Reader, key: str, vtype: GGUFValueType, budget: list[int]) -> Any:
    if vtype == GGUFValueType.STRING:
        v = r.string(f"value of {key!r}", KEEP_STRING)
        return LongString(v) if isinstance(v, int) else v
    if vtype != GGUFValueType.ARRAY:
        return r.scalar(_SCALAR[vtype], f"value of {key!r}")
    etype = _value_type(r, f"element type of {key!r}")
    count = r.scalar("Q", f"length of {key!r}")
    if etype == GGUFValueType.ARRAY:
        raise r.fail(f"{key!r} is an array of arrays, which GGUF readers do not support")
    if count > budget[0]:
        raise r.fail(f"{key!r} declares {count} elements: the arrays of one file may hold {MAX_ARRAY_ELEMENTS}")
    budget[0] -= count
    if etype == GGUFValueType.STRING:
        r.need(8 * count, f"{count} strings of {key!r}")  # each at least its length prefix
        _skip_strings(r, key, count)
    else:
        size = struct.calcsize("<" + _SCALAR[etype])
        r.need(size * count, f"{count} elements of {key!r}")
        r.pos += size * count
    return ArrayValue(etype, count)


def _skip_strings(r: _Reader, key: str, count: int) -> None:
    """Step over `count` strings, checking each length: the hot loop of a vocabulary (~100k entries)."""
    buf, size, pos, unpack = r.buf, min(r.size, MAX_HEADER_BYTES), r.pos, _U64.unpack_from
    for i in range(count):
        if pos + 8 > size:
            r.pos = pos
            r.need(8, f"length of element {i} of {key!r}")
        (n,) = unpack(buf, pos)
        pos += 8
        if n > size - pos or n > MAX_STRING:
            r.pos = pos
            if n > MAX_STRING:
                raise r.fail(f"element {i} of {key!r} declares {n} bytes, more than the cap of {MAX_STRING}")
            r.need(n, f"element {i} of {key!r}")
        pos += n
    r.pos = pos


def _read_tensor(r: _Reader, index: int) -> TensorInfo:
    name = r.string(f"name of tensor {index}", None)
    assert isinstance(name, str)
    if len(name.encode("utf-8")) > MAX_NAME:
        raise r.fail(f"tensor {index} name is longer than {MAX_NAME} bytes")
    n_dims = r.scalar("I", f"dimensions of {name!r}")
    if n_dims > MAX_DIMS:
        raise r.fail(f"tensor {name!r} has {n_dims} dimensions, ggml allows {MAX_DIMS}")
    shape = tuple(r.scalar("q", f"dimension {d} of {name!r}") for d in range(n_dims))
    n = 1
    for d in shape:
        if d < 0:
            raise r.fail(f"tensor {name!r} has a negative dimension {d}")
        if d and n > (2**63 - 1) // d:
            raise r.fail(f"tensor {name!r} of shape {shape} has more elements than ggml can count")
        n *= d
    code = r.scalar("I", f"type of {name!r}")
    sizes = _TYPE_SIZES.get(code)
    if sizes is None:
        raise r.fail(f"tensor {name!r} has unknown ggml type {code}")
    block, type_size = sizes
    if shape and shape[0] % block:
        raise r.fail(f"tensor {name!r} rows of {shape[0]} are not a multiple of its type's block of {block}")
    offset = r.scalar("Q", f"offset of {name!r}")
    return TensorInfo(name, shape, code, offset, n // block * type_size)


def _walk(buf, size: int, path: Path) -> GGUFHeader:
    r = _Reader(buf, size, path)
    r.need(4, "magic")
    magic = bytes(buf[0:4])
    if struct.unpack("<I", magic)[0] != GGUF_MAGIC:
        raise ModelFileError(f"not a GGUF file (bad magic {magic!r}): {path}")
    r.pos = 4
    version = r.scalar("I", "version")
    if version not in VERSIONS:
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise r.fail(f"version {version}{hint}; kvedge and llama.cpp read versions 2 and 3")
    n_tensors = r.scalar("Q", "tensor count")
    n_kv = r.scalar("Q", "metadata count")
    if n_tensors > MAX_TENSORS:
        raise r.fail(f"{n_tensors} tensors declared, the cap is {MAX_TENSORS}")
    if n_kv > MAX_KV:
        raise r.fail(f"{n_kv} metadata entries declared, the cap is {MAX_KV}")
    fields: dict[str, Any] = {}
    types: dict[str, GGUFValueType] = {}
    budget = [MAX_ARRAY_ELEMENTS]
    for i in range(n_kv):
        key = r.string(f"key {i}", None)
        assert isinstance(key, str)
        if not key:
            raise r.fail(f"key {i} is empty")
        if key in fields:
            raise r.fail(f"duplicate key {key!r}")
        types[key] = _value_type(r, f"type of {key!r}")
        fields[key] = _read_value(r, key, types[key], budget)
    tensors: dict[str, TensorInfo] = {}
    for i in range(n_tensors):
        t = _read_tensor(r, i)
        if t.name in tensors:
            raise r.fail(f"duplicate tensor name {t.name!r}")
        tensors[t.name] = t
    alignment = fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if types.get("general.alignment", GGUFValueType.UINT32) != GGUFValueType.UINT32 \
            or alignment <= 0 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment {alignment!r} is not a uint32 power of two")
    data_offset = -(-r.pos // alignment) * alignment
    expected = 0
    for t in tensors.values():
        if t.offset != expected:
            raise r.fail(f"tensor {t.name!r} data at offset {t.offset}, where the previous tensor's data ends at "
                         f"{expected}")
        end = data_offset + t.offset + t.n_bytes
        if end > size:
            raise ModelFileError(f"truncated GGUF: tensor {t.name!r} data ends at byte {end} but the file has "
                                 f"{size}: {path}")
        expected += -(-t.n_bytes // alignment) * alignment
    return GGUFHeader(path, size, version, alignment, data_offset, fields, types, tensors)


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """The checked header of the GGUF at `path` (ModelFileError if the file is missing or malformed).
    Reads only the header, through a memory map: nothing is read that the file does not hold."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelFileError(f"model path is not a file: {p}")
    st = p.stat()
    return _read_header_cached(str(p.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _read_header_cached(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    p = Path(path)
    if size < 4:
        raise ModelFileError(f"not a GGUF file ({size} bytes): {p}")
    try:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _walk(mm, size, p)
    except (OSError, ValueError) as exc:  # unreadable, or the file changed size under the map
        raise ModelFileError(f"cannot read {p}: {exc}") from None
