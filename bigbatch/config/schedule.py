"""Batch arithmetic, learning-rate scaling rules and LR schedules: the numbers a large-batch run is made of."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from bigbatch.config import ConfigError, OptimizerConfig, Recipe, ScheduleConfig


@dataclass(frozen=True)
class BatchSplit:
    """A global batch as micro-batch x accumulation x world."""

    global_batch: int
    micro_batch: int
    grad_accum: int
    world: int

    def __str__(self) -> str:
        return f"{self.micro_batch} x {self.grad_accum} x {self.world} = {self.global_batch}"


def _nearest_multiples(value: int, unit: int) -> str:
    below, above = (value // unit) * unit, (value // unit + 1) * unit
    return f"{below} or {above}" if below > 0 else f"{above}"


def solve_batch(global_batch: int, world: int, micro_batch: int = 0, grad_accum: int = 0) -> BatchSplit:
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
        return BatchSplit(global_batch, micro_batch, grad_accum, world)
    if micro_batch:
        unit = micro_batch * world
        if global_batch % unit:
            raise ConfigError(
                f"batch.global_batch={global_batch} is not divisible by micro_batch {micro_batch} x world {world} = "
                f"{unit}; nearest valid: {_nearest_multiples(global_batch, unit)}."
            )
        return BatchSplit(global_batch, micro_batch, global_batch // unit, world)
    grad_accum = grad_accum or 1
    unit = grad_accum * world
    if global_batch % unit:
        raise ConfigError(
            f"batch.global_batch={global_batch} is not divisible by grad_accum {grad_accum} x world {world} = {unit}; "
            f"nearest valid: {_nearest_multiples(global_batch, unit)}."
        )
    return BatchSplit(global_batch, global_batch // unit, grad_accum, world)


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
    """`schedule.warmup`: a fraction of the steps when < 1, else a number of samples (so it survives a batch change)."""
    if schedule.warmup < 1:
        return int(round(schedule.warmup * schedule.steps))
    return int(math.ceil(schedule.warmup / global_batch))


def lr_factor(step: int, total: int, warmup: int, decay: str, power: float = 1.0, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR for the update with index `step` (0-based), as NVIDIA's BERT LAMB recipe counts.

    Warmup: (step + 1) / warmup, reaching 1 at the last warmup update. Then with p = (step - warmup) / (total - warmup),
    the progress through the decay (0 at its first update, never 1, so the last update still moves):
    poly -> (1 - p) ** power, cosine -> (1 + cos(pi p)) / 2, constant -> 1; floored at `min_ratio`.
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


# ---------------------------------------------------------------------------------------------------------------------
# The step table: phases and the batch ramp, resolved to one entry per optimizer step.


@dataclass(frozen=True)
class ScheduledStep:
    """Everything that varies from step to step. `offset`: samples of this phase consumed before this step, i.e. the
    sampler position where the step's global batch starts."""

    step: int
    phase: int
    phase_step: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    offset: int
    lr: float


