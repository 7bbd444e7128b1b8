"""Large-batch optimizers that stay exact under every ZeRO stage."""

from bigbatch.optim.groups import param_groups
from bigbatch.optim.lamb import LAMB
from bigbatch.optim.lars import LARS
from bigbatch.optim.layerwise import FlatLayout, LayerwiseOptimizer

__all__ = ["LAMB", "LARS", "FlatLayout", "LayerwiseOptimizer", "param_groups"]
