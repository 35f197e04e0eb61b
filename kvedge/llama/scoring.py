"""Distances between next-token distributions: the one place KL divergence is written.

Two estimators of KL(ref || q), both in nats:
- `kld`: over the full vocabulary, for log-probabilities held in full (PCR, tests);
- `kld_topk`: over ref's top-k tokens plus one bucket for all the rest, for an audit's reference,
  which keeps 512 numbers a position instead of the whole vocabulary (see `kld_topk`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOPK = 512  # reference positions keep their top-512 log-probs plus a tail bucket


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def kld(ref_logp: np.ndarray, q_logp: np.ndarray) -> np.ndarray:
    """KL(ref || q) over the last axis, from log-probabilities (rows of log-softmax)."""
    p = np.asarray(ref_logp, dtype=np.float64)
    q = np.asarray(q_logp, dtype=np.float64)
    return (np.exp(p) * (p - q)).sum(axis=-1)


@dataclass(frozen=True)
class TopK:
    """A position's log-probabilities kept as the top-k entries plus the mass of everything else."""

    ids: np.ndarray  # (k,) int32
    logp: np.ndarray  # (k,) float64

    @property
    def tail(self) -> float:
        return max(0.0, 1.0 - float(np.exp(self.logp).sum()))


def top_k(logp: np.ndarray, k: int = TOPK) -> TopK:
    ids = np.argpartition(-logp, min(k, logp.size - 1))[:k]
    ids = ids[np.argsort(-logp[ids])].astype(np.int32)
    return TopK(ids, logp[ids])


def kld_topk(ref: TopK, logq: np.ndarray) -> float:
    """KL(ref || q) over ref's top-k tokens plus one bucket for all other tokens. The bucketed form is a
    lower bound on the full KLD and equals it when ref's tail mass is negligible (it is < 1e-3 for the
    greedy continuations an audit scores)."""
    p = np.exp(ref.logp)
    k = float(np.sum(p * (ref.logp - logq[ref.ids])))
    p_tail = ref.tail
    if p_tail > 1e-12:
        q_tail = max(1e-300, 1.0 - float(np.exp(logq[ref.ids]).sum()))
        k += p_tail * (np.log(p_tail) - np.log(q_tail))
    return max(0.0, k)
