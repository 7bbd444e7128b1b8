"""fp16 dynamic loss scaling and the overflow policy, through the real trainer (one process, DeepSpeed ZeRO-1).

fp16 on the CPU needs the test-only accelerator patch (DeepSpeed refuses fp16 on a CPU otherwise). Overflows are
injected as an inf in one parameter's gradient at chosen steps; a divergence as a NaN loss. The expectations are
written out here from DeepSpeed's documented rule (halve on an overflow once `hysteresis` is spent, double after
`loss_scale_window` clean steps since the last overflow), not read from DeepSpeed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import bigbatch.train
from bigbatch.cli import main
from bigbatch.config import load_recipe
from bigbatch.metrics import read_metrics
from bigbatch.scaling import plan_steps

SMALL = ["--batch.global_batch=32", "--batch.micro_batch=16", "--run.eval_every=100", "--checkpoint.every_steps=1",
         "--checkpoint.keep_last=20", "--data.vocab_size=400", "--data.eval_samples=32", "--data.seq_len=32",
         "--model.max_position=64", "--optimizer.lr=2e-3", "--schedule.warmup=0.5"]


@pytest.fixture
def inject(monkeypatch):
    """Steps (1-based) at which a gradient gets an inf, or the loss a NaN; the trainer's step read from its seed."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)  # test only
    plan = {"inf_grad": set(), "nan_loss": set(), "step": 0}
    seed = bigbatch.train._dropout_seed

    def dropout_seed(s, step, rank):
        plan["step"] = step + 1
        return seed(s, step, rank)

    build = bigbatch.train.build_model

    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        first = next(p for p in model.parameters() if p.requires_grad)
        first.register_hook(lambda g: g * math.inf if plan["step"] in plan["inf_grad"] else g)
        model.register_forward_hook(
            lambda m, a, out: out * math.nan if m.training and plan["step"] in plan["nan_loss"] else out)
        return model

    monkeypatch.setattr(bigbatch.train, "_dropout_seed", dropout_seed)
    monkeypatch.setattr(bigbatch.train, "build_model", build_model)
    return plan


def fp16_fragment(tmp_path, **fp16):
    path = tmp_path / "fp16_test.json"
    path.write_text(json.dumps({"fp16": {"enabled": True, "loss_scale": 0, "hysteresis": 1, **fp16}}))
    return f"--deepspeed.configs=zero1.json,{path}"


def expected_scales(initial: float, window: int, overflows: set[int], steps: int, minimum: float) -> list[float]:
    """The scale after each step, by DeepSpeed's documented rule with hysteresis 1."""
    scale, last_overflow, out = initial, -1, []
    for i in range(steps):
        if i + 1 in overflows:
            scale, last_overflow = max(scale / 2, minimum), i
        elif (i - last_overflow - 1) > 0 and (i - last_overflow - 1) % window == 0:
            scale *= 2
        out.append(scale)
    return out


def states(run, step):
    """(fp16 module weights, fp32 master partitions, optimizer state: LAMB's moments or LARS's momentum) at `step`."""
    d = run / "checkpoints" / f"step{step:08d}"
    model = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    optim = torch.load(next(d.glob("*optim_states.pt")), map_location="cpu", weights_only=False)
    osd = optim["optimizer_state_dict"]
    return model, osd["single_partition_of_fp32_groups"], osd["base_optimizer_state"]["state"]


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["lamb", "lars"])
def test_fp16_overflow_skips_the_step_halves_the_scale_and_holds_the_lr(tmp_path, corpus_file, inject, optimizer):
    inject["inf_grad"] = {4}
    run = tmp_path / "run"
    args = ["train", "tiny", f"--data.sources={corpus_file}", "--run-dir", str(run), "--schedule.steps=8",
            f"--optimizer.type={optimizer}",
            fp16_fragment(tmp_path, initial_scale_power=8, loss_scale_window=3, min_loss_scale=1), *SMALL]
    assert main(args) == 0
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["skipped_this_step"] for r in records] == [s == 4 for s in range(1, 9)]
    assert [r["skipped_steps"] for r in records] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert [r["updates"] for r in records] == [1, 2, 3, 3, 4, 5, 6, 7]
    # the scale halves at the overflow and grows again after loss_scale_window clean steps
    assert [r["loss_scale"] for r in records] == expected_scales(256, 3, {4}, 8, 1)
    assert records[3]["loss_scale"] == 128 and records[-1]["loss_scale"] == 256
    # the skipped step changed nothing: fp16 weights, fp32 masters and the optimizer's state as after step 3
    assert all(same(a, b) for a, b in zip(states(run, 3), states(run, 4)))
    assert not same(states(run, 4)[1], states(run, 5)[1])  # the next step applies
    # the LR schedule does not advance on a skipped step: step 5 runs at step 4's LR, then it follows `updates`
    table = [sp.lr for sp in plan_steps(load_recipe(str(run / "recipe.json")), world=1)]
    assert [r["lr"] for r in records] == pytest.approx([table[r["updates"] - (0 if r["skipped_this_step"] else 1)]
                                                        for r in records])
    assert records[4]["lr"] == records[3]["lr"]


@pytest.mark.slow
def test_overflows_at_the_minimum_scale_checkpoint_and_stop(tmp_path, corpus_file, inject, capsys):
    inject["inf_grad"] = set(range(3, 100))
    run = tmp_path / "run"
    args = ["train", "tiny", f"--data.sources={corpus_file}", "--run-dir", str(run), "--schedule.steps=12",
            "--run.overflow_patience=2",
            fp16_fragment(tmp_path, initial_scale_power=2, loss_scale_window=1000, min_loss_scale=1), *SMALL]
    assert main(args) == 3
    err = capsys.readouterr().err
    # scale 4 at step 3 -> 2, step 4 -> 1 (the minimum), steps 5 and 6 overflow at the minimum: stop after step 6
    sentence = ("stopped at step 6: 2 steps in a row were skipped with the fp16 loss scale at its minimum (1); "
                "checkpoint step00000006 holds the last applied update.")
    assert sentence in err and "continue with --resume" in err
    assert sentence in (run / "DIVERGED").read_text()
    assert (run / "checkpoints" / "latest").read_text() == "step00000006"
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["loss_scale"] for r in records] == [4, 4, 2, 1, 1, 1] and records[-1]["updates"] == 2
    model2, masters2, moments2 = states(run, 2)
    model6, masters6, moments6 = states(run, 6)
    assert same(model2, model6) and same(masters2, masters6) and same(moments2, moments6)  # the last good state


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_before_its_update(tmp_path, corpus_file, inject, capsys):
    inject["nan_loss"] = {3}
    run = tmp_path / "run"
    args = ["train", "tiny", f"--data.sources={corpus_file}", "--run-dir", str(run), "--schedule.steps=6", *SMALL]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert ("stopped at step 3: the training loss is nan (not finite), so the run diverged; its update was not "
            "applied and checkpoint step00000002 holds the last good state.") in err
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    # resuming (here with the fault gone) continues from the last good state
    inject["nan_loss"] = set()
    assert main(["train", str(run / "recipe.json"), "--run-dir", str(run), "--resume"]) == 0
    assert not (run / "DIVERGED").exists()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
