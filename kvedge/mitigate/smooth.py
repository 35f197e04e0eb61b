"""Channel smoothing of the KV cache: an exact reparametrisation, as pure functions.

The cache stores `x / s` instead of `x`, per channel, and attention multiplies `s` back where it reads:
- K: each RoPE pair of a KV head's key channels is divided by one `s_p` (RoPE rotates the two channels of
  a pair together, so a common factor passes through it), and the same pair's query channels are
  multiplied by `s_p` in every query head that reads that KV head (GQA). `q . k` is unchanged. Both are
  rows of `attn_k` / `attn_q` (and their biases). With a per-head K/Q RMSNorm before RoPE (qwen3), the
  norm would undo a scale of `attn_k`, so the norm weights carry it instead, one factor per channel shared
  by all heads.
- V: each channel of a KV head is divided by `s_c` (rows of `attn_v` and its bias); attention output is
  linear in V, so the matching input columns of `attn_output` are multiplied by `s_c` for every query
  head of the group.

Every `s` is a power of two, `2^e`: multiplying a float by it is exact, so the rows of a block-quantized
weight scale exactly through their blocks' f16 scales (gguf_patch.py), and the model computes what it
computed before. Which channels to shrink, and by how much, comes from the calibration prompts' cache
statistics (`exponents`); the recipe is chosen in simulation (simulate.py). docs/mitigation.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np

# architectures whose layout channel smoothing cannot rescale exactly yet, and why
UNSMOOTHABLE = {"phi3": "its Q, K and V share one fused matrix (attn_qkv), which channel smoothing does not rescale"}
MAX_EXPONENT = 8  # |e| <= 8: a 256x shrink already flattens any outlier a calibration set shows

Kind = Literal["k", "v"]
Axis = Literal["rows", "cols"]


@dataclass(frozen=True)
class Geometry:
    """What the reparametrisation needs to know of an attention layer."""

    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_rot: int  # RoPE acts on the first n_rot channels of a head; the rest pass through
    rope_neox: bool  # pairs (i, i + n_rot/2) instead of (2i, 2i + 1)
    kq_norm: bool = False  # per-head K/Q RMSNorm before RoPE (qwen3)

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_head // self.n_head_kv

    def head_dim(self, kind: Kind) -> int:
        return self.head_dim_k if kind == "k" else self.head_dim_v


def channel_groups(g: Geometry, kind: Kind) -> list[tuple[int, ...]]:
    """Channels of one head that must share a scale: RoPE pairs of K (channels past n_rot alone); every V
    channel alone."""
    hd = g.head_dim(kind)
    if kind == "v":
        return [(c,) for c in range(hd)]
    half = g.n_rot // 2
    pairs = [(i, i + half) if g.rope_neox else (2 * i, 2 * i + 1) for i in range(half)]
    return pairs + [(c,) for c in range(g.n_rot, hd)]


def exponents(absmax: np.ndarray, kind: Kind, alpha: float, g: Geometry) -> np.ndarray:
    """Power-of-two exponents `e` (the cache stores x / 2^e) for one layer's cache channels, from each
    channel's abs-max over the calibration tokens ([n_head_kv * head_dim]).

    Per head, each group (a RoPE pair, or one channel) has abs-max `a` = the largest of its channels;
    `e = round(alpha * log2(a / median))`, the median over the head's groups: alpha 0 changes nothing,
    alpha 1 brings every group's abs-max to the head's median (up to the power-of-two rounding). A
    quantized block only compares channels of one head, so the head is the reference. With a K norm
    (qwen3) one exponent serves every head, from the largest abs-max across heads."""
    hd = g.head_dim(kind)
    a = np.asarray(absmax, dtype=np.float64).reshape(g.n_head_kv, hd)
    shared = kind == "k" and g.kq_norm
    if shared:
        a = a.max(axis=0, keepdims=True)
    groups = channel_groups(g, kind)
    ga = np.stack([a[:, list(grp)].max(axis=1) for grp in groups], axis=1)  # [heads, groups]
    ref = np.median(ga, axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.round(alpha * np.log2(ga / ref))
    e = np.where(np.isfinite(e) & (ga > 0) & (ref > 0), e, 0.0)
    e = np.clip(e, -MAX_EXPONENT, MAX_EXPONENT).astype(np.int64)
    out = np.zeros_like(a, dtype=np.int64)
    for j, grp in enumerate(groups):
        out[:, list(grp)] = e[:, j : j + 1]
    if shared:
        out = np.repeat(out, g.n_head_kv, axis=0)
    return out.reshape(-1)


@dataclass(frozen=True)
class Smoothing:
    """The exponents per (layer, cache): the cache stores x / 2^e channel by channel. Layers and caches
    not named are left alone."""

    exps: Mapping[tuple[int, str], tuple[int, ...]]

    @classmethod
    def of(cls, exps: Mapping[tuple[int, str], np.ndarray]) -> "Smoothing":
        kept = {k: tuple(int(x) for x in v) for k, v in sorted(exps.items()) if np.any(np.asarray(v) != 0)}
        return cls(kept)

    def scale(self, layer: int, kind: str) -> np.ndarray | None:
        e = self.exps.get((layer, kind))
        return None if e is None else np.exp2(np.asarray(e, dtype=np.float64))

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.exps})

    def to_json(self) -> str:
        return json.dumps({f"{l}.{k}": list(e) for (l, k), e in self.exps.items()}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Smoothing":
        raw = json.loads(text)
        return cls({(int(key.split(".")[0]), key.split(".")[1]): tuple(int(x) for x in v) for key, v in raw.items()})


@dataclass(frozen=True)
class TensorScale:
    """Multiply one GGUF tensor by powers of two: `rows` scales its output channels (whole rows, exact in
    any block type), `cols` its input channels (cuts across blocks). A 1-D tensor (bias, norm) has one
    row per element."""

    name: str
    axis: Axis
    exps: tuple[int, ...]


def _per_query_head(e_kv: np.ndarray, g: Geometry, hd: int) -> np.ndarray:
    """A KV head's channel exponents repeated for each query head that reads it (query head h reads KV
    head h // group, as ggml broadcasts)."""
    return np.repeat(e_kv.reshape(g.n_head_kv, 1, hd), g.group, axis=1).reshape(-1)


