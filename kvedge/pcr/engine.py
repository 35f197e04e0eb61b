"""Torch runs of the calibration set under cache plans: which scheme stores K and V at which layer.

Every run is one packed forward (the shared chat-template prefix once, then each prompt's own tokens);
runs that change only layers from `l` on resume from the f16 reference's residual stream at `l`, and
runs that only need the safety signal stop at the readout layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..calib.gguf_torch import Packed, TorchModel
from ..calib.kvquant import Scheme, cache_roundtrip_segments, parse_scheme
from .calibset import CalibSet

F16 = parse_scheme("f16")


@dataclass(frozen=True)
class Plan:
    """K and V schemes on `layers` (None: all); every other layer's cache is f16, as llama.cpp's
    unquantized cache. A None scheme keeps that cache f16 everywhere."""

    k: Scheme | None = None
    v: Scheme | None = None
    layers: frozenset[int] | None = None

    def scheme(self, layer: int, kind: str) -> Scheme:
        s = self.k if kind == "k" else self.v
        if s is None or (self.layers is not None and layer not in self.layers):
            return F16
        return s

    @property
    def first_layer(self) -> int:
        return min(self.layers) if self.layers else 0


@dataclass
class _Transform:
    plan: Plan
    head_dim_k: int
    head_dim_v: int
    segments: Tensor
    keep: dict[tuple[int, str], Tensor] | None = None  # rows handed to attention, for autograd

    def __call__(self, layer: int, kind: str, x: Tensor) -> Tensor:
        scheme = self.plan.scheme(layer, kind)
        head_dim = self.head_dim_k if kind == "k" else self.head_dim_v
        if self.keep is not None:
            x.retain_grad()
            self.keep[(layer, kind)] = x
        return cache_roundtrip_segments(x, scheme, kind, head_dim, self.segments)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RunResult:
    signal_hidden: Tensor  # [prompts, d]: residual stream at the readout layer, last prompt token
    logits: Tensor | None  # [prompts, vocab] at the last prompt token (None for truncated runs)


@dataclass
class Engine:
    tm: TorchModel
    cal: CalibSet
    packed: Packed = field(init=False)
    last: Tensor = field(init=False)
    ref_hidden: Tensor | None = field(init=False, default=None)  # [n_layer, N, d] under the f16 plan
    runs: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        n = len(self.cal.prefix)
        self.packed = Packed.of(list(self.cal.prefix), [list(p.tokens[n:]) for p in self.cal.prompts])
        self.last = self.packed.last()

    def _transform(self, plan: Plan, keep: dict | None = None) -> _Transform:
        hp = self.tm.hp
        return _Transform(plan, hp.head_dim_k, hp.head_dim_v, self.packed.seg, keep)

    def reference(self) -> Tensor:
        """All layers' residual streams (all tokens) under the f16 plan, computed once."""
        if self.ref_hidden is None:
            with torch.inference_mode():
                out = self.tm.forward(self.packed, self._transform(Plan()), logits_at=torch.empty(0, dtype=torch.long))
            self.ref_hidden = out.hidden_per_layer
            self.runs += 1
        return self.ref_hidden

    def run(self, plan: Plan, readout: int, full: bool) -> RunResult:
        """`full`: to the last layer with next-token logits; else stop at `readout`. Resumes from the
        reference at the plan's first layer."""
        ref = self.reference()
        start = plan.first_layer
        if not full and start > readout:
            return RunResult(ref[readout][self.last], None)  # the plan cannot reach the readout
        kw = dict(start_layer=start, start_hidden=ref[start - 1]) if start else {}
        with torch.inference_mode():
            out = self.tm.forward(self.packed, self._transform(plan), logits_at=self.last if full else None,
                                  stop_layer=None if full else readout, **kw)
        self.runs += 1
        return RunResult(out.hidden_per_layer[readout - start][self.last], out.logits if full else None)

    def gradients(self, direction: Tensor, readout: int, harmful: Tensor) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
        """For every layer up to the readout and K/V: (cache rows, d gap / d rows) under the f16 plan,
        where gap = mean harmful <h, r> - mean harmless <h, r> at the readout layer."""
        keep: dict[tuple[int, str], Tensor] = {}
        x0 = self.tm.tok_embd[self.packed.tokens].clone().requires_grad_(True)
        out = self.tm.forward(self.packed, self._transform(Plan(), keep), start_hidden=x0, stop_layer=readout)
        s = out.hidden_per_layer[readout][self.last] @ direction
        gap = s[harmful].mean() - s[~harmful].mean()
        gap.backward()
        self.runs += 1
        return {key: (x.detach(), x.grad.detach() if x.grad is not None else torch.zeros_like(x))
                for key, x in keep.items()}

    def continuation_logits(self, plan: Plan) -> list[Tensor]:
        """Per prompt, logits [len(continuation), V] at the last prompt token and at each teacher-forced
        token of llama.cpp's greedy continuation but the last: the positions the fidelity check compares."""
        n = len(self.cal.prefix)
        suffixes = [list(p.tokens[n:]) + list(p.continuation[:-1]) for p in self.cal.prompts]
        packed = Packed.of(list(self.cal.prefix), suffixes)
        idx = [[packed.index(i, j) for j in range(-len(p.continuation), 0)] for i, p in enumerate(self.cal.prompts)]
        hp = self.tm.hp
        transform = _Transform(plan, hp.head_dim_k, hp.head_dim_v, packed.seg)
        flat = torch.as_tensor([i for row in idx for i in row], dtype=torch.long)
        with torch.inference_mode():
            logits = self.tm.forward(packed, transform, logits_at=flat).logits
        self.runs += 1
        return list(torch.split(logits, [len(r) for r in idx]))
