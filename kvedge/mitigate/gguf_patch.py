"""Write a patched GGUF (model or LoRA adapter): the named tensors multiplied by powers of two, every other
tensor byte for byte in its own type, every metadata key carried over, provenance under `kvedge.*`.

Exactness is checked, not assumed: a row scale of a block-quantized tensor rewrites only its blocks' f16
scale (and minimum) fields, and the result is kept only when gguf-py dequantizes it to exactly the old
values times 2^e (an f16 field can overflow or fall into subnormals); otherwise, and for column scales,
which cut across blocks, the tensor is written dequantized, in f16 when that holds its values exactly,
else in f32, and the report says so with the size it costs. The file is written with gguf-py's
GGUFWriter to a temporary file in the target directory, after a free-space check, and renamed into place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from ..errors import PatchError
from ..io import atomic_path, check_space
from .smooth import TensorScale

# Byte offsets, within one block, of the f16 fields that every value of the block is a multiple of (the
# scale d, and the minimum or dmin where the type has one): ggml's block structs (ggml-common.h).
F16_FIELDS: dict[Q, tuple[int, ...]] = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
}
FLOAT_TYPES = {Q.F32: np.float32, Q.F16: np.float16}


@dataclass(frozen=True)
class TensorChange:
    name: str
    axis: str
    type_in: str
    type_out: str  # type_in when the scaling is exact in the tensor's own format
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class PatchReport:
    source: str
    source_bytes: int
    output_bytes: int
    changes: tuple[TensorChange, ...]

    @property
    def widened(self) -> list[TensorChange]:
        return [c for c in self.changes if c.type_out != c.type_in]

    def to_dict(self) -> dict:
        return {"source": self.source, "source_bytes": self.source_bytes, "output_bytes": self.output_bytes,
                "size_delta_bytes": self.output_bytes - self.source_bytes,
                "tensors_scaled": len(self.changes), "tensors_widened": [asdict(c) for c in self.widened]}


def _pow2(exps: np.ndarray) -> np.ndarray:
    return np.exp2(np.asarray(exps, dtype=np.float64)).astype(np.float32)


def _dequantize(raw: np.ndarray, qtype: Q) -> np.ndarray:
    from gguf.quants import dequantize

    return np.asarray(dequantize(raw, qtype), dtype=np.float32)


def _scale_float(data: np.ndarray, scale: np.ndarray, dtype: type) -> np.ndarray | None:
    """data * scale in `dtype`, or None when that is not exact (overflow, subnormal loss)."""
    x = data.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the answer "not exact", not a warning
        y = (x * scale).astype(dtype)
        back = y.astype(np.float32) / scale
    return y if np.all(np.isfinite(y)) and np.array_equal(back, x) else None


def _scale_block_rows(raw: np.ndarray, qtype: Q, scale: np.ndarray) -> np.ndarray | None:
    """Rows of a block-quantized tensor times `scale` (one power of two per row), through each block's f16
    fields alone; None unless gguf-py dequantizes the result to exactly the old values times the scale."""
    fields = F16_FIELDS.get(qtype)
    if fields is None:
        return None
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(-1, raw.shape[-1])
    blocks = rows.reshape(rows.shape[0], -1, block_bytes).copy()
    s = scale.reshape(-1, 1, 1)
    for off in fields:
        f = np.ascontiguousarray(blocks[..., off : off + 2]).view(np.float16)
        scaled = _scale_float(f, s, np.float16)
        if scaled is None:
            return None
        blocks[..., off : off + 2] = scaled.view(np.uint8)
    out = blocks.reshape(raw.shape)
    before = _dequantize(raw, qtype).reshape(rows.shape[0], -1)
    after = _dequantize(out, qtype).reshape(rows.shape[0], -1)
    return out if np.array_equal(after, before * scale.reshape(-1, 1)) else None


def scale_tensor(raw: np.ndarray, qtype: Q, ts: TensorScale) -> tuple[np.ndarray, Q]:
    """The tensor's data after `ts`, in its own type where that is exact, else dequantized (f16 when it
    holds the values exactly, else f32). `raw` is gguf-py's array: [rows, row bytes] for block types,
    [rows, n] (or [n]) for float types."""
    scale = _pow2(np.asarray(ts.exps))
    if ts.axis == "rows":
        if qtype in FLOAT_TYPES:
            col = scale.reshape((-1,) + (1,) * (raw.ndim - 1))
            out = _scale_float(raw, col, FLOAT_TYPES[qtype])
            if out is not None:
                return out, qtype
        else:
            out = _scale_block_rows(raw, qtype, scale)
            if out is not None:
                return out, qtype
        deq = _dequantize(raw, qtype)
        values = (deq.reshape(len(scale), -1) * scale.reshape(-1, 1)).reshape(deq.shape)
    else:
        values = _dequantize(raw, qtype) * scale.reshape(1, -1)
    with np.errstate(over="ignore"):
        as_f16 = values.astype(np.float16)
    if np.all(np.isfinite(as_f16)) and np.array_equal(as_f16.astype(np.float32), values):
        return as_f16, Q.F16
    return values.astype(np.float32), Q.F32


def _padded(n: int, align: int) -> int:
    return (n + align - 1) // align * align




def patch_gguf(src: Path, dst: Path, scales: list[TensorScale], provenance: Mapping[str, str],
               extra: Mapping[str, tuple[Any, Any, Any]] | None = None) -> PatchReport:
    """Write `src` with `scales` applied to `dst` (atomically, after a free-space check). Every other tensor
    is copied byte for byte, every metadata key carried, `provenance` added (its keys replace any of the
    same name in `src`), and `extra` too: typed keys, key -> (value, GGUFValueType, array element type or
    None) as GGUFWriter.add_key_value takes them (kvedge.gguf.ktransform.metadata). Never writes `src`."""
    import gguf

    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise PatchError(f"refusing to overwrite the input file {src}")
    reader = gguf.GGUFReader(src, "r")
    arch = str(reader.fields["general.architecture"].contents())
    by_name = {ts.name: ts for ts in scales}
    tensors = {t.name: t for t in reader.tensors}
    missing = [n for n in by_name if n not in tensors]
    if missing:
        raise PatchError(f"{src} has no tensor {missing[0]}")
    new: dict[str, tuple[np.ndarray, Q]] = {}
    changes = []
    for name, ts in by_name.items():
        t = tensors[name]
        data, qtype = scale_tensor(np.asarray(t.data), t.tensor_type, ts)
        new[name] = (data, qtype)
        changes.append(TensorChange(name, ts.axis, t.tensor_type.name, qtype.name, int(t.n_bytes), int(data.nbytes)))
    align = int(reader.alignment)
    delta = sum(_padded(new[n][0].nbytes, align) - _padded(int(tensors[n].n_bytes), align) for n in new)
    extra = dict(extra or {})
    added = {**provenance, **extra}
    estimate = (src.stat().st_size + delta + sum(len(k) + len(v) + 16 for k, v in provenance.items())
                + sum(len(k) + 32 + 8 * len(v[0]) if isinstance(v[0], (list, tuple)) else len(k) + 32
                      for k, v in extra.items()))  # 8 bytes bound an array element
    check_space(dst.parent, estimate, dst.name, PatchError)

    try:
        with atomic_path(dst) as tmp:
            w = gguf.GGUFWriter(tmp, arch)
            w.data_alignment = align
            for field in reader.fields.values():
                if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in added:
                    continue
                vtype = field.types[0]
                sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
            for k, v in sorted(provenance.items()):
                w.add_key_value(k, v, gguf.GGUFValueType.STRING)
            for k, (value, vtype, sub) in extra.items():
                w.add_key_value(k, value, vtype, sub_type=sub)
            for t in reader.tensors:
                data, qtype = new.get(t.name, (t.data, t.tensor_type))
                w.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for t in reader.tensors:
                w.write_tensor_data(new[t.name][0] if t.name in new else t.data, tensor_endianess=reader.endianess)
            w.close()
    except OSError as exc:
        raise PatchError(f"cannot write {dst}: {exc.strerror or exc}") from None
    return PatchReport(str(src), src.stat().st_size, dst.stat().st_size, tuple(changes))

