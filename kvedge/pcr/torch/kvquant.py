"""Fake quantization of the KV cache exactly as llama.cpp stores it, in torch float32.

What llama.cpp does to one layer's cache (docs/pcr.md, "What llama.cpp does to the cache"):
- a row is one token's `n_head_kv * head_dim` post-RoPE K (or V) values in the GGUF's channel order;
- a quantized type stores the row in blocks of 32 consecutive values, each with an f16 scale (and an
  f16 minimum for q4_1/q5_1);
- current llama.cpp multiplies Q and K (after RoPE) and V by an orthonormal Walsh-Hadamard matrix when
  that cache is quantized and the head size is a multiple of 64, and rotates the attention output
  back. Because the matrix is orthonormal, attention over a rotated, quantized cache equals attention
  over `unrotate(dequant(quant(rotate(x))))`, which is what `cache_roundtrip` returns.

The ggml block types reproduce gguf-py's numpy reference (`gguf.quants`) bit for bit, operation by
operation in float32 (same divisions, truncations and f16 conversions). iq4_nl, which gguf-py cannot
quantize, reproduces ggml's C reference `quantize_row_iq4_nl_ref` (sequential float32 sums). Tests
check all of them against gguf-py and against the libggml-cpu cache writers themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal

import torch
from torch import Tensor

from ...errors import SchemeError
from ...gguf import kvtypes
from ...gguf.kvmap import KVConfig

QK = 32  # values per block in every ggml type used for the KV cache
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
GGML_BLOCK_TYPES = kvtypes.QUANTIZED  # the quantized cache types llama.cpp accepts
ROTATION_MIN = 64  # llama.cpp rotates only when the head size is a multiple of 64
V_ROTATION_BLOCK = 64  # llama.cpp rotates V in 64-blocks whatever the head size

Granularity = Literal["none", "block32", "channel"]
Kind = Literal["k", "v"]
# what `TorchModel.forward` calls on each layer's cache rows: (layer, "k" | "v", rows) -> rows read back
KVTransform = Callable[[int, str, Tensor], Tensor]

_INT_RE = re.compile(r"^int([2-8])(-channel)?$")


# --- schemes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scheme:
    """How one cache (K or V) is stored. `name` is canonical: f32, f16, a ggml block type, intN or
    intN-channel. `rotation`: whether the runtime rotates (current llama.cpp: yes; older builds and
    `LLAMA_ATTN_ROT_DISABLE=1`: no). It acts only on quantized schemes, as in llama.cpp."""

    name: str
    bits: int
    granularity: Granularity
    rotation: bool = True

    @property
    def quantized(self) -> bool:
        # llama.cpp's `ggml_is_quantized`: f32/f16 caches are never rotated
        return self.granularity != "none"

    @property
    def is_ggml_type(self) -> bool:
        return self.name in kvtypes.NAMES

    @property
    def label(self) -> str:
        if not self.quantized:
            return self.name
        return f"{self.name}{'' if self.rotation else ':norot'}"

    @property
    def bits_per_value(self) -> float:
        """Storage cost: ggml's own block sizes; intN group-32 carries one f16 scale per 32 values;
        the per-channel scales are amortised over the tokens and counted as zero."""
        if self.is_ggml_type:
            return 8.0 * kvtypes.bytes_per_value(self.name)
        return self.bits + (16 / QK if self.granularity == "block32" else 0.0)

    def rotates(self, head_dim: int) -> bool:
        return self.rotation and self.quantized and head_dim % ROTATION_MIN == 0


def parse_scheme(spec: str, rotation: bool | None = None) -> Scheme:
    """`f16`, `bf16`, `q4_0`, `iq4_nl`, `int3`, `int4-channel`; an optional `:rot` / `:norot` suffix sets the
    rotation flag (default on, like current llama.cpp); an explicit `rotation` argument wins."""
    s = spec.strip().lower()
    rot = True
    for suffix, value in ((":norot", False), (":rot", True)):
        if s.endswith(suffix):
            s, rot = s[: -len(suffix)], value
    if rotation is not None:
        rot = rotation
    if s in kvtypes.UNQUANTIZED:
        return Scheme(s, kvtypes.nominal_bits(s), "none", rot)
    if s in GGML_BLOCK_TYPES:
        return Scheme(s, kvtypes.nominal_bits(s), "block32", rot)
    m = _INT_RE.match(s)
    if m:
        return Scheme(s, int(m.group(1)), "channel" if m.group(2) else "block32", rot)
    raise SchemeError(
        f"unknown KV scheme {spec!r}: use {', '.join(kvtypes.NAMES)}, intN or intN-channel "
        "(N in 2..8), optionally with :rot or :norot"
    )


# --- ggml-exact block quantizers (input: [n_blocks, 32] float32; output: dequantized, same shape) ---
def _f16(x: Tensor) -> Tensor:
    return x.to(torch.float16).to(torch.float32)


def _inv(d: Tensor) -> Tensor:
    # numpy: `np.where(d == 0, 0, 1 / d)`
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _signed_absmax(b: Tensor) -> Tensor:
    # the value (with its sign) of largest magnitude, first one on ties, as np.argmax picks it
    idx = b.abs().argmax(dim=-1, keepdim=True)
    return torch.gather(b, -1, idx)


def _roundf(x: Tensor) -> Tensor:
    """C `roundf` (half away from zero), written as gguf-py's `np_roundf` computes it."""
    a = x.abs()
    fl = torch.floor(a)
    r = torch.sign(x) * (fl + torch.floor(2 * (a - fl)))
    return r + 0.0  # -0.0 -> +0.0: ggml stores an integer code, which has no negative zero


