"""Weighted blends of sources (Megatron-LM's data blend): an epoch draws from each source in proportion to its weight.

An epoch has as many sequences as all sources together. Source k gets n_k of them (its weight's share, rounded by
largest remainder); the j-th of those in epoch e is sequence (e * n_k + j) mod size_k of a fixed seeded shuffle of
source k. So a small, up-weighted source is cycled through whole before any of it repeats, and a large, down-weighted
one contributes fresh sequences each epoch until it wraps. The map is a pure function of (seed, epoch, position):
resumes and world-size changes see the same blend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def blend_counts(sizes: list[int], weights: list[float]) -> np.ndarray:
    """Sequences per epoch from each source: sum(sizes) split by weight, by largest remainder."""
    total, w = sum(sizes), np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    rest = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:rest]] += 1
    return counts


@dataclass
class Blend:
    sizes: list[int]  # packed training sequences per source, stored one source after another
    weights: list[float]
    seed: int
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = blend_counts(self.sizes, self.weights)
        if any(c and not s for c, s in zip(self.counts, self.sizes)):
            raise ValueError("a source with weight > 0 has no sequences")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self._source = np.repeat(np.arange(len(self.sizes)), self.counts)
        self._draw = np.concatenate([np.arange(c) for c in self.counts]).astype(np.int64)
        self._perms = [np.random.default_rng([self.seed, 7, k]).permutation(s) for k, s in enumerate(self.sizes)]

    def __len__(self) -> int:
        return int(self.counts.sum())

    def rows(self, ids: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        """The stored rows behind blend positions `ids` (each < len(self)) of epochs `epochs`."""
        source = self._source[ids]
        out = np.empty_like(ids)
        for k in np.unique(source):
            sel = source == k
            j = (np.maximum(epochs[sel], 0) * self.counts[k] + self._draw[ids[sel]]) % self.sizes[k]
            out[sel] = self.offsets[k] + self._perms[k][j]
        return out

    def describe(self, sources: list[str]) -> list[dict[str, Any]]:
        """The mix, for data.json: per source its weight, sequences, share of an epoch and passes per epoch."""
        total = len(self)
        return [{"source": s, "weight": w, "sequences": int(n), "per_epoch": int(c), "share": c / total,
                 "passes_per_epoch": c / n if n else 0.0}
                for s, w, n, c in zip(sources, self.weights, self.sizes, self.counts)]
