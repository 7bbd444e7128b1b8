"""Which sequences each rank reads: a deterministic order counted in samples, disjoint across ranks.

Position p of a phase (0, 1, 2, ... over all its global batches) is sequence perm_e[p mod N] of epoch e = p // N,
where perm_e depends only on (seed, e). A step whose global batch starts at position o (the samples of the phase
consumed before it: t*G at a fixed batch G, a running sum under a batch ramp) reads positions [o, o + G); micro-step
m of rank r reads o + m*(W*b) + r*b + [0, b). Resuming at step t, or on another world size with the same batches,
continues the same sequence of samples: nothing skipped, nothing repeated.
"""

from __future__ import annotations

import numpy as np


class Positions:
    """The run positions each micro-step reads. All a stream needs (it reads its rows in order); `GlobalSampler`
    adds which stored sequence each position is."""

    @staticmethod
    def positions(offset: int, micro: int, rank: int, world: int, micro_batch: int) -> np.ndarray:
        """The run positions micro-step `micro` of `rank` reads in the step whose global batch starts at `offset`."""
        start = offset + micro * world * micro_batch + rank * micro_batch
        return np.arange(start, start + micro_batch, dtype=np.int64)


class GlobalSampler(Positions):
    def __init__(self, n_samples: int, seed: int) -> None:
        if n_samples < 1:
            raise ValueError("the sampler needs at least one sample")
        self.n, self.seed = n_samples, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sequence indices, epochs) of run positions."""
        epochs = positions // self.n
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[positions[sel] % self.n]
        return out, epochs
