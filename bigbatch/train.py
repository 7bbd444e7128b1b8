"""The training loop: data -> forward -> engine.backward -> engine.step, with evaluation, metrics and checkpoints.

Read top to bottom: `train()` sets the run up (batch arithmetic, run directory, data, model, DeepSpeed engine),
then `Trainer.fit()` is the loop.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from bigbatch import checkpoint, distributed, dsconfig, rundir
from bigbatch.check import check_config, raise_on_errors
from bigbatch.config import Recipe
from bigbatch.data import TrainingData, prepare
from bigbatch.data.corpus import check_sources
from bigbatch.engine import client_optimizer, initialize
from bigbatch.metrics import MetricsLog, device_peak_flops, plot_loss
from bigbatch.model import build_model, count_parameters, padded_vocab, wants_checkpointing
from bigbatch.optim import param_groups
from bigbatch.optim.layerwise import LayerwiseOptimizer
from bigbatch.scaling import BatchPlan, lr_factor, scaled_lr, solve_batch, warmup_steps

log = logging.getLogger("bigbatch")


def _say(message: str) -> None:
    log.info(message)
    print(message, flush=True)


def _dropout_seed(seed: int, step: int, rank: int) -> int:
    """Dropout RNG as a function of (seed, step, rank): a resumed run draws the same masks with no saved state."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63)


def _precision(config: dict[str, Any]) -> str:
    if config.get("fp16", {}).get("enabled"):
        return "fp16"
    if config.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp32"


