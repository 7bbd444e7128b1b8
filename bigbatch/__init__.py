"""bigbatch: large-batch pretraining of Transformers on DeepSpeed."""

__version__ = "0.1.0"
