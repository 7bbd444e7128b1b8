"""The teacher of a distillation run (`distill.teacher`): found, checked and loaded before anything is written.

A teacher is a bigbatch run directory (the weights of its newest complete checkpoint, gathered from ZeRO partitions
as `bigbatch export` does), a `bigbatch export` directory, or `hf:<name>` from the local transformers cache (never
downloaded). The student takes the teacher's SentencePiece tokenizer unless `data.tokenizer` names one, which must then
hold the teacher's vocabulary. recipe.json records the teacher's source and a sha256 of its weights; a resume whose
teacher changed is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from bigbatch.config import ConfigError, Recipe
from bigbatch.config.files import load_recipe_file
from bigbatch.data.tokenizer import PAD, Tokenizer
from bigbatch.models.build import build_model
from bigbatch.models.distill import Distilled, every_other, init_from_teacher, teacher_kind, weights_sha256
from bigbatch.run import checkpoint
from bigbatch.run.export import AUTO_CLASS, consolidate, tokenizer_file_of
from bigbatch.run.rundir import RunDir

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Teacher:
    """A loaded teacher: its transformers model (fp32, eval, frozen), architecture, tokenizer and record."""

    hf: nn.Module
    arch: str
    tokenizer: Optional[Path]  # its SentencePiece model; None for an hf: teacher
    vocab_size: int
    record: dict[str, Any]  # what recipe.json keeps: source, kind, sha256, parameters, layers


def load(spec: str) -> Teacher:
    """The teacher `spec` names, or a ConfigError saying what is wrong with it."""
    kind = teacher_kind(spec)
    if kind == "hf":
        return _from_hub(spec[3:])
    return _from_run(Path(spec)) if kind == "run" else _from_export(Path(spec))


def _from_run(path: Path) -> Teacher:
    run = RunDir(path)
    tag = checkpoint.newest_complete(run.checkpoints)
    if tag is None:
        raise ConfigError(f"distill.teacher={path} has no complete checkpoint in {run.checkpoints}; let the teacher "
                          "run finish (or save with --checkpoint.every_steps) first.")
    recipe = load_recipe_file(run.recipe_file)
    tokenizer = tokenizer_file_of(recipe, run)
    vocab = Tokenizer(tokenizer).vocab_size
    model = build_model(recipe.model, vocab, pad_id=PAD)
    with contextlib.redirect_stderr(io.StringIO()):  # zero_to_fp32's progress bars: the teacher is one step of start-up
        model.load_state_dict(consolidate(run.checkpoints / tag))
    return _teacher(model.hf, recipe.model.arch, tokenizer, vocab,
                    {"source": str(path.resolve()), "kind": "run", "checkpoint": tag})


def _from_export(path: Path) -> Teacher:
    import transformers

    arch = transformers.AutoConfig.from_pretrained(path).model_type
    if arch not in AUTO_CLASS:
        raise ConfigError(f"distill.teacher={path} is a {arch!r} model; bigbatch distils bert, gpt2 and llama.")
    hf = getattr(transformers, AUTO_CLASS[arch]).from_pretrained(path)
    tokenizer = path / "tokenizer.model"
    return _teacher(hf, arch, tokenizer, Tokenizer(tokenizer).vocab_size, {"source": str(path.resolve()),
                                                                           "kind": "export"})


def _from_hub(name: str) -> Teacher:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        raise ConfigError(f"distill.teacher=hf:{name} is not in the local transformers cache, and bigbatch does not "
                          "download teachers; fetch it first (huggingface-cli download) or give a local directory.") \
            from None
    if config.model_type not in AUTO_CLASS:
        raise ConfigError(f"distill.teacher=hf:{name} is a {config.model_type!r} model; bigbatch distils bert, gpt2 "
                          "and llama.")
    hf = getattr(transformers, AUTO_CLASS[config.model_type]).from_pretrained(name, local_files_only=True)
    return _teacher(hf, config.model_type, None, config.vocab_size, {"source": f"hf:{name}", "kind": "hf"})


def _teacher(hf: nn.Module, arch: str, tokenizer: Optional[Path], vocab: int, record: dict[str, Any]) -> Teacher:
    hf = hf.float().eval().requires_grad_(False)
    record = {**record, "arch": arch, "sha256": weights_sha256(hf), "parameters": sum(p.numel() for p in
                                                                                       hf.parameters()),
              "num_layers": hf.config.num_hidden_layers, "hidden_size": hf.config.hidden_size,
              "tokenizer": str(tokenizer.resolve()) if tokenizer else None}
    return Teacher(hf, arch, tokenizer, vocab, record)


def student_recipe(recipe: Recipe, teacher: Teacher) -> Recipe:
    """The recipe with the teacher's tokenizer (unless data.tokenizer names one, which must hold the teacher's
    vocabulary) and the teacher's architecture checked."""
    if recipe.model.arch != teacher.arch:
        raise ConfigError(f"model.arch={recipe.model.arch} but the teacher {teacher.record['source']} is a "
                          f"{teacher.arch} model; distil into a student of the teacher's architecture.")
    cfg, config = recipe.distill, teacher.hf.config
    if cfg.alpha_hidden and config.hidden_size != recipe.model.hidden_size:
        raise ConfigError(f"distill.alpha_hidden={cfg.alpha_hidden} compares last hidden states, but the student's "
                          f"width {recipe.model.hidden_size} differs from the teacher's {config.hidden_size}; set "
                          "--distill.alpha_hidden=0.")
    if cfg.init == "teacher_layers":
        if not cfg.layers:
            every_other(config.num_hidden_layers, recipe.model.num_layers)  # raises when the teacher has too few
        mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        if (config.hidden_size, mlp) != (recipe.model.hidden_size, recipe.model.intermediate_size):
            raise ConfigError(f"distill.init=teacher_layers copies whole layers, but the student's width and MLP width "
                              f"{recipe.model.hidden_size}, {recipe.model.intermediate_size} differ from the teacher's "
                              f"{config.hidden_size}, {mlp}; match them or set --distill.init=none.")
    if not recipe.data.tokenizer:
        if teacher.tokenizer is None:
            raise ConfigError(f"the teacher {teacher.record['source']} has no SentencePiece tokenizer bigbatch can "
                              "use; set --data.tokenizer to one with its vocabulary.")
        data = dataclasses.replace(recipe.data, tokenizer=str(teacher.tokenizer.resolve()),
                                   vocab_size=teacher.vocab_size)
        return dataclasses.replace(recipe, data=data)
    mine = Tokenizer(Path(recipe.data.tokenizer))
    theirs = Tokenizer(teacher.tokenizer) if teacher.tokenizer else None
    same = (mine.vocab_size == teacher.vocab_size if theirs is None else
            [mine.sp.id_to_piece(i) for i in range(mine.vocab_size)]
            == [theirs.sp.id_to_piece(i) for i in range(theirs.vocab_size)])
    if not same:
        raise ConfigError(f"data.tokenizer={recipe.data.tokenizer} has another vocabulary than the teacher "
                          f"{teacher.record['source']} ({mine.vocab_size} vs {teacher.vocab_size} pieces, or other "
                          "pieces), and a student must predict the teacher's tokens; leave --data.tokenizer empty to "
                          "take the teacher's.")
    return recipe


