"""`bigbatch compress <run_dir | export_dir> --out DIR [--prune S] [--prune-kind K] [--quantize Q] [--overwrite]`:
a pretrained model pruned and/or quantized, written as a transformers directory with its tokenizer, and a report of
what it cost and saved (DIR/compression.json, and the screen): parameters, non-zero parameters, bytes on disk, the
held-out loss on the run's own evaluation split, and CPU latency per batch, before and after.

The model comes from a run's newest complete checkpoint (as `bigbatch export` reads it) or an export directory
(whose export.json names its run, for the evaluation split). Everything about the input is checked before anything is
written; the output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigbatch.config import ConfigError, DistillConfig, Recipe
from bigbatch.config.files import load_recipe_file
from bigbatch.data import prepare
from bigbatch.data.tokenizer import PAD, Tokenizer
from bigbatch.models.build import CausalLM, MaskedLM, build_model
from bigbatch.models.compression import (
    PRUNE_KINDS,
    QUANTIZE,
    count,
    linear_weight_bytes,
    prune,
    quiet_torchao,
    torchao_config,
)
from bigbatch.models.shrink import HEADS_KEY, from_pretrained
from bigbatch.run import checkpoint
from bigbatch.run.export import AUTO_CLASS, consolidate, tokenizer_file_of, write_tokenizer
from bigbatch.run.rundir import RunDir
from bigbatch.run.train import train

LATENCY_BATCH = 32  # sequences per timed forward pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigbatch compress", description="Prune and/or quantize a pretrained model; "
                                "write it as a transformers directory with compression.json (before and after).")
    p.add_argument("source", type=Path, help="a `bigbatch train` run directory or a `bigbatch export` directory")
    p.add_argument("--out", type=Path, required=True, help="the directory to write")
    p.add_argument("--prune", type=float, default=0.0, help="the share of weights (or neurons) removed, in [0, 1)")
    p.add_argument("--prune-kind", default="unstructured", help="unstructured (global over the Linear weights) | "
                   "heads (whole attention heads removed, global) | neurons (MLP rows and columns removed)")
    p.add_argument("--recover", type=int, default=0, help="steps of continued pretraining after pruning")
    p.add_argument("--quantize", default="none", help="none | int8-weight | int8-dynamic (torchao, post-training)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    return p


def cmd_compress(args: list[str]) -> int:
    known = _parser().parse_args(args)
    report = compress(known.source, known.out, known.prune, known.prune_kind, known.recover, known.quantize,
                      known.overwrite)
    if report.get("preempted"):
        print(f"recovery stopped; the same command resumes it from {recovery_paths(known.out)[1]}")
        return 0
    print(format_report(report))
    return 0


def _check_arguments(out: Path, sparsity: float, kind: str, recover: int, quantize: str, overwrite: bool) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"--prune {sparsity} is not a sparsity: give the share of weights to remove, in [0, 1).")
    if kind not in PRUNE_KINDS:
        raise ConfigError(f"--prune-kind {kind!r} is not one of {', '.join(PRUNE_KINDS)}.")
    if quantize not in QUANTIZE:
        raise ConfigError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZE)}.")
    if recover < 0 or (recover and not sparsity):
        raise ConfigError(f"--recover {recover} needs a whole number of steps >= 1 and a --prune to recover from.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"--out {out} already exists and is not empty; choose another --out or pass --overwrite to "
                          "replace it.")


def open_source(source: Path) -> tuple[nn.Module, Recipe, Path, Path]:
    """(the model with its loss, as the trainer built it; the run's recipe; the run directory; its tokenizer file)."""
    if (source / "recipe.json").is_file():
        run = RunDir(source)
        tag = checkpoint.newest_complete(run.checkpoints)
        if tag is None:
            raise ConfigError(f"{source} has no complete checkpoint in {run.checkpoints}; compress a finished run.")
        recipe = load_recipe_file(run.recipe_file)
        tokenizer = tokenizer_file_of(recipe, run)
        model = build_model(recipe.model, Tokenizer(tokenizer).vocab_size, pad_id=PAD)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model.load_state_dict(consolidate(run.checkpoints / tag))  # zero_to_fp32 narrates each file it reads
        return model.eval(), recipe, run.path, tokenizer
    if (source / "export.json").is_file():
        info = json.loads((source / "export.json").read_text())
        run_dir = Path(info["run_dir"])
        if not (run_dir / "recipe.json").is_file():
            raise ConfigError(f"{source} was exported from {run_dir}, which is gone; compress needs the run's "
                              "evaluation split: restore the run or compress the run directory itself.")
        import transformers

        recipe = load_recipe_file(run_dir / "recipe.json")
        hf = from_pretrained(getattr(transformers, AUTO_CLASS[recipe.model.arch]), source)
        return _wrap(hf, recipe.model.arch).eval(), recipe, run_dir, source / "tokenizer.model"
    raise ConfigError(f"{source} is neither a bigbatch run directory (recipe.json) nor a `bigbatch export` "
                      "directory (export.json); give one of those.")


def _wrap(hf: nn.Module, arch: str) -> nn.Module:
    return MaskedLM(hf) if arch == "bert" else CausalLM(hf)


def compress(source: Path, out: Path, sparsity: float = 0.0, kind: str = "unstructured", recover: int = 0,
             quantize: str = "none", overwrite: bool = False) -> dict[str, Any]:
    """Writes the compressed model to `out` and returns the report (also in out/compression.json)."""
    from transformers.utils import logging as transformers_logging

    source, out = Path(source), Path(out)
    _check_arguments(out, sparsity, kind, recover, quantize, overwrite)
    transformers_logging.disable_progress_bar()  # the report is the output
    quiet_torchao()  # before transformers' model code imports it, which would print its CUDA libraries' load failures
    model, recipe, run_dir, tokenizer = open_source(source)
    arch = recipe.model.arch
    batches = _eval_batches(recipe, run_dir)
    with tempfile.TemporaryDirectory() as scratch:
        before = measure(model, batches, Path(scratch) / "before")
        prune(model.hf, arch, kind, sparsity)
        if recover:
            model = _recover(model, recipe, tokenizer, kind, recover, out)
            if model is None:
                return {"preempted": True}
        staging = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        if quantize == "none":
            model.hf.save_pretrained(staging)
        else:  # quantized by transformers as it loads the pruned fp32 model, so the result saves and loads back
            import transformers

            model.hf.save_pretrained(Path(scratch) / "pruned")
            hf = from_pretrained(getattr(transformers, AUTO_CLASS[arch]), Path(scratch) / "pruned",
                                 quantization_config=torchao_config(quantize))
            hf.save_pretrained(staging)
            model = _wrap(hf, arch).eval()
    after = measure(model, batches, staging)
    write_tokenizer(tokenizer, staging, arch, recipe.model.max_position)
    report = {"source": str(source.resolve()), "run_dir": str(run_dir.resolve()), "arch": arch,
              "prune": sparsity, "prune_kind": kind, "recover": recover, "quantize": quantize,
              "latency_batch": LATENCY_BATCH, "seq_len": recipe.data.seq_len, "before": before, "after": after}
    (staging / "compression.json").write_text(json.dumps(report, indent=1))
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(staging, out)
    return report


def recovery_paths(out: Path) -> tuple[Path, Path]:
    """Where --recover keeps the pruned weights it starts from and its run (kept, so a stopped recovery resumes)."""
    return out.with_name(f"{out.name}.pruned"), out.with_name(f"{out.name}.recover")


def _recover(model: nn.Module, recipe: Recipe, tokenizer: Path, kind: str, steps: int, out: Path) -> Any:
    """Continued pretraining of the pruned model through the normal trainer: the run's recipe (its LAMB, batch, ZeRO
    stage and data) for `steps` steps, starting from the pruned weights, the pruned weights held at zero. A second
    call with the same --out resumes a stopped recovery. Returns the recovered model, None when it was stopped."""
    pruned, run_dir = recovery_paths(out)
    if not (run_dir / "recipe.json").is_file():
        model.hf.save_pretrained(pruned)
    shape = dataclasses.replace(recipe.model, init_from=str(pruned.resolve()), hold_zeros=kind == "unstructured",
                                intermediate_size=model.hf.config.n_inner if recipe.model.arch == "gpt2" else
                                model.hf.config.intermediate_size,
                                heads_per_layer=tuple(getattr(model.hf.config, HEADS_KEY, None) or ()))
    data = dataclasses.replace(recipe.data, tokenizer=str(tokenizer.resolve()),
                               vocab_size=Tokenizer(tokenizer).vocab_size)
    rec = dataclasses.replace(recipe, name=f"{recipe.name}-recover", model=shape, data=data, phases=(),
                              schedule=dataclasses.replace(recipe.schedule, steps=steps), distill=DistillConfig())
    last = train(rec, run_dir, resume=(run_dir / "recipe.json").is_file())
    if last.get("preempted"):
        return None
    recovered = build_model(rec.model, data.vocab_size, pad_id=PAD)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        recovered.load_state_dict(consolidate(run_dir / "checkpoints" / checkpoint.newest_complete(
            run_dir / "checkpoints")))
    return recovered.eval()


def _eval_batches(recipe: Recipe, run_dir: Path) -> list[dict[str, torch.Tensor]]:
    """The run's held-out batches (every rank's share), as its evaluation scores them."""
    data = prepare(recipe, run_dir / "data", True, lambda x: x)
    return list(data.eval_batches(0, 1, LATENCY_BATCH))


def measure(model: nn.Module, batches: list[dict[str, torch.Tensor]], directory: Path) -> dict[str, Any]:
    """Parameters, non-zero parameters, bytes of the Linear weights in memory, bytes on disk (the weight files in
    `directory`, written here when absent), held-out loss (token-weighted) and the median CPU seconds per batch."""
    if not directory.is_dir():
        model.hf.save_pretrained(directory)
    params, nonzero = count(model.hf)
    total = tokens = 0.0
    seconds = []
    with torch.no_grad():
        model(**batches[0])  # warm-up: the first call pays for one-time allocations
        for batch in batches:
            started = time.perf_counter()
            loss = model(**batch)
            seconds.append(time.perf_counter() - started)
            n = _predicted(batch["labels"], model)
            total, tokens = total + float(loss) * n, tokens + n
    disk = sum(p.stat().st_size for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"parameters": params, "nonzero_parameters": nonzero, "linear_weight_bytes": linear_weight_bytes(model.hf),
            "bytes_on_disk": disk, "eval_loss": total / max(tokens, 1),
            "latency_s_per_batch": statistics.median(seconds)}


def _predicted(labels: torch.Tensor, model: nn.Module) -> int:
    """Tokens a batch's loss averages over: the masked ones (BERT), every next token with a label (GPT/Llama)."""
    if isinstance(model, MaskedLM):
        return int((labels != -100).sum())
    return int((labels[:, 1:] != -100).sum())


def format_report(report: dict[str, Any]) -> str:
    b, a = report["before"], report["after"]
    rows = [("parameters", "parameters", "{:,}"), ("non-zero parameters", "nonzero_parameters", "{:,}"),
            ("Linear weight bytes (untied)", "linear_weight_bytes", "{:,}"), ("bytes on disk", "bytes_on_disk", "{:,}"),
            ("held-out loss", "eval_loss", "{:.4f}"),
            (f"CPU s / batch of {report['latency_batch']}", "latency_s_per_batch", "{:.4f}")]
    lines = [f"compressed {report['source']}: prune {report['prune']} ({report['prune_kind']}), quantize "
             f"{report['quantize']}", f"{'':30}{'before':>14}{'after':>14}"]
    lines += [f"{label:30}{fmt.format(b[key]):>14}{fmt.format(a[key]):>14}" for label, key, fmt in rows]
    return "\n".join(lines)

