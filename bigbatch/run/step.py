"""One optimizer step over its micro-batches, as torchtitan's `train_step`: forward, backward and DeepSpeed's step,
with the checks that belong to a step (a loss that is not finite is never applied; a skipped step is told apart),
returning a typed record. The loop (`bigbatch.run.train.Trainer.fit`) decides what the record means for the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch

from bigbatch.config.schedule import ScheduledStep
from bigbatch.run import distributed, faults
from bigbatch.run.noise import GradientNoiseScale, held_gradient_norm, loss_multiplier
from bigbatch.run.overflow import DS_MIN_SCALE_ERROR, OverflowGuard, divergence_message


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """Dropout RNG as a function of (seed, step, rank): a resumed run draws the same masks with no saved state."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63)


class Halt(Exception):
    """The run stops itself (exit 3; not a preemption, which exits 0 and is requeued): the step's loss is not finite
    (its update is not applied), or DeepSpeed's scaler gave up at its minimum. `message(saved tag, tag to resume
    from)` is the sentence; `at` the step whose state is the last good one."""

    def __init__(self, at: int, message: Callable[[Optional[str], Optional[str]], str]) -> None:
        super().__init__("the run halts")
        self.at, self.message = at, message


@dataclass
class StepRecord:
    """What one step did, for metrics.jsonl and the overflow policy."""

    loss: float  # mean over micro-batches and ranks
    lr: float  # the LR applied at this step
    skipped: bool  # DeepSpeed skipped the update (fp16 overflow, or a gradient that is not finite)
    was_at_minimum: bool  # the loss scale was already at its minimum before the step (or there is no scale)
    grad_norm: Optional[float]
    loss_scale: float
    skipped_steps: int  # DeepSpeed's running count
    seconds: float
    noise: dict[str, Any] = field(default_factory=dict)  # the gradient noise scale's entries, when it is on
    terms: dict[str, float] = field(default_factory=dict)  # a distillation's loss terms (mean over ranks)


@dataclass
class StepContext:
    """What every step of a run shares: the engine, this rank's place, and the per-step helpers."""

    engine: Any
    rank: int
    world: int
    seed: int
    guard: OverflowGuard
    noise: Optional[GradientNoiseScale]

    def __post_init__(self) -> None:
        self.stage0 = self.engine.zero_optimization_stage() == 0


def shape_engine(engine: Any, sp: ScheduledStep) -> None:
    """DeepSpeed keeps the batch shape in its config; a phase or a ramp changes it between steps."""
    if engine.train_micro_batch_size_per_gpu() != sp.micro_batch:
        engine.set_train_micro_batch_size(sp.micro_batch)
    if engine.train_batch_size() != sp.global_batch:
        engine.set_train_batch_size(sp.global_batch)


def train_step(ctx: StepContext, data: Any, sp: ScheduledStep) -> StepRecord:
    """Step `sp.step` over its `sp.grad_accum` micro-batches on every rank; raises Halt (see above)."""
    engine, noise = ctx.engine, ctx.noise
    shape_engine(engine, sp)
    torch.manual_seed(dropout_seed(ctx.seed, sp.step, ctx.rank))
    faults.step_started(sp.step + 1, engine.module)
    skipped_before, was_at_minimum = engine.skipped_steps, ctx.guard.at_minimum()
    lr = float(engine.get_lr()[0])
    started = time.perf_counter()
    losses, summed, big_norm, loss = [], [0.0], None, math.nan
    for micro in range(sp.grad_accum):
        boundary = micro == sp.grad_accum - 1
        # said explicitly: DeepSpeed's own boundary test counts micro-steps modulo the *current* accumulation, which
        # goes out of step once a ramp or a phase has changed it
        engine.set_gradient_accumulation_boundary(boundary)
        positions = data.sampler.positions(sp.offset, micro, ctx.rank, ctx.world, sp.micro_batch)
        micro_loss = engine(**data.train_batch(positions))
        engine.backward(micro_loss)
        losses.append(micro_loss.detach().float())
        if noise is not None:
            noise.micro_batch_done(loss_multiplier(engine))
        if boundary:
            # the step's loss on every rank before its update, so a diverged step is never applied; the noise scale's
            # small-batch sums ride on the same all-reduce
            local = [float(torch.stack(losses).mean()), *(noise.take_local() if noise else ())]
            summed = distributed.sum_across_ranks(local)
            loss = summed[0] / ctx.world
            big_norm = held_gradient_norm(engine.module) if noise and ctx.stage0 else None
            if not math.isfinite(loss):
                raise Halt(sp.step, partial(divergence_message, sp.step + 1, loss))
        try:
            engine.step()
        except Exception as err:  # ZeRO's scaler at its minimum, if the guard could not switch it off
            if DS_MIN_SCALE_ERROR not in str(err):
                raise
            ctx.guard.in_a_row += 1  # this step, skipped at the minimum: DeepSpeed can go no further
            raise Halt(sp.step, partial(ctx.guard.overflow_message, sp.step + 1)) from None
    seconds = time.perf_counter() - started
    norm = engine.get_global_grad_norm()
    record = StepRecord(loss=loss, lr=lr, skipped=engine.skipped_steps > skipped_before,
                        was_at_minimum=was_at_minimum, grad_norm=float(norm) if norm is not None else None,
                        loss_scale=float(getattr(engine.optimizer, "cur_scale", 1.0) or 1.0),
                        skipped_steps=int(engine.skipped_steps), seconds=seconds)
    if hasattr(engine.module, "take_terms"):  # a distillation (bigbatch.models.distill.Distilled)
        terms = engine.module.take_terms()
        record.terms = dict(zip(terms, (v / ctx.world for v in distributed.sum_across_ranks(list(terms.values())))))
    if noise is not None:
        record.noise = noise.update(*summed[1:], sp.micro_batch, sp.global_batch,
                                    big_norm if ctx.stage0 else record.grad_norm, applied=not record.skipped)
    return record
