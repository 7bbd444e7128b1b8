"""`bigbatch train`'s set-up, read top to bottom: `train()` resolves the recipe and runs the pre-flight checks, claims
the run directory, then `_start()` builds the data, the model and the DeepSpeed engine and resumes (`bigbatch.run.
resume`); the loop itself is `bigbatch.run.loop.Trainer.fit`.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from bigbatch.check.preflight import chosen_in_free_memory, ready_to_train
from bigbatch.config import Recipe
from bigbatch.config.errors import Preempted, StorageFault
from bigbatch.config.schedule import ScheduledStep
from bigbatch.data import BatchSource, prepare
from bigbatch.engine import initialize
from bigbatch.models.build import build_model, count_parameters, padded_vocab
from bigbatch.models.compression import start_from
from bigbatch.optim import param_groups
from bigbatch.plan.advice import choose_at_start
from bigbatch.resolve import ResolvedRun, phase_recipe
from bigbatch.run import distributed, faults, resume, space, teacher
from bigbatch.run.loop import Trainer
from bigbatch.run.metrics import MetricsLog, RankLog, log, plot_loss, say
from bigbatch.run.preemption import (
    StopRequest,
    clear_markers,
    install_handlers,
    local_request,
    mark_preempted,
    restore_default_handlers,
)
from bigbatch.run.rundir import RunDir, default_run_dir, environment


def _phase_summary(steps: list[ScheduledStep]) -> list[dict[str, Any]]:
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
    handler = RankLog(run_dir.log_file(rank))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("bigbatch", "DeepSpeed"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # bigbatch prints its own banner and metrics


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
    world = distributed.world_size_from_env()
    recipe.validate()
    tutor = teacher.load(recipe.distill.teacher) if recipe.distill.teacher else None
    if tutor is not None:  # the student takes the teacher's tokenizer
        recipe = teacher.student_recipe(recipe, tutor)
    previous, kept = None, None
    if path is not None:
        run_dir = RunDir(path)
        mode = run_dir.decide_mode(resume_run, overwrite)
        previous = run_dir.read_recipe() if mode == "resume" else None
        kept = (run_dir.read_resolved() or {}).get("auto") if mode == "resume" else None
    # an "auto" micro-batch and checkpointing: chosen now (a resume on as many GPUs keeps the last start's)
    asked = recipe  # recipe.json keeps "auto", so that a start on another world size chooses again
    recipe, auto = choose_at_start(recipe, world, kept)
    run = ready_to_train(recipe, world)  # the pre-flight `bigbatch check` runs too
    if previous is not None:
        resume.refuse_changes(previous, asked.to_dict(), run_dir)
        if tutor is not None:
            teacher.refuse_changed(run_dir, tutor)

    rank, _ = distributed.init()  # the world size is the one resolved above, from the same environment
    if auto and torch.cuda.is_available() and not (kept and kept.get("world") == world):
        # chosen above in what every rank can see alike (the device's total); now in the free memory they agree on
        run, auto = chosen_in_free_memory(asked, world, distributed.min_across_ranks)
    if path is None:
        run_dir = RunDir(Path(distributed.broadcast(str(default_run_dir(recipe.run.runs_root, recipe.name)))))
        mode = run_dir.decide_mode(resume_run, overwrite)
    _claim(run, run_dir, mode, rank)
    _setup_logging(run_dir, rank)
    stop = StopRequest(run_dir.path, distributed.sum_across_ranks)
    engine = None
    try:
        faults.at("startup", run_dir.path)
        stop.raise_if_requested()  # a request that came during rendezvous or the checks above
        engine, trainer = _start(run, run_dir, mode, previous, rank, stop, argv, (asked, auto), tutor)
        last = trainer.fit()
    except Preempted as request:  # during start-up: the run stays as its last checkpoint left it
        if rank == 0:
            mark_preempted(run_dir, None, request.reason, during="start-up")
            say(f"stopped during start-up ({request.reason}); the next start with --resume (or the requeued SLURM "
                "job) continues the run, reusing the data already prepared")
        return {"preempted": True}
    finally:
        if engine is not None:
            engine.destroy()
    if rank == 0:
        plot_loss(run_dir)
        if not last.get("preempted"):
            say(f"done: {run_dir}")
    return last


def _claim(run: ResolvedRun, run_dir: RunDir, mode: str, rank: int) -> None:
    """Every rank: the writer looks at the storage before anything is written (every rank ends the same way on its
    answer), then claims the directory for this start."""
    room = distributed.broadcast(_room(run, run_dir) if rank == 0 else None)
    if isinstance(room, StorageFault):
        raise room
    distributed.barrier()  # every rank has read the directory before the writer changes it
    if rank == 0:
        if room:
            say(room)
        run_dir.claim(mode)
        if mode == "resume":
            run_dir.keep_records()
        clear_markers(run_dir)
    distributed.barrier()


def _room(run: ResolvedRun, run_dir: RunDir) -> Optional[StorageFault | str]:
    """Writer rank: the storage fault that refuses this start (returned, to be broadcast), or a note, or None."""
    try:
        return space.refuse_unless_room(run, run_dir)
    except StorageFault as fault:
        return fault


def _start(run: ResolvedRun, run_dir: RunDir, mode: str, previous: Optional[dict[str, Any]], rank: int,
           stop: StopRequest, argv: Optional[list[str]], auto: tuple[Optional[Recipe], str] = (None, ""),
           tutor: Optional[teacher.Teacher] = None) -> tuple[Any, Trainer]:
    """Every rank: data, model, engine and resume; the trainer, ready for its loop. Stop requests are looked at
    between these stages (raising Preempted)."""
    tell = say if rank == 0 else log.info
    recipe, world, steps, lr, ds_config = run.recipe, run.world, run.steps, run.lr, run.ds_config

    def load_phase(phase: int) -> BatchSource:
        """Phase 0's data, or a later phase's: the same corpus and tokenizer, packed at that phase's length."""
        if phase == 0:
            return data
        of_phase = phase_recipe(recipe, phase)
        of_phase = dataclasses.replace(of_phase, data=dataclasses.replace(of_phase.data,
                                                                          tokenizer=str(data.tokenizer.path)))
        return prepare(of_phase, run_dir.data(phase), rank == 0, distributed.broadcast, log=tell,
                       rank=rank, world=world, stop_requested=requested)

    def requested(moment: str) -> Optional[str]:
        """Asked by the writer between the stages of data preparation (see `bigbatch.data.prepare`)."""
        faults.at(moment, run_dir.path)
        return local_request(run_dir.path)

    data = prepare(recipe, run_dir.data(), rank == 0, distributed.broadcast, log=tell, rank=rank, world=world,
                   stop_requested=requested)
    stop.raise_if_requested()
    torch.manual_seed(recipe.run.seed)
    model = _model(run, data.vocab_size, tutor)
    n_params = count_parameters(model)

    def schedule(opt: Any) -> Any:
        # The optimizer's LR is the first phase's peak; the step table holds each step's LR (warmups, decays,
        # phases, the ramp's rule), so the factor is a lookup.
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: steps[min(k, len(steps) - 1)].lr / lr)

    hostnames = distributed.gather_objects(socket.gethostname())
    space.written_by_writer(lambda: _write_records(run, run_dir, previous, data.vocab_size, n_params, environment(
        list(argv or sys.argv), world, hostnames), auto, tutor.record if tutor else None), rank == 0,
        distributed.broadcast, "the records", run_dir)
    resume_tag = resume.choose(run, run_dir.checkpoints, rank) if mode == "resume" else None
    if resume_tag and resume_tag.endswith("-universal"):
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    groups = param_groups(model, recipe.optimizer.weight_decay)
    engine, *_ = initialize(model=model, config=ds_config, model_parameters=groups, lr_scheduler=schedule)
    try:
        resumed = resume.load(engine, run, run_dir, resume_tag, rank) if mode == "resume" else resume.Resumed()
        if resumed.step < len(steps) and steps[resumed.step].phase:
            data = load_phase(steps[resumed.step].phase)
        stop.raise_if_requested()
    except BaseException:
        engine.destroy()
        raise
    trainer = Trainer(recipe, run_dir, engine, data, steps, rank, world,
                      MetricsLog(run_dir.metrics_file, engine.monitor, enabled=rank == 0),
                      load_phase, stop, start_step=resumed.step, precision=run.ds.precision,
                      overflow_in_a_row=resumed.overflow_in_a_row, decisions=list(resumed.decisions),
                      noise_state=resumed.noise)
    return engine, trainer


