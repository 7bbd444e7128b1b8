"""A stream read in order, each rank its own share: the other `BatchSource` next to the packed `TrainingData`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from bigbatch.config import ConfigError
from bigbatch.data.batches import Batches
from bigbatch.data.pipeline import iter_rows
from bigbatch.data.sampler import Positions


class StreamingData(Batches):
    """Training sequences read from a stream (data.streaming): no random access, so each rank reads its own share of
    the documents (`datasets.distributed.split_dataset_by_node`), in the order of a seeded shuffle buffer, and its
    k-th micro-batch row is the k-th row it packs. A resume on the same number of ranks reads forward to where it
    stopped (tokenizing on the way: minutes per billion tokens), so it skips and repeats nothing; on another number
    of ranks the shares differ and the order is not the same.
    """

    def __init__(self, stream: Any, rank: int, world: int, **batches: Any) -> None:
        super().__init__(**batches)
        self.sampler = Positions()  # indices come from the stream itself
        self.stream, self.rank, self.world = stream, rank, world
        self._rows: Iterator[np.ndarray] = iter(())
        self._pending = np.zeros((0, 0), dtype=np.int32)
        self._next = -1  # the local row index the reader is at; -1: not started
        self._epoch = self._read = 0

    def _open(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)  # reseeds the shuffle buffer: a new order each pass over the stream
        self._rows, self._epoch, self._read = iter_rows(self.stream, chunk=256), epoch, 0
        self._pending = np.zeros((0, 0), dtype=np.int32)

    def _take(self, n: int) -> np.ndarray:
        """The next n rows of this rank's share, starting the next pass over the stream where one ends."""
        out: list[np.ndarray] = []
        while n:
            if not len(self._pending):
                chunk = next(self._rows, None)
                if chunk is None:
                    if not self._read:
                        raise ConfigError(f"rank {self.rank}'s share of the data stream holds no training sequence; "
                                          "add text to --data.sources.")
                    self._open(self._epoch + 1)
                    continue
                self._pending, self._read = chunk, self._read + len(chunk)
            k = min(n, len(self._pending))
            out.append(self._pending[:k])
            self._pending, n = self._pending[k:], n - k
        return np.concatenate(out)

    def train_batch(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        b = len(positions)
        block = self.world * b
        local = int(positions[0] // block * b + positions[0] % block - self.rank * b)
        if local != self._next:  # first call, or a resume: read forward from the start
            self._open(0)
            self._next = 0
            while self._next < local:
                self._next += len(self._take(min(4096, local - self._next)))
        tokens = self._take(b)
        self._next += b
        return self._batch(tokens, positions, np.zeros(b, dtype=np.int64))
