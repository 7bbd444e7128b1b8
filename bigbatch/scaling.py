"""Batch arithmetic, learning-rate scaling rules and LR schedules: the numbers a large-batch run is made of."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bigbatch.config import ConfigError, OptimizerConfig, ScheduleConfig


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    grad_accum: int
    world: int

    def __str__(self) -> str:
        return f"{self.micro_batch} x {self.grad_accum} x {self.world} = {self.global_batch}"


def _nearest_multiples(value: int, unit: int) -> str:
    below, above = (value // unit) * unit, (value // unit + 1) * unit
    return f"{below} or {above}" if below > 0 else f"{above}"


def solve_batch(global_batch: int, world: int, micro_batch: int = 0, grad_accum: int = 0) -> BatchPlan:
    """Solves global = micro x accum x world for the factor left at 0; one sentence says what is wrong otherwise."""
    if world < 1:
        raise ConfigError(f"world size {world} must be at least 1.")
    if global_batch < 1:
        raise ConfigError(f"batch.global_batch={global_batch} must be at least 1.")
    if micro_batch < 0 or grad_accum < 0:
        raise ConfigError("batch.micro_batch and batch.grad_accum must be >= 0 (0 means: solve for it).")
    if micro_batch and grad_accum:
        if micro_batch * grad_accum * world != global_batch:
            raise ConfigError(
                f"batch.global_batch={global_batch} != micro_batch {micro_batch} x grad_accum {grad_accum} x world "
                f"{world} = {micro_batch * grad_accum * world}; leave one of micro_batch or grad_accum at 0."
            )
        return BatchPlan(global_batch, micro_batch, grad_accum, world)
    if micro_batch:
        unit = micro_batch * world
        if global_batch % unit:
            raise ConfigError(
                f"batch.global_batch={global_batch} is not divisible by micro_batch {micro_batch} x world {world} = "
                f"{unit}; nearest valid: {_nearest_multiples(global_batch, unit)}."
            )
        return BatchPlan(global_batch, micro_batch, global_batch // unit, world)
    grad_accum = grad_accum or 1
    unit = grad_accum * world
    if global_batch % unit:
        raise ConfigError(
            f"batch.global_batch={global_batch} is not divisible by grad_accum {grad_accum} x world {world} = {unit}; "
            f"nearest valid: {_nearest_multiples(global_batch, unit)}."
        )
    return BatchPlan(global_batch, global_batch // unit, grad_accum, world)


def scaled_lr(opt: OptimizerConfig, global_batch: int) -> tuple[float, str]:
    """The LR at `global_batch` from `opt.lr` at `opt.base_batch`, and a sentence naming the rule that produced it.

    linear: Goyal et al. 2017 (lr grows with k = B / B0); sqrt: You et al. 2020, the LAMB paper (lr grows with sqrt(k)).
    """
    base = opt.base_batch or global_batch
    k = global_batch / base
    if opt.lr_rule == "none" or k == 1:
        return opt.lr, f"{opt.lr_rule} rule" if opt.lr_rule == "none" else f"{opt.lr_rule} rule at its base batch"
    factor = k if opt.lr_rule == "linear" else math.sqrt(k)
    return opt.lr * factor, f"{opt.lr_rule} rule: {opt.lr:g} at batch {base} x{factor:.4g}"


def warmup_steps(schedule: ScheduleConfig, global_batch: int) -> int:
    """`schedule.warmup` is a fraction of the steps when < 1, else a number of samples (so it survives a batch change)."""
    if schedule.warmup < 1:
        return int(round(schedule.warmup * schedule.steps))
    return int(math.ceil(schedule.warmup / global_batch))


def lr_factor(step: int, total: int, warmup: int, decay: str, power: float = 1.0, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR for the update with index `step` (0-based), as NVIDIA's BERT LAMB recipe counts.

    Warmup: (step + 1) / warmup, reaching 1 at the last warmup update. Then with p = (step - warmup) / (total - warmup),
    the progress through the decay (0 at its first update, never 1, so the last update still moves): poly -> (1 - p) ** power, cosine -> (1 + cos(pi p)) / 2, constant -> 1; floored at `min_ratio`.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    span = max(total - warmup, 1)
    p = min(max(step - warmup, 0) / span, 1.0)
    if decay == "poly":
        value = (1.0 - p) ** power
    elif decay == "cosine":
        value = 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        raise ConfigError(f"schedule.decay={decay!r} is not one of poly, cosine, constant.")
    return min_ratio + (1.0 - min_ratio) * value
