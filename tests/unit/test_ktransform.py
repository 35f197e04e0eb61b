"""The K transform's metadata (kvedge.gguf.ktransform): written into a copy of a tiny GGUF and read back
exactly, every other key and tensor carried; each rule the native build enforces at model load refused here
first, with one line. The native build itself: tests/e2e/test_native_ktransform.py."""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest
from support.fakes import write_tiny_gguf

from kvedge.errors import ModelFileError, PatchError
from kvedge.gguf import ktransform as ktm
from kvedge.gguf.ktransform import (
    KTransform,
    metadata,
    read_k_transform,
    validate_k_transform,
    write_with_k_transform,
)
from kvedge.gguf.model import inspect_model

N_LAYER, ROW = 2, 32  # write_tiny_gguf: 2 layers, 1 KV head of 64 / 2 heads = 32 channels


def _kt(seed: int = 0, mu: bool = True, scale: bool = True) -> KTransform:
    rng = np.random.default_rng(seed)
    return KTransform(mu=rng.normal(size=(N_LAYER, ROW)).astype(np.float32) if mu else None,
                      scale=np.exp2(rng.uniform(-2, 2, size=(N_LAYER, ROW))).astype(np.float32) if scale else None)


def _raw(path, fields: dict) -> None:
    """A tiny GGUF with `fields` written as given (key -> (value, type, subtype)), bypassing kvedge's checks."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(N_LAYER)
    w.add_embedding_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_context_length(512)
    for k, (v, t, sub) in fields.items():
        w.add_key_value(k, v, t, sub_type=sub)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_round_trip_carries_everything_else(tmp_path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    assert read_k_transform(src) is None and not inspect_model(src).k_transform
    kt = _kt()
    dst = tmp_path / "out" / "tiny.kt.gguf"
    rep = write_with_k_transform(src, dst, kt, {"kvedge.k_transform_provenance.recipe": "centre+scale"})
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before  # never written
    assert rep.changes == () and rep.output_bytes == dst.stat().st_size
    back = read_k_transform(dst)
    assert back.mu.dtype == np.float32 and back.mu.shape == (N_LAYER, ROW)
    np.testing.assert_array_equal(back.mu, kt.mu)
    np.testing.assert_array_equal(back.scale, kt.scale)
    assert back.layers_with_mu() == back.layers_with_scale() == 2
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    fields = {k for k in b.fields if not k.startswith("GGUF.")}
    assert fields - {k for k in a.fields if not k.startswith("GGUF.")} == {
        ktm.KEY_VERSION, ktm.KEY_MU, ktm.KEY_SCALE, "kvedge.k_transform_provenance.recipe"}
    assert b.fields[ktm.KEY_VERSION].types == [gguf.GGUFValueType.UINT32] and b.fields[ktm.KEY_VERSION].contents() == 1
    assert b.fields[ktm.KEY_MU].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32]
    for k in a.fields:
        if not k.startswith("GGUF."):
            assert b.fields[k].contents() == a.fields[k].contents(), k
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.name == tb.name and bytes(ta.data) == bytes(tb.data)
    info = inspect_model(dst)
    assert info.k_transform and info.n_layer == N_LAYER and info.n_embd_k_gqa == ROW


def test_mu_only_and_scale_only(tmp_path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    for name, kt in (("mu", _kt(mu=True, scale=False)), ("scale", _kt(mu=False, scale=True))):
        dst = tmp_path / f"{name}.gguf"
        write_with_k_transform(src, dst, kt, {})
        back = read_k_transform(dst)
        assert (back.mu is None) == (kt.mu is None) and (back.scale is None) == (kt.scale is None)
        assert set(metadata(kt)) == {ktm.KEY_VERSION, ktm.KEY_MU if name == "mu" else ktm.KEY_SCALE}


def test_identity_layers_are_counted_as_such():
    mu = np.zeros((3, 4), np.float32)
    mu[1, 2] = 0.5
    s = np.ones((3, 4), np.float32)
    s[0] = 2
    s[2, 0] = 0.25
    kt = KTransform(mu=mu, scale=s)
    assert kt.layers_with_mu() == 1 and kt.layers_with_scale() == 2
    validate_k_transform(kt, 3, 4, "llama")  # identity layers are allowed


@pytest.mark.parametrize("kt, message", [
    (KTransform(mu=np.zeros((2, 31), np.float32), scale=None), r"^kvedge.k_transform.mu has 62 values, expected 64 \(2 layers x 32 K channels\)$"),
    (KTransform(mu=None, scale=np.ones(65, np.float32)), r"^kvedge.k_transform.scale has 65 values, expected 64"),
    (KTransform(mu=np.zeros((3, 32), np.float32), scale=None), r"^kvedge.k_transform.mu covers 3 layers, the model has 2$"),
    (KTransform(mu=np.where(np.arange(64) == 40, np.nan, 0).astype(np.float32).reshape(2, 32), scale=None),
     r"^kvedge.k_transform.mu\[40\] \(layer 1, channel 8\) is nan: every mu must be finite$"),
    (KTransform(mu=None, scale=np.where(np.arange(64) == 3, np.inf, 1).astype(np.float32).reshape(2, 32)),
     r"^kvedge.k_transform.scale\[3\] \(layer 0, channel 3\) is inf: every scale must be finite and > 0$"),
    (KTransform(mu=None, scale=np.where(np.arange(64) == 5, 0, 1).astype(np.float32).reshape(2, 32)),
     r"^kvedge.k_transform.scale\[5\] \(layer 0, channel 5\) is 0: every scale must be finite and > 0$"),
    (KTransform(mu=None, scale=np.where(np.arange(64) == 63, -2, 1).astype(np.float32).reshape(2, 32)),
     r"^kvedge.k_transform.scale\[63\] \(layer 1, channel 31\) is -2: every scale must be finite and > 0$"),
    (KTransform(mu=None, scale=None), r"^kvedge.k_transform has neither kvedge.k_transform.mu nor kvedge.k_transform.scale$"),
])
def test_validation_says_what_is_wrong_in_one_line(kt, message):
    with pytest.raises(ModelFileError, match=message) as e:
        validate_k_transform(kt, N_LAYER, ROW, "llama")
    assert "\n" not in str(e.value)


def test_other_architectures_are_refused():
    with pytest.raises(ModelFileError, match=r"^kvedge.k_transform is verified for the llama architecture only, not qwen2$"):
        validate_k_transform(_kt(), N_LAYER, ROW, "qwen2")


def test_writer_refuses_bad_transforms_and_files_before_writing(tmp_path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(ModelFileError, match="covers 3 layers"):
        write_with_k_transform(src, tmp_path / "a.gguf", KTransform(mu=np.zeros((3, ROW), np.float32), scale=None), {})
    qwen = write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ModelFileError, match="not qwen2"):
        write_with_k_transform(qwen, tmp_path / "b.gguf", _kt(), {})
    with pytest.raises(PatchError, match="refusing to overwrite"):
        write_with_k_transform(src, src, _kt(), {})
    with pytest.raises(PatchError, match="namespace"):
        write_with_k_transform(src, tmp_path / "c.gguf", _kt(), {ktm.KEY_MU: "x"})
    once = tmp_path / "once.gguf"
    write_with_k_transform(src, once, _kt(), {})
    with pytest.raises(PatchError, match="already carries a K transform"):
        write_with_k_transform(once, tmp_path / "twice.gguf", _kt(1), {})
    assert not any(tmp_path.glob("[abc]*.gguf")) and not (tmp_path / "twice.gguf").exists()
    assert not list(tmp_path.glob(".*.tmp"))


F32, U32, ARR = gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.ARRAY


@pytest.mark.parametrize("fields, message", [
    ({ktm.KEY_MU: ([0.0] * 64, ARR, F32)}, r"^kvedge.k_transform.version is missing \(it must be 1\)"),
    ({ktm.KEY_VERSION: (2, U32, None), ktm.KEY_MU: ([0.0] * 64, ARR, F32)}, r"^kvedge.k_transform.version is 2: kvedge reads version 1 only$"),
    ({ktm.KEY_VERSION: (1.0, F32, None), ktm.KEY_MU: ([0.0] * 64, ARR, F32)}, r"^kvedge.k_transform.version must be a uint32, not FLOAT32$"),
    ({ktm.KEY_VERSION: (1, U32, None), ktm.KEY_MU: ([0] * 64, ARR, U32)}, r"^kvedge.k_transform.mu must be a float32 array$"),
    ({ktm.KEY_VERSION: (1, U32, None), ktm.KEY_SCALE: ([1.0] * 63 + [0.0], ARR, F32)}, r"^kvedge.k_transform.scale\[63\] .* is 0"),
    ({ktm.KEY_VERSION: (1, U32, None)}, r"^kvedge.k_transform has neither"),
])
def test_reading_a_malformed_file(tmp_path, fields, message):
    path = tmp_path / "bad.gguf"
    _raw(path, fields)
    with pytest.raises(ModelFileError, match=message) as e:
        read_k_transform(path)
    assert "\n" not in str(e.value)


def test_reading_without_validation_returns_what_is_there(tmp_path):
    path = tmp_path / "short.gguf"
    _raw(path, {ktm.KEY_VERSION: (1, U32, None), ktm.KEY_MU: ([0.5] * 63, ARR, F32)})
    kt = read_k_transform(path, validate=False)
    assert kt.scale is None and kt.mu.shape == (63,)
    with pytest.raises(ModelFileError, match="has 63 values, expected 64"):
        validate_k_transform(kt, N_LAYER, ROW, "llama")
