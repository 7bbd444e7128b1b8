"""Resume on another number of ranks (2 -> 4 -> 2) through DeepSpeed's universal checkpoint: the data position,
counted in samples, carries over, so every step sees the same samples and the losses follow the uninterrupted run
(to fp32 reduction order: the ranks sum gradients in another order)."""

from __future__ import annotations

import shutil

import pytest

from bigbatch.run import checkpoint
from bigbatch.run.metrics import read_metrics

from conftest import deepspeed_launch

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

ARGS = ["--schedule.steps=6", "--batch.global_batch=64", "--batch.micro_batch=8", "--checkpoint.every_steps=2",
        "--checkpoint.keep_last=5", "--data.vocab_size=400", "--data.eval_samples=64", "--run.eval_every=3",
        "--deepspeed.configs=zero2.json,fp32.json"]


def train(world, run_dir, corpus, *extra):
    return deepspeed_launch(["--module", "bigbatch", "train", "tiny", "--run-dir", str(run_dir),
                             f"--data.sources={corpus}", *ARGS, *extra], world=world)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def restart_from(source, target, step):
    shutil.copytree(source, target)
    root = target / "checkpoints"
    for tag in checkpoint.list_tags(root):
        if int(tag[len("step"):]) > step:
            shutil.rmtree(root / tag)
    (root / "latest").write_text(checkpoint.tag_for(step))


def test_two_to_four_to_two_ranks(tmp_path, corpus_file):
    plain = tmp_path / "plain"
    train(2, plain, corpus_file)
    reference = losses(plain)

    up = tmp_path / "up"  # written by 2 ranks at step 2, resumed on 4
    restart_from(plain, up, 2)
    out = train(4, up, corpus_file, "--resume").stdout
    assert "through a universal checkpoint" in out and "world 4 |" in out
    got = losses(up)
    assert sorted(got) == list(range(1, 7))  # steps 1-2 kept, 3-6 recorded once each
    for step in range(3, 7):
        assert got[step] == pytest.approx(reference[step], rel=1e-5), step

    down = tmp_path / "down"  # written by 4 ranks at step 4, resumed on 2
    restart_from(up, down, 4)
    assert checkpoint.saved_world(down / "checkpoints" / checkpoint.tag_for(4)) == 4
    train(2, down, corpus_file, "--resume")
    got = losses(down)
    for step in (5, 6):
        assert got[step] == pytest.approx(reference[step], rel=1e-5), step


def test_lars_momentum_crosses_world_sizes(tmp_path, corpus_file):
    # DeepSpeed's converter knows only Adam-style states; LARS's momentum takes bigbatch's own path through it
    lars = ["--optimizer.type=lars", "--optimizer.lr=2.0", "--optimizer.trust_coefficient=0.01"]
    plain = tmp_path / "plain"
    train(2, plain, corpus_file, *lars)
    up = tmp_path / "up"
    restart_from(plain, up, 2)
    out = train(4, up, corpus_file, *lars, "--resume").stdout
    assert "through a universal checkpoint" in out
    reference, got = losses(plain), losses(up)
    for step in range(3, 7):  # a lost momentum would change step 3's update and every loss after it
        assert got[step] == pytest.approx(reference[step], rel=1e-5), step
