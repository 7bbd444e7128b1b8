"""One step from a recipe and a world size to everything a run is made of: `resolve(recipe, world)`.

The batch plan (micro x accumulation x world), the peak LR and the rule that carried it, the step table (one row per
optimizer step: batch, sequence length, LR, phase, data offset), the resolved DeepSpeed JSON, and a typed view of that
JSON. `bigbatch train`, `check`, `plan`, `sweep`, the benchmarks and the test workers all start here, so the sequence
is written once. The config linter (`bigbatch.check.preflight`) is not called here: it imports this module, and its
callers decide what a finding means for them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from bigbatch.config import ConfigError, Recipe, dsconfig
from bigbatch.config.schedule import (
    BatchSplit,
    ScheduledStep,
    scaled_lr,
    solve_batch,
    step_table,
    warmup_steps,
)


@dataclass(frozen=True)
class DeepSpeedView:
    """What bigbatch reads from a resolved DeepSpeed JSON, typed, instead of `config.get(...)` chains."""

    stage: int
    precision: str  # fp32 | fp16 | bf16
    checkpointing: bool  # an `activation_checkpointing` section: transformers' per-layer checkpointing is switched on
    clipping: float  # global gradient norm; 0 disables
    zero: dict[str, Any]  # the `zero_optimization` section as written (bucket sizes, overlap, stage-3 limits)

    @classmethod
    def of(cls, config: dict[str, Any]) -> "DeepSpeedView":
        zero = config.get("zero_optimization") or {}
        return cls(stage=int(zero.get("stage", 0)), precision=dsconfig.precision(config),
                   checkpointing=isinstance(config.get("activation_checkpointing"), dict),
                   clipping=float(config.get("gradient_clipping", 1.0)), zero=dict(zero))


@dataclass(frozen=True)
class ResolvedRun:
    recipe: Recipe
    world: int
    batch: BatchSplit  # the first phase's batch factors
    lr: float  # the first phase's peak LR: the optimizer's LR, which the step table's LRs are factors of
    lr_rule: str  # how `lr` was carried from optimizer.base_batch, in words
    steps: list[ScheduledStep]
    ds_config: dict[str, Any]
    ds: DeepSpeedView

    @property
    def warmup_steps(self) -> int:
        return warmup_steps(self.recipe.schedule, self.batch.global_batch)


def phase_recipe(recipe: Recipe, phase: int) -> Recipe:
    """The recipe as phase `phase` (0: the first; n: `recipe.phases[n - 1]`) runs it on its own: that phase's
    sequence length, global batch and micro-batch (0: the first phase's), and no later phases. What the data of a
    phase is packed for, and what the memory planner fits."""
    if phase == 0:
        return dataclasses.replace(recipe, phases=())
    ph = recipe.phases[phase - 1]
    batch = dataclasses.replace(recipe.batch, global_batch=ph.global_batch, micro_batch=ph.micro_batch
                                or recipe.batch.micro_batch, grad_accum=0, ramp_start=0, ramp_increment=0,
                                ramp_samples=0)
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, seq_len=ph.seq_len), batch=batch,
                               phases=())


def resolve(recipe: Recipe, world: int, batch: Optional[BatchSplit] = None) -> ResolvedRun:
    """The run `recipe` makes on `world` ranks. `batch` overrides the first phase's batch factors (the planner
    tabulates a micro-batch that does not divide); ConfigError when the batch arithmetic does not work out."""
    if "auto" in (recipe.batch.micro_batch, recipe.deepspeed.activation_checkpointing,
                  *(ph.micro_batch for ph in recipe.phases)):  # the planner's choice, made above this layer
        raise ConfigError(f"recipe {recipe.name} asks for an 'auto' micro-batch or checkpointing, which bigbatch "
                          "train, check and plan choose at start; resolve the recipe "
                          "bigbatch.plan.advice.choose_auto returns.")
    batch = batch or solve_batch(recipe.batch.global_batch, world, recipe.batch.micro_batch, recipe.batch.grad_accum)
    lr, rule = scaled_lr(recipe.optimizer, batch.global_batch)
    steps = step_table(recipe, world, first=batch)
    config = dsconfig.build(recipe, batch, lr)
    return ResolvedRun(recipe, world, batch, lr, rule, steps, config, DeepSpeedView.of(config))