def _q_sym(b: Tensor, levels: int) -> Tensor:
    """q4_0 (levels=16) and q5_0 (levels=32): the signed absmax maps to code 0 (-levels/2)."""
    half = levels // 2
    d = _signed_absmax(b) / -half
    q = torch.trunc(b * _inv(d) + (half + 0.5)).clamp(0, levels - 1)
    return _f16(d) * (q - half)


def _q_affine(b: Tensor, levels: int) -> Tensor:
    """q4_1 (levels=16) and q5_1 (levels=32): scale and minimum, both stored as f16."""
    mx = b.max(dim=-1, keepdim=True).values
    mn = b.min(dim=-1, keepdim=True).values
    d = (mx - mn) / (levels - 1)
    q = torch.trunc((b - mn) * _inv(d) + 0.5).clamp(0, levels - 1)
    return _f16(d) * q + _f16(mn)


def _q8_0(b: Tensor) -> Tensor:
    d = b.abs().amax(dim=-1, keepdim=True) / 127
    return _roundf(b * _inv(d)) * _f16(d)


def _iq4_best_index(x: Tensor, values: Tensor) -> Tensor:
    """ggml's `best_index_int8`: nearest table entry, the upper one on exact ties."""
    mu = torch.searchsorted(values, x.contiguous(), right=True).clamp(1, len(values) - 1)
    lo, hi = values[mu - 1], values[mu]
    idx = torch.where(x - lo < hi - x, mu - 1, mu)
    idx = torch.where(x <= values[0], torch.zeros_like(idx), idx)
    return torch.where(x >= values[-1], torch.full_like(idx, len(values) - 1), idx)


def _seq_sum(terms: Tensor) -> Tensor:
    """Sum over the last axis in order j = 0..31 in float32, as the C loop accumulates (a pairwise
    or double-accumulated sum can flip the scale search's comparisons)."""
    acc = terms[..., 0]
    for j in range(1, terms.shape[-1]):
        acc = acc + terms[..., j]
    return acc


def _iq4_sums(b: Tensor, w: Tensor, inv_d: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    q = values[_iq4_best_index(inv_d * b, values)]
    wq = w * q
    return _seq_sum(wq * b), _seq_sum(wq * q)


def _iq4_nl(b: Tensor, ntry: int = -1) -> Tensor:
    """ggml's `quantize_row_iq4_nl_impl` for one 32-block, without importance weights. The KV cache
    is written by `quantize_row_iq4_nl_ref`, which passes ntry = -1: codes from the scale
    max/values[0], then the weighted (w = x^2) least-squares scale for those codes, stored as f16.
    ntry > 0 (the weight quantizer's path) adds the scale search and re-derives the codes."""
    values = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32)
    w = b * b
    amax = b.abs().amax(dim=-1)
    mx = _signed_absmax(b).squeeze(-1)
    zero = amax < 1e-15  # GROUP_MAX_EPS
    mx_safe = torch.where(zero, torch.ones_like(mx), mx)
    d0 = -mx_safe / values[0] if ntry > 0 else mx_safe / values[0]
    codes = _iq4_best_index((1.0 / d0)[:, None] * b, values)
    q = values[codes]
    wq = w * q
    sumqx, sumq2 = _seq_sum(wq * b), _seq_sum(wq * q)
    d = sumqx / sumq2
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        inv_d = (itry + IQ4_NL_VALUES[0]) / mx_safe
        sumqx, sumq2 = _iq4_sums(b, w, inv_d[:, None], values)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    d = torch.where(zero, torch.zeros_like(d), d)
    if ntry > 0:
        codes = _iq4_best_index(_inv(d)[:, None] * b, values)
    return _f16(d)[:, None] * values[codes]


