"""`bigbatch export`: a finished run as a transformers directory. The exported model must reproduce the trainer's final
held-out loss (recomputed from its logits on the run's held-out batches, apart from bigbatch's model code) and the
logits of the model DeepSpeed loads from the same checkpoint; its tokenizer loads with AutoTokenizer; bad input exits
2 with one sentence. tests/test_demo.py exports a 2-rank ZeRO-1 checkpoint (two partitions) the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigbatch.cli import main
from bigbatch.config.files import load_recipe, load_recipe_file
from bigbatch.run.metrics import read_metrics

from conftest import held_out_loss

AUTO = {"bert": "AutoModelForMaskedLM", "gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM"}


def _load(arch: str, out: Path):
    import transformers

    model, info = getattr(transformers, AUTO[arch]).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys"), info
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch,stage", [("bert", 0), ("bert", 2), ("gpt2", 3), ("llama", 1)])
def test_export_reproduces_the_final_eval_loss(tiny_runs, arch, stage, tmp_path):
    run_dir = tiny_runs(arch, stage)
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "export.json"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "export.json").read_text())["step"] == 4
    final = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    assert final["step"] == 4
    assert held_out_loss(_load(arch, out), run_dir) == pytest.approx(final["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_logits_match_the_engine_loading_the_zero3_checkpoint(tiny_runs, tmp_path):
    """DeepSpeed's own loader, its ZeRO-3 partitions gathered, against the export (zero_to_fp32): the same logits."""
    import deepspeed

    from bigbatch.engine import initialize
    from bigbatch.models.build import build_model
    from bigbatch.optim import param_groups
    from bigbatch.run import checkpoint

    run_dir = tiny_runs("gpt2", 3)
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    recipe = load_recipe_file(run_dir / "recipe.json")
    vocab = json.loads((run_dir / "recipe.json").read_text())["resolved"]["vocab_size"]
    model = build_model(recipe.model, vocab, pad_id=0)
    engine, *_ = initialize(model=model, config=str(run_dir / "ds_config.json"),
                            model_parameters=param_groups(model, recipe.optimizer.weight_decay))
    engine.load_checkpoint(str(run_dir / "checkpoints"), tag=checkpoint.newest_complete(run_dir / "checkpoints"))
    ids = torch.randint(5, vocab, (3, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    engine.eval()
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        expected = engine.module.hf(input_ids=ids, attention_mask=mask).logits
    engine.destroy()
    with torch.no_grad():
        got = _load("gpt2", out)(input_ids=ids, attention_mask=mask).logits
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_auto_tokenizer_gives_the_pretraining_ids(tiny_runs, corpus_file, arch, tmp_path):
    from transformers import AutoTokenizer

    from bigbatch.data.tokenizer import CLS, SEP, Tokenizer

    run_dir = tiny_runs(arch, 2 if arch == "bert" else 3)
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    texts = [line for line in corpus_file.read_text().splitlines() if line.strip()][:20]
    ours = Tokenizer(out / "tokenizer.model").encode(texts)
    theirs = AutoTokenizer.from_pretrained(out)(texts)["input_ids"]
    assert theirs == [[CLS, *ids, SEP] if arch == "bert" else [*ids, SEP] for ids in ours]


@pytest.mark.slow
def test_existing_out_is_refused_then_replaced_with_overwrite(tiny_runs, tmp_path, capsys):
    run_dir = tiny_runs("bert", 2)
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"bigbatch: error: export directory {out} already exists and is not empty; choose another --out "
                   "or pass --overwrite to replace it.")
    assert (out / "notes.txt").read_text() == "mine"
    assert main(["export", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    # the default, <run_dir>/export, then the same refusal on a second export
    assert main(["export", str(run_dir)]) == 0 and (run_dir / "export" / "config.json").is_file()
    assert main(["export", str(run_dir)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_overwrite_never_replaces_the_run_itself(tiny_runs, capsys):
    run_dir = tiny_runs("bert", 2)
    assert main(["export", str(run_dir), "--out", str(run_dir), "--overwrite"]) == 2
    assert "holds the run" in capsys.readouterr().err
    assert (run_dir / "recipe.json").is_file() and (run_dir / "checkpoints" / "latest").is_file()


def test_a_run_without_checkpoint_is_one_sentence(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.json").write_text(json.dumps({"recipe": load_recipe("tiny").to_dict(), "resolved": {}}))
    assert main(["export", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"bigbatch: error: {run_dir} has no complete checkpoint in {run_dir / 'checkpoints'}; a run saves "
                   "one when it finishes, or every --checkpoint.every_steps steps.")
    assert not (run_dir / "export").exists()


def test_a_directory_that_holds_no_run_is_one_sentence(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"bigbatch: error: {tmp_path} is not a bigbatch run directory (it has no recipe.json); give the --run-dir "
        "that `bigbatch train` wrote.")
