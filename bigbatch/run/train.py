"""The training loop: data -> forward -> engine.backward -> engine.step, with evaluation, metrics and checkpoints.

Read top to bottom: `Trainer.fit()` is the loop (each step is `bigbatch.run.step.train_step`); `train()` sets the run
up: `resolve()` the recipe, the run directory, then `_start()` (data, model, DeepSpeed engine, resume).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from bigbatch.check.preflight import ready_to_train
from bigbatch.config import ConfigError, Recipe
from bigbatch.config.schedule import StepPlan, samples_before
from bigbatch.data import BatchSource, prepare
from bigbatch.engine import client_optimizer, initialize
from bigbatch.models.build import build_model, count_parameters, padded_vocab
from bigbatch.optim import param_groups
from bigbatch.optim.layerwise import LayerwiseOptimizer
from bigbatch.resolve import ResolvedRun, phase_recipe
from bigbatch.run import checkpoint, distributed, faults, resume
from bigbatch.run.metrics import MetricsLog, device_peak_flops, plot_loss, truncate_metrics
from bigbatch.run.noise import GradientNoiseScale
from bigbatch.run.overflow import OverflowGuard, TrainingStopped, state_is_finite
from bigbatch.run.preemption import (
    Preempted,
    StopRequest,
    clear_markers,
    install_handlers,
    local_request,
    mark_preempted,
    restore_default_handlers,
)
from bigbatch.run.rundir import RunDir, default_run_dir, environment
from bigbatch.run.step import Halt, StepContext, StepRecord, train_step

log = logging.getLogger("bigbatch")


def _say(message: str) -> None:
    log.info(message)
    print(message, flush=True)


@dataclass
class Trainer:
    recipe: Recipe
    run_dir: RunDir
    engine: Any
    data: BatchSource  # the data of the phase of `start_step`
    steps: list[StepPlan]
    rank: int
    world: int
    metrics: MetricsLog
    load_phase: Callable[[int], BatchSource]  # collective: every rank calls it at a phase change
    preemption: StopRequest  # a request to stop cleanly (exit 0, requeued); _halt is the run stopping itself (exit 3)
    start_step: int = 0
    n_params: int = 0
    overflow_in_a_row: int = 0  # the overflow guard's count at the checkpoint this start resumed from

    def __post_init__(self) -> None:
        # the guard's count of steps skipped in a row is part of the run's state: saved with each checkpoint, so a
        # resume in the middle of a run of skips stops where the uninterrupted run would
        self.guard = OverflowGuard(self.engine, self.recipe.run.overflow_patience)
        self.guard.in_a_row = self.overflow_in_a_row
        self.last_saved = self.start_step
        ema = self.recipe.run.noise_scale_ema
        self.ctx = StepContext(self.engine, self.rank, self.world, self.recipe.run.seed, self.guard,
                               GradientNoiseScale(self.engine.module, ema) if ema else None)
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
                 "overflow_in_a_row": self.guard.in_a_row}
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
            _say(f"stopped at step {step} ({reason}): {saved}; the next start with --resume (or the requeued SLURM "
                 "job) continues from it")
        return {"preempted": True, "stopped_at": step}

    def _halt(self, step: int, message: Callable[[Optional[str], Optional[str]], str]) -> None:
        """Every rank: checkpoint the current (last good) state as step `step`, say why (`message(saved tag, tag to
        resume from)`) and stop the run. A state that is not finite on some rank is not saved as the last good one:
        the sentence names the checkpoint `latest` still points to."""
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

    def _enter_phase(self, sp: StepPlan) -> None:
        """At a phase boundary: this phase's data and batch shape; model, optimizer and LR scheduler state stay."""
        faults.at("phase", self.run_dir.path)
        self.data = self.load_phase(sp.phase)
        if self.is_writer:
            n = sum(1 for x in self.steps if x.phase == sp.phase)
            _say(f"phase {sp.phase + 1}/{self.steps[-1].phase + 1} from step {sp.step}: seq {sp.seq_len}, batch "
                 f"{sp.micro_batch} x {sp.grad_accum} x {self.world} = {sp.global_batch}, {n} steps, "
                 f"peak lr {max(x.lr for x in self.steps if x.phase == sp.phase):.3g} after its own warmup")

    def fit(self) -> dict[str, Any]:
        """The loop: each step's record, then what it means for the run (stop, checkpoint, preempt, report)."""
        if self.start_step == 0:
            first = self.evaluate(self.steps[0].micro_batch)
            self.metrics.write({"step": 0, "samples": 0, "tokens": 0, **first})
            if self.is_writer:
                _say(f"step 0: eval loss {first['eval_loss']:.4f} (before any update)")
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
                if self.guard.update(result.skipped, result.was_at_minimum):
                    self._halt(done, partial(self.guard.overflow_message, done))
                every = self.recipe.checkpoint.every_steps
                if every and done % every == 0 and done != self.total_steps:
                    self.save(done)
                if done != self.total_steps and self.preemption.agreed():
                    return {**last, **self.preempt(done, self.preemption.reason or "")}
                self._report(last, bar)
        if self.start_step < self.total_steps:
            self.save(self.total_steps)
        return last

    def _record(self, sp: StepPlan, result: StepRecord) -> dict[str, Any]:
        """The step's metrics.jsonl record, with what runs every few steps (trust ratios, evaluation) added."""
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
        }
        if torch.cuda.is_available():
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            peak = device_peak_flops(torch.cuda.get_device_name(0))
            if peak:  # model FLOPs: 6 N per token, forward + backward (Kaplan et al. 2020)
                record["mfu"] = 6.0 * self.n_params * record["tokens_per_s"] / (peak * self.world)
        optimizer, every = client_optimizer(self.engine), r.run.trust_ratio_every
        if isinstance(optimizer, LayerwiseOptimizer) and every and (done % every == 0 or done == 1):
            record["trust_ratios"] = optimizer.trust_ratios()
        if done % r.run.eval_every == 0 or done == self.total_steps:
            eval_started = time.perf_counter()
            record.update(self.evaluate(sp.micro_batch))
            record["eval_s"] = time.perf_counter() - eval_started
        self.metrics.write(record)
        faults.at(f"step{done}", self.run_dir.path)
        return record

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
            _say(f"step {done}/{self.total_steps}: {summary}")


