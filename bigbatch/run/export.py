"""`bigbatch export <run_dir> [--out DIR] [--overwrite]`: a run's newest checkpoint as a transformers directory.

What `from_pretrained` needs, from what the run wrote: the weights of the newest complete checkpoint
(`checkpoint.newest_complete`), gathered from every rank's ZeRO partitions by DeepSpeed's own `zero_to_fp32`; the
transformers model the trainer built (`bigbatch.models.build.build_model`, padded vocabulary), into which they must
load with no key missing or left over; and the run's SentencePiece model, with a tokenizer_config.json so that
`AutoTokenizer` loads it. The directory is written under a temporary name and renamed when complete, so a failed
export leaves no half of one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from bigbatch.config import ConfigError, Recipe
from bigbatch.config.files import load_recipe_file
from bigbatch.data.tokenizer import CLS, PAD, SEP, Tokenizer
from bigbatch.models.build import build_model
from bigbatch.run import checkpoint
from bigbatch.run.rundir import RunDir

AUTO_CLASS = {"bert": "AutoModelForMaskedLM", "gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigbatch export", description="Write a run's newest checkpoint as a "
                                "transformers save_pretrained directory: weights, config and tokenizer.")
    p.add_argument("run_dir", type=Path, help="a directory `bigbatch train` wrote (it holds recipe.json)")
    p.add_argument("--out", type=Path, default=None, help="default: <run_dir>/export")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    return p


def cmd_export(args: list[str]) -> int:
    known = _parser().parse_args(args)
    out = export(known.run_dir, known.out, known.overwrite)
    info = json.loads((out / "export.json").read_text())
    print(f"exported {info['checkpoint']} (step {info['step']}) to {out}; load it with "
          f"transformers.{info['auto_class']}.from_pretrained({str(out)!r}) and AutoTokenizer.from_pretrained")
    return 0


def export(run_dir: Path, out: Optional[Path] = None, overwrite: bool = False) -> Path:
    """Writes the export directory (default `<run_dir>/export`) and returns its path."""

    run = RunDir(Path(run_dir))
    run_dir = run.path
    out = Path(out) if out is not None else run_dir / "export"
    if not run.recipe_file.is_file():
        raise ConfigError(f"{run_dir} is not a bigbatch run directory (it has no recipe.json); give the --run-dir "
                          "that `bigbatch train` wrote.")
    if run_dir.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--out {out} holds the run {run_dir} itself; choose an export directory outside the run, "
                          "e.g. the default <run_dir>/export.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"export directory {out} already exists and is not empty; choose another --out or pass "
                          "--overwrite to replace it.")
    root = run.checkpoints
    tag = checkpoint.newest_complete(root)
    if tag is None:
        raise ConfigError(f"{run_dir} has no complete checkpoint in {root}; a run saves one when it finishes, or "
                          "every --checkpoint.every_steps steps.")
    recipe = load_recipe_file(run.recipe_file)
    tokenizer_file = tokenizer_file_of(recipe, run)
    vocab_size = _vocab_size(tokenizer_file, json.loads(run.recipe_file.read_text()).get("resolved", {}))
    model = build_model(recipe.model, vocab_size, pad_id=PAD)
    missing, unexpected = model.load_state_dict(consolidate(root / tag), strict=False)
    if missing or unexpected:
        raise ConfigError(f"checkpoint {root / tag} does not fit the model recipe.json describes (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}); was recipe.json edited after the run?")
    hf = model.hf
    # transformers' GPT-2 and Llama configs default to their own tokenizers' ids (50256; 1 and 2), which here are
    # other pieces or out of range: generate() and sequence classification must find bigbatch's fixed ids.
    for config in (hf.config, getattr(hf, "generation_config", None)):
        if config is not None:
            config.pad_token_id, config.bos_token_id, config.eos_token_id = PAD, CLS, SEP
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    hf.save_pretrained(staging)
    write_tokenizer(tokenizer_file, staging, recipe.model.arch, recipe.model.max_position)
    info = {"run_dir": str(run_dir.resolve()), "checkpoint": str((root / tag).resolve()),
            "step": int(checkpoint.TAG.match(tag).group(1)), "recipe": recipe.name, "arch": recipe.model.arch,
            "auto_class": AUTO_CLASS[recipe.model.arch], "tokenizer": str(tokenizer_file.resolve())}
    (staging / "export.json").write_text(json.dumps(info, indent=1))
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(staging, out)
    return out


def _model_states_file(tag_dir: Path) -> Path:
    """The engine's model states: one file up to ZeRO-2; under ZeRO-3 each rank writes its own (rank 0's suffices)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise ConfigError(f"checkpoint {tag_dir} holds no DeepSpeed model states file; it was not written by "
                      "`bigbatch train`.")


def consolidate(tag_dir: Path) -> dict[str, Any]:
    """The full fp32 weights of one checkpoint, named as in bigbatch's wrapped model (`hf.` first).

    Unpickles DeepSpeed's files as DeepSpeed itself does (weights_only=False): export only runs you trust.
    """
    import torch

    saved = torch.load(_model_states_file(tag_dir), map_location="cpu", mmap=True, weights_only=False)
    stage = ((saved.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0)
    if stage == 0:
        # No partitions: the engine saved the whole module, in the precision it trained and evaluated in (a 16-bit
        # stage-0 optimizer keeps its fp32 masters in its own layout, which zero_to_fp32 does not read).
        return {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def tokenizer_file_of(recipe: Recipe, run: RunDir) -> Path:
    """The SentencePiece model the run trained with: the recipe's data.tokenizer, else the one trained in the run."""
    path = Path(recipe.data.tokenizer) if recipe.data.tokenizer else run.data() / "tokenizer.model"
    if not path.is_file():
        raise ConfigError(f"the run's tokenizer {path} does not exist; export from the directory the run used "
                          "its data.tokenizer path from, or restore the file.")
    return path


def _vocab_size(tokenizer_file: Path, resolved: dict[str, Any]) -> int:

    size = Tokenizer(tokenizer_file).vocab_size
    if resolved.get("vocab_size", size) != size:
        raise ConfigError(f"tokenizer {tokenizer_file} has {size} pieces but the run trained with "
                          f"{resolved['vocab_size']}; restore the run's tokenizer.")
    return size


def write_tokenizer(model_file: Path, out: Path, arch: str, max_length: int) -> None:
    """`tokenizer.model` (the run's SentencePiece model) and a tokenizer_config.json for `AutoTokenizer`.

    transformers' SentencePieceBackend runs the SentencePiece model itself (no conversion to a `tokenizers` model,
    which needs protobuf and may normalise text differently), so its ids are the pretraining's. It adds the special
    tokens the packing put around text (bigbatch.data.packing): [CLS] text [SEP] for BERT, text [SEP] for GPT-style.
    """
    shutil.copyfile(model_file, out / "tokenizer.model")
    try:
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    except ImportError:  # transformers 4.x has no tokenizer class that runs SentencePiece itself: the model file only
        return
    tok = SentencePieceBackend(vocab_file=str(out / "tokenizer.model"), pad_token="[PAD]", unk_token="[UNK]",
                               cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", bos_token="[CLS]",
                               eos_token="[SEP]", model_max_length=max_length)
    tok.save_pretrained(out)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    # transformers (5.24) reads special_tokens_pattern from this file but does not write it there
    config["special_tokens_pattern"] = "cls_sep" if arch == "bert" else "eos"
    path.write_text(json.dumps(config, indent=2))