@dataclass
class Trainer:
    recipe: Recipe
    run_dir: Path
    engine: Any
    data: TrainingData
    plan: BatchPlan
    rank: int
    world: int
    metrics: MetricsLog
    total_steps: int
    start_step: int = 0
    flops_per_sample: float = 0.0

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def evaluate(self) -> dict[str, float]:
        """Held-out loss over the fixed eval set (token-weighted across micro-batches and ranks) and perplexity."""
        self.engine.eval()
        total = count = 0.0
        with torch.no_grad():
            for batch in self.data.eval_batches(self.rank, self.world, self.plan.micro_batch):
                loss = self.engine(**batch)
                labels = batch["labels"]
                n = float((labels != -100).sum()) if self.recipe.model.arch == "bert" else float(labels[:, 1:].numel())
                total += float(loss) * n
                count += n
        self.engine.train()
        total, count = distributed.sum_across_ranks([total, count])
        loss = total / max(count, 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def save(self, step: int) -> None:
        state = {"step": step, "samples": step * self.plan.global_batch, "recipe": self.recipe.name}
        checkpoint.save(self.engine, self.run_dir / "checkpoints", step, state, self.recipe.checkpoint.keep_last,
                        self.is_writer)

    def _progress(self) -> Any:
        if self.is_writer and sys.stdout.isatty():
            from tqdm import tqdm

            return tqdm(total=self.total_steps, initial=self.start_step, dynamic_ncols=True, unit="step")
        return None

    def fit(self) -> dict[str, Any]:
        r, p = self.recipe, self.plan
        engine, optimizer = self.engine, client_optimizer(self.engine)
        last: dict[str, Any] = {}
        if self.start_step == 0:
            first = self.evaluate()
            self.metrics.write({"step": 0, "samples": 0, "tokens": 0, **first})
            if self.is_writer:
                _say(f"step 0: eval loss {first['eval_loss']:.4f} (before any update)")
        bar = self._progress()
        for step in range(self.start_step, self.total_steps):
            torch.manual_seed(_dropout_seed(r.run.seed, step, self.rank))
            skipped_before = engine.skipped_steps
            lr_used = float(engine.get_lr()[0])
            started = time.perf_counter()
            losses = []
            for micro in range(p.grad_accum):
                positions = self.data.sampler.positions(step, micro, self.rank, p.global_batch, p.world, p.micro_batch)
                loss = engine(**self.data.train_batch(positions))
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach().float())
            loss = distributed.mean_across_ranks(torch.stack(losses).mean())
            elapsed = time.perf_counter() - started
            done = step + 1
            samples = done * p.global_batch
            grad_norm = engine.get_global_grad_norm()
            record: dict[str, Any] = {
                "step": done,
                "samples": samples,
                "tokens": samples * r.data.seq_len,
                "lr": lr_used,
                "loss": loss,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "loss_scale": float(getattr(engine.optimizer, "cur_scale", 1.0) or 1.0),
                "skipped_steps": int(engine.skipped_steps),
                "skipped_this_step": engine.skipped_steps > skipped_before,
                "step_time_s": elapsed,
                "samples_per_s": p.global_batch / elapsed,
                "tokens_per_s": p.global_batch * r.data.seq_len / elapsed,
            }
            if torch.cuda.is_available():
                record["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                peak = device_peak_flops(torch.cuda.get_device_name(0))
                if peak:
                    record["mfu"] = self.flops_per_sample * record["samples_per_s"] / (peak * self.world)
            every = r.run.trust_ratio_every
            if isinstance(optimizer, LayerwiseOptimizer) and every and (done % every == 0 or done == 1):
                record["trust_ratios"] = optimizer.trust_ratios()
            if done % r.run.eval_every == 0 or done == self.total_steps:
                record.update(self.evaluate())
            self.metrics.write(record)
            last = record
            if r.checkpoint.every_steps and done % r.checkpoint.every_steps == 0 and done != self.total_steps:
                self.save(done)
            if self.is_writer:
                if "eval_loss" in record:
                    plot_loss(self.run_dir)
                summary = (f"loss {loss:.4f} lr {record['lr']:.3g} {record['samples_per_s']:.0f} samples/s"
                           + (f" eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""))
                if bar is not None:
                    bar.set_postfix_str(summary)
                    bar.update(1)
                elif done % r.run.log_every == 0 or done == self.total_steps:
                    _say(f"step {done}/{self.total_steps}: {summary}")
        if bar is not None:
            bar.close()
        if self.start_step < self.total_steps:
            self.save(self.total_steps)
        return last


def _banner(recipe: Recipe, plan: BatchPlan, lr: float, rule: str, ds_config: dict[str, Any], run_dir: Path,
            n_params: int) -> str:
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    return (f"bigbatch {recipe.name}: {n_params / 1e6:.2f}M params | world {plan.world} | batch {plan} "
            f"(micro x accum x world) | {recipe.optimizer.type.upper()} lr {lr:.3g} ({rule}) | ZeRO {stage} | "
            f"{_precision(ds_config)}{' | act-ckpt' if wants_checkpointing(ds_config) else ''} | run {run_dir}")


def _setup_logging(run_dir: Path, rank: int) -> None:
    handler = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
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
    """Runs one recipe to its last step on the ranks of this launch; returns the last metrics record."""
    # Everything that can be wrong with the input is checked before the process group starts.
    distributed.ensure_env()
    world = distributed.world_size_from_env()
    plan = solve_batch(recipe.batch.global_batch, world, recipe.batch.micro_batch, recipe.batch.grad_accum)
    lr, rule = scaled_lr(recipe.optimizer, plan.global_batch)
    check_sources(recipe.data.sources)
    ds_config = dsconfig.build(recipe, plan, lr)
    raise_on_errors(check_config(ds_config, plan.world), f"recipe {recipe.name}")
    if run_dir is not None:
        mode = rundir.decide_mode(run_dir, resume, overwrite)

    rank, world = distributed.init()
    if run_dir is None:
        run_dir = Path(distributed.broadcast(str(rundir.default_run_dir(recipe.run.runs_root, recipe.name))))
        mode = rundir.decide_mode(run_dir, resume, overwrite)
    distributed.barrier()  # every rank has read the directory before the writer changes it
    if rank == 0:
        rundir.prepare(run_dir, mode)
    distributed.barrier()
    _setup_logging(run_dir, rank)

    data = prepare(recipe, run_dir / "data", rank == 0, distributed.broadcast, log=_say if rank == 0 else log.info)
    torch.manual_seed(recipe.run.seed)
    model = build_model(recipe.model, data.vocab_size, pad_id=0, checkpointing=wants_checkpointing(ds_config))
    n_params = count_parameters(model)
    warmup = warmup_steps(recipe.schedule, plan.global_batch)
    s = recipe.schedule

    def schedule(opt: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: lr_factor(k, s.steps, warmup, s.decay, s.power, s.min_lr_ratio))

    hostnames = distributed.gather_objects(__import__("socket").gethostname())
    if rank == 0:
        dsconfig.write(ds_config, run_dir / "ds_config.json")
        resolved = {"lr": lr, "lr_rule": rule, "world": plan.world, "micro_batch": plan.micro_batch,
                    "grad_accum": plan.grad_accum, "global_batch": plan.global_batch, "warmup_steps": warmup,
                    "vocab_size": data.vocab_size,
                    "padded_vocab_size": padded_vocab(data.vocab_size, recipe.model.pad_vocab_to_multiple),
                    "parameters": n_params}
        (run_dir / "recipe.json").write_text(json.dumps({"recipe": recipe.to_dict(), "resolved": resolved}, indent=1))
        env = rundir.environment(list(argv or sys.argv), world, hostnames)
        (run_dir / "env.json").write_text(json.dumps(env, indent=1))
        _say(_banner(recipe, plan, lr, rule, ds_config, run_dir, n_params))

    groups = param_groups(model, recipe.optimizer.weight_decay)
    engine, *_ = initialize(model=model, config=ds_config, model_parameters=groups, lr_scheduler=schedule)
    start_step = 0
    if mode == "resume":
        state = checkpoint.load_latest(engine, run_dir / "checkpoints")
        if state is not None:
            start_step = int(state["step"])
            if rank == 0:
                _say(f"resumed {run_dir} at step {start_step} ({state['samples']} samples)")
        elif rank == 0:
            _say(f"no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
    # Model FLOPs per sample: 6 N per token (forward + backward), the standard estimate (Kaplan et al. 2020).
    flops = 6.0 * n_params * recipe.data.seq_len
    trainer = Trainer(recipe, run_dir, engine, data, plan, rank, world,
                      MetricsLog(run_dir / "metrics.jsonl", engine.monitor, enabled=rank == 0),
                      total_steps=recipe.schedule.steps, start_step=start_step, flops_per_sample=flops)
    last = trainer.fit()
    if rank == 0:
        plot_loss(run_dir)
        _say(f"done: {run_dir}")
    engine.destroy()
    return last
