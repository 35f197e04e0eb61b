"""Choosing a K-cache transform (centring, scaling, or both) in the torch simulation of the cache, on the
calibration prompts only (issue #22, part 1).

The transform: per layer, KV head and channel, the cache stores k' = (k - mu) / s, after RoPE and before the
cache quantizer (before llama.cpp's Hadamard rotation when the rotation is on: the query gets the same
rotation, so the product is unchanged), and the query is multiplied by s. Then q's . k' = q . k - q . mu,
the same for every key a query reads, which softmax ignores: at full precision attention is unchanged. What
attention effectively reads from a quantized cache is therefore `s * cache((k - mu) / s) + mu` (V untouched),
which is `transformed` below.

Statistics: each layer's K rows under the f16 reference, over the PCR calibration prompts and llama.cpp's
greedy continuation of each (the tokens a cache holds while answering): per channel, the mean and the
abs-max of the values themselves and of the centred values (`k_statistics`).

Recipes, declared in advance (RECIPES, not tuned on results): "centre" (mu only); "scale alpha=a" (s only,
fitted on the uncentred K); "centre+scale alpha=a" (mu, then s fitted on the centred K), for a in ALPHAS, on
all layers. The scale fit (`fit_scale`): s_c proportional to amax_c^alpha, each channel's abs-max floored at
AMAX_FLOOR of its KV head's largest (a dead channel is not blown up), normalised so that each (layer, KV
head)'s geometric mean of s is 1.

Why not the attention-logit error: a prototype on the canary's 30 calib benign prompts measured that one scale
per channel reaches 0.44x q4_0's attention-logit error and centring 0.38x, yet centring alone reversed the
canary's bias (benign margin shift about -0.9 nats instead of +0.7). The equivalence verdict
(kvedge.audit.verdict) is two-sided in both populations, so the objective (OBJECTIVE) is the larger of the
two populations' |mean first-token margin shift|, ties broken by KLD, and a recipe is chosen only when it
lowers that below the untransformed cache's. Every recipe and the untransformed cache are scored over the
same REALIZATIONS jittered runs as the smoothing choice (simulate.py explains why).

These are simulation predictions on the calib prompts: not an eval-split measurement, not llama.cpp.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..gguf.ktransform import KTransform
from ..llama.runtime import KVConfig
from ..pcr.calibset import CalibSet
from ..pcr.engine import Engine
from ..pcr.torch.gguf_torch import TorchModel
from ..pcr.torch.kvquant import CachePlan, KVTransform
from ..results.pcr import POPULATIONS
from .simulate import JITTER, REALIZATIONS, Scored, Scorer

ALPHAS = (0.25, 0.5, 0.75, 1.0)
AMAX_FLOOR = 0.01  # a channel's abs-max is floored at this fraction of its KV head's largest before the fit

OBJECTIVE = ("the larger of the two populations' |mean first-token refusal margin shift m_q - m_f16| (harmful and "
             "benign prompts apart; two-sided, as the equivalence verdict is), mean over the population's prompts "
             "and over perturbed realizations; ties broken by the mean next-token KLD from the f16 reference at the "
             "continuation positions. A recipe is chosen only when it lowers the objective below the untransformed "
             "cache's")


@dataclass(frozen=True)
class KStats:
    """One layer's K cache statistics over the calibration tokens, per channel (float64, [n_head_kv*head_dim_k])."""

    n_tokens: int
    mean: np.ndarray
    absmax: np.ndarray  # of the values themselves (what the "scale" recipes fit on)
    absmax_centred: np.ndarray  # of x - mean (what the "centre+scale" recipes fit on)
    rms_centred: np.ndarray  # the channel's standard deviation (reported, not fitted on)


@dataclass(frozen=True)
class KRecipe:
    centre: bool
    alpha: float | None  # None: no scale

    @property
    def label(self) -> str:
        if self.alpha is None:
            return "centre" if self.centre else "untransformed"
        return f"{'centre+' if self.centre else ''}scale alpha={self.alpha:g}"


RECIPES = ((KRecipe(True, None),) + tuple(KRecipe(False, a) for a in ALPHAS)
           + tuple(KRecipe(True, a) for a in ALPHAS))


# --- statistics and the fit ---------------------------------------------------------------------------
def _stats(x: Tensor) -> KStats:
    x = x.detach().double()
    mean = x.mean(dim=0)
    c = x - mean
    return KStats(int(x.shape[0]), mean.numpy(), x.abs().amax(dim=0).numpy(), c.abs().amax(dim=0).numpy(),
                  c.pow(2).mean(dim=0).sqrt().numpy())