def _phase_summary(steps: list[StepPlan]) -> list[dict[str, Any]]:
    """Per phase: first step, steps, batch range, sequence length and peak LR (written to recipe.json)."""
    out: list[dict[str, Any]] = []
    for sp in steps:
        if not out or out[-1]["phase"] != sp.phase + 1:
            out.append({"phase": sp.phase + 1, "first_step": sp.step, "steps": 0, "seq_len": sp.seq_len,
                        "min_global_batch": sp.global_batch, "global_batch": sp.global_batch, "peak_lr": sp.lr})
        ph = out[-1]
        ph["steps"] += 1
        ph["min_global_batch"] = min(ph["min_global_batch"], sp.global_batch)
        ph["global_batch"] = max(ph["global_batch"], sp.global_batch)
        ph["peak_lr"] = max(ph["peak_lr"], sp.lr)
    return out


def _banner(run: ResolvedRun, run_dir: RunDir, n_params: int) -> str:
    return (f"bigbatch {run.recipe.name}: {n_params / 1e6:.2f}M params | world {run.world} | batch {run.batch} "
            f"(micro x accum x world) | {run.recipe.optimizer.type.upper()} lr {run.lr:.3g} ({run.lr_rule}) | "
            f"ZeRO {run.ds.stage} | {run.ds.precision}{' | act-ckpt' if run.ds.checkpointing else ''} | run {run_dir}")