def refuse_changed(run_dir: RunDir, teacher: Teacher) -> None:
    """On a resume: the teacher must be the one the run started with (its weights' sha256 in recipe.json)."""
    try:
        before = json.loads(run_dir.recipe_file.read_text()).get("resolved", {}).get("teacher")
    except (OSError, ValueError):
        return
    if before and before.get("sha256") != teacher.record["sha256"]:
        raise ConfigError(f"distill.teacher {teacher.record['source']} has other weights (sha256 "
                          f"{teacher.record['sha256'][:12]}) than the teacher {before.get('source')} the run in "
                          f"{run_dir} started with ({str(before.get('sha256'))[:12]}); resume with that teacher or "
                          "start a new --run-dir.")


def student(model: nn.Module, teacher: Teacher, recipe: Recipe, precision: str, vocab_size: int) -> Distilled:
    """The freshly built student, started from the teacher's layers when distill.init says so, with its teacher in
    the run's precision; recipe.json's teacher record gains the layers copied."""
    cfg = recipe.distill
    if cfg.init == "teacher_layers":
        layers = cfg.layers or every_other(teacher.hf.config.num_hidden_layers, recipe.model.num_layers)
        init_from_teacher(model.hf, teacher.hf, layers)
        teacher.record["init_layers"] = list(layers)
    return Distilled(model.hf, teacher.hf.to(DTYPES[precision]), cfg, recipe.model.arch, vocab_size)
