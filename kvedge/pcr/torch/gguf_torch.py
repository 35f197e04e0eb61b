"""A plain torch float32 forward over a GGUF's own tensors, for the PCR calibration pass.

Weights are read with gguf-py and dequantized to float32 once (`TorchModel.from_gguf`); the forward
follows llama.cpp's graph for the supported architectures closely enough that its next-token
distributions match llama.cpp's at f16 KV (measured in tests/e2e/test_calib_forward.py and reported in
docs/pcr.md). The hook `kv_transform(layer, kind, x)` sees each layer's K (post-RoPE) and V exactly
as the cache stores them, one row of `n_head_kv * head_dim` values per token in the GGUF's channel
order, and returns what attention reads back (e.g. `kvquant.CacheSim`).

Architectures: `llama` (verified on the default model), and on synthetic models of each layout
(tests/e2e/test_architectures.py, docs/measurements/pcr.md): `mistral3` (llama's graph), `qwen2` (Q/K/V
biases, NEOX RoPE), `qwen3` (per-head Q/K RMSNorm before RoPE, NEOX RoPE) and `phi3` (fused QKV and
gate/up matrices, NEOX RoPE) and `gemma3` (embeddings scaled by sqrt(n_embd), per-head Q/K RMSNorm,
post-attention and post-FFN norms, GeGLU with tanh GELU, sliding-window layers with their own RoPE base,
tied output, optional final logit soft-capping). They share one code path, selected by the tensors
present. A sliding window is honoured by refusing sequences longer than it (kvedge's calibration prompts
are far shorter); LongRoPE factors are refused. Anything else raises UnsupportedArchitecture.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import ModelFileError, UnsupportedArchitecture
from ...gguf.archs import ARCHS, ArchSpec, check_architecture  # noqa: F401  (where callers have found them)
from ...gguf.lora import LoraAdapter
from ...gguf.model import K_TRANSFORM_PREFIX, Geometry, read_geometry, read_metadata
from .kvquant import CachePlan, CacheSim, KVTransform, Scheme


@dataclass(frozen=True)
class Hparams:
    """The geometry (read once by `kvedge.gguf.model.read_geometry`) and what the forward adds to it."""

    arch: ArchSpec
    geometry: Geometry
    rope_base: float
    rope_freq_scale: float
    norm_eps: float
    n_vocab: int
    n_swa: int = 0  # sliding-window attention: tokens a key stays visible (0: none)
    swa_layers: tuple[bool, ...] = ()  # per layer: a sliding-window layer (its own RoPE base)
    rope_base_swa: float = 10000.0  # llama.cpp's default where the file states none
    embd_scale: float = 1.0  # gemma3 scales the token embeddings by sqrt(n_embd)
    attn_scale: float | None = None  # the attention's score scale; None: 1/sqrt(head_dim)
    softcap: float = 0.0  # final logit soft-capping (0: none)
    ffn_act: str = "silu"  # silu (SwiGLU) | gelu (GeGLU, tanh approximation)

    @property
    def n_layer(self) -> int:
        return self.geometry.n_layer

    @property
    def n_embd(self) -> int:
        return self.geometry.n_embd

    @property
    def n_head(self) -> int:
        return self.geometry.n_head

    @property
    def n_head_kv(self) -> int:
        return self.geometry.n_head_kv

    @property
    def head_dim_k(self) -> int:
        return self.geometry.head_dim_k

    @property
    def head_dim_v(self) -> int:
        return self.geometry.head_dim_v

    @property
    def n_rot(self) -> int:
        return self.geometry.n_rot


@dataclass
class Linear:
    # Activations stay float32. ggml's CPU backend rounds a matmul's input to the weight's
    # vec_dot_type (q8_1 for Q4_1 weights); emulating that was measured not to bring the forward
    # closer to llama.cpp and made it discontinuous (docs/pcr.md), so it is not modelled.
    weight: Tensor  # [out, in] float32
    bias: Tensor | None = None

    def __call__(self, x: Tensor) -> Tensor:
        y = x @ self.weight.T
        return y + self.bias if self.bias is not None else y


@dataclass
class LoraLinear(Linear):
    """A base Linear plus a low-rank update, as llama.cpp applies an adapter: y = W x + (alpha/r) B (A x).
    Kept unmerged so A and B can be trained (models/canary) or read back."""

    a: Tensor | None = None  # [rank, in]
    b: Tensor | None = None  # [out, rank]
    scale: float = 1.0

    def __call__(self, x: Tensor) -> Tensor:
        return super().__call__(x) + self.scale * ((x @ self.a.T) @ self.b.T)


@dataclass
class Layer:
    attn_norm: Tensor
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    ffn_norm: Tensor
    gate: Linear
    up: Linear
    down: Linear
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None
    attn_post_norm: Tensor | None = None  # gemma3: on the attention's output, before the residual
    ffn_post_norm: Tensor | None = None


@dataclass(frozen=True)
class Output:
    logits: Tensor  # [tokens, n_vocab]
    hidden_per_layer: Tensor  # [n_layer, tokens, n_embd]: the residual stream after each layer


# --- loading -----------------------------------------------------------------------------------------
def _hparams(md: dict[str, Any], n_vocab: int, where: Path | str = "") -> Hparams:
    from gguf import Keys

    arch = check_architecture(md.get(Keys.General.ARCHITECTURE))
    g = read_geometry(md, where)
    if g.per_layer:
        raise UnsupportedArchitecture(f"{g.per_layer[0]} varies per layer: not supported by the torch forward")

    def get(key: str, default: Any = None) -> Any:
        name = key.format(arch=arch.name)
        v = md.get(name, default)
        if v is None:
            raise UnsupportedArchitecture(f"GGUF lacks {name}")
        return v

    def key(k: str, default: Any = None) -> Any:
        return md.get(k.format(arch=arch.name), default)

    n_swa = int(key(Keys.Attention.SLIDING_WINDOW, 0) or 0)
    gemma = arch.name == "gemma3"
    swa_layers: tuple[bool, ...] = ()
    if gemma and n_swa > 0:
        # llama.cpp's load_swa_pattern: a per-layer array, else every n-th layer global (6 by default)
        pattern = key(Keys.Attention.SLIDING_WINDOW_PATTERN, 6)
        if isinstance(pattern, (list, tuple)):
            swa_layers = tuple(bool(x) for x in pattern)
        else:
            n = int(pattern)
            swa_layers = tuple(n == 0 or i % n < n - 1 for i in range(g.n_layer))
    scaling = str(md.get(Keys.Rope.SCALING_TYPE.format(arch=arch.name), "none"))
    if scaling not in ("none", "linear"):
        raise UnsupportedArchitecture(f"RoPE scaling {scaling!r} is not supported by the torch forward")
    factor = float(md.get(Keys.Rope.SCALING_FACTOR.format(arch=arch.name), 0.0) or 0.0)
    return Hparams(
        arch=arch,
        geometry=g,
        rope_base=float(get(Keys.Rope.FREQ_BASE, 10000.0)),
        rope_freq_scale=1.0 / factor if scaling == "linear" and factor > 0 else 1.0,
        norm_eps=float(get(Keys.Attention.LAYERNORM_RMS_EPS)),
        n_vocab=n_vocab,
        n_swa=n_swa,
        swa_layers=swa_layers,
        rope_base_swa=float(key(Keys.Rope.FREQ_BASE_SWA, 10000.0)),
        embd_scale=math.sqrt(g.n_embd) if gemma else 1.0,
        # llama.cpp: 1/sqrt(n_embd / n_head) for Gemma 3 27B (62 layers), else 1/sqrt(head_dim)
        attn_scale=(1.0 / math.sqrt(g.n_embd / g.n_head) if g.n_layer == 62 else None) if gemma else None,
        softcap=float(key(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, 0.0) or 0.0),
        ffn_act="gelu" if gemma else "silu",
    )


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of the file dequantized to float32, shaped as numpy sees ggml's layout
    ([rows, ne0]: a weight matrix is [out, in])."""
    from gguf.quants import dequantize

    out: dict[str, Tensor] = {}
    for t in read_metadata(path)[1]:
        try:
            arr = dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError:
            raise UnsupportedArchitecture(f"gguf-py cannot dequantize {t.name} ({t.tensor_type.name})") from None
        shape = tuple(int(n) for n in reversed([int(x) for x in t.shape]))
        # a copy: the reader's arrays are read-only memory maps
        out[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
    return out


def _merge_adapter(w: dict[str, Tensor], adapter: LoraAdapter, arch: str) -> None:
    if adapter.architecture != arch:
        raise ModelFileError(f"adapter is for {adapter.architecture}, the model is {arch}")
    for name, pair in adapter.pairs.items():
        base = w.get(name)
        delta = torch.from_numpy(pair.delta(adapter.alpha))
        if base is None or tuple(base.shape) != tuple(delta.shape):
            raise ModelFileError(f"adapter tensor {name} does not match the model")
        w[name] = base + delta


def _linear_from(w: dict[str, Tensor], name: str) -> Linear:
    if name + ".weight" not in w:
        raise UnsupportedArchitecture(f"GGUF lacks {name}.weight: not a layout the torch forward knows")
    return Linear(w[name + ".weight"], w.get(name + ".bias"))


def _split(lin: Linear, sizes: list[int]) -> list[Linear]:
    """A fused matrix (rows stacked in `sizes` order, as llama.cpp views them) as separate Linears."""
    ws = torch.split(lin.weight, sizes, dim=0)
    bs = torch.split(lin.bias, sizes) if lin.bias is not None else [None] * len(sizes)
    return [Linear(a.contiguous(), b.contiguous() if b is not None else None) for a, b in zip(ws, bs)]


def _layer(w: dict[str, Tensor], i: int, hp: Hparams) -> Layer:
    def lin(name: str) -> Linear:
        return _linear_from(w, f"blk.{i}.{name}")

    def norm(name: str) -> Tensor:
        key = f"blk.{i}.{name}.weight"
        if key not in w:
            raise UnsupportedArchitecture(f"GGUF lacks {key}: not a layout the torch forward knows")
        return w[key]

    if f"blk.{i}.attn_qkv.weight" in w:  # phi3: one matrix, Q then K then V rows
        q, k, v = _split(lin("attn_qkv"), [hp.n_head * hp.head_dim_k, hp.n_head_kv * hp.head_dim_k,
                                           hp.n_head_kv * hp.head_dim_v])
    else:
        q, k, v = lin("attn_q"), lin("attn_k"), lin("attn_v")
    if f"blk.{i}.ffn_gate.weight" in w:
        gate, up = lin("ffn_gate"), lin("ffn_up")
    else:  # phi3: ffn_up holds gate then up rows; llama.cpp's swiglu takes silu(first half) * second half
        fused = lin("ffn_up")
        gate, up = _split(fused, [fused.weight.shape[0] // 2] * 2)
    return Layer(
        attn_norm=norm("attn_norm"), q=q, k=k, v=v, o=lin("attn_output"),
        ffn_norm=norm("ffn_norm"), gate=gate, up=up, down=lin("ffn_down"),
        q_norm=w.get(f"blk.{i}.attn_q_norm.weight"), k_norm=w.get(f"blk.{i}.attn_k_norm.weight"),
        attn_post_norm=w.get(f"blk.{i}.post_attention_norm.weight"), ffn_post_norm=w.get(f"blk.{i}.post_ffw_norm.weight"),
    )


# --- pieces of the graph -----------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def rope_angles(n_tokens: int, hp: Hparams, freq_factors: Tensor | None, base: float | None = None,
                freq_scale: float | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin [tokens, n_rot/2] as ggml_rope_cache_init builds them: theta starts at the position
    and is multiplied by powf(base, -2/n_rot) once per pair, in float32. `base` and `freq_scale` override
    the model's (a sliding-window layer's own)."""
    base = hp.rope_base if base is None else base
    freq_scale = hp.rope_freq_scale if freq_scale is None else freq_scale
    scale = torch.tensor(math.pow(base, -2.0 / hp.n_rot), dtype=torch.float32)
    theta = torch.arange(n_tokens, dtype=torch.float32)
    cols = []
    for i in range(hp.n_rot // 2):
        t = theta / freq_factors[i] if freq_factors is not None else theta
        cols.append(t * freq_scale)
        theta = theta * scale
    ang = torch.stack(cols, dim=-1)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, n_rot: int, neox: bool) -> Tensor:
    """x: [tokens, heads, head_dim]. Normal mode rotates (2i, 2i+1); NEOX rotates (i, i + n_rot/2);
    channels past n_rot pass through."""
    rot, rest = x[..., :n_rot], x[..., n_rot:]
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:
        x0, x1 = rot[..., : n_rot // 2], rot[..., n_rot // 2 :]
        out = torch.cat([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    else:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, n_head_kv: int, allowed: Tensor | None = None) -> Tensor:
    """q [T, n_head, d_k], k [T, n_kv, d_k], v [T, n_kv, d_v] -> [T, n_head * d_v]. Query head h reads
    KV head h // (n_head / n_kv), as ggml broadcasts. `allowed` [T, T] (query, key) replaces the plain
    causal mask for packed sequences."""
    n_tokens, n_head, d_k = q.shape
    group = n_head // n_head_kv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * (1.0 / math.sqrt(d_k))
    if allowed is None:
        allowed = torch.ones(n_tokens, n_tokens, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).reshape(n_tokens, -1)


@dataclass(frozen=True)
class PackedLayout:
    """Index tensors of a `Packed` row for attention without its dense [N, N] score matrix."""

    n_prefix: int
    own: Tensor  # [S, Lmax] long: packed index of token j of sequence s's own tokens (0 where padded)
    valid: Tensor  # [S, Lmax] bool
    keys_allowed: Tensor  # [S, Lmax, n_prefix + Lmax] bool: the prefix, then the sequence's own tokens causally


def packed_attention(q: Tensor, k: Tensor, v: Tensor, n_head_kv: int, layout: PackedLayout) -> Tensor:
    """`causal_attention` over a `Packed` row with its `allowed` mask, computed block by block: the prefix
    attends causally to itself, each sequence's own tokens to the prefix and causally to themselves. Entries
    the mask removes contribute exp(-inf) = 0 to the dense version, so the two agree up to float summation
    order; this one skips the [N, N] scores (a third of a forward over 40 short prompts)."""
    p = layout.n_prefix
    out = torch.empty(q.shape[0], q.shape[1] * v.shape[-1], dtype=q.dtype)
    if p:
        out[:p] = causal_attention(q[:p], k[:p], v[:p], n_head_kv)
    s_n, l_max = layout.own.shape
    group = q.shape[1] // n_head_kv

    def ctx(x: Tensor) -> Tensor:  # [S, P + Lmax, n_head, d]: the prefix's rows, then the sequence's own
        own = x[layout.own]
        pre = x[:p].unsqueeze(0).expand(s_n, *x[:p].shape)
        return torch.cat([pre, own], dim=1).repeat_interleave(group, dim=2)

    qo = q[layout.own]  # [S, Lmax, n_head, d_k]
    scores = torch.einsum("sqhd,skhd->shqk", qo, ctx(k)) * (1.0 / math.sqrt(q.shape[-1]))
    probs = torch.softmax(scores.masked_fill(~layout.keys_allowed[:, None], float("-inf")), dim=-1)
    att = torch.einsum("shqk,skhd->sqhd", probs, ctx(v)).reshape(s_n, l_max, -1)
    out[layout.own[layout.valid]] = att[layout.valid]
    return out


@dataclass(frozen=True)
class Packed:
    """Several sequences that share a prefix, packed into one row of tokens: the prefix once
    (segment 0), then each sequence's own tokens (segment i + 1). A token attends to the prefix and to
    its own segment up to its position, so every sequence sees exactly what it would alone, while the
    prefix (a chat template's system prompt, most of a short prompt) is computed once. Exact for any
    per-row cache scheme (ggml blocks, intN group-32); a per-channel scheme takes its scales per segment."""

    tokens: Tensor  # [N] long
    pos: Tensor  # [N] long: position within its own sequence
    seg: Tensor  # [N] long
    allowed: Tensor  # [N, N] bool

    @classmethod
    def of(cls, prefix: list[int], suffixes: list[list[int]]) -> "Packed":
        if any(not s for s in suffixes):
            raise ValueError("every packed sequence needs at least one token of its own")
        toks, pos, seg = list(prefix), list(range(len(prefix))), [0] * len(prefix)
        for i, suf in enumerate(suffixes):
            toks += suf
            pos += range(len(prefix), len(prefix) + len(suf))
            seg += [i + 1] * len(suf)
        t, p, g = (torch.as_tensor(v, dtype=torch.long) for v in (toks, pos, seg))
        allowed = (p[None, :] <= p[:, None]) & ((g[None, :] == g[:, None]) | (g[None, :] == 0))
        return cls(t, p, g, allowed)

    @property
    def n_sequences(self) -> int:
        return int(self.seg.max())

    @functools.cached_property
    def layout(self) -> PackedLayout:
        # built as ordinary tensors even when first asked for under inference_mode: the autograd pass
        # (Engine.gradients) indexes with the same layout later
        with torch.inference_mode(False):
            return self._layout()

    def _layout(self) -> PackedLayout:
        n_prefix = int((self.seg == 0).sum())
        owns = [torch.nonzero(self.seg == i + 1).flatten() for i in range(self.n_sequences)]
        l_max = max(len(o) for o in owns)
        own = torch.zeros(len(owns), l_max, dtype=torch.long)
        valid = torch.zeros(len(owns), l_max, dtype=torch.bool)
        for i, o in enumerate(owns):
            own[i, : len(o)], valid[i, : len(o)] = o, True
        causal = torch.ones(l_max, l_max, dtype=torch.bool).tril()
        keys = torch.cat([torch.ones(len(owns), l_max, n_prefix, dtype=torch.bool),
                          causal[None] & valid[:, None, :]], dim=-1)
        return PackedLayout(n_prefix, own, valid, keys)

    def index(self, seq: int, offset: int) -> int:
        """Index in the packed row of token `offset` of sequence `seq` (its prefix included; negative
        offsets count from its end)."""
        n_prefix = int((self.seg == 0).sum())
        own = torch.nonzero(self.seg == seq + 1).flatten()
        full = torch.cat([torch.arange(n_prefix), own])
        return int(full[offset])

    def last(self) -> Tensor:
        """Index of each sequence's last token."""
        return torch.as_tensor([self.index(i, -1) for i in range(self.n_sequences)], dtype=torch.long)


# --- the model ---------------------------------------------------------------------------------------
class TorchModel:
    """A GGUF's weights in float32 and a forward over them. Load once with `from_gguf`."""

    def __init__(self, hp: Hparams, tok_embd: Tensor, layers: list[Layer], out_norm: Tensor, output: Linear,
                 freq_factors: Tensor | None = None, path: Path | None = None):
        self.hp, self.tok_embd, self.layers = hp, tok_embd, layers
        self.out_norm, self.output, self.freq_factors, self.path = out_norm, output, freq_factors, path

    @classmethod
    def from_gguf(cls, path: str | Path, adapter: LoraAdapter | None = None) -> "TorchModel":
        """Load and dequantize once; with `adapter`, its updates are merged into the weights in float32
        (llama.cpp adds them to the dequantized weight in the matmul, which is the same function)."""
        p = Path(path)
        md, _ = read_metadata(p)  # validates the file (ModelFileError on damage)
        if any(k.startswith(K_TRANSFORM_PREFIX) for k in md):
            # the forward would silently simulate the untransformed model
            raise UnsupportedArchitecture(f"{p.name} carries kvedge's K transform ({K_TRANSFORM_PREFIX}*), which the "
                                          "torch pass does not apply: diagnose the original model")
        w = _read_tensors(p)
        if adapter is not None:
            _merge_adapter(w, adapter, str(md.get("general.architecture")))
        if "token_embd.weight" not in w or "output_norm.weight" not in w:
            raise UnsupportedArchitecture(f"GGUF lacks token_embd.weight or output_norm.weight: {p}")
        hp = _hparams(md, n_vocab=w["token_embd.weight"].shape[0], where=p)
        if any(k.endswith(("rope_factors_long.weight", "rope_factors_short.weight")) for k in w):
            raise UnsupportedArchitecture("LongRoPE factors (rope_factors_long/short) are not supported by the torch "
                                          "forward")
        layers = [_layer(w, i, hp) for i in range(hp.n_layer)]
        # tied embeddings when the file has no output matrix (llama.cpp does the same)
        output = _linear_from(w, "output" if "output.weight" in w else "token_embd")
        return cls(hp, w["token_embd.weight"], layers, w["output_norm.weight"], output, w.get("rope_freqs.weight"), p)

    @property
    def verified(self) -> bool:
        return self.hp.arch.verified

    def cache_sim(self, k: Scheme | None, v: Scheme | None, layers: set[int] | None = None,
                  packed: "Packed | None" = None) -> CacheSim:
        """A kv_transform storing K/V under the given schemes on `layers` (default all) and f16 everywhere
        else; pass the `Packed` input a forward will run on so per-channel schemes scale per segment."""
        return self.sim(CachePlan(k, v, frozenset(layers) if layers is not None else None), packed)

    def sim(self, plan: CachePlan, packed: "Packed | None" = None) -> CacheSim:
        return CacheSim(plan, self.hp.head_dim_k, self.hp.head_dim_v, packed.seg if packed is not None else None)

    def _attention(self, i: int, x: Tensor, cos: Tensor, sin: Tensor, kv_transform: KVTransform | None,
                   packed: "Packed | None") -> Tensor:
        hp, ly = self.hp, self.layers[i]
        n = x.shape[0]
        q = ly.q(x).view(n, hp.n_head, hp.head_dim_k)
        k = ly.k(x).view(n, hp.n_head_kv, hp.head_dim_k)
        v = ly.v(x)
        if ly.q_norm is not None:
            q = rms_norm(q, ly.q_norm, hp.norm_eps)
        if ly.k_norm is not None:
            k = rms_norm(k, ly.k_norm, hp.norm_eps)
        q = apply_rope(q, cos, sin, hp.n_rot, hp.arch.rope_neox)
        k = apply_rope(k, cos, sin, hp.n_rot, hp.arch.rope_neox).reshape(n, -1)
        if hp.attn_scale is not None:  # the attention below scales by 1/sqrt(head_dim): carry the difference in Q
            q = q * (hp.attn_scale * math.sqrt(hp.head_dim_k))
        if kv_transform is not None:
            k, v = kv_transform(i, "k", k), kv_transform(i, "v", v)
        k, v = k.view(n, hp.n_head_kv, hp.head_dim_k), v.view(n, hp.n_head_kv, hp.head_dim_v)
        if packed is not None and packed.n_sequences > 1:
            att = packed_attention(q, k, v, hp.n_head_kv, packed.layout)
        else:
            att = causal_attention(q, k, v, hp.n_head_kv, packed.allowed if packed is not None else None)
        out = ly.o(att)
        return rms_norm(out, ly.attn_post_norm, hp.norm_eps) if ly.attn_post_norm is not None else out

    def logits(self, hidden: Tensor) -> Tensor:
        """The output head over residual-stream rows after the last layer."""
        out = self.output(rms_norm(hidden, self.out_norm, self.hp.norm_eps))
        c = self.hp.softcap
        return torch.tanh(out / c) * c if c else out

    def embed(self, ids: Tensor) -> Tensor:
        """The residual stream entering layer 0 (gemma3 scales the embeddings, in float32 as ggml does)."""
        x = self.tok_embd[ids]
        return x * torch.tensor(self.hp.embd_scale, dtype=x.dtype) if self.hp.embd_scale != 1.0 else x

    def _ffn(self, i: int, x: Tensor) -> Tensor:
        ly = self.layers[i]
        gate = ly.gate(x)
        act = (torch.nn.functional.gelu(gate, approximate="tanh") if self.hp.ffn_act == "gelu"
               else torch.nn.functional.silu(gate))
        out = ly.down(act * ly.up(x))
        return rms_norm(out, ly.ffn_post_norm, self.hp.norm_eps) if ly.ffn_post_norm is not None else out

    def _angles(self, n_tokens: int, pos: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each layer's RoPE cos/sin at `pos`: sliding-window layers use their own base and no scaling."""
        hp = self.hp
        glob = rope_angles(n_tokens, hp, self.freq_factors)
        local = rope_angles(n_tokens, hp, self.freq_factors, hp.rope_base_swa, 1.0) if any(hp.swa_layers) else None
        per = [local if hp.swa_layers and hp.swa_layers[i] else glob for i in range(hp.n_layer)]
        return [(c[pos], s[pos]) for c, s in per]

    def forward(
        self,
        tokens: list[int] | Packed,
        kv_transform: KVTransform | None = None,
        *,
        logits_at: Tensor | None = None,
        start_layer: int = 0,
        start_hidden: Tensor | None = None,
        stop_layer: int | None = None,
    ) -> Output:
        """Logits and the residual stream after each layer, for one sequence from position 0 or for
        packed sequences. Differentiable; wrap in torch.inference_mode() when not needed.

        - `logits_at`: token indices whose logits to compute (default all; the 49k-row output matrix
          dominates the cost of a short prompt). Empty: none.
        - `start_layer` with `start_hidden` (the residual stream after layer `start_layer - 1`, e.g.
          from an f16 run): resume there, for runs that change only layers from `start_layer` on.
        - `stop_layer`: stop after that layer (no logits); `hidden_per_layer` then holds layers
          `start_layer..stop_layer`."""
        hp = self.hp
        packed = tokens if isinstance(tokens, Packed) else None
        ids = packed.tokens if packed else torch.as_tensor(tokens, dtype=torch.long)
        pos = packed.pos if packed else torch.arange(len(ids))
        if hp.n_swa and int(pos.max()) + 1 > hp.n_swa:
            raise UnsupportedArchitecture(f"a sequence of {int(pos.max()) + 1} tokens is longer than the model's "
                                          f"sliding window ({hp.n_swa}), which the torch forward does not model")
        angles = self._angles(int(pos.max()) + 1, pos)
        if start_layer and start_hidden is None:
            raise ValueError("start_layer needs start_hidden")
        # at layer 0, start_hidden stands for the embeddings (a leaf to differentiate from)
        x = start_hidden if start_hidden is not None else self.embed(ids)
        last = hp.n_layer - 1 if stop_layer is None else stop_layer
        hidden = []
        for i in range(start_layer, last + 1):
            ly = self.layers[i]
            cos, sin = angles[i]
            x = x + self._attention(i, rms_norm(x, ly.attn_norm, hp.norm_eps), cos, sin, kv_transform, packed)
            x = x + self._ffn(i, rms_norm(x, ly.ffn_norm, hp.norm_eps))
            hidden.append(x)
        if stop_layer is not None:
            # even at the last layer: a run that asked to stop wants no 49k-wide logits over every token
            logits = torch.empty(0, hp.n_vocab)
        else:
            logits = self.logits(x if logits_at is None else x[logits_at])
        return Output(logits=logits, hidden_per_layer=torch.stack(hidden))
