"""The adaptive batch: the global batch steered online by the measured gradient noise scale.

McCandlish et al. (2018) find the critical batch near the gradient noise scale B_noise, which grows as the loss falls;
AdaScale SGD (Johnson et al. 2020) and Pollux (Qiao et al., OSDI 2021) adapt to it online inside their own systems.
Here a decision is plain arithmetic on the step table: every `batch.adaptive_every` steps of a phase the batch becomes
clamp(k B_noise, max(current, batch.min), batch.max), rounded down to a multiple of micro-batch x world, and the rest
of that phase is the step table recomputed with that decision (`step_table(..., decisions)`), so offsets, warmup in
samples and the LR rule follow it exactly as they follow the batch ramp. A decision is (first step at the new batch,
new global batch); the run's decisions are saved with each checkpoint and replayed on resume. A later phase whose
recipe says `batch_from="adapted"` starts from the batch the previous phase reached: one more decision, at its first
step, saved and replayed as the others are.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from bigbatch.config import BatchConfig, Recipe
from bigbatch.config.schedule import ScheduledStep

Decision = tuple[int, int]  # (first step run at the new batch, the new global batch)


def decide(current: int, noise_scale: Optional[float], batch: BatchConfig, unit: int) -> int:
    """The global batch after a decision at `current` with the measured B_noise (None: no estimate yet, the batch
    stays): never below `current`, never above `batch.max`, a multiple of `unit` (micro-batch x world)."""
    if noise_scale is None or not math.isfinite(noise_scale) or noise_scale <= 0:
        return current
    target = min(max(batch.adaptive_factor * noise_scale, batch.min, current), batch.max)
    return max(current, int(target // unit) * unit)


def due(steps: Sequence[ScheduledStep], done: int, every: int) -> bool:
    """Whether a decision falls after `done` steps: `every` steps into a phase, never at a phase's first step (a
    later phase starts from its own batch, or from the adapted one: `carried`)."""
    if not 0 < done < len(steps):
        return False
    nxt = steps[done]
    return nxt.phase == steps[done - 1].phase and nxt.phase_step % every == 0


def rerounded(steps: Sequence[ScheduledStep], at: int, world: int) -> Optional[Decision]:
    """On a resume on another world size: the decision that puts the batch of step `at` back on a multiple of
    micro-batch x world (rounded down, at least one micro-batch per rank); None when it already divides."""
    if at >= len(steps):
        return None
    sp = steps[at]
    unit = sp.micro_batch * world
    if sp.global_batch % unit == 0:
        return None
    return at, max(unit, sp.global_batch // unit * unit)


def carry(reached: int, unit: int, top: int) -> int:
    """The batch a phase with `batch_from="adapted"` starts from: the previous phase's `reached` batch, at most `top`
    (`batch.max`), rounded down to a multiple of `unit` (this phase's micro-batch x world), at least one unit."""
    return max(unit, min(reached, top) // unit * unit)


def carried(recipe: Recipe, steps: Sequence[ScheduledStep], done: int, world: int) -> Optional[int]:
    """The batch a later phase starts from when its first step is `done` and its recipe says `batch_from="adapted"`
    (see `carry`); None at every other step and for a phase that starts from its own batch."""
    if not 0 < done < len(steps) or steps[done].phase == steps[done - 1].phase:
        return None
    if recipe.phases[steps[done].phase - 1].batch_from != "adapted":
        return None
    return carry(steps[done - 1].global_batch, steps[done].micro_batch * world, recipe.batch.max)