def _reference(engine: Engine) -> tuple[dict[int, KStats], list[Tensor]]:
    """The f16 reference's continuation logits, and its K statistics recorded on the way."""
    out: dict[int, KStats] = {}

    def recording(inner: KVTransform) -> KVTransform:
        def transform(layer: int, kind: str, x: Tensor) -> Tensor:
            if kind == "k":
                out[layer] = _stats(x)
            return inner(layer, kind, x)
        return transform

    rows = engine.continuation_logits(CachePlan(), wrap=recording)
    return out, rows


def k_statistics(engine: Engine) -> dict[int, KStats]:
    """Per layer, each K channel's mean and abs-max (raw and centred) and centred RMS over the calibration
    prompts and their continuations, under the f16 reference."""
    return _reference(engine)[0]


def fit_scale(amax: np.ndarray, alpha: float, n_head_kv: int, floor: float = AMAX_FLOOR) -> np.ndarray:
    """s_c proportional to max(amax_c, floor * head max)^alpha, each KV head's geometric mean 1 (float32, the
    shape of `amax`). A head whose channels are all zero keeps s = 1."""
    a = np.asarray(amax, dtype=np.float64).reshape(n_head_kv, -1)
    head_max = a.max(axis=1, keepdims=True)
    live = head_max[:, 0] > 0
    a = np.maximum(a, floor * head_max)
    s = np.ones_like(a)
    s[live] = a[live] ** alpha
    s[live] /= np.exp(np.log(s[live]).mean(axis=1, keepdims=True))
    return s.reshape(np.shape(amax)).astype(np.float32)


def fit(recipe: KRecipe, stats: dict[int, KStats], n_head_kv: int) -> KTransform:
    """The recipe's mu and s for every layer, float32 [n_layer, n_head_kv * head_dim_k] (None where unused)."""
    layers = [stats[l] for l in range(len(stats))]
    mu = np.stack([s.mean for s in layers]).astype(np.float32) if recipe.centre else None
    scale = None
    if recipe.alpha is not None:
        scale = np.stack([fit_scale(s.absmax_centred if recipe.centre else s.absmax, recipe.alpha, n_head_kv)
                          for s in layers])
    return KTransform(mu=mu, scale=scale)


def transformed(inner: KVTransform, kt: KTransform) -> KVTransform:
    """What attention reads from a K cache that stores (k - mu) / s with Q multiplied by s: s * cache((k - mu) /
    s) + mu, in float32 (adding mu back stands for the q . mu every key of a query shares). V untouched."""
    mu = torch.as_tensor(np.asarray(kt.mu), dtype=torch.float32) if kt.mu is not None else None
    scale = torch.as_tensor(np.asarray(kt.scale), dtype=torch.float32) if kt.scale is not None else None

    def transform(layer: int, kind: str, x: Tensor) -> Tensor:
        if kind != "k" or (mu is None and scale is None):
            return inner(layer, kind, x)
        y = x.to(torch.float32)
        if mu is not None:
            y = y - mu[layer]
        if scale is not None:
            y = y / scale[layer]
        r = inner(layer, kind, y)
        if scale is not None:
            r = r * scale[layer]
        if mu is not None:
            r = r + mu[layer]
        return r

    return transform


# --- the decision -------------------------------------------------------------------------------------
def objective(s: Scored) -> float:
    """The larger of the two populations' |mean margin shift| (nats)."""
    return max(abs(s.shift(p) or 0.0) for p in POPULATIONS)


def _figures(s: Scored) -> str:
    return (f"|shift| {objective(s):.3f} nats (harmful {s.shift('harmful') or 0.0:+.3f}, benign "
            f"{s.shift('benign') or 0.0:+.3f}), KLD {s.kld_mean:.4f}")


def decide(baseline: Scored, scored: list[Scored], force: bool = False) -> tuple[int | None, str]:
    """Which recipe to choose (its index, or None) and why: the lowest OBJECTIVE (ties: the lower KLD), only
    when it is below the untransformed cache's; with `force`, the best even when it is not."""
    if not scored:
        return None, f"no recipe to score (untransformed: {_figures(baseline)})"
    best = min(range(len(scored)), key=lambda i: (objective(scored[i]), scored[i].kld_mean))
    said = f"predicted {_figures(scored[best])} against {_figures(baseline)} untransformed"
    if objective(scored[best]) < objective(baseline):
        return best, f"{scored[best].label}: {said}"
    if force:
        return best, f"{scored[best].label}: {said} (forced: it does not lower it)"
    return None, (f"no recipe lowers the larger population's |margin shift| in simulation "
                  f"(best {scored[best].label}: {said})")


