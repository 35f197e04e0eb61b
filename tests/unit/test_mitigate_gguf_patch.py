"""The patched GGUF writer: power-of-two row scales stay in each tensor's own format where that is exact
(checked by dequantizing), column scales and inexact ones are widened, everything else is carried byte
for byte, and nothing is written where it should not be."""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from kvedge import io as kvio
from kvedge.mitigate.gguf_patch import F16_FIELDS, PatchError, patch_gguf, scale_tensor
from kvedge.mitigate.smooth import TensorScale

QUANTIZABLE = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)


def _rows(rng, n_rows=6, n=64):
    return (rng.normal(size=(n_rows, n)) * rng.uniform(0.1, 3, size=(n_rows, 1))).astype(np.float32)


@pytest.mark.parametrize("qtype", QUANTIZABLE)
def test_row_scale_is_exact_in_the_own_type(qtype):
    rng = np.random.default_rng(0)
    raw = quantize(_rows(rng), qtype)
    exps = (3, -2, 0, 1, -4, 2)
    out, t = scale_tensor(raw, qtype, TensorScale("w", "rows", exps))
    assert t == qtype and out.shape == raw.shape and out.dtype == np.uint8
    want = dequantize(raw, qtype) * np.exp2(np.array(exps, dtype=np.float32))[:, None]
    np.testing.assert_array_equal(dequantize(out, qtype), want)


@pytest.mark.parametrize("qtype", [t for t in F16_FIELDS if t not in QUANTIZABLE])
def test_row_scale_of_k_and_iq_types(qtype):
    """gguf-py cannot quantize these: random blocks with finite f16 fields stand in for weights."""
    rng = np.random.default_rng(1)
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(4, 2 * block_bytes), dtype=np.uint8)
    blocks = raw.reshape(4, 2, block_bytes)
    for off in F16_FIELDS[qtype]:
        blocks[..., off:off + 2] = rng.uniform(0.01, 1, size=(4, 2, 1)).astype(np.float16).view(np.uint8)
    exps = (1, -1, 2, 0)
    out, t = scale_tensor(raw, qtype, TensorScale("w", "rows", exps))
    assert t == qtype
    np.testing.assert_array_equal(dequantize(out, qtype),
                                  dequantize(raw, qtype) * np.exp2(np.array(exps, dtype=np.float32))[:, None])


def test_overflowing_scale_falls_back_to_a_wider_type():
    big = np.full((2, 32), 60000.0, dtype=np.float32)
    raw = quantize(big, Q.Q8_0)
    out, t = scale_tensor(raw, Q.Q8_0, TensorScale("w", "rows", (8, 0)))  # d * 256 overflows f16
    assert t in (Q.F16, Q.F32)
    np.testing.assert_array_equal(out.astype(np.float32), dequantize(raw, Q.Q8_0) * np.array([[256.0], [1.0]], dtype=np.float32))


def test_column_scale_widens_and_is_exact():
    rng = np.random.default_rng(2)
    raw = quantize(_rows(rng, 4, 64), Q.Q4_1)
    exps = tuple(int(x) for x in rng.integers(-3, 4, size=64))
    out, t = scale_tensor(raw, Q.Q4_1, TensorScale("w", "cols", exps))
    assert t in (Q.F16, Q.F32)
    np.testing.assert_array_equal(out.astype(np.float32),
                                  dequantize(raw, Q.Q4_1) * np.exp2(np.array(exps, dtype=np.float32))[None, :])


def test_float_rows_and_vectors():
    v = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    out, t = scale_tensor(v, Q.F32, TensorScale("b", "rows", (1, 0, -2)))
    assert t == Q.F32
    np.testing.assert_array_equal(out, [3.0, -2.0, 0.8125])
    tiny = np.array([[1e-7, 1.0]], dtype=np.float16)  # an f16 subnormal cannot shrink exactly
    out, t = scale_tensor(tiny, Q.F16, TensorScale("w", "rows", (-3,)))
    assert t == Q.F32 and out[0, 0] == np.float32(tiny[0, 0]) / 8


def _write(path, rng):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_uint32("llama.block_count", 1)
    w.add_array("general.languages", ["en", "fr"])
    w.add_string("kvedge.canary.purpose", "test")
    w.add_tensor("blk.0.attn_k.weight", quantize(_rows(rng, 8, 64), Q.Q4_1), raw_dtype=Q.Q4_1)
    w.add_tensor("blk.0.attn_output.weight", quantize(_rows(rng, 8, 64), Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("blk.0.attn_norm.weight", rng.normal(size=64).astype(np.float32))
    w.add_tensor("token_embd.weight", quantize(_rows(rng, 16, 64), Q.Q4_0), raw_dtype=Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_patch_carries_everything_else(tmp_path):
    rng = np.random.default_rng(3)
    src = _write(tmp_path / "m.gguf", rng)
    before = _sha(src)
    scales = [TensorScale("blk.0.attn_k.weight", "rows", (1, -1, 2, 0, 0, 3, -2, 1)),
              TensorScale("blk.0.attn_output.weight", "cols", tuple([1, 0] * 32))]
    rep = patch_gguf(src, tmp_path / "out" / "m.kvedge.gguf", scales, {"kvedge.smoothing.recipe": "{}"})
    assert _sha(src) == before
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(tmp_path / "out" / "m.kvedge.gguf")
    fa = {f.name: f.contents() for f in a.fields.values() if not f.name.startswith("GGUF.")}
    fb = {f.name: f.contents() for f in b.fields.values() if not f.name.startswith("GGUF.")}
    assert fb.pop("kvedge.smoothing.recipe") == "{}" and fb == fa
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for name in ("blk.0.attn_norm.weight", "token_embd.weight"):
        assert tb[name].tensor_type == ta[name].tensor_type
        assert bytes(tb[name].data) == bytes(ta[name].data)
    assert tb["blk.0.attn_k.weight"].tensor_type == Q.Q4_1
    assert tb["blk.0.attn_output.weight"].tensor_type in (Q.F16, Q.F32)
    assert [c.name for c in rep.widened] == ["blk.0.attn_output.weight"]
    assert rep.output_bytes == (tmp_path / "out" / "m.kvedge.gguf").stat().st_size


def test_no_space_no_file(tmp_path, monkeypatch):
    src = _write(tmp_path / "m.gguf", np.random.default_rng(4))
    monkeypatch.setattr(kvio, "free_bytes", lambda folder: 1000)
    with pytest.raises(PatchError, match="not enough free space"):
        patch_gguf(src, tmp_path / "out" / "m.kvedge.gguf", [], {})
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_never_overwrites_the_input(tmp_path):
    src = _write(tmp_path / "m.gguf", np.random.default_rng(5))
    with pytest.raises(PatchError, match="overwrite"):
        patch_gguf(src, src, [], {})
