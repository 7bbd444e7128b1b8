"""The embedded default, end to end: `make demo`'s command on 2 CPU ranks through the deepspeed launcher.

This is also the 2-rank end-to-end test of `bigbatch train` (one launch, as CI's budget asks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigbatch.cli import main
from bigbatch.metrics import read_metrics
from conftest import _free_port, deepspeed_launch, held_out_loss

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def test_demo_trains_and_records_everything(tmp_path):
    run_dir = tmp_path / "demo run"  # a space in the path must work end to end
    port = _free_port()
    proc = deepspeed_launch(["--module", "bigbatch", "train", "tiny", "--run-dir", str(run_dir)], world=2,
                            timeout=1200, port=port)
    # DeepSpeed's CPU all-reduce buffers (66 MB a rank in /dev/shm, named by the master port) are unlinked at
    # shutdown, not left behind
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    out = proc.stdout
    assert "world 2 | batch 256 x 8 x 2 = 4096" in out and "LAMB lr 0.02 (sqrt rule" in out and "ZeRO 1" in out
    assert f"done: {run_dir}" in out
    for name in ("ds_config.json", "recipe.json", "env.json", "metrics.jsonl", "loss.png", "logs/rank0.log",
                 "logs/rank1.log", "checkpoints/latest"):
        assert (run_dir / name).exists(), name
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert records[0]["step"] == 0 and "loss" not in records[0]  # the first evaluation precedes any update
    assert evals[-1] <= 0.85 * evals[0], f"held-out loss fell only from {evals[0]:.3f} to {evals[-1]:.3f}"
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 60 and steps[-1]["samples"] == 60 * 4096
    ratios = [r["trust_ratios"] for r in steps if "trust_ratios" in r]
    assert ratios and any("encoder.layer.0.attention" in name for name in ratios[-1])
    env = json.loads((run_dir / "env.json").read_text())
    assert env["world_size"] == 2 and len(env["hostnames"]) == 2
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["optimizer"]["type"] == "LAMB" and ds["train_batch_size"] == 4096
    # `bigbatch export` gathers the two ranks' ZeRO-1 partitions: the exported model scores the held-out set as the
    # trainer did at its last step
    from transformers import AutoModelForMaskedLM

    assert main(["export", str(run_dir)]) == 0
    model = AutoModelForMaskedLM.from_pretrained(run_dir / "export").eval()
    assert held_out_loss(model, run_dir) == pytest.approx(evals[-1], rel=1e-5)
