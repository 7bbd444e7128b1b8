"""A resume trains with the recipe as given at that start (bigbatch/resume.py): hyper-parameters and the LR table
from the recipe, moments, step counts and the schedule's position from the checkpoint; keys that cannot change
within a run are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bigbatch.cli import main
from bigbatch.engine import client_optimizer, initialize
from bigbatch.optim import param_groups
from bigbatch.run import distributed
from bigbatch.run.metrics import read_metrics
from bigbatch.run.resume import changed_keys, hyperparameters, refuse_changes, restore

from conftest import TINY_RUN

RUN = [*TINY_RUN, "--schedule.steps=4", "--checkpoint.every_steps=2", "--run.eval_every=4", "--schedule.decay=constant",
       "--schedule.warmup=0.5"]


def lrs(run):
    return {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, corpus_file):
    """A 4-step run stopped after its step-2 checkpoint (by truncating it back there, as a kill would leave it)."""
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "tiny", "--run-dir", str(run), f"--data.sources={corpus_file}", *RUN]) == 0
    return run


def _copy(stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    root = run / "checkpoints"
    (root / "latest").write_text("step00000002")
    shutil.rmtree(root / "step00000004")
    return run


def test_a_resume_with_a_lower_lr_trains_at_it(stopped_run, tmp_path, corpus_file):
    run = _copy(stopped_run, tmp_path)
    before = lrs(stopped_run)
    args = ["train", "tiny", "--run-dir", str(run), f"--data.sources={corpus_file}", *RUN, "--resume"]
    assert main([*args, "--optimizer.lr=0.0025", "--optimizer.weight_decay=0.1"]) == 0
    after = lrs(run)
    # tiny's LR is 0.005 at batch 256 carried by the square-root rule: halving it halves every entry of the table
    assert after[1] == before[1] and after[2] == before[2]  # the steps before the checkpoint, as they ran
    assert after[3] == pytest.approx(before[3] / 2, rel=1e-12) and after[4] == pytest.approx(before[4] / 2, rel=1e-12)
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["resolved"]["changed_on_resume"] == {"optimizer.lr": [0.005, 0.0025],
                                                        "optimizer.weight_decay": [0.01, 0.1]}
    assert json.loads((run / "starts" / "1" / "recipe.json").read_text())["recipe"]["optimizer"]["lr"] == 0.005


@pytest.mark.parametrize("override,key", [("--batch.global_batch=128", "batch.global_batch"),
                                          ("--data.seq_len=32", "data.seq_len"),
                                          ("--run.seed=7", "run.seed"),
                                          ("--optimizer.type=lars", "optimizer.type"),
                                          ("--model.hidden_size=32", "model.hidden_size")])
def test_a_resume_that_changes_what_a_run_fixes_is_one_sentence(stopped_run, tmp_path, corpus_file, capsys,
                                                                override, key):
    run = _copy(stopped_run, tmp_path)
    args = ["train", "tiny", "--run-dir", str(run), f"--data.sources={corpus_file}", *RUN, override, "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bigbatch: error: {key} is ") and "cannot change within a run" in err, err
    assert len(err.splitlines()) == 1
    assert not (run / "starts").exists()  # refused before anything was written


def test_data_blend_and_phase_changes_are_refused_and_others_are_recorded():
    base = {"data": {"sources": ["a", "b"], "weights": [1, 1]}, "optimizer": {"lr": 1.0, "betas": [0.9, 0.99]},
            "phases": [{"seq_len": 128, "global_batch": 64, "lr": 0.1}]}
    changed = json.loads(json.dumps(base))
    changed["data"]["weights"] = [3, 1]
    with pytest.raises(ValueError, match=r"data.weights is \[3, 1\] .* resume with --data.weights=1,1 "):
        refuse_changes(base, changed, "run")
    changed = json.loads(json.dumps(base))
    changed["phases"][0]["seq_len"] = 512
    with pytest.raises(ValueError, match="phases.1.seq_len is 512"):
        refuse_changes(base, changed, "run")
    changed = json.loads(json.dumps(base))
    changed["phases"].append({"seq_len": 512, "global_batch": 32, "lr": 0.1})
    with pytest.raises(ValueError, match="phases is 2"):
        refuse_changes(base, changed, "run")
    changed = json.loads(json.dumps(base))
    changed["optimizer"]["betas"] = (0.8, 0.99)  # a tuple, as the recipe holds it
    changed["phases"][0]["lr"] = 0.2
    refuse_changes(base, changed, "run")
    assert changed_keys(base, changed) == {"optimizer.betas": [[0.9, 0.99], [0.8, 0.99]], "phases.1.lr": [0.1, 0.2]}


def _engine(lr, **params):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    config = {"train_batch_size": 4, "gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
              "optimizer": {"type": "LAMB", "params": {"lr": lr, **params}}}
    engine, *_ = initialize(model=model, config=config, model_parameters=param_groups(model, params["weight_decay"]),
                            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1)))
    return engine


def test_restore_puts_this_starts_hyperparameters_back_and_keeps_the_moments(tmp_path):
    distributed.ensure_env()
    old = dict(weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6, min_coeff=0.01, max_coeff=10.0)
    engine = _engine(1e-2, **old)
    for _ in range(3):
        loss = engine(torch.randn(4, 6)).square().mean()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(tmp_path), tag="t")
    saved = {k: v.clone() for k, v in client_optimizer(engine).state[client_optimizer(engine).param_groups[0]
                                                                       ["params"][0]].items() if torch.is_tensor(v)}
    engine.destroy()

    new = dict(weight_decay=0.1, betas=(0.8, 0.99), eps=1e-8, min_coeff=0.0, max_coeff=float("inf"))
    engine = _engine(5e-3, **new)
    opt = client_optimizer(engine)
    settings, base_lrs = hyperparameters(opt), list(engine.lr_scheduler.base_lrs)
    engine.load_checkpoint(str(tmp_path), tag="t")
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)  # what DeepSpeed + torch do by themselves
    restore(opt, engine.lr_scheduler, settings, base_lrs)
    for group in opt.param_groups:
        assert (group["betas"], group["eps"], group["min_coeff"], group["max_coeff"]) == \
            ((0.8, 0.99), 1e-8, 0.0, float("inf"))
        assert group["lr"] == 5e-3 / 4  # this start's base LR at the loaded position (3 steps: factor 1/4)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # decay group, then biases without
    assert engine.lr_scheduler.base_lrs == [5e-3, 5e-3] and engine.lr_scheduler.last_epoch == 3
    state = opt.state[opt.param_groups[0]["params"][0]]
    for name, value in saved.items():
        assert torch.equal(state[name], value), name  # moments and step counts from the checkpoint
    engine.destroy()


@pytest.mark.slow
def test_the_overflow_count_survives_a_resume(tmp_path, corpus_file, inject, monkeypatch, capsys):
    """Patience 3, gradients not finite from step 3 on: the run must stop after step 5 whether or not it was
    preempted after step 4, with 2 skips counted (a resume that forgot the count would skip on to step 7)."""
    from test_overflow import SMALL as OVERFLOW_RUN

    from bigbatch.run import faults

    inject["inf_grad"] = set(range(3, 100))
    run = tmp_path / "run"
    args = ["train", "tiny", f"--data.sources={corpus_file}", "--run-dir", str(run), "--schedule.steps=8",
            "--run.overflow_patience=3", "--deepspeed.configs=zero1.json,fp32.json", *OVERFLOW_RUN]
    faults.reset()
    monkeypatch.setenv(faults.ENV, "step4:usr1")
    assert main(args) == 0 and json.loads((run / "PREEMPTED").read_text())["step"] == 4
    monkeypatch.delenv(faults.ENV)
    assert main([*args, "--resume"]) == 3
    assert "stopped at step 5: 3 steps in a row were skipped" in capsys.readouterr().err
    faults.reset()
