"""Torch runs of the calibration set under cache plans: which scheme stores K and V at which layer.

Every run is one packed forward (the shared chat-template prefix once, then each prompt's own tokens);
runs that change only layers from `l` on resume from the f16 reference's residual stream at `l`, and
runs that only need the safety signal stop at the readout layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .calibset import CalibSet
from .torch.gguf_torch import Packed, TorchModel
from .torch.kvquant import CachePlan, KVTransform


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

    def _transform(self, plan: CachePlan, keep: dict[tuple[int, str], Tensor] | None = None) -> KVTransform:
        """The plan's cache simulation; with `keep`, the rows handed to it are kept for autograd."""
        sim = self.tm.sim(plan, self.packed)
        if keep is None:
            return sim

        def keeping(layer: int, kind: str, x: Tensor) -> Tensor:
            x.retain_grad()
            keep[(layer, kind)] = x
            return sim(layer, kind, x)

        return keeping

    def reference(self) -> Tensor:
        """All layers' residual streams (all tokens) under the f16 plan, computed once."""
        if self.ref_hidden is None:
            with torch.inference_mode():
                out = self.tm.forward(self.packed, self._transform(CachePlan()), logits_at=torch.empty(0, dtype=torch.long))
            self.ref_hidden = out.hidden_per_layer
            self.runs += 1
        return self.ref_hidden

    def run(self, plan: CachePlan, readout: int, full: bool) -> RunResult:
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
        # a plan that starts past the readout layer cannot move the signal: the reference's is exact
        hidden = ref[readout] if start > readout else out.hidden_per_layer[readout - start]
        return RunResult(hidden[self.last], out.logits if full else None)

    def gradients(self, direction: Tensor, readout: int, harmful: Tensor) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
        """For every layer up to the readout and K/V: (cache rows, d gap / d rows) under the f16 plan,
        where gap = mean harmful <h, r> - mean harmless <h, r> at the readout layer."""
        keep: dict[tuple[int, str], Tensor] = {}
        x0 = self.tm.embed(self.packed.tokens).clone().requires_grad_(True)
        out = self.tm.forward(self.packed, self._transform(CachePlan(), keep), start_hidden=x0, stop_layer=readout)
        s = out.hidden_per_layer[readout][self.last] @ direction
        gap = s[harmful].mean() - s[~harmful].mean()
        gap.backward()
        self.runs += 1
        return {key: (x.detach(), x.grad.detach() if x.grad is not None else torch.zeros_like(x))
                for key, x in keep.items()}

    def continuation_logits(self, plan: CachePlan,
                            wrap: Callable[[KVTransform], KVTransform] | None = None) -> list[Tensor]:
        """Per prompt, logits [len(continuation), V] at the last prompt token and at each teacher-forced
        token of llama.cpp's greedy continuation but the last: the positions the fidelity check compares.
        `wrap` changes what the plan's cache simulation does (e.g. a reparametrisation around it)."""
        n = len(self.cal.prefix)
        suffixes = [list(p.tokens[n:]) + list(p.continuation[:-1]) for p in self.cal.prompts]
        packed = Packed.of(list(self.cal.prefix), suffixes)
        idx = [[packed.index(i, j) for j in range(-len(p.continuation), 0)] for i, p in enumerate(self.cal.prompts)]
        transform = self.tm.sim(plan, packed)
        if wrap is not None:
            transform = wrap(transform)
        flat = torch.as_tensor([i for row in idx for i in row], dtype=torch.long)
        with torch.inference_mode():
            logits = self.tm.forward(packed, transform, logits_at=flat).logits
        self.runs += 1
        return list(torch.split(logits, [len(r) for r in idx]))