def _model(run: ResolvedRun, vocab_size: int, tutor: Optional[teacher.Teacher]) -> Any:
    """The model the run trains: built fresh from the recipe's shape (seeded by the caller), or from the weights of
    model.init_from; a distillation's student carrying its teacher."""
    recipe = run.recipe
    model = build_model(recipe.model, vocab_size, pad_id=0, checkpointing=run.ds.checkpointing)
    if recipe.model.init_from:
        start_from(model, recipe.model.init_from, recipe.model.hold_zeros)
    if tutor is not None:
        model = teacher.student(model, tutor, recipe, run.ds.precision, vocab_size)
    return model


def _write_records(run: ResolvedRun, run_dir: RunDir, previous: Optional[dict[str, Any]], vocab_size: int,
                   n_params: int, env: dict[str, Any], auto: tuple[Optional[Recipe], str] = (None, ""),
                   teacher_record: Optional[dict[str, Any]] = None) -> None:
    """Writer rank: recipe.json (the tree as asked, and what was resolved from it: an "auto" choice and a teacher
    too), env.json and ds_config.json; the banner."""
    recipe, steps = run.recipe, run.steps
    asked, auto_reason = auto
    resolved = {"lr": run.lr, "lr_rule": run.lr_rule, "world": run.world, "micro_batch": run.batch.micro_batch,
                "grad_accum": run.batch.grad_accum, "global_batch": run.batch.global_batch,
                "warmup_steps": run.warmup_steps, "total_steps": len(steps),
                "total_samples": sum(sp.global_batch for sp in steps), "phases": _phase_summary(steps),
                "vocab_size": vocab_size,
                "padded_vocab_size": padded_vocab(vocab_size, recipe.model.pad_vocab_to_multiple),
                "parameters": n_params}
    if auto_reason:  # the "auto" choice and why; a resume on as many GPUs keeps it (choose_at_start)
        resolved["auto"] = {"world": run.world, "micro_batches": [run.batch.micro_batch, *(
            ph.micro_batch for ph in recipe.phases)], "checkpointing": run.ds.checkpointing,
            "reason": auto_reason}
    if teacher_record is not None:
        resolved["teacher"] = teacher_record
    if previous is not None:  # what this start changed (the previous start's recipe.json is in starts/<n>/)
        resolved["changed_on_resume"] = resume.changed_keys(previous, (asked or recipe).to_dict())
    # the choice's reason beside the JSON it shaped: DeepSpeed's parser ignores the key, `bigbatch check` notes it
    ds_config = {**run.ds_config, "_bigbatch_auto": auto_reason} if auto_reason else run.ds_config
    run_dir.write_records((asked or recipe).to_dict(), resolved, env, ds_config)
    say(_banner(run, run_dir, n_params))
    if auto_reason:
        say(f"auto chose {auto_reason}")
    if resolved.get("changed_on_resume"):
        say("changed at this resume: " + ", ".join(f"{k} {a!r} -> {b!r}"
                                                   for k, (a, b) in resolved["changed_on_resume"].items()))
    if len(recipe.phases) or recipe.batch.ramp_start:
        say("phases: " + " -> ".join(
            f"{ph['phase']}: seq {ph['seq_len']}, {ph['steps']} steps at batch "
            + (f"{ph['min_global_batch']}..{ph['global_batch']}" if ph["min_global_batch"] != ph["global_batch"]
               else f"{ph['global_batch']}") + f", peak lr {ph['peak_lr']:.3g}"
            for ph in resolved["phases"]))
