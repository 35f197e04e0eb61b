"""How faithfully the torch simulation reproduces llama.cpp on this run's calibration set (docs/pcr.md,
"Fidelity"): at f16, next-token top-1 agreement and KLD; for the audited quantized cache, the effect
(KLD vs f16) on each side, their ratio and the rank correlation of per-prompt KLDs, per rotation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..gguf.model import ModelInfo
from ..llama.runtime import KVConfig, Runtime, RuntimeOptions
from ..results.pcr import Fidelity, FidelityTargets, QuantFidelity
from .calibset import CalibSet
from .stats import kld, spearman

F16_TOP1_TARGET = 0.99
F16_KLD_TARGET = 0.01
RATIO_RANGE = (0.5, 2.0)
SPEARMAN_TARGET = 0.5


TARGETS = FidelityTargets(F16_TOP1_TARGET, F16_KLD_TARGET, RATIO_RANGE, SPEARMAN_TARGET)


def quant_meets_target(ratio: float | None, rho: float | None) -> bool:
    return (ratio is not None and RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]
            and rho is not None and rho >= SPEARMAN_TARGET)


def fidelity(f16_top1: float, f16_kld: float, n_positions: int, quantized: tuple[QuantFidelity, ...],
             verified_architecture: bool) -> Fidelity:
    return Fidelity(f16_top1, f16_kld, n_positions, quantized, verified_architecture,
                    f16_top1 >= F16_TOP1_TARGET and f16_kld < F16_KLD_TARGET, TARGETS)


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
    ratio, rho = sm / lm if lm > 0 else None, spearman(lk, sk)
    return QuantFidelity(rotation, lm, sm, ratio, rho, len(lk), quant_meets_target(ratio, rho))
