"""A teacher named `hf:<org>/<name>` comes from the local transformers cache, as a user's downloaded model does: the
tiny teacher run is exported, laid out as the hub cache lays a download (models--org--name/refs/main and a snapshot),
and a student is distilled from it in bf16 in a fresh process whose HF_HUB_CACHE points there, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from bigbatch.cli import main
from bigbatch.models.distill import weights_sha256
from bigbatch.run.metrics import read_metrics

from conftest import ROOT, launch_env

STEPS = 3


@pytest.mark.slow
def test_a_cached_hub_teacher_distils_in_bf16(tiny_runs, corpus_file, tmp_path):
    export = tmp_path / "export"
    assert main(["export", str(tiny_runs("bert", 0)), "--out", str(export)]) == 0
    snapshot = tmp_path / "hub" / "models--local--tiny-teacher" / "snapshots" / "0123abc"
    shutil.copytree(export, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abc")
    expected = weights_sha256(transformers.AutoModelForMaskedLM.from_pretrained(export).float())

    run = tmp_path / "student"
    env = {**launch_env(), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HOME", None)
    argv = ["train", "tiny_distil", "--distill.teacher=hf:local/tiny-teacher", "--run-dir", str(run),
            f"--data.sources={corpus_file}", f"--data.tokenizer={export / 'tokenizer.model'}",
            "--data.vocab_size=400", "--deepspeed.configs=zero1.json,bf16.json", f"--schedule.steps={STEPS}",
            "--batch.global_batch=64", "--batch.micro_batch=16", f"--run.eval_every={STEPS}",
            "--data.eval_samples=64"]
    program = "import sys; from bigbatch.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", program, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    record = json.loads((run / "recipe.json").read_text())["resolved"]["teacher"]
    assert record["source"] == "hf:local/tiny-teacher" and record["kind"] == "hf"
    assert record["sha256"] == expected  # the cached snapshot's weights, not a fresh initialisation
    metrics = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor([r["loss"], r["loss_kd"], r["loss_hard"]])).all() for r in metrics)
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is True
    assert os.path.isfile(snapshot / "config.json")  # the cache is read, never rewritten