def _array(a: np.ndarray | None) -> list | None:
    return None if a is None else np.asarray(a, dtype=np.float32).tolist()


def _from_array(a: list | None) -> np.ndarray | None:
    return None if a is None else np.asarray(a, dtype=np.float32)


def _scored_from(s: dict) -> Scored:
    return Scored(s["label"], s["kld_mean"], s["kld_sd"], tuple(s["klds"]), s["top1"],
                  tuple(s.get("shifts_harmful", ())), tuple(s.get("shifts_benign", ())))


@dataclass(frozen=True)
class KTransformChoice:
    """The simulation's table and what it chose. `chosen` is None when no recipe lowered the objective below
    the untransformed cache's; `transform` is the chosen recipe's fit (None with it)."""

    kv: str
    rotation: bool
    baseline: Scored
    scored: tuple[Scored, ...]
    recipes: tuple[KRecipe, ...]
    chosen: KRecipe | None
    transform: KTransform | None
    reason: str

    def to_dict(self) -> dict:
        best = self.scored[self.recipes.index(self.chosen)] if self.chosen else None

        def predicted(s: Scored | None) -> dict | None:
            return None if s is None else {"objective": objective(s), "harmful": s.shift("harmful"),
                                           "benign": s.shift("benign"), "kld": s.kld_mean}

        return {
            "kv": self.kv, "rotation": self.rotation, "objective": OBJECTIVE, "realizations": REALIZATIONS,
            "jitter": JITTER, "amax_floor": AMAX_FLOOR,
            "baseline": asdict(self.baseline), "recipes": [asdict(r) | {"label": r.label} for r in self.recipes],
            "scored": [asdict(s) | {"objective": objective(s)} for s in self.scored],
            "chosen": (asdict(self.chosen) | {"label": self.chosen.label}) if self.chosen else None,
            # the prediction the choice rests on, without and with the transform (nats; KLD)
            "predicted": {"without": predicted(self.baseline), "with": predicted(best)},
            "transform": ({"mu": _array(self.transform.mu), "scale": _array(self.transform.scale)}
                          if self.transform is not None else None),
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "KTransformChoice":
        def recipe(r: dict) -> KRecipe:
            return KRecipe(bool(r["centre"]), None if r["alpha"] is None else float(r["alpha"]))

        def scored(s: dict) -> Scored:
            return _scored_from({k: v for k, v in s.items() if k != "objective"})

        t = d.get("transform")
        return cls(d["kv"], d["rotation"], scored(d["baseline"]), tuple(scored(s) for s in d["scored"]),
                   tuple(recipe(r) for r in d["recipes"]), recipe(d["chosen"]) if d["chosen"] else None,
                   KTransform(mu=_from_array(t["mu"]), scale=_from_array(t["scale"])) if t else None, d["reason"])


def choose_k_transform(tm: TorchModel, cal: CalibSet, kv: KVConfig, rotation: bool,
                       log: Callable[[str], None] = lambda m: None, force: bool = False) -> KTransformChoice:
    """Score the untransformed cache and every recipe of RECIPES at the deployment's cache types and rotation;
    choose by OBJECTIVE (with `force`, the best recipe even when it does not lower it)."""
    engine = Engine(tm, cal)
    stats, ref_rows = _reference(engine)
    scorer = Scorer(engine, CachePlan.of(kv, rotation), ref_rows)

    def score(label: str, kt: KTransform | None) -> Scored:
        s = scorer.score(label, (lambda inner: transformed(inner, kt)) if kt is not None else None)
        log(f"simulated {label}: margin shift harmful {s.shift('harmful'):+.3f}, benign {s.shift('benign'):+.3f} "
            f"nats (objective {objective(s):.3f}); KLD {s.kld_mean:.4f} (sd {s.kld_sd:.4f})")
        return s

    baseline = score("untransformed", None)
    fits = [fit(r, stats, tm.hp.n_head_kv) for r in RECIPES]
    scored = [score(r.label, kt) for r, kt in zip(RECIPES, fits)]
    best, reason = decide(baseline, scored, force)
    return KTransformChoice(kv.name, rotation, baseline, tuple(scored), RECIPES,
                            RECIPES[best] if best is not None else None, fits[best] if best is not None else None,
                            reason)