def tensor_scales(sm: Smoothing, g: Geometry, present: set[str] | frozenset[str]) -> list[TensorScale]:
    """The tensors to rescale so that the model computes what it computed before, with the cache storing
    x / 2^e. `present`: the GGUF's tensor names (biases and norms are scaled where they exist)."""
    out: list[TensorScale] = []

    def add(name: str, axis: Axis, e: np.ndarray) -> None:
        if name in present:
            out.append(TensorScale(name, axis, tuple(int(x) for x in e)))

    for (layer, kind), e in sm.exps.items():
        e = np.asarray(e, dtype=np.int64)
        blk = f"blk.{layer}"
        if f"{blk}.attn_qkv.weight" in present:  # scaling half a fused matrix's rows would not be exact
            raise ValueError(f"{blk}.attn_qkv is fused: channel smoothing rescales separate Q, K and V matrices")
        hd = g.head_dim(kind)
        if kind == "k" and g.kq_norm:
            # the norm weights follow RoPE's channel layout within a head, shared by all heads
            add(f"{blk}.attn_k_norm.weight", "rows", -e[:hd])
            add(f"{blk}.attn_q_norm.weight", "rows", e[:hd])
        elif kind == "k":
            for suffix in ("weight", "bias"):
                add(f"{blk}.attn_k.{suffix}", "rows", -e)
                add(f"{blk}.attn_q.{suffix}", "rows", _per_query_head(e, g, hd))
        else:
            for suffix in ("weight", "bias"):
                add(f"{blk}.attn_v.{suffix}", "rows", -e)
            add(f"{blk}.attn_output.weight", "cols", _per_query_head(e, g, hd))
    return out


def adapter_scales(base: list[TensorScale], adapter_tensors: set[str] | frozenset[str]) -> list[TensorScale]:
    """The same rescaling for a LoRA adapter, so that patched base + patched adapter computes what base +
    adapter computed: llama.cpp adds (alpha/r) B A to the weight, so scaling the weight's rows scales B's
    rows (`<name>.lora_b`, [n_out, rank]) and scaling its columns scales A's columns (`<name>.lora_a`,
    [rank, n_in])."""
    out = []
    for ts in base:
        half = f"{ts.name}.lora_b" if ts.axis == "rows" else f"{ts.name}.lora_a"
        if half in adapter_tensors:
            out.append(TensorScale(half, ts.axis, ts.exps))
    return out
