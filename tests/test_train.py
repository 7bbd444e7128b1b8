"""`bigbatch train` in one process: the run directory, refusal to overwrite, resume, bad input (exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.cli import main
from bigbatch.config.files import load_recipe
from bigbatch.engine import initialize
from bigbatch.models.build import build_model
from bigbatch.plan.memory import Footprint
from bigbatch.resolve import resolve
from bigbatch.run.metrics import read_metrics

SMALL = ["--schedule.steps=4", "--batch.global_batch=64", "--batch.micro_batch=16", "--run.eval_every=2",
         "--checkpoint.every_steps=2", "--checkpoint.keep_last=3", "--data.vocab_size=400", "--data.eval_samples=64",
         "--run.trust_ratio_every=2"]
METRIC_KEYS = {"step", "samples", "tokens", "lr", "loss", "grad_norm", "loss_scale", "skipped_steps", "samples_per_s",
               "tokens_per_s"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus_file) -> Path:
    root = tmp_path_factory.mktemp("runs")
    monitor = root / "monitor.json"
    monitor.write_text(json.dumps({"csv_monitor": {"enabled": True, "output_path": str(root / "csv"),
                                                   "job_name": "smoke"}}))
    run_dir = root / "run"
    rc = main(["train", "tiny", "--run-dir", str(run_dir), f"--data.sources={corpus_file}",
               f"--deepspeed.configs=zero2.json,fp32.json,{monitor}", *SMALL])
    assert rc == 0
    return run_dir


@pytest.mark.slow
def test_run_directory_holds_what_ran(finished_run):
    for name in ("ds_config.json", "recipe.json", "env.json", "metrics.jsonl", "loss.png", "logs/rank0.log",
                 "checkpoints/latest", "data/tokenizer.model"):
        assert (finished_run / name).exists(), name
    ds = json.loads((finished_run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    resolved = json.loads((finished_run / "recipe.json").read_text())["resolved"]
    assert resolved["padded_vocab_size"] % 8 == 0 and resolved["padded_vocab_size"] >= resolved["vocab_size"]
    env = json.loads((finished_run / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] and env["deepspeed"]
    records = read_metrics(finished_run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert METRIC_KEYS <= set(steps[-1])
    assert "eval_loss" in records[0] and records[0]["step"] == 0
    assert "trust_ratios" in steps[1] and steps[1]["trust_ratios"]
    assert steps[1]["samples"] == 128 and steps[1]["tokens"] == 128 * 64
    assert [r["updates"] for r in steps] == [1, 2, 3, 4]
    # micro-batch 16, global 64: two batch sizes, so the gradient noise scale is estimated and logged
    assert all(r["noise_scale"] > 0 and r["gns_trace"] > 0 for r in steps)
    # the checkpoints of steps 2 and 4, pruned to keep_last
    assert sorted(p.name for p in (finished_run / "checkpoints").glob("step*")) == ["step00000002", "step00000004"]


@pytest.mark.slow
def test_deepspeed_monitor_receives_metrics(finished_run):
    csv_files = list((finished_run.parent / "csv").rglob("*.csv"))
    names = {p.name for p in csv_files}
    assert any("loss" in n for n in names), names


@pytest.mark.slow
def test_second_start_is_refused_then_resume_is_exact(finished_run, capsys):
    args = ["train", "tiny", "--run-dir", str(finished_run), *SMALL]
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    # Resume from the step-2 checkpoint: steps 3 and 4 must repeat bit for bit (fp32, one process).
    before = [r for r in read_metrics(finished_run / "metrics.jsonl") if "loss" in r]
    resumed_dir = finished_run.parent / "resumed"
    shutil.copytree(finished_run, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step00000004")
    (resumed_dir / "checkpoints" / "latest").write_text("step00000002")
    (resumed_dir / "metrics.jsonl").write_text("")
    recipe = str(finished_run / "recipe.json")
    assert main(["train", recipe, "--run-dir", str(resumed_dir), "--resume"]) == 0
    after = [r for r in read_metrics(resumed_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in after] == [3, 4]
    assert [r["loss"] for r in after] == [r["loss"] for r in before[2:]]
    assert after[-1]["eval_loss"] == before[-1]["eval_loss"]


def test_missing_data_file_is_one_sentence(tmp_path, capsys):
    rc = main(["train", "tiny", "--run-dir", str(tmp_path / "r"), "--data.sources=/no/such/corpus.txt"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == ("bigbatch: error: data source /no/such/corpus.txt does not exist; fix --data.sources or create "
                   "the file.")
    assert not (tmp_path / "r").exists()


def test_unknown_key_exit_2_with_hint(capsys):
    assert main(["train", "tiny", "--optimizer.learning_rate=1"]) == 2
    assert "unknown recipe key --optimizer.learning_rate" in capsys.readouterr().err


def test_indivisible_batch_exit_2(tmp_path, capsys):
    assert main(["train", "tiny", "--run-dir", str(tmp_path / "r"), "--batch.global_batch=100",
                 "--batch.micro_batch=64"]) == 2
    assert "nearest valid: 64 or 128" in capsys.readouterr().err


def test_console_script_exit_code():
    exe = Path(sys.executable).parent / "bigbatch"
    proc = subprocess.run([str(exe), "train", "tiny", "--batch.global_bach=8"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "did you mean --batch.global_batch?" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def handed_to_trainer(monkeypatch):
    """What `bigbatch train` hands the trainer, without training: {"run_dir": ...} after main() returns."""
    import bigbatch.run.train

    seen = {}
    monkeypatch.setattr(bigbatch.run.train, "train", lambda recipe, run_dir, **kw: seen.update(run_dir=run_dir))
    monkeypatch.delenv("BIGBATCH_RUN_DIR", raising=False)
    return seen


def test_run_dir_from_flag_or_environment_is_one_directory(tmp_path, monkeypatch, handed_to_trainer, capsys):
    # slurm/pretrain.sh exports BIGBATCH_RUN_DIR and passes --run-dir; both ways, or either, mean the same directory
    monkeypatch.chdir(tmp_path)
    assert main(["train", "tiny"]) == 0 and handed_to_trainer["run_dir"] is None  # the default name
    assert main(["train", "tiny", "--run-dir=a"]) == 0 and handed_to_trainer["run_dir"] == Path("a")
    monkeypatch.setenv("BIGBATCH_RUN_DIR", str(tmp_path / "from-env"))
    assert main(["train", "tiny"]) == 0 and handed_to_trainer["run_dir"] == tmp_path / "from-env"
    assert main(["train", "tiny", "--run-dir", "sub/../from-env"]) == 0  # the same directory, written otherwise
    assert handed_to_trainer["run_dir"].resolve() == tmp_path / "from-env"
    handed_to_trainer.clear()
    assert main(["train", "tiny", "--run-dir", "other"]) == 2 and not handed_to_trainer
    assert capsys.readouterr().err == (
        f"bigbatch: error: --run-dir other and BIGBATCH_RUN_DIR={tmp_path / 'from-env'} name different run "
        "directories; give the run directory one way only (drop one, or make them the same).\n")
    # no abbreviation of --run-dir gets past the template's parsing unseen
    assert main(["train", "tiny", "--run-d", "x"]) == 2
    assert "unknown argument '--run-d'" in capsys.readouterr().err


@pytest.mark.slow
def test_overwrite_replaces_an_existing_run_and_nothing_else_does(finished_run, corpus_file, capsys):
    target = finished_run.parent / "overwritten"
    shutil.copytree(finished_run, target)
    (target / "notes.txt").write_text("left by the old run")
    short = [a for a in SMALL if not a.startswith("--schedule.steps=")] + ["--schedule.steps=2"]
    args = ["train", "tiny", "--run-dir", str(target), f"--data.sources={corpus_file}",
            f"--data.tokenizer={finished_run / 'data' / 'tokenizer.model'}", *short]
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (target / "notes.txt").exists() and (target / "checkpoints" / "step00000004").exists()
    assert main([*args, "--overwrite"]) == 0
    # the old run is gone, not continued: a fresh start of 2 steps, its own checkpoint, no record of earlier starts
    assert not (target / "notes.txt").exists() and not (target / "starts").exists()
    assert sorted(p.name for p in (target / "checkpoints").glob("step*")) == ["step00000002"]
    assert [r["step"] for r in read_metrics(target / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert json.loads((target / "recipe.json").read_text())["recipe"]["schedule"]["steps"] == 2


@pytest.mark.slow
def test_a_fragment_deepspeed_accepts_trains(tmp_path, corpus_file):
    """A fragment with comments, trailing commas and a byte-order mark runs under DeepSpeed, so it trains here."""
    fragment = tmp_path / "lenient.json"
    fragment.write_text('\ufeff{\n  // ZeRO-1, written by hand\n  "zero_optimization": {"stage": 1,},  # stage 1\n'
                        '  "steps_per_print": 1e3,\n}\n', encoding="utf-8")
    run_dir = tmp_path / "run"
    small = [a for a in SMALL if not a.startswith("--schedule.steps")]
    assert main(["train", "tiny", "--run-dir", str(run_dir), f"--data.sources={corpus_file}",
                 f"--deepspeed.configs={fragment},fp32.json", "--schedule.steps=2", *small]) == 0
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"] == {"stage": 1} and ds["steps_per_print"] == 1000
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2]


@pytest.mark.slow
def test_auto_micro_batch_is_chosen_recorded_and_kept_on_resume(tmp_path, corpus_file, capsys):
    """In-process at world 1, tiny's cluster.gpu_memory (no GPU here): micro-batch 64, the whole global batch, fits.
    A resume on as many GPUs keeps it even where memory now says otherwise; recipe.json keeps "auto"."""
    run_dir = tmp_path / "auto"
    args = ["train", "tiny", "--run-dir", str(run_dir), f"--data.sources={corpus_file}", *SMALL,
            "--batch.micro_batch=auto"]
    assert main(args) == 0
    assert "auto chose micro-batch 64, checkpointing off: fits in " in capsys.readouterr().out
    records = json.loads((run_dir / "recipe.json").read_text())
    assert records["recipe"]["batch"]["micro_batch"] == "auto"
    assert records["resolved"]["auto"]["micro_batches"] == [64] and records["resolved"]["micro_batch"] == 64
    written = json.loads((run_dir / "ds_config.json").read_text())
    assert written["train_micro_batch_size_per_gpu"] == 64
    # the choice's reason beside the JSON it shaped: `bigbatch check` notes the key, DeepSpeed builds an engine on it
    assert written["_bigbatch_auto"] == records["resolved"]["auto"]["reason"]
    assert main(["check", str(run_dir / "ds_config.json"), "--world", "1"]) == 0
    assert "_bigbatch_auto starts with _, a comment by convention: DeepSpeed ignores it." in capsys.readouterr().out
    model = build_model(load_recipe("tiny").model, 400, pad_id=0)
    engine, *_ = initialize(model=model, config=written)
    engine.destroy()
    # memory for micro-batch 32 but not 64: a fresh choice would take 32; the resume keeps 64
    recipe = load_recipe("tiny", {"batch.micro_batch": "32", "batch.global_batch": "64", "data.vocab_size": "400"})
    ds = resolve(recipe, 1).ds
    need = Footprint(recipe, 1, ds.zero, 0).row(ds.stage, ds.precision, 32, ds.checkpointing).total
    small = f"--cluster.gpu_memory={(need + 2**20) / 2**30:.6f}GiB"
    assert main([*args, small, "--resume", "--schedule.steps=5"]) == 0
    assert "auto chose micro-batch 64" in capsys.readouterr().out
    assert json.loads((run_dir / "recipe.json").read_text())["resolved"]["micro_batch"] == 64
