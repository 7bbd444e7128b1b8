"""The overflow policy: a run that can no longer make progress stops with a checkpoint and one sentence.

DeepSpeed's dynamic loss scaler (fp16) skips a step whose gradients overflow and halves the scale (after `hysteresis`
overflows). At `min_loss_scale` it has nothing left to lower: ZeRO's scaler then raises a bare
`Exception("Current loss scale already at minimum ...")` on the next overflow, and other wrappers skip forever.
bigbatch takes that decision itself: it switches the raise off and counts steps skipped while the scale was already
at its minimum (or skipped with no scale to lower at all: fp32 and bf16 skip a step whose gradient norm is not
finite; at ZeRO stage 0 in fp32 that skip is bigbatch's, see `bigbatch.engine.SkipNonFinite`). After
`run.overflow_patience` of them in a row the trainer checkpoints, the parameters and optimizer state being those of
the last applied update, and stops. A loss that is not finite (a real divergence: loss scaling cannot help a forward
pass) stops the run at once, before that step's update. A state that is not finite itself (`state_is_finite`) is
never saved as the last good one: the sentence names the newest earlier checkpoint instead.

What a skipped step does to the counters (DeepSpeed's behaviour, which bigbatch keeps, as Megatron-LM does): the
step's samples count as read (the data moves on; `step`, `samples` and `tokens` in metrics.jsonl count data read),
but no update is applied and the LR schedule does not advance (`updates` counts applied updates; the LR follows it).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from bigbatch.engine import client_optimizer
from bigbatch.optim.zero import shard_real_numel

DS_MIN_SCALE_ERROR = "Current loss scale already at minimum"


class OverflowGuard:
    def __init__(self, engine: Any, patience: int) -> None:
        self.patience = patience
        self.scaler = getattr(engine.optimizer, "loss_scaler", None)
        if self.scaler is not None and hasattr(self.scaler, "raise_error_at_min_scale"):
            # Not a config key in DeepSpeed 0.19: the attribute of its DynamicLossScaler. Our patience replaces it.
            self.scaler.raise_error_at_min_scale = False
        self.in_a_row = 0

    @property
    def dynamic(self) -> bool:
        return bool(getattr(self.scaler, "dynamic", False))

    def at_minimum(self) -> bool:
        """True when a skipped step could not be helped by a lower scale: at min_loss_scale, or no dynamic scale."""
        if not self.dynamic:
            return True
        return float(self.scaler.cur_scale) <= float(self.scaler.min_scale)

    def update(self, skipped: bool, was_at_minimum: bool) -> bool:
        """After a step: True when `patience` steps in a row were skipped with the scale already at its minimum."""
        self.in_a_row = self.in_a_row + 1 if skipped and was_at_minimum else 0
        return self.in_a_row >= self.patience

    def overflow_message(self, step: int, saved: Optional[str], previous: Optional[str] = None) -> str:
        where = (f"with the fp16 loss scale at its minimum ({float(self.scaler.min_scale):g})" if self.dynamic
                 else "with gradients that are not finite")
        count = "1 step was" if self.in_a_row == 1 else f"{self.in_a_row} steps in a row were"
        return (f"stopped at step {step}: {count} skipped {where}; "
                f"{checkpoint_clause(saved, previous, 'the last applied update')}. Try bf16 (e.g. "
                "--deepspeed.configs=zero1.json,bf16.json), a lower --optimizer.lr or a longer --schedule.warmup, then "
                "continue with --resume.")


def divergence_message(step: int, loss: float, saved: Optional[str], previous: Optional[str] = None) -> str:
    return (f"stopped at step {step}: the training loss is {loss} (not finite), so the run diverged; its update was "
            f"not applied and {checkpoint_clause(saved, previous, 'the last good state')}. Try a lower "
            "--optimizer.lr, a longer --schedule.warmup or --optimizer.grad_clip=1.0, then continue with --resume.")


def checkpoint_clause(saved: Optional[str], previous: Optional[str], holds: str) -> str:
    """What to resume from: the checkpoint `saved` at the stop; or, when the state in memory was not finite and so
    was not saved, the newest one before it (`previous`)."""
    if saved is not None:
        return f"checkpoint {saved} holds {holds}"
    where = (f"resume from checkpoint {previous}, the last one saved" if previous
             else "there is no earlier checkpoint to resume from")
    return f"the weights or optimizer state in memory are not finite, so no checkpoint was written; {where}"


def state_tensors(engine: Any) -> list[torch.Tensor]:
    """This rank's weights (at ZeRO-3 its shards), fp32 masters and optimizer state: what a skipped step must leave
    bit-identical and a checkpoint of the last good state must hold finite. Views of the real elements only: ZeRO-3
    pads each shard with uninitialised memory, which may hold any bits (NaN seen)."""

    opt = client_optimizer(engine)
    runs = _stage3_real_runs(engine.optimizer) if engine.zero_optimization_stage() == 3 else {}

    def real(t: torch.Tensor, owner: Any = None) -> list[torch.Tensor]:
        spans = runs.get(id(owner if owner is not None else t))
        if spans is None or t.numel() != sum(n for _, n, _ in spans):
            return [t]
        return [t.view(-1).narrow(0, start, count) for start, _, count in spans if count]

    tensors = [_real_shard(p) for p in engine.module.parameters()]
    # the masters: what the optimizer steps (ZeRO-3 empties its param_groups between steps; its state keeps them)
    masters = {id(m): m for m in [p for g in opt.param_groups for p in g["params"]] + list(opt.state)}
    tensors += [v for m in masters.values() if torch.is_tensor(m) for v in real(m)]
    return tensors + [v for key, st in opt.state.items() for t in st.values() if torch.is_tensor(t)
                      for v in real(t, key)]


def _real_shard(p: torch.Tensor) -> torch.Tensor:
    """A parameter, or at ZeRO-3 the real elements of this rank's shard of it."""
    if not hasattr(p, "ds_tensor"):
        return p

    n = p.partition_numel()
    return p.ds_tensor.view(-1).narrow(0, 0, shard_real_numel(p.ds_numel, n, dist.get_rank(p.ds_process_group)))


def _stage3_real_runs(ds_optimizer: Any) -> dict[int, list[tuple[int, int, int]]]:
    """ZeRO-3: (start, shard size, real elements) of each parameter's shard in each sub-group's flat fp32 master,
    keyed by the master's id; the shards lie end to end in the order of `fp16_groups`."""

    runs = {}
    for s, params in enumerate(ds_optimizer.fp16_groups):
        rank = dist.get_rank(ds_optimizer.sub_group_process_groups[s])
        start, spans = 0, []
        for p in params:
            n = p.partition_numel()
            spans.append((start, n, shard_real_numel(p.ds_numel, n, rank)))
            start += n
        runs[id(ds_optimizer.fp32_partitioned_groups_flat[s])] = spans
    return runs


def state_is_finite(engine: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state_tensors(engine))
