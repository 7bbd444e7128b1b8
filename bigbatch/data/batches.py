"""What the training loop reads micro-batches through (`BatchSource`), and the batch-building its two
implementations share: packed arrays (`bigbatch.data.packed`) and a stream (`bigbatch.data.streaming`)."""

from __future__ import annotations

from functools import cached_property
from typing import Protocol

import numpy as np
import torch

from bigbatch.config import ConfigError
from bigbatch.data.masking import mask_tokens
from bigbatch.data.sampler import Positions
from bigbatch.data.tokenizer import PAD, Tokenizer


class BatchSource(Protocol):
    """A phase's training and held-out data as the loop sees it (`bigbatch.run.step`, `bigbatch.run.train`)."""

    tokenizer: Tokenizer
    sampler: Positions

    @property
    def vocab_size(self) -> int: ...

    def train_batch(self, positions: np.ndarray) -> dict[str, torch.Tensor]: ...

    def eval_batches(self, rank: int, world: int, micro_batch: int) -> list[dict[str, torch.Tensor]]: ...


class Batches:
    """Packed rows -> a micro-batch (MLM masking for BERT, the rows themselves for GPT), and the held-out set's
    micro-batches: what both implementations of `BatchSource` share. (`TrainingData`, a dataclass, sets the same
    attributes from its fields.)"""

    def __init__(self, arch: str, eval: np.ndarray, tokenizer: Tokenizer, seed: int, mlm_probability: float,
                 whole_word_masking: bool = False) -> None:
        self.arch, self.eval, self.tokenizer, self.seed = arch, eval, tokenizer, seed
        self.mlm_probability, self.whole_word_masking = mlm_probability, whole_word_masking

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @cached_property
    def _word_start(self) -> np.ndarray | None:
        return self.tokenizer.word_starts() if self.whole_word_masking else None

    def _batch(self, tokens: np.ndarray, ids: np.ndarray, epochs: np.ndarray) -> dict[str, torch.Tensor]:
        if self.arch == "bert":
            inputs, labels = mask_tokens(tokens, ids, epochs, self.seed, self.vocab_size, self.mlm_probability,
                                         self._word_start)
        else:
            inputs = labels = tokens.astype(np.int64)
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.from_numpy((tokens != PAD).astype(np.int64)),
            "labels": torch.from_numpy(np.array(labels, dtype=np.int64)),
        }

    def eval_batches(self, rank: int, world: int, micro_batch: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the held-out set (a fixed masking), in micro-batches.

        The set is cut to a multiple of the world size so every rank runs the same number of forward passes (ZeRO-3
        gathers parameters collectively in each one).
        """
        usable = len(self.eval) - len(self.eval) % world
        if usable == 0:  # every rank sees the same length, so all raise together
            raise ConfigError(
                f"the held-out set has {len(self.eval)} sequences, fewer than the {world} ranks that share it; raise "
                f"--data.eval_samples (and --data.eval_fraction if the held-out text is short) to at least {world}.")
        ids = np.arange(rank, usable, world)
        return [
            self._batch(np.asarray(self.eval[chunk]), chunk, np.full(len(chunk), -1))
            for chunk in np.array_split(ids, max(1, int(np.ceil(len(ids) / micro_batch))))
            if len(chunk)
        ]