def _setup_logging(run_dir: RunDir, rank: int) -> None:
    handler = logging.FileHandler(run_dir.log_file(rank))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("bigbatch", "DeepSpeed"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # bigbatch prints its own banner and metrics


def _choose_resume(recipe: Recipe, stage: int, root: Path, world: int) -> Any:
    """Writer rank: the tag to resume from (None without one), converted to a universal checkpoint when it was written
    on another number of ranks under ZeRO; a ConfigError, for every rank to raise, when it cannot be resumed here."""
    tag = checkpoint.choose(root)  # verifies the manifests once
    if not (tag and stage and checkpoint.saved_world(root / tag) not in (None, world)):
        return tag
    lars = recipe.optimizer.type.lower() == "lars"
    if lars and stage == 3:
        return ConfigError(
            f"{root / tag} was written by {checkpoint.saved_world(root / tag)} ranks and this start has {world}: a "
            "LARS run under ZeRO-3 resumes on the same number of ranks only (its momentum has no universal-checkpoint "
            "path there yet).")
    return checkpoint.to_universal(root, tag, lars=lars)


def train(recipe: Recipe, run_dir: Optional[Path] = None, resume: bool = False, overwrite: bool = False,
          argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Runs one recipe to its last step on the ranks of this launch; returns the last metrics record, with
    `preempted` when a stop request ended this start first (at any moment: start-up, data, a step, an evaluation, a
    checkpoint write, a phase change), leaving the run resumable."""
    installed = install_handlers()  # `bigbatch.cli.main` installs them earlier still, as a program's first act
    try:
        return _train(recipe, run_dir, resume, overwrite, argv)
    finally:
        if installed:  # an in-process caller gets its signals back
            restore_default_handlers()


def _train(recipe: Recipe, path: Optional[Path], resume_run: bool, overwrite: bool,
           argv: Optional[list[str]]) -> dict[str, Any]:
    # Everything that can be wrong with the input is checked before the process group starts.
    distributed.ensure_env()
    run = ready_to_train(recipe, distributed.world_size_from_env())  # the pre-flight `bigbatch check` runs too
    previous = None
    if path is not None:
        run_dir = RunDir(path)
        mode = run_dir.decide_mode(resume_run, overwrite)
        previous = run_dir.read_recipe() if mode == "resume" else None
        if previous is not None:
            resume.refuse_changes(previous, recipe.to_dict(), run_dir)

    rank, _ = distributed.init()  # the world size is the one resolved above, from the same environment
    if path is None:
        run_dir = RunDir(Path(distributed.broadcast(str(default_run_dir(recipe.run.runs_root, recipe.name)))))
        mode = run_dir.decide_mode(resume_run, overwrite)
    distributed.barrier()  # every rank has read the directory before the writer changes it
    if rank == 0:
        run_dir.prepare(mode)
        if mode == "resume":
            run_dir.keep_records()
        clear_markers(run_dir)
    distributed.barrier()
    _setup_logging(run_dir, rank)
    stop = StopRequest(run_dir.path)
    engine = None
    try:
        faults.at("startup", run_dir.path)
        stop.check()  # a request that came during rendezvous or the checks above
        engine, trainer = _start(run, run_dir, mode, previous, rank, stop, argv)
        last = trainer.fit()
    except Preempted as request:  # during start-up: the run stays as its last checkpoint left it
        if rank == 0:
            mark_preempted(run_dir, None, request.reason, during="start-up")
            _say(f"stopped during start-up ({request.reason}); the next start with --resume (or the requeued SLURM "
                 "job) continues the run, reusing the data already prepared")
        return {"preempted": True}
    finally:
        if engine is not None:
            engine.destroy()
    if rank == 0:
        plot_loss(run_dir)
        if not last.get("preempted"):
            _say(f"done: {run_dir}")
    return last


def _start(run: ResolvedRun, run_dir: RunDir, mode: str, previous: Optional[dict[str, Any]], rank: int,
           stop: StopRequest, argv: Optional[list[str]]) -> tuple[Any, Trainer]:
    """Every rank: data, model, engine and resume; the trainer, ready for its loop. Stop requests are looked at
    between these stages (raising Preempted)."""
    say = _say if rank == 0 else log.info
    recipe, world, steps, lr, ds_config = run.recipe, run.world, run.steps, run.lr, run.ds_config

    def load_phase(phase: int) -> BatchSource:
        """Phase 0's data, or a later phase's: the same corpus and tokenizer, packed at that phase's length."""
        if phase == 0:
            return data
        of_phase = phase_recipe(recipe, phase)
        of_phase = dataclasses.replace(of_phase, data=dataclasses.replace(of_phase.data,
                                                                          tokenizer=str(data.tokenizer.path)))
        return prepare(of_phase, run_dir.data(phase), rank == 0, distributed.broadcast, log=say,
                       rank=rank, world=world, stop_requested=requested)

    def requested(moment: str) -> Optional[str]:
        """Asked by the writer between the stages of data preparation (see `bigbatch.data.prepare`)."""
        faults.at(moment, run_dir.path)
        return local_request(run_dir.path)

    data = prepare(recipe, run_dir.data(), rank == 0, distributed.broadcast, log=say, rank=rank, world=world,
                   stop_requested=requested)
    stop.check()
    torch.manual_seed(recipe.run.seed)
    model = build_model(recipe.model, data.vocab_size, pad_id=0, checkpointing=run.ds.checkpointing)
    n_params = count_parameters(model)

    def schedule(opt: Any) -> Any:
        # The optimizer's LR is the first phase's peak; the step table holds each step's LR (warmups, decays,
        # phases, the ramp's rule), so the factor is a lookup.
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: steps[min(k, len(steps) - 1)].lr / lr)

    hostnames = distributed.gather_objects(__import__("socket").gethostname())
    if rank == 0:
        _write_records(run, run_dir, previous, data.vocab_size, n_params, environment(list(argv or sys.argv), world,
                                                                                      hostnames))
    resume_tag = _resume_tag(run, run_dir.checkpoints, rank) if mode == "resume" else None
    if resume_tag and resume_tag.endswith("-universal"):
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    groups = param_groups(model, recipe.optimizer.weight_decay)
    engine, *_ = initialize(model=model, config=ds_config, model_parameters=groups, lr_scheduler=schedule)
    try:
        start_step, overflow_in_a_row = _resume(engine, recipe, run_dir, mode, resume_tag, steps, rank)
        if start_step < len(steps) and steps[start_step].phase:
            data = load_phase(steps[start_step].phase)
        stop.check()
    except BaseException:
        engine.destroy()
        raise
    trainer = Trainer(recipe, run_dir, engine, data, steps, rank, world,
                      MetricsLog(run_dir.metrics_file, engine.monitor, enabled=rank == 0),
                      load_phase, stop, start_step=start_step, n_params=n_params,
                      overflow_in_a_row=overflow_in_a_row)
    return engine, trainer


def _write_records(run: ResolvedRun, run_dir: RunDir, previous: Optional[dict[str, Any]], vocab_size: int,
                   n_params: int, env: dict[str, Any]) -> None:
    """Writer rank: recipe.json (the tree and what was resolved from it), env.json and ds_config.json; the banner."""
    recipe, steps = run.recipe, run.steps
    resolved = {"lr": run.lr, "lr_rule": run.lr_rule, "world": run.world, "micro_batch": run.batch.micro_batch,
                "grad_accum": run.batch.grad_accum, "global_batch": run.batch.global_batch,
                "warmup_steps": run.warmup_steps, "total_steps": len(steps),
                "total_samples": sum(sp.global_batch for sp in steps), "phases": _phase_summary(steps),
                "vocab_size": vocab_size,
                "padded_vocab_size": padded_vocab(vocab_size, recipe.model.pad_vocab_to_multiple),
                "parameters": n_params}
    if previous is not None:  # what this start changed (the previous start's recipe.json is in starts/<n>/)
        resolved["changed_on_resume"] = resume.changed_keys(previous, recipe.to_dict())
    run_dir.write_records(recipe.to_dict(), resolved, env, run.ds_config)
    _say(_banner(run, run_dir, n_params))
    if resolved.get("changed_on_resume"):
        _say("changed at this resume: " + ", ".join(f"{k} {a!r} -> {b!r}"
                                                   for k, (a, b) in resolved["changed_on_resume"].items()))
    if len(recipe.phases) or recipe.batch.ramp_start:
        _say("phases: " + " -> ".join(
            f"{ph['phase']}: seq {ph['seq_len']}, {ph['steps']} steps at batch "
            + (f"{ph['min_global_batch']}..{ph['global_batch']}" if ph["min_global_batch"] != ph["global_batch"]
               else f"{ph['global_batch']}") + f", peak lr {ph['peak_lr']:.3g}"
            for ph in resolved["phases"]))


def _resume_tag(run: ResolvedRun, root: Path, rank: int) -> Optional[str]:
    """Every rank: the checkpoint to resume from, chosen by the writer before DeepSpeed starts (one written on another
    number of ranks under ZeRO loads through DeepSpeed's universal checkpoint, which the engine must be set for)."""
    tag = None
    if rank == 0:
        try:
            tag = _choose_resume(run.recipe, run.ds.stage, root, run.world)
        except Exception as err:  # the others wait in the broadcast below: they raise it too
            distributed.broadcast(RuntimeError(f"choosing the checkpoint to resume on rank 0 failed: {err}"))
            raise
    tag = distributed.broadcast(tag)
    if isinstance(tag, Exception):
        raise tag
    return tag


def _resume(engine: Any, recipe: Recipe, run_dir: RunDir, mode: str, tag: Optional[str], steps: list[StepPlan],
            rank: int) -> tuple[int, int]:
    """Loads `tag` (every rank) with this start's hyper-parameters put back (`bigbatch.run.resume`); returns the step to
    start from and the overflow guard's saved count."""
    if mode != "resume":
        return 0, 0
    start_step = overflow_in_a_row = 0
    if tag is not None:
        optimizer = client_optimizer(engine)
        settings, base_lrs = resume.hyperparameters(optimizer), list(engine.lr_scheduler.base_lrs)
        state = checkpoint.load(engine, run_dir.checkpoints, tag)
        resume.restore(optimizer, engine.lr_scheduler, settings, base_lrs)
        start_step, overflow_in_a_row = int(state["step"]), int(state.get("overflow_in_a_row", 0))
        expected = samples_before(steps, start_step)
        if int(state["samples"]) != expected:  # the sampler position follows the step table: data would repeat
            raise ConfigError(                 # or be skipped without a word
                f"{run_dir.checkpoints / tag} was saved after {state['samples']} samples, but this recipe "
                f"reaches step {start_step} after {expected}: resume with the batch settings and phases the run "
                "started with (its recipe.json), or start a new run directory.")
        if rank == 0:
            _say(f"resumed {run_dir} at step {start_step} ({state['samples']} samples)"
                 + (" through a universal checkpoint (another number of ranks)" if tag.endswith("-universal") else ""))
    elif rank == 0:
        _say(f"no checkpoint in {run_dir.checkpoints}; starting from step 0")
    if rank == 0:  # the steps after the checkpoint are recorded again; without one, every step
        truncate_metrics(run_dir.metrics_file, start_step if tag is not None else -1)
    return start_step, overflow_in_a_row