def ramp_batch(consumed: int, start: int, increment: int, ramp_samples: int, target: int) -> int:
    """The global batch after `consumed` samples under Megatron's ramp: start, +increment every
    ramp_samples / ((target - start) / increment) samples, capped at target."""
    increments = (target - start) // increment
    per_increment = ramp_samples / increments
    return min(target, start + int(consumed // per_increment) * increment)


def samples_before(steps: list[ScheduledStep], step: int) -> int:
    """Samples the run has read before `step` (0-based) of its step table: where a resume at `step` reads on."""
    return sum(sp.global_batch for sp in steps[:step])


def step_table(recipe: Recipe, world: int, first: Optional[BatchSplit] = None,
               decisions: Sequence[tuple[int, int]] = ()) -> list[ScheduledStep]:
    """One ScheduledStep per optimizer step of the whole run (first phase, then `recipe.phases`); `first`: the first
    phase's batch factors when the caller has solved them already (`bigbatch.resolve`). `decisions`: the adaptive
    batch's (step, global batch) changes, each holding from its step to the end of that step's phase
    (`bigbatch.config.adaptive`); offsets and LRs follow them as they follow the ramp."""
    b, opt = recipe.batch, recipe.optimizer
    first = first or solve_batch(b.global_batch, world, b.micro_batch, b.grad_accum)
    if b.adaptive and first.grad_accum * world == 1:
        raise ConfigError(f"batch.adaptive=true with world 1 and batch.grad_accum=1 has one batch size only, so no "
                          f"gradient noise scale to steer by; set --batch.micro_batch={first.global_batch // 2} (two "
                          "micro-batches a step) or run on more ranks.")
    if b.adaptive and not opt.base_batch:  # the rule carries the LR from the recipe's batch to each adapted one
        opt = dataclasses.replace(opt, base_batch=first.global_batch)
    # The first phase, with the optional ramp (its LR follows the rule at each batch of the ramp).
    s = recipe.schedule
    batches, consumed = [], 0
    for _ in range(s.steps):
        batch = first.global_batch
        if b.ramp_start:
            batch = ramp_batch(consumed, b.ramp_start, b.ramp_increment, b.ramp_samples, first.global_batch)
            if batch % (first.micro_batch * world):
                raise ConfigError(
                    f"the batch ramp reaches global batch {batch}, not divisible by micro_batch {first.micro_batch} x "
                    f"world {world} = {first.micro_batch * world}; make batch.ramp_start and batch.ramp_increment "
                    "multiples of it.")
        batches.append(batch)
        consumed += batch
    batches = _decided(batches, 0, decisions)
    # A warmup in samples under a ramp is one in samples (Megatron's --lr-warmup-samples: LR x samples consumed /
    # warmup samples): counted in steps of the target batch it would end many times too early.
    by_samples = bool(b.ramp_start or b.adaptive) and s.warmup >= 1
    steps = _phase_steps(0, 0, batches, first.micro_batch, world, recipe.data.seq_len, s, by_samples,
                         lambda batch: scaled_lr(opt, batch)[0])
    for p, ph in enumerate(recipe.phases, start=1):
        plan = solve_batch(ph.global_batch, world, ph.micro_batch or first.micro_batch, 0)
        n = ph.num_steps()
        sched = ScheduleConfig(steps=n, warmup=ph.warmup, decay=ph.decay, power=ph.power, min_lr_ratio=ph.min_lr_ratio)
        # an explicit phase LR is its peak at the phase's own batch; an adapted batch carries it by the same rule
        rule = OptimizerConfig(lr=ph.lr, lr_rule=opt.lr_rule, base_batch=plan.global_batch) if ph.lr else opt
        batches = _decided([plan.global_batch] * n, len(steps), decisions)
        steps += _phase_steps(len(steps), p, batches, plan.micro_batch, world, ph.seq_len, sched,
                              b.adaptive and ph.warmup >= 1, lambda batch, rule=rule: scaled_lr(rule, batch)[0])
    return steps


def _decided(batches: list[int], first_step: int, decisions: Sequence[tuple[int, int]]) -> list[int]:
    """A phase's per-step batches (its steps start at `first_step`) with the decisions that fall inside it applied."""
    out = list(batches)
    for step, batch in sorted(decisions):
        k = step - first_step
        if 0 <= k < len(out):
            out[k:] = [batch] * (len(out) - k)
    return out


def _phase_steps(first_step: int, phase: int, batches: list[int], micro: int, world: int, seq_len: int,
                 s: ScheduleConfig, by_samples: bool, peak: Callable[[int], float]) -> list[ScheduledStep]:
    """A phase's rows: each step's batch, its sampler offset (samples of the phase before it) and its LR, the peak at
    its batch (`peak`) times warmup and decay; a warmup in samples (`by_samples`) ends when they are consumed."""
    offsets = list(itertools.accumulate([0, *batches[:-1]]))
    n = len(batches)
    if by_samples:
        warm = next((k + 1 for k, (b_k, o_k) in enumerate(zip(batches, offsets)) if o_k + b_k >= s.warmup), n)
    else:
        warm = warmup_steps(s, batches[0]) if batches else 0
    rows = []
    for k, (batch, offset) in enumerate(zip(batches, offsets)):
        if by_samples and k < warm:
            factor = min((offset + batch) / s.warmup, 1.0)
        else:
            factor = lr_factor(k, n, warm, s.decay, s.power, s.min_lr_ratio)
        rows.append(ScheduledStep(first_step + k, phase, k, batch, micro, batch // (micro * world), seq_len, offset,
                                  peak(batch) * factor))
    return rows
