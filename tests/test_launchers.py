"""The same `bigbatch train` under torchrun (ZeRO-3, eval sharded in lockstep) and as `python recipes/tiny.py`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.run.metrics import read_metrics

from conftest import ROOT, launch_env

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def _corpus(tmp_path: Path) -> Path:
    from bigbatch.data.corpus import python_docs

    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(d.replace("\n\n", "\n") for d in python_docs()[:500]))
    return path


SMALL = ["--schedule.steps=3", "--batch.global_batch=128", "--batch.micro_batch=32", "--data.vocab_size=400",
         "--data.eval_samples=50", "--run.eval_every=3"]


def test_torchrun_two_ranks_zero3(tmp_path):
    run_dir = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "bigbatch", "train", "tiny",
           "--run-dir", str(run_dir), f"--data.sources={_corpus(tmp_path)}",
           "--deepspeed.configs=zero3.json,fp32.json", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "world 2" in proc.stdout and "ZeRO 3" in proc.stdout
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert "eval_loss" in [r for r in records if "loss" in r][-1]  # the last step evaluates (ranks in lockstep)


def test_python_recipe_file_runs_one_process(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "recipes/tiny.py", "--run-dir", str(run_dir), f"--data.sources={_corpus(tmp_path)}", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "world 1 | batch 32 x 4 x 1 = 128" in proc.stdout
    assert (run_dir / "metrics.jsonl").exists()
