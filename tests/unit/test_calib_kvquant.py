"""kvedge.pcr.torch.kvquant against the real references: gguf-py's numpy quantizers (the spec's oracle)
and the quantize_row_* functions of the libggml-cpu that llama-cpp-python ships, which are what
llama.cpp's CPU backend calls to write a quantized KV cache (the only oracle for iq4_nl)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from kvedge.errors import SchemeError  # noqa: E402
from kvedge.pcr.torch.kvquant import (  # noqa: E402
    GGML_BLOCK_TYPES,
    cache_roundtrip,
    fake_quant,
    hadamard,
    int_levels,
    k_rotation_block,
    parse_scheme,
    rotate,
    rotation_block,
    unrotate,
)

SHAPES = [(1, 32), (7, 64), (24, 192), (33, 576)]  # rows of several blocks, odd token counts
GGUF_TYPES = [t for t in GGML_BLOCK_TYPES if t != "iq4_nl"]  # gguf-py has no iq4_nl quantizer


def outlier_data(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Gaussian rows with planted outliers: a few whole channels x30 (as K caches have) and scattered
    single values x50, plus one all-zero block to exercise the d == 0 branches."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    cols = rng.choice(shape[-1], size=max(1, shape[-1] // 40), replace=False)
    x[..., cols] *= 30
    x[rng.random(shape) < 0.01] *= 50
    if shape[0] > 2:
        x[1, :32] = 0.0
    return x


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality, except that -0.0 and +0.0 count as one value: for an all-zero block
    ggml's iq4_nl leaves stale codes beside a zero scale, so its zeros carry a stack-dependent sign."""
    a32, b32 = a.astype(np.float32) + np.float32(0), b.astype(np.float32) + np.float32(0)
    return a.shape == b.shape and bool((a32.view(np.uint32) == b32.view(np.uint32)).all())


def torch_roundtrip(x: np.ndarray, name: str) -> np.ndarray:
    return fake_quant(torch.from_numpy(x), parse_scheme(name)).numpy()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", GGUF_TYPES)
def test_block_types_bit_exact_against_gguf(name: str, shape: tuple[int, int]) -> None:
    x = outlier_data(shape, seed=hash((name, shape)) % 1000)
    qtype = GGMLQuantizationType[name.upper()]
    ref = dequantize(quantize(x, qtype), qtype)
    assert same_bits(torch_roundtrip(x, name), ref)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # f16 overflow to inf is part of it
@pytest.mark.parametrize("shape", SHAPES)
def test_f16_bit_exact_against_gguf(shape: tuple[int, int]) -> None:
    x = outlier_data(shape) * 1e3  # reach f16's coarse range too
    ref = dequantize(quantize(x, GGMLQuantizationType.F16), GGMLQuantizationType.F16)
    assert same_bits(torch_roundtrip(x, "f16"), ref)


def _ggml_cpu() -> ctypes.CDLL:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"
    if not lib.exists():
        pytest.skip(f"no libggml-cpu at {lib}")
    return ctypes.CDLL(str(lib))


