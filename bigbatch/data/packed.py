"""Training data packed on disk (`train.npy`, memory-mapped): random access, so any rank reads any position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bigbatch.data.batches import Batches
from bigbatch.data.blend import Blend
from bigbatch.data.sampler import GlobalSampler
from bigbatch.data.tokenizer import Tokenizer


@dataclass
class TrainingData(Batches):
    """The packed train and held-out sequences of a run, and how to turn run positions into a micro-batch."""

    arch: str
    train: np.ndarray  # memory-mapped: (sequences, seq_len), the sources one after another
    eval: np.ndarray
    tokenizer: Tokenizer
    seed: int
    mlm_probability: float
    whole_word_masking: bool = False
    blend: Blend | None = None  # data.weights: which stored row each blend position reads

    def __post_init__(self) -> None:
        self.sampler = GlobalSampler(len(self.blend) if self.blend else len(self.train), self.seed)

    def train_batch(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        ids, epochs = self.sampler.indices(positions)
        rows = self.blend.rows(ids, epochs) if self.blend else ids
        return self._batch(np.asarray(self.train[rows]), ids, epochs)
