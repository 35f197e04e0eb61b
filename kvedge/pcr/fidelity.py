"""How faithfully the torch simulation reproduces llama.cpp on this run's calibration set (docs/pcr.md,
"Fidelity"): at f16, next-token top-1 agreement and KLD; for the audited quantized cache, the effect
(KLD vs f16) on each side, their ratio and the rank correlation of per-prompt KLDs, per rotation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..gguf.model import ModelInfo
from ..llama.runtime import KVConfig, Runtime, RuntimeOptions
from .calibset import CalibSet
from .stats import kld, spearman

F16_TOP1_TARGET = 0.99
F16_KLD_TARGET = 0.01
RATIO_RANGE = (0.5, 2.0)
SPEARMAN_TARGET = 0.5


@dataclass(frozen=True)
class QuantFidelity:
    rotation: bool
    llama_kld: float  # mean over positions of KL(llama.cpp f16 || llama.cpp quantized)
    sim_kld: float  # the same for the torch simulation
    ratio: float | None  # sim / llama.cpp
    spearman: float | None  # of per-prompt mean KLDs
    n_prompts: int

    @property
    def meets_target(self) -> bool:
        return (self.ratio is not None and RATIO_RANGE[0] <= self.ratio <= RATIO_RANGE[1]
                and self.spearman is not None and self.spearman >= SPEARMAN_TARGET)


@dataclass(frozen=True)
class Fidelity:
    f16_top1: float
    f16_kld: float
    n_positions: int
    quantized: tuple[QuantFidelity, ...]
    verified_architecture: bool

    @property
    def f16_meets_target(self) -> bool:
        return self.f16_top1 >= F16_TOP1_TARGET and self.f16_kld < F16_KLD_TARGET

    def to_dict(self) -> dict:
        d = asdict(self)
        d["f16_meets_target"] = self.f16_meets_target
        d["quantized"] = [asdict(q) | {"meets_target": q.meets_target} for q in self.quantized]
        d["targets"] = {"f16_top1": F16_TOP1_TARGET, "f16_kld": F16_KLD_TARGET, "ratio": list(RATIO_RANGE),
                        "spearman": SPEARMAN_TARGET}
        return d


def llama_logits(model: ModelInfo, lora: Path | None, cal: CalibSet, kv: KVConfig, rotation: bool,
                 options: RuntimeOptions) -> list[torch.Tensor]:
    """llama.cpp's logits at the positions `Engine.continuation_logits` computes, per prompt."""
    out = []
    with Runtime(model, kv, rotation, options, lora) as rt:
        for p in cal.prompts:
            out.append(torch.from_numpy(np.stack(list(rt.score(list(p.tokens), list(p.continuation))))))
    return out


def _per_prompt_kld(ref: list[torch.Tensor], other: list[torch.Tensor]) -> list[float]:
    return [float(kld(a, b).mean()) for a, b in zip(ref, other)]


def f16_agreement(llama_f16: list[torch.Tensor], sim_f16: list[torch.Tensor]) -> tuple[float, float, int]:
    a, b = torch.cat(llama_f16), torch.cat(sim_f16)
    top1 = float((a.argmax(-1) == b.argmax(-1)).double().mean())
    return top1, float(kld(a, b).mean()), a.shape[0]


def quant_fidelity(rotation: bool, llama_f16, llama_q, sim_f16, sim_q) -> QuantFidelity:
    lk, sk = _per_prompt_kld(llama_f16, llama_q), _per_prompt_kld(sim_f16, sim_q)
    # position-weighted means, as the f16 figures
    n = [len(x) for x in llama_f16]
    lm = float(np.average(lk, weights=n))
    sm = float(np.average(sk, weights=n))
    return QuantFidelity(rotation, lm, sm, sm / lm if lm > 0 else None, spearman(lk, sk), len(lk))