_BLOCK_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "q8_0": _q8_0,
    "q4_0": lambda b: _q_sym(b, 16),
    "q5_0": lambda b: _q_sym(b, 32),
    "q4_1": lambda b: _q_affine(b, 16),
    "q5_1": lambda b: _q_affine(b, 32),
    "iq4_nl": _iq4_nl,
}
assert set(_BLOCK_FNS) == set(GGML_BLOCK_TYPES), "a quantized cache type has no quantizer"


# --- generic intN ----------------------------------------------------------------------------------
def int_levels(bits: int) -> int:
    """Largest code magnitude of symmetric intN: codes are -qmax..qmax, 2**bits - 1 levels."""
    return 2 ** (bits - 1) - 1


def _int_sym(x: Tensor, bits: int, dim: int) -> Tensor:
    """Symmetric round-to-nearest over groups along `dim`: d = absmax / qmax in float32, codes
    roundf(x / d) in [-qmax, qmax], d stored as f16 (as ggml stores block scales). int8 group-32 is
    therefore q8_0 exactly."""
    qmax = int_levels(bits)
    d = x.abs().amax(dim=dim, keepdim=True) / qmax
    q = _roundf(x * _inv(d)).clamp(-qmax, qmax)
    return q * _f16(d)


# --- public quantize-dequantize --------------------------------------------------------------------
def _blocks(x: Tensor) -> Tensor:
    if x.shape[-1] % QK:
        raise SchemeError(f"a cache row of {x.shape[-1]} values is not a whole number of {QK}-blocks")
    return x.reshape(-1, QK)


def fake_quant(x: Tensor, scheme: Scheme) -> Tensor:
    """`dequant(quant(x))` for cache rows `x` of shape [..., tokens, row] (no rotation here).
    Per-channel schemes take one scale per channel over the tokens axis (-2)."""
    x = x.to(torch.float32)
    if scheme.name == "f32":
        return x
    if scheme.name == "f16":
        return _f16(x)
    if scheme.name == "bf16":
        return x.to(torch.bfloat16).to(torch.float32)  # round to nearest even, as ggml's fp32->bf16
    if scheme.granularity == "channel":
        if x.dim() < 2:
            raise SchemeError("a per-channel scheme needs [tokens, row] input")
        return _int_sym(x, scheme.bits, dim=-2)
    blocks = _blocks(x)
    fn = _BLOCK_FNS.get(scheme.name)
    out = fn(blocks) if fn is not None else _int_sym(blocks, scheme.bits, dim=-1)
    return out.reshape(x.shape)


# --- attention rotation ----------------------------------------------------------------------------
@lru_cache(maxsize=8)
def hadamard(n: int) -> Tensor:
    """ggml's `ggml_gen_hadamard`: Sylvester construction scaled by 1/sqrtf(n), float32; symmetric,
    orthonormal, its own inverse."""
    if n < 1 or n & (n - 1):
        raise SchemeError(f"a Walsh-Hadamard matrix needs a power-of-two size, not {n}")
    h = torch.full((1, 1), 1.0 / float(torch.tensor(float(n)).sqrt()), dtype=torch.float32)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def k_rotation_block(head_dim: int) -> int:
    """llama.cpp `build_input_k_rot`: the largest power of two dividing the head size (at least 64)."""
    n = ROTATION_MIN
    while head_dim % (n * 2) == 0:
        n *= 2
    return n


def rotation_block(kind: Kind, head_dim: int) -> int:
    return k_rotation_block(head_dim) if kind == "k" else V_ROTATION_BLOCK


def _apply_blocks(x: Tensor, m: Tensor) -> Tensor:
    # float64 then back: unrotate(rotate(x)) returns x to the last bit, so a simulation adds no
    # float32 noise of its own and rotation on/off comparisons isolate the quantization
    # (this 135M model turns 1e-7 input noise into 1e-4 logit noise over 30 layers)
    block = m.shape[0]
    y = x.to(torch.float64).reshape(*x.shape[:-1], -1, block) @ m.to(torch.float64)
    return y.reshape(x.shape).to(torch.float32)


def rotate(x: Tensor, block: int) -> Tensor:
    """Multiply each run of `block` consecutive values along the last axis by H (ggml_mul_mat_aux
    reshapes the row to [block, n/block] and left-multiplies). Blocks never straddle heads because
    the block size divides the head size."""
    return _apply_blocks(x, hadamard(block).T)


def unrotate(x: Tensor, block: int) -> Tensor:
    return _apply_blocks(x, hadamard(block))


