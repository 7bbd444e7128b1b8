"""The loop: `Trainer.fit` runs the step table (each step is `bigbatch.run.step.train_step`) and decides what each
step's record means for the run: evaluate, checkpoint, stop itself (overflow, divergence), stop on request.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch

from bigbatch.config import Recipe, adaptive
from bigbatch.config.adaptive import Decision
from bigbatch.config.errors import Preempted, StorageFault, TrainingStopped
from bigbatch.config.schedule import ScheduledStep, samples_before, step_table
from bigbatch.data import BatchSource
from bigbatch.engine import client_optimizer
from bigbatch.optim.layerwise import LayerwiseOptimizer
from bigbatch.plan.hardware import cuda_peak_flops
from bigbatch.plan.timing import model_flops_per_sample
from bigbatch.run import checkpoint, distributed, faults, space
from bigbatch.run.metrics import MetricsLog, log, plot_loss, say
from bigbatch.run.noise import GradientNoiseScale
from bigbatch.run.overflow import OverflowGuard, state_is_finite
from bigbatch.run.preemption import StopRequest, mark_preempted
from bigbatch.run.resume import lr_at_position
from bigbatch.run.rundir import RunDir
from bigbatch.run.step import Halt, StepContext, StepRecord, train_step


@dataclass
class Trainer:
    recipe: Recipe
    run_dir: RunDir
    engine: Any
    data: BatchSource  # the data of the phase of `start_step`
    steps: list[ScheduledStep]
    rank: int
    world: int
    metrics: MetricsLog
    load_phase: Callable[[int], BatchSource]  # collective: every rank calls it at a phase change
    preemption: StopRequest  # a request to stop cleanly (exit 0, requeued); _halt is the run stopping itself (exit 3)
    start_step: int = 0
    precision: str = "fp32"  # the run's, for MFU against the device's peak at that precision
    overflow_in_a_row: int = 0  # the overflow guard's count at the checkpoint this start resumed from
    decisions: list[Decision] = field(default_factory=list)  # the adaptive batch's, as the checkpoint saved them
    noise_state: dict[str, Optional[float]] = field(default_factory=dict)  # the noise scale's moving averages

    def __post_init__(self) -> None:
        # the guard's count of steps skipped in a row is part of the run's state: saved with each checkpoint, so a
        # resume in the middle of a run of skips stops where the uninterrupted run would
        self.guard = OverflowGuard(self.engine, self.recipe.run.overflow_patience)
        self.guard.in_a_row = self.overflow_in_a_row
        self.last_saved = self.start_step
        ema = self.recipe.run.noise_scale_ema
        self.ctx = StepContext(self.engine, self.rank, self.world, self.recipe.run.seed, self.guard,
                               GradientNoiseScale(self.engine.module, ema) if ema else None)
        if self.ctx.noise is not None and self.noise_state:
            self.ctx.noise.load_state(self.noise_state)
        self.samples = samples_before(self.steps, self.start_step)  # read so far: what metrics.jsonl counts
        self.tokens = sum(sp.global_batch * sp.seq_len for sp in self.steps[: self.start_step])

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def evaluate(self, micro_batch: int) -> dict[str, float]:
        """Held-out loss over the fixed eval set (token-weighted across micro-batches and ranks) and perplexity."""
        self.engine.eval()
        total = count = 0.0
        with torch.no_grad():
            for batch in self.data.eval_batches(self.rank, self.world, micro_batch):
                loss = self.engine(**batch)
                labels = batch["labels"]
                n = float((labels != -100).sum()) if self.recipe.model.arch == "bert" else float(labels[:, 1:].numel())
                total += float(loss) * n
                count += n
                faults.at("eval", self.run_dir.path)
        self.engine.train()
        total, count = distributed.sum_across_ranks([total, count])
        loss = total / max(count, 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def save(self, step: int) -> None:
        """A checkpoint of the state after `step` steps; its cost goes to metrics.jsonl as `checkpoint_s`."""
        started = time.perf_counter()
        state = {"step": step, "samples": samples_before(self.steps, step), "recipe": self.recipe.name,
                 "overflow_in_a_row": self.guard.in_a_row, "batch_decisions": [list(d) for d in self.decisions],
                 "noise_scale_state": self.ctx.noise.state() if self.ctx.noise else {}}
        checkpoint.save(self.engine, self.run_dir.checkpoints, step, state, self.recipe.checkpoint.keep_last,
                        self.is_writer, distributed.barrier, self.world)
        self.last_saved = step
        self.metrics.write({"step": step, "samples": state["samples"], "checkpoint_s": time.perf_counter() - started})

    def preempt(self, step: int, reason: str) -> dict[str, Any]:
        """Every rank, once all agreed to stop: the state after `step` steps checkpointed (unless it already is, or
        no step has run), `PREEMPTED` written for the SLURM template to requeue on."""
        if self.last_saved != step:
            self.save(step)
        if self.is_writer:
            mark_preempted(self.run_dir, step, reason)
            saved = f"checkpoint {checkpoint.tag_for(step)} saved" if step else "no step had run, nothing to save"
            say(f"stopped at step {step} ({reason}): {saved}; the next start with --resume (or the requeued SLURM "
                "job) continues from it")
        return {"preempted": True, "stopped_at": step}

    def _halt(self, step: int, message: Callable[[Optional[str], Optional[str]], str]) -> None:
        """Every rank: checkpoint the current (last good) state as step `step`, say why (`message(saved tag, tag to
        resume from)`) and stop the run. A state that is not finite on some rank is not saved as the last good one:
        the sentence names the checkpoint `latest` still points to."""
        self._stop_if_unwritten()  # a full disk first: it is why this step's record is missing
        if distributed.sum_across_ranks([float(not state_is_finite(self.engine))])[0] == 0:
            self.save(step)
            sentence = message(checkpoint.tag_for(step), None)
        else:
            sentence = message(None, self.run_dir.latest_checkpoint())
        if self.is_writer:
            self.run_dir.mark_diverged(sentence)
            plot_loss(self.run_dir)
            log.error(sentence)
        raise TrainingStopped(sentence)

    @contextmanager
    def _progress(self) -> Iterator[Any]:
        """A progress bar on the writer's terminal (None elsewhere: logs get a line every run.log_every steps)."""
        bar = None
        if self.is_writer and sys.stdout.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.start_step, dynamic_ncols=True, unit="step")
        try:
            yield bar
        finally:
            if bar is not None:
                bar.close()

    def _enter_phase(self, sp: ScheduledStep) -> None:
        """At a phase boundary: this phase's data and batch shape; model, optimizer and LR scheduler state stay."""
        faults.at("phase", self.run_dir.path)
        self.data = self.load_phase(sp.phase)
        if self.is_writer:
            n = sum(1 for x in self.steps if x.phase == sp.phase)
            say(f"phase {sp.phase + 1}/{self.steps[-1].phase + 1} from step {sp.step}: seq {sp.seq_len}, batch "
                f"{sp.micro_batch} x {sp.grad_accum} x {self.world} = {sp.global_batch}, {n} steps, "
                f"peak lr {max(x.lr for x in self.steps if x.phase == sp.phase):.3g} after its own warmup")

    def fit(self) -> dict[str, Any]:
        """The loop: each step's record, then what it means for the run (stop, checkpoint, preempt, report)."""
        if self.start_step == 0:
            first = self.evaluate(self.steps[0].micro_batch)
            self.metrics.write({"step": 0, "samples": 0, "tokens": 0, **first})
            if self.is_writer:
                say(f"step 0: eval loss {first['eval_loss']:.4f} (before any update)")
        if self.preemption.agreed():  # asked during start-up's last stages or the first evaluation
            return self.preempt(self.start_step, self.preemption.reason or "")
        last: dict[str, Any] = {}
        with self._progress() as bar:
            for step in range(self.start_step, self.total_steps):
                sp = self.steps[step]
                if step > self.start_step and sp.phase != self.steps[step - 1].phase:
                    try:
                        self._enter_phase(sp)  # re-packing at the new length looks at stop requests between chunks
                    except Preempted as stop:
                        return {**last, **self.preempt(step, stop.reason)}
                try:
                    result = train_step(self.ctx, self.data, sp)
                except Halt as halt:
                    self._halt(halt.at, halt.message)
                done = step + 1
                last = self._record(sp, result)
                last.update(self._adapt(done))
                if done % self.recipe.run.eval_every == 0 or done == self.total_steps:
                    last.update(self._timed_evaluation(sp.micro_batch))
                self.metrics.write(last)
                faults.at(f"step{done}", self.run_dir.path)
                if self.guard.update(result.skipped, result.was_at_minimum):
                    self._halt(done, partial(self.guard.overflow_message, done))
                every = self.recipe.checkpoint.every_steps
                if every and done % every == 0 and done != self.total_steps:
                    self._stop_if_unwritten()  # no checkpoint claims a step whose record is missing
                    self.save(done)
                if done != self.total_steps:
                    asked, unwritten = self.preemption.agree(failing=self.metrics.failed is not None)
                    if unwritten:
                        self._stop_unwritten()
                    if asked:
                        return {**last, **self.preempt(done, self.preemption.reason or "")}
                self._report(last, bar)
        if self.start_step < self.total_steps:
            self._stop_if_unwritten()
            self.save(self.total_steps)
            self._stop_if_unwritten()
        return last

    def _stop_if_unwritten(self) -> None:
        """Every rank (one small all-reduce): a record the writer could not write (a full disk) stops the run as a
        failed checkpoint does. Each step's check rides on the stop request's all-reduce instead (`fit`)."""
        if distributed.sum_across_ranks([1.0 if self.metrics.failed else 0.0])[0] > 0:
            self._stop_unwritten()

    def _stop_unwritten(self) -> None:
        """Every rank, once all know the writer's record failed: its reason, sent only now, in one sentence."""
        raise StorageFault(space.record_failed(self.run_dir, distributed.broadcast(self.metrics.failed)))

    def _adapt(self, done: int) -> dict[str, Any]:
        """A decision of the adaptive batch when one falls after `done` steps: the rest of the phase's step table
        follows it (batch, sampler offsets, LR by the rule), the scheduler's LR with it; its record for metrics.jsonl.
        Every rank decides on the writer's estimate (one small broadcast every `adaptive_every` steps); a later phase
        with `batch_from="adapted"` starts from the batch the previous one reached (no estimate needed)."""
        b = self.recipe.batch
        carry = adaptive.carried(self.recipe, self.steps, done, self.world) if b.adaptive else None
        if carry is None and not (b.adaptive and adaptive.due(self.steps, done, b.adaptive_every)):
            return {}
        old, phase = self.steps[done].global_batch, self.steps[done].phase
        if carry is None:
            noise = distributed.broadcast(self.ctx.noise.estimate if self.ctx.noise else None)
            new = adaptive.decide(old, noise, b, self.steps[done].micro_batch * self.world)
            why = ("noise scale " + (f"{noise:,.0f}" if noise is not None else "not estimated yet")
                   + f", factor {b.adaptive_factor:g}")
        else:
            noise, new = None, carry
            why = f"phase {phase + 1} starts from the batch phase {phase} reached: batch_from=adapted"
        if new != old:
            self.decisions.append((done, new))
            self.steps[:] = step_table(self.recipe, self.world, decisions=self.decisions)
            lr_at_position(self.engine.lr_scheduler, client_optimizer(self.engine))
        nxt = self.steps[done]
        if self.is_writer:
            say(f"step {done}: adaptive batch {old} -> {new} ({why}); {nxt.micro_batch} x {nxt.grad_accum} x "
                f"{self.world}, lr {nxt.lr:.4g}")
        return {"decision_noise_scale": noise, "decision_old_batch": old, "decision_new_batch": new,
                "decision_lr": nxt.lr, **({"decision_carried": True} if carry is not None else {})}

    def _record(self, sp: ScheduledStep, result: StepRecord) -> dict[str, Any]:
        """The step's metrics.jsonl record, with the trust ratios every few steps (evaluation is `fit`'s decision)."""
        r, done = self.recipe, sp.step + 1
        self.samples += sp.global_batch
        self.tokens += sp.global_batch * sp.seq_len
        record: dict[str, Any] = {
            "step": done, "samples": self.samples, "tokens": self.tokens, "phase": sp.phase + 1,
            "global_batch": sp.global_batch, "seq_len": sp.seq_len, "lr": result.lr, "loss": result.loss,
            "grad_norm": result.grad_norm, "loss_scale": result.loss_scale, "skipped_steps": result.skipped_steps,
            "skipped_this_step": result.skipped,
            "updates": done - result.skipped_steps,  # applied updates; the LR schedule follows these
            "step_time_s": result.seconds,
            "time": time.time(),  # wall clock: the loop's own overhead shows between consecutive records
            "samples_per_s": sp.global_batch / result.seconds,
            "tokens_per_s": sp.global_batch * sp.seq_len / result.seconds,
            **result.noise,
            **result.terms,
        }
        if torch.cuda.is_available():
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            peak = cuda_peak_flops(torch.cuda.get_device_name(0), self.precision)
            if peak:  # model FLOPs per matmul, the planner's own count (bigbatch.plan.timing), so the two agree
                flops = model_flops_per_sample(r.model, self.data.vocab_size, sp.seq_len, sp.micro_batch,
                                               r.data.mlm_probability)
                record["mfu"] = flops * record["samples_per_s"] / (peak * self.world)
        optimizer, every = client_optimizer(self.engine), r.run.trust_ratio_every
        if isinstance(optimizer, LayerwiseOptimizer) and every and (done % every == 0 or done == 1):
            record["trust_ratios"] = optimizer.trust_ratios()
        return record

    def _timed_evaluation(self, micro_batch: int) -> dict[str, float]:
        started = time.perf_counter()
        return {**self.evaluate(micro_batch), "eval_s": time.perf_counter() - started}

    def _report(self, record: dict[str, Any], bar: Any) -> None:
        """Writer rank: the loss plot at each evaluation, and a line (or the progress bar) per step."""
        if not self.is_writer:
            return
        if "eval_loss" in record:
            plot_loss(self.run_dir)
        done = record["step"]
        summary = (f"loss {record['loss']:.4f} lr {record['lr']:.3g} {record['samples_per_s']:.0f} samples/s"
                   + (f" eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""))
        if bar is not None:
            bar.set_postfix_str(summary)
            bar.update(1)
        elif done % self.recipe.run.log_every == 0 or done == self.total_steps:
            say(f"step {done}/{self.total_steps}: {summary}")