@pytest.mark.parametrize("name", GGML_BLOCK_TYPES)
def test_block_types_bit_exact_against_ggml_cpu_cache_writer(name: str) -> None:
    """The function llama.cpp's CPU set_rows uses to store a cache row (`from_float`)."""
    fn = getattr(_ggml_cpu(), f"quantize_row_{name}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    qtype = GGMLQuantizationType[name.upper()]
    block, size = GGML_QUANT_SIZES[qtype]
    for shape in SHAPES:
        x = np.ascontiguousarray(outlier_data(shape, seed=3))
        buf = np.zeros((shape[0], shape[1] // block * size), dtype=np.uint8)
        fn(x.ctypes.data, buf.ctypes.data, x.size)
        assert same_bits(torch_roundtrip(x, name), dequantize(buf, qtype)), shape


def test_zero_rows_stay_zero() -> None:
    x = np.zeros((3, 64), dtype=np.float32)
    for name in (*GGML_BLOCK_TYPES, "int3", "int4-channel"):
        assert not torch_roundtrip(x, name).any(), name


# --- intN ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
def test_int_group32_levels(bits: int) -> None:
    """Symmetric: codes -qmax..qmax with qmax = 2**(bits-1) - 1, so at most 2**bits - 1 levels per
    block, all of them used by a ramp through the block's range."""
    ramp = torch.linspace(-1, 1, 32 * 64).reshape(64, 32)
    ramp[:, 0] = -1.0  # every block spans [-1, 1]
    ramp[:, -1] = 1.0
    y = fake_quant(ramp.reshape(1, -1), parse_scheme(f"int{bits}")).reshape(64, 32)
    qmax = int_levels(bits)
    assert qmax == 2 ** (bits - 1) - 1
    counts = {len(torch.unique(row)) for row in y}
    assert max(counts) <= 2 * qmax + 1
    if bits <= 5:  # one block of 32 evenly spaced values hits every level when there are <= 32
        block = fake_quant(torch.linspace(-1, 1, 32)[None], parse_scheme(f"int{bits}"))
        assert len(torch.unique(block)) == 2 * qmax + 1


def test_int_error_decreases_with_bits() -> None:
    x = torch.from_numpy(outlier_data((64, 192), seed=5))
    for gran in ("", "-channel"):
        errs = [float((fake_quant(x, parse_scheme(f"int{b}{gran}")) - x).pow(2).mean()) for b in range(2, 9)]
        assert all(a > b for a, b in zip(errs, errs[1:])), (gran, errs)


def test_int8_group32_is_q8_0() -> None:
    x = outlier_data((16, 192), seed=6)
    assert same_bits(torch_roundtrip(x, "int8"), torch_roundtrip(x, "q8_0"))


def test_per_channel_scales_are_per_channel() -> None:
    """One scale per channel over the tokens: an outlier token in channel 0 coarsens channel 0 only,
    whereas group-32 coarsens the 31 neighbours of that token's block."""
    x = torch.from_numpy(outlier_data((40, 64), seed=7))
    base = fake_quant(x, parse_scheme("int4-channel"))
    y = x.clone()
    y[5, 0] = 1000.0
    assert torch.equal(fake_quant(y, parse_scheme("int4-channel"))[:, 1:], base[:, 1:])
    per_col_levels = [len(torch.unique(base[:, c])) for c in range(64)]
    assert max(per_col_levels) <= 2 * int_levels(4) + 1
    g = fake_quant(y, parse_scheme("int4"))
    assert not torch.equal(g[5, 1:32], fake_quant(x, parse_scheme("int4"))[5, 1:32])


# --- schemes ---------------------------------------------------------------------------------------
def test_parse_scheme() -> None:
    s = parse_scheme("Q4_0")
    assert (s.name, s.bits, s.granularity, s.rotation) == ("q4_0", 4, "block32", True)
    assert parse_scheme("q4_0:norot").rotation is False
    assert parse_scheme("q4_0:norot", rotation=True).rotation is True
    assert parse_scheme("int3") == parse_scheme("int3", rotation=True)
    c = parse_scheme("int4-channel", rotation=False)
    assert (c.bits, c.granularity, c.rotation, c.label) == (4, "channel", False, "int4-channel:norot")
    assert parse_scheme("f16").quantized is False
    assert parse_scheme("q4_0").bits_per_value == 4.5
    assert parse_scheme("q8_0").bits_per_value == 8.5
    assert parse_scheme("int4").bits_per_value == 4.5
    assert parse_scheme("f16").bits_per_value == 16
    for bad in ("int1", "int9", "q4_k", "", "int4-token"):
        with pytest.raises(SchemeError):
            parse_scheme(bad)


def test_row_must_be_whole_blocks() -> None:
    with pytest.raises(SchemeError):
        fake_quant(torch.zeros(2, 48), parse_scheme("q4_0"))


# --- rotation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [64, 128, 256])
def test_hadamard_orthonormal_symmetric_involution(n: int) -> None:
    h = hadamard(n).double()
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(h @ h.T, eye, atol=1e-6)
    assert torch.equal(h, h.T)
    assert torch.allclose(h @ h, eye, atol=1e-6)
    assert set(torch.unique(h.abs()).tolist()) == {float(torch.tensor(1 / n**0.5, dtype=torch.float32))}


def test_rotation_block_sizes() -> None:
    # K: the largest power of two dividing the head size (from 64); V: always 64
    assert [k_rotation_block(d) for d in (64, 128, 192, 256, 320)] == [64, 128, 64, 256, 64]
    assert rotation_block("v", 256) == 64
    assert rotation_block("k", 256) == 256


def test_rotation_gating() -> None:
    assert parse_scheme("q4_0").rotates(64)
    assert not parse_scheme("q4_0:norot").rotates(64)
    assert not parse_scheme("q4_0").rotates(80)  # head size not a multiple of 64
    assert not parse_scheme("f16").rotates(64)  # llama.cpp rotates only quantized caches
    x = torch.from_numpy(outlier_data((9, 192)))
    assert torch.equal(cache_roundtrip(x, parse_scheme("f16"), "k", 64), fake_quant(x, parse_scheme("f16")))


def kv_like(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """K-cache-like rows: unit Gaussian with a few whole outlier channels (x30)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, rng.choice(shape[1], size=3, replace=False)] *= 30
    return torch.from_numpy(x)


@pytest.mark.parametrize("kind,head_dim", [("k", 64), ("v", 64), ("k", 128), ("v", 128)])
def test_rotate_unrotate_is_identity(kind: str, head_dim: int) -> None:
    x = kv_like((17, 3 * head_dim), seed=head_dim)
    block = rotation_block(kind, head_dim)  # type: ignore[arg-type]
    y = rotate(x, block)
    assert not torch.allclose(y, x)
    assert torch.allclose(unrotate(y, block), x, atol=1e-5, rtol=1e-5)
    # per-block norms are preserved (orthonormal), so heads never mix
    nb = x.reshape(17, -1, block).norm(dim=-1)
    assert torch.allclose(y.reshape(17, -1, block).norm(dim=-1), nb, rtol=1e-5)


def test_rotation_spreads_outlier_channels() -> None:
    """Why llama.cpp rotates: with outlier channels (as K caches have), q4_0 after rotation loses
    several times less. (Not a law: a single huge isolated value is spread over its 64-block and
    q4_0's code range -8..7 then clips the opposite-sign half; the sim reproduces that too.)"""
    x = kv_like((64, 192), seed=11)
    for name in ("q4_0", "q4_1", "iq4_nl", "int4"):
        on = cache_roundtrip(x, parse_scheme(name), "k", 64)
        off = cache_roundtrip(x, parse_scheme(name, rotation=False), "k", 64)
        assert (on - x).pow(2).mean() < 0.5 * (off - x).pow(2).mean(), name


def test_oracle_is_the_pinned_gguf_py() -> None:
    """The bit-exact tests above compare against gguf-py 0.19.0, whose reference quantizers compute in
    float32 as ggml's C code does; gguf-py's unreleased master computes Q4_0 in float64, which is no longer
    the same oracle. pyproject.toml pins 0.19.0; a different version must be re-validated, not assumed."""
    from importlib.metadata import version

    assert version("gguf") == "0.19.0"


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_bit_exact_against_gguf(shape: tuple[int, int]) -> None:
    x = outlier_data(shape)
    ref = dequantize(quantize(x, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16)
    assert same_bits(torch_roundtrip(x, "bf16"), ref)
