"""Data: sources -> documents -> SentencePiece tokens -> packed sequences -> per-rank micro-batches.

`prepare` (build.py) builds or loads a run's data directory and returns a `BatchSource` (batches.py), the protocol
the loop reads: the packed `TrainingData` (packed.py) or `StreamingData` (streaming.py).
"""

from bigbatch.data.batches import BatchSource
from bigbatch.data.build import prepare
from bigbatch.data.packed import TrainingData
from bigbatch.data.streaming import StreamingData

__all__ = ["BatchSource", "StreamingData", "TrainingData", "prepare"]
