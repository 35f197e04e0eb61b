"""The export's check of its own output, through llama.cpp: the patched model (with its patched adapter)
at f16 KV must agree with the original at least as well as the original agrees with itself when only
its arithmetic changes (the audit's noise run: flash attention off). Both measured on the same positions
of the calibration prompts (each prompt's last token and its greedy f16 continuation): mean next-token
KLD against the original's f16 logits must not exceed the noise run's, and top-1 disagreements must not
exceed the noise run's beyond `noise.judge`'s exact test (a position where the top-2 logits nearly tie
flips under any change of arithmetic, so 2 against 1 of 160 is not a difference).

The smoothing is bit-exact where every scaled tensor keeps its own type; a tensor written wider (f32
`attn_output` for V smoothing, an f16 LoRA half whose scaled values would fall into subnormals) is
multiplied by llama.cpp with other rounding, which is what this check bounds."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..audit.noise import Flips, Judgement, judge
from ..gguf.model import ModelInfo
from ..llama.runtime import F16, RuntimeOptions
from ..pcr.calibset import CalibSet
from ..pcr.fidelity import f16_agreement, llama_logits
from ..registry import NOISE_VARIANTS
from .choose import NOISE


@dataclass(frozen=True)
class Agreement:
    top1: float
    kld: float
    n_positions: int


@dataclass(frozen=True)
class SelfCheck:
    patched: Agreement  # patched + patched adapter vs original + adapter, f16 KV
    noise: Agreement  # original with flash attention off vs original, f16 KV
    noise_how: str

    @property
    def top1_judgement(self) -> Judgement:
        def disagreements(a: Agreement) -> Flips:
            lost = round((1 - a.top1) * a.n_positions)
            return Flips(a.n_positions, lost, 0, a.n_positions)

        return judge(disagreements(self.patched), disagreements(self.noise))

    @property
    def passed(self) -> bool:
        return self.patched.kld <= self.noise.kld and self.top1_judgement.verdict == "within noise"

    @property
    def summary(self) -> str:
        p, n = self.patched, self.noise
        return (f"patched vs original at f16 KV: top-1 {p.top1:.4f}, KLD {p.kld:.6f} over {p.n_positions} positions; "
                f"original vs itself ({self.noise_how}): top-1 {n.top1:.4f}, KLD {n.kld:.6f}")

    def to_dict(self) -> dict:
        return {"patched": asdict(self.patched), "noise": asdict(self.noise), "noise_how": self.noise_how,
                "top1_p": self.top1_judgement.p_loss, "passed": self.passed,
                "rule": "patched KLD <= noise KLD, and top-1 disagreements not beyond the noise run's (noise.judge)"}


def self_check(original: ModelInfo, adapter: Path | None, patched: ModelInfo, patched_adapter: Path | None,
               cal: CalibSet, options: RuntimeOptions) -> SelfCheck:
    ref = llama_logits(original, adapter, cal, F16, True, options)
    noise = llama_logits(original, adapter, cal, F16, True, NOISE_VARIANTS.get(NOISE)(options))
    mine = llama_logits(patched, patched_adapter, cal, F16, True, options)
    return SelfCheck(Agreement(*f16_agreement(ref, mine)), Agreement(*f16_agreement(ref, noise)), NOISE)