def cache_roundtrip(x: Tensor, scheme: Scheme, kind: Kind, head_dim: int) -> Tensor:
    """What attention effectively reads back from a cache that stored rows `x` ([tokens, row]) under
    `scheme`: with rotation, H^T dequant(quant(H x)) per head block (llama.cpp rotates Q by the same
    H, so q . H^T y = (H q) . y)."""
    if not scheme.rotates(head_dim):
        return fake_quant(x, scheme)
    block = rotation_block(kind, head_dim)
    return unrotate(fake_quant(rotate(x, block), scheme), block)


def cache_roundtrip_segments(x: Tensor, scheme: Scheme, kind: Kind, head_dim: int, segments: Tensor | None) -> Tensor:
    """`cache_roundtrip` for packed rows (`segments`: [tokens] ids from a `Packed` forward): a per-channel
    scheme takes its scales per segment; per-row schemes never look across rows, so they need none."""
    if scheme.granularity != "channel" or segments is None:
        return cache_roundtrip(x, scheme, kind, head_dim)
    out = torch.empty_like(x, dtype=torch.float32)
    for seg in torch.unique(segments):
        rows = segments == seg
        out[rows] = cache_roundtrip(x[rows], scheme, kind, head_dim)
    return out


SCHEME_F16 = Scheme("f16", 16, "none")


def cache_scheme(type_name: str, rotation: bool) -> Scheme | None:
    """The scheme of a llama.cpp cache type (None: f16). An f32 cache is simulated as f16: llama.cpp's
    flash attention reads K and V as f16 whatever the cache stores (measured: f32 and f16 caches give
    identical logits, docs/pcr.md)."""
    return None if type_name in ("f16", "f32") else parse_scheme(type_name, rotation)


LayerSchemes = tuple[tuple[int, "Scheme | None"], ...]  # (layer, scheme); None stores f16


@dataclass(frozen=True)
class CachePlan:
    """Which scheme stores K and V on which layers (`layers` None: all). `k_at` / `v_at` give single layers
    a scheme of their own (a per-layer KV map), within `layers` too. Every other layer's cache, and a
    scheme that is None, is f16: what llama.cpp's unquantized cache stores.

    A map of llama.cpp cache types is a `KVConfig` (kvedge.gguf.kvmap); `CachePlan.of` turns one into the
    simulation's plan. Direct construction is for schemes llama.cpp lacks (intN, intN-channel)."""

    k: Scheme | None = None
    v: Scheme | None = None
    layers: frozenset[int] | None = None
    k_at: LayerSchemes = ()
    v_at: LayerSchemes = ()

    @classmethod
    def of(cls, config: KVConfig, rotation: bool, k: bool = True, v: bool = True,
           layers: frozenset[int] | None = None) -> "CachePlan":
        """`config` (uniform or per layer) under a rotation setting: its K and/or V (the other cache f16),
        on `layers` only if given."""
        def own(overrides: tuple[tuple[int, str], ...]) -> LayerSchemes:
            return tuple((l, cache_scheme(t, rotation)) for l, t in overrides)

        return cls(cache_scheme(config.type_k, rotation) if k else None,
                   cache_scheme(config.type_v, rotation) if v else None, layers,
                   own(config.layers_k) if k else (), own(config.layers_v) if v else ())

    def stored_at(self, layer: int, kind: str) -> Scheme | None:
        """The scheme one layer's K or V cache stores, None where that is f16 (the reference's own cache)."""
        s = self.scheme(layer, kind)
        return None if s.name == "f16" else s

    def scheme(self, layer: int, kind: str) -> Scheme:
        if self.layers is not None and layer not in self.layers:
            return SCHEME_F16
        s = self.k if kind == "k" else self.v
        for at, own in self.k_at if kind == "k" else self.v_at:
            if at == layer:
                s = own
        return SCHEME_F16 if s is None else s

    @property
    def first_layer(self) -> int:
        """A layer at or before the first whose cache differs from the all-f16 plan's."""
        if self.layers:
            return min(self.layers)
        if self.k is not None or self.v is not None:
            return 0
        own = [l for l, s in self.k_at + self.v_at if s is not None]
        return min(own) if own else 0


@dataclass(frozen=True, eq=False)
class CacheSim:
    """A `KVTransform` for `TorchModel.forward`: each layer's K and V stored as `plan` says.
    `segments` ([tokens] ids, from a `Packed` forward) makes per-channel schemes take their scales
    per segment rather than over the whole packed row; per-row schemes do not need it."""

    plan: CachePlan
    head_dim_k: int
    head_dim_v: int
    segments: Tensor | None = None

    def __call__(self, layer: int, kind: str, x: Tensor) -> Tensor:
        k = kind == "k"
        return cache_roundtrip_segments(x, self.plan.scheme(layer, kind), "k" if k else "v",
                                        self.head_dim_k if k else self.head_dim_v, self.segments)
