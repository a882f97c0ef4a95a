"""Next-token sampling: greedy at temperature 0, else temperature, top-k and top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40      # 0 disables
    top_p: float = 0.95  # 1.0 disables
    seed: int | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got {self.seed!r}")


def distribution(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) a sampler with params p draws from: temperature, top-k, top-p.

    Greedy (temperature 0) is the one-token distribution of the argmax. Speculative
    verification (edgekv.ead) compares these distributions explicitly.
    """
    if p.temperature == 0:
        return np.array([int(np.argmax(logits))]), np.array([1.0])
    z = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < z.size:
        idx = np.argpartition(z, -p.top_k)[-p.top_k:]
    else:
        idx = np.arange(z.size)
    z = z[idx]
    order = np.argsort(-z, kind="stable")
    idx, z = idx[order], z[order]
    probs = np.exp(z - z[0])
    probs /= probs.sum()
    if p.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
        idx, probs = idx[:keep], probs[:keep] / probs[:keep].sum()
    return idx, probs


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.temperature == 0:
            return int(np.argmax(logits))
        idx, probs = distribution(logits, self.params)
        return int(idx[self.rng.choice(idx.size, p=probs)])
