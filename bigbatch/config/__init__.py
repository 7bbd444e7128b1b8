"""The recipe and its resolution's inputs: the typed recipe tree (schema), `--section.key=value` overrides, recipe
files, named model shapes, batch arithmetic with LR rules and the step table (schedule), and the DeepSpeed JSON
builder (dsconfig). The lowest layer: it imports nothing else of bigbatch.

Recipes import the tree from here (`from bigbatch.config import Recipe, ModelConfig, ...`)."""

from bigbatch.config.schema import (
    BatchConfig,
    CheckpointConfig,
    ClusterConfig,
    ConfigError,
    DataConfig,
    DeepSpeedSection,
    DistillConfig,
    ModelConfig,
    OptimizerConfig,
    PhaseConfig,
    Recipe,
    RunConfig,
    ScheduleConfig,
)

__all__ = ["BatchConfig", "CheckpointConfig", "ClusterConfig", "ConfigError", "DataConfig", "DeepSpeedSection",
           "DistillConfig", "ModelConfig", "OptimizerConfig", "PhaseConfig", "Recipe", "RunConfig", "ScheduleConfig"]
