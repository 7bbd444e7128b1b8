"""A resume trains with the recipe as given at that start (bigbatch/resume.py): hyper-parameters and the LR table
from the recipe, moments, step counts and the schedule's position from the checkpoint; keys that cannot change
within a run are refused."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil

import pytest
import torch

from bigbatch.cli import main
from bigbatch.config import ConfigError
from bigbatch.config.files import load_recipe
from bigbatch.config.schema import PhaseConfig
from bigbatch.engine import client_optimizer, initialize
from bigbatch.optim import LAMB, param_groups
from bigbatch.run import distributed
from bigbatch.run.metrics import read_metrics
from bigbatch.run.resume import (
    changed_keys,
    hyperparameters,
    lr_at_position,
    refuse_changes,
    restore,
    restore_clipping,
)

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


def _engine(lr, clip=1.0, **params):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    config = {"train_batch_size": 4, "gradient_clipping": clip, "zero_optimization": {"stage": 1},
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


# Every leaf of the recipe tree, classified here on its own (not read from bigbatch.run.resume.FIXED): a run fixes what
# the checkpoint's data position or tensor shapes depend on; everything else may change at a resume. A new recipe key
# fails test_every_recipe_leaf_is_fixed_or_changeable until it is put in one of the two lists.
FIXED_BY_SPEC = {
    "model.arch", "model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads",
    "model.intermediate_size", "model.max_position", "model.pad_vocab_to_multiple",
    "data.sources", "data.weights", "data.tokenizer", "data.vocab_size", "data.seq_len", "data.eval_fraction",
    "data.eval_samples", "data.streaming", "data.shuffle_buffer", "optimizer.type",
    "batch.global_batch", "batch.ramp_start", "batch.ramp_increment", "batch.ramp_samples", "run.seed",
    "phases", "phases.1.global_batch", "phases.1.seq_len", "batch.adaptive", "model.init_from", "model.hold_zeros",
    "model.heads_per_layer",
}
CHANGEABLE_BY_SPEC = {
    "name", "model.dropout", "data.mlm_probability", "data.whole_word_masking", "data.num_proc", "data.cache_dir",
    "optimizer.lr", "optimizer.lr_rule", "optimizer.base_batch", "optimizer.betas", "optimizer.eps",
    "optimizer.weight_decay", "optimizer.grad_clip", "optimizer.max_coeff", "optimizer.min_coeff",
    "optimizer.momentum", "optimizer.trust_coefficient", "schedule.steps", "schedule.warmup", "schedule.decay",
    "schedule.power", "schedule.min_lr_ratio", "batch.micro_batch", "batch.grad_accum", "deepspeed.configs",
    "batch.adaptive_factor", "batch.adaptive_every", "batch.min", "batch.max", "deepspeed.activation_checkpointing",
    # a distillation's teacher is held to its weights (teacher.refuse_changed, by sha256), not to its path
    *(f"distill.{k}" for k in ("teacher", "temperature", "alpha_kd", "alpha_hard", "alpha_hidden", "init", "layers")),
    "checkpoint.every_steps", "checkpoint.keep_last", "run.eval_every", "run.log_every", "run.trust_ratio_every",
    "run.runs_root", "run.overflow_patience", "run.noise_scale_ema", "cluster.nodes", "cluster.gpus_per_node",
    # a phase's batch_from: the batch it carried is a decision in the checkpoint once taken; a change moves only
    # boundaries still ahead
    "cluster.gpu_memory", *(f"phases.1.{k}" for k in ("steps", "samples", "micro_batch", "lr", "warmup", "decay",
                                                       "power", "min_lr_ratio", "batch_from")),
}


def _recipe_tree():
    """tiny with one later phase, as recipe.json holds it (a JSON round trip)."""
    recipe = dataclasses.replace(load_recipe("tiny"), phases=(PhaseConfig(global_batch=2048, seq_len=128, steps=5),))
    return json.loads(json.dumps(dataclasses.asdict(recipe)))


def _leaf_paths(tree, prefix=""):
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _leaf_paths(v, f"{prefix}{k}.")]
    if prefix == "phases.":
        return ["phases", *(p for n, v in enumerate(tree, 1) for p in _leaf_paths(v, f"phases.{n}."))]
    return [prefix[:-1]]


LEAVES = _leaf_paths(_recipe_tree())


def _changed(value):
    """Another value of the same JSON type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    return [*value, value[0] if value else "x"]


def test_every_recipe_leaf_is_fixed_or_changeable():
    assert FIXED_BY_SPEC.isdisjoint(CHANGEABLE_BY_SPEC)
    assert set(LEAVES) == FIXED_BY_SPEC | CHANGEABLE_BY_SPEC


@pytest.mark.parametrize("key", LEAVES)
def test_a_change_of_each_leaf_is_refused_by_name_or_allowed(key):
    before = _recipe_tree()
    after = copy.deepcopy(before)
    *parents, last = key.split(".")
    node = after
    for part in parents:
        node = node[int(part) - 1] if isinstance(node, list) else node[part]
    if key == "phases":
        after["phases"].append(dict(after["phases"][0]))
    else:
        node[last] = _changed(node[last])
    if key in FIXED_BY_SPEC:
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)} is .* cannot change within a run"):
            refuse_changes(before, after, "run")
    else:
        refuse_changes(before, after, "run")
        assert list(changed_keys(before, after)) == [key]


def test_a_resumed_engine_clips_at_this_starts_gradient_clipping(tmp_path):
    """gradient_clipping is read from the DeepSpeed JSON each start writes: the checkpoint does not bring back the
    old one, and the step clips at the new norm (DeepSpeed reports the norm before clipping)."""
    distributed.ensure_env()
    params = dict(weight_decay=0.01)
    engine = _engine(1e-2, **params)
    engine.backward(engine(torch.randn(4, 6)).square().mean())
    engine.step()
    engine.save_checkpoint(str(tmp_path), tag="t")
    engine.destroy()
    engine = _engine(1e-2, clip=1e-6, **params)
    engine.load_checkpoint(str(tmp_path), tag="t")
    assert engine.optimizer.clip_grad == 1.0  # DeepSpeed brought back the checkpoint's clipping by itself
    restore_clipping(engine)
    assert engine.gradient_clipping() == engine.optimizer.clip_grad == 1e-6
    opt = client_optimizer(engine)
    loaded = {id(p): st["exp_avg"].clone() for p, st in opt.state.items()}
    engine.backward((engine(torch.randn(4, 6)) * 1e3).square().mean())
    engine.step()
    # m = b1 m + (1 - b1) g_clipped: with |g_clipped| <= 1e-6 the moment moves from 0.9 m by at most 1e-7 (at the old
    # clipping of 1.0 this huge gradient would move it by 0.1)
    for p, st in opt.state.items():
        assert float((st["exp_avg"] - 0.9 * loaded[id(p)]).norm()) <= 1.01e-7
    assert engine.get_global_grad_norm() > 1.0  # the norm before clipping: the gradient was large
    engine.destroy()


# One resume changes every changeable key a LAMB run without phases, distillation or the adaptive batch reads, and each
# is shown applied: the LR table (metrics' lr, steps 3-6), the optimizer's groups and clipping as the resumed engine
# checkpointed them at step 6, the micro-batch split DeepSpeed ran with, and the cadences of evaluation, trust ratios,
# log lines and checkpoints.
APPLIED = ["--name=tiny_resumed", "--optimizer.lr=0.004", "--optimizer.lr_rule=linear", "--optimizer.base_batch=128",
           "--schedule.steps=6", "--schedule.warmup=0.6", "--schedule.decay=poly", "--schedule.power=2",
           "--schedule.min_lr_ratio=0.1", "--optimizer.betas=0.8,0.99", "--optimizer.eps=1e-8",
           "--optimizer.weight_decay=0.1", "--optimizer.min_coeff=0", "--optimizer.max_coeff=5",
           "--optimizer.grad_clip=0.5", "--batch.micro_batch=32", "--batch.grad_accum=2", "--run.eval_every=3",
           "--run.trust_ratio_every=3", "--run.log_every=4", "--checkpoint.every_steps=3", "--checkpoint.keep_last=3"]


def _lr_expected(step):
    """The new table written out: peak 0.004 x (64 / 128) (linear rule); warmup round(0.6 x 6) = 4 updates, then
    poly decay of power 2 over the last 2, floored at 0.1: update index k = step - 1."""
    peak, k = 0.004 * 64 / 128, step - 1
    if k < 4:
        return peak * (k + 1) / 4
    return peak * (0.1 + 0.9 * (1 - (k - 4) / 2) ** 2)


def test_a_resume_applies_each_changed_setting_from_the_resumed_step_on(stopped_run, tmp_path, corpus_file, capsys):
    run = _copy(stopped_run, tmp_path)
    before = lrs(stopped_run)
    keys = {a.split("=")[0] for a in APPLIED}
    base = [a for a in [*RUN, "--batch.micro_batch=16"] if a.split("=")[0] not in keys]
    args = ["train", "tiny", "--run-dir", str(run), f"--data.sources={corpus_file}", *base, *APPLIED, "--resume"]
    assert main(args) == 0
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # schedule.steps: on to 6
    after = {r["step"]: r["lr"] for r in records}
    assert after[1] == before[1] and after[2] == before[2]
    for step in (3, 4, 5, 6):
        assert after[step] == pytest.approx(_lr_expected(step), rel=1e-12), step
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert [r["step"] for r in records if "trust_ratios" in r] == [1, 3, 6]  # and at step 1 always
    out = capsys.readouterr()
    logged = re.findall(r"step (\d)/6:", out.out + out.err)
    assert logged == ["4", "6"], logged
    # checkpoints at 3 and the end, the 3 newest kept (with 2, step 2 would be gone)
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == \
        ["step00000002", "step00000003", "step00000006"]
    saved = run / "checkpoints" / "step00000006"
    (optim_file,) = saved.glob("*optim_states.pt")
    optim = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    groups = optim["base_optimizer_state"]["param_groups"]
    assert [(g["betas"], g["eps"], g["min_coeff"], g["max_coeff"]) for g in groups] == \
        [((0.8, 0.99), 1e-8, 0.0, 5.0)] * 2
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]  # the decay group, then biases and norms without
    assert optim["clip_grad"] == 0.5
    ds = torch.load(next(saved.glob("*model_states.pt")), map_location="cpu", weights_only=False)["ds_config"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == \
        (32, 2, 0.5)
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["recipe"]["name"] == "tiny_resumed"
    assert set(recipe["resolved"]["changed_on_resume"]) == {k.removeprefix("--") for k in keys}


def _plain_lamb(lr, **params):
    """LAMB over two groups (decay, none) with a LambdaLR, no DeepSpeed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = LAMB(param_groups(model, params.pop("weight_decay")), lr=lr, **params)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))


def test_restore_without_an_engine_puts_this_starts_settings_over_the_loaded_ones():
    """restore after torch's load_state_dict (which DeepSpeed's load_checkpoint calls, and which overwrites every
    group's settings and the scheduler's base_lrs with the saved ones): this start's settings and LR table at the
    loaded position, the loaded moments kept; a checkpoint with another number of groups is refused."""
    model, opt, sched = _plain_lamb(1e-2, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6, max_coeff=10.0)
    for _ in range(3):
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        sched.step()
    saved, saved_sched = copy.deepcopy(opt.state_dict()), sched.state_dict()
    model, opt, sched = _plain_lamb(5e-3, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-8, max_coeff=5.0)
    settings, base_lrs = hyperparameters(opt), list(sched.base_lrs)
    assert all("params" not in g for g in settings) and len(settings) == 2
    opt.load_state_dict(saved)
    sched.load_state_dict(saved_sched)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and sched.base_lrs == [1e-2, 1e-2]  # torch's own doing
    restore(opt, sched, settings, base_lrs)
    assert [(g["betas"], g["eps"], g["max_coeff"], g["weight_decay"]) for g in opt.param_groups] == \
        [((0.8, 0.99), 1e-8, 5.0, 0.1), ((0.8, 0.99), 1e-8, 5.0, 0.0)]
    assert [g["lr"] for g in opt.param_groups] == [5e-3 / 4] * 2 == sched.get_last_lr()  # position 3: factor 1/4
    assert sched.base_lrs == [5e-3, 5e-3] and sched.last_epoch == 3
    now = opt.state_dict()["state"]
    assert now.keys() == saved["state"].keys() and all(
        torch.equal(now[i][k], saved["state"][i][k]) and int(now[i]["step"]) == 3
        for i in now for k in ("exp_avg", "exp_avg_sq"))
    with pytest.raises(ConfigError, match="the checkpoint has 2 optimizer param groups and this start builds 1"):
        restore(opt, sched, settings[:1], base_lrs)
    restore(opt, None, settings, base_lrs)  # no scheduler: the settings alone
    sched.base_lrs = [1e-3, 2e-3]  # as an adaptive-batch decision changes the table: the scheduler's own groups
    lr_at_position(sched)
    assert [g["lr"] for g in opt.param_groups] == [1e-3 / 4, 2e-3 / 4] == sched.get_last_lr()


def test_restore_clipping_takes_the_engines_value_where_the_wrapper_keeps_one():
    from types import SimpleNamespace

    wrapper = SimpleNamespace(clip_grad=1.0)
    restore_clipping(SimpleNamespace(optimizer=wrapper, gradient_clipping=lambda: 0.25))
    assert wrapper.clip_grad == 0.25
    plain = SimpleNamespace()
    restore_clipping(SimpleNamespace(optimizer=plain, gradient_clipping=lambda: 0.25))
    assert not hasattr(plain, "clip_grad")


def test_a_refusal_names_the_value_to_resume_with_and_keys_on_one_side_only_count():
    """The sentence's fix, written as the option to type (a flag in lower case, a string as it is, a list with
    commas, a change of the number of phases by its keys); a key one recipe holds and the other lacks (a recipe of an
    older bigbatch) is a change like any other."""
    base = {"data": {"streaming": True, "tokenizer": "SP-Unigram", "sources": ["a", "b"]}, "run": {"seed": 0},
            "phases": [{"seq_len": 128}]}
    for key, value, fix in (("data.streaming", False, "--data.streaming=true"),
                            ("data.tokenizer", "bpe", "--data.tokenizer=SP-Unigram"),
                            ("data.sources", ["a"], "--data.sources=a,b"), ("run.seed", 7, "--run.seed=0")):
        changed = copy.deepcopy(base)
        section, name = key.split(".")
        changed[section][name] = value
        with pytest.raises(ConfigError) as err:
            refuse_changes(base, changed, "runs/x")
        assert str(err.value) == (
            f"{key} is {value!r} at this start but the run in runs/x was started with {base[section][name]!r}, and it "
            "cannot change within a run (the checkpoint's data position and shapes depend on it); resume with "
            f"{fix} or start a new --run-dir.")
    changed = copy.deepcopy(base)
    changed["phases"].append({"seq_len": 256})
    with pytest.raises(ConfigError, match=r"^phases is 2 .* was started with 1, .* resume with --phases\.N\.seq_len "
                                          r"and the other phase keys=1 or start"):
        refuse_changes(base, changed, "runs/x")
    newer = copy.deepcopy(base)
    newer["model"] = {"hold_zeros": True}
    with pytest.raises(ConfigError, match=r"^model\.hold_zeros is True .* was started with None"):
        refuse_changes(base, newer, "runs/x")
    newer = copy.deepcopy(base)
    newer["run"]["noise_scale_ema"] = 0.9
    assert changed_keys(base, newer) == {"run.noise_scale_ema": [None, 0.9]}
    assert changed_keys(newer, base) == {"run.noise_scale_ema": [0.9, None]}


def _keys(args):
    return {a.split("=")[0].removeprefix("--") for a in args}


# what the resume of test_a_resume_applies_the_model_data_run_cluster_and_deepspeed_settings changes
SECOND_RESUME = {"model.dropout", "data.mlm_probability", "data.whole_word_masking", "data.num_proc", "data.cache_dir",
                 "run.overflow_patience", "run.noise_scale_ema", "run.runs_root", "cluster.nodes",
                 "cluster.gpus_per_node", "cluster.gpu_memory", "deepspeed.configs",
                 "deepspeed.activation_checkpointing"}
DISTILL_RESUME = {f"distill.{k}" for k in ("teacher", "temperature", "alpha_kd", "alpha_hard", "alpha_hidden", "init",
                                           "layers")}


@pytest.fixture
def trainers(monkeypatch):
    """Every Trainer that fits in this test, kept after its run (its engine, data, guard and noise estimator)."""
    from bigbatch.run.loop import Trainer

    seen, real_fit = [], Trainer.fit

    def fit(self):
        seen.append(self)
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", fit)
    return seen


def test_a_resume_applies_the_model_data_run_cluster_and_deepspeed_settings(stopped_run, tmp_path, corpus_file,
                                                                            trainers):
    """A second resume of the same stopped run changes the rest of the changeable keys a LAMB run reads, each shown
    where it acts: the resumed model's dropouts, the masking of the data it trains on, the overflow guard's patience,
    the noise scale's average, ZeRO's stage. data.num_proc and data.cache_dir only steer preprocessing, which a resume
    does not redo (the packed rows are in the run directory), run.runs_root only names a run without --run-dir, and
    cluster.nodes/gpus_per_node only inform the planner on one rank: their effect is this start's recipe.json."""
    run = _copy(stopped_run, tmp_path)
    changed = ["--model.dropout=0.25", "--data.mlm_probability=0.5", "--data.whole_word_masking=true",
               "--data.num_proc=2", f"--data.cache_dir={tmp_path / 'hf'}", "--run.overflow_patience=4",
               "--run.noise_scale_ema=0.5", f"--run.runs_root={tmp_path / 'elsewhere'}", "--cluster.nodes=2",
               "--cluster.gpus_per_node=4", "--cluster.gpu_memory=40GB",
               "--deepspeed.configs=zero2.json,fp32.json", "--deepspeed.activation_checkpointing=auto"]
    args = ["train", "tiny", "--run-dir", str(run), f"--data.sources={corpus_file}", *RUN, *changed, "--resume"]
    assert main(args) == 0
    (trainer,) = trainers
    assert trainer.start_step == 2
    engine = trainer.engine
    dropouts = [m.p for m in engine.module.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and set(dropouts) == {0.25}  # tiny trained at 0.0
    assert engine.zero_optimization_stage() == 2
    assert (trainer.guard.patience, trainer.ctx.noise.ema) == (4, 0.5)
    assert (trainer.data.mlm_probability, trainer.data.whole_word_masking) == (0.5, True)
    batch = trainer.data.eval_batches(0, 1, 64)[0]
    real = batch["attention_mask"].bool()
    masked = float((batch["labels"] != -100)[real].float().mean())
    assert masked == pytest.approx(0.5, abs=0.1)  # at the old 0.15 this would be about 0.15
    recipe = json.loads((run / "recipe.json").read_text())
    assert set(recipe["resolved"]["changed_on_resume"]) == _keys(changed) == SECOND_RESUME
    assert recipe["recipe"]["cluster"] == {"nodes": 2, "gpus_per_node": 4, "gpu_memory": "40GB"}
    assert (recipe["recipe"]["data"]["num_proc"], recipe["recipe"]["run"]["runs_root"]) == \
        (2, str(tmp_path / "elsewhere"))
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "hf").exists()
    # "auto" checkpointing was chosen in cluster.gpu_memory (no GPU here): 40 GB = 37.3 GiB
    assert "of 37.3 GiB" in json.dumps(recipe["resolved"]), recipe["resolved"]


# A LARS run of tiny with a later phase and the adaptive batch (a decision every 8 steps: none in its 6 first-phase
# steps), stopped after step 2; its resume changes LARS's own settings, every key of the later phase and the adaptive
# batch's, each shown applied in the decisions, the step table and the checkpoints the resumed start writes.
LARS_RUN = ["--optimizer.type=lars", "--batch.global_batch=16", "--batch.micro_batch=4", "--batch.adaptive=true",
            "--batch.adaptive_every=8", "--batch.adaptive_factor=1", "--batch.min=0", "--batch.max=64",
            "--optimizer.base_batch=16", "--optimizer.lr_rule=sqrt", "--run.noise_scale_ema=0.9", "--schedule.steps=6",
            "--schedule.warmup=0", "--schedule.decay=constant", "--run.eval_every=100", "--checkpoint.every_steps=2",
            "--checkpoint.keep_last=9", "--data.vocab_size=400", "--data.eval_samples=32", "--data.seq_len=32",
            "--model.max_position=64"]
LARS_CHANGED = ["--optimizer.momentum=0.5", "--optimizer.trust_coefficient=0.01", "--batch.adaptive_every=3",
                "--batch.adaptive_factor=3", "--batch.min=20", "--batch.max=36", "--phases.1.steps=0",
                "--phases.1.samples=64", "--phases.1.micro_batch=8", "--phases.1.lr=0.002", "--phases.1.warmup=0.5",
                "--phases.1.decay=poly", "--phases.1.power=2", "--phases.1.min_lr_ratio=0.1",
                "--phases.1.batch_from=adapted"]


@pytest.fixture(scope="module")
def lars_resumed(tmp_path_factory, corpus_file):
    """(run directory, the resumed start's Trainer, the stopped start's records)."""
    from test_adaptive import two_phase_file

    from bigbatch.run.loop import Trainer

    root = tmp_path_factory.mktemp("lars")
    recipe = two_phase_file(root, global_batch=16, seq_len=64, steps=2, warmup=0.0, decay="constant")
    run = root / "run"
    args = ["train", recipe, "--run-dir", str(run), f"--data.sources={corpus_file}", *LARS_RUN]
    assert main(args) == 0
    before = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    for tag in ("step00000004", "step00000006", "step00000008"):
        shutil.rmtree(run / "checkpoints" / tag)
    (run / "checkpoints" / "latest").write_text("step00000002")
    seen, mp = [], pytest.MonkeyPatch()
    real_fit = Trainer.fit
    mp.setattr(Trainer, "fit", lambda self: seen.append(self) or real_fit(self))
    try:
        assert main([*args, *LARS_CHANGED, "--resume"]) == 0
    finally:
        mp.undo()
    return run, seen[0], before


def _decided(noise, current, factor, low, high, unit=4):
    """The adaptive batch's rule written out: clamp(factor x B_noise, max(current, batch.min), batch.max), rounded
    down to a multiple of micro-batch x world, never below the current batch."""
    return max(current, int(min(max(factor * noise, low, current), high) // unit) * unit)


def test_a_resume_applies_lars_phase_and_adaptive_settings(lars_resumed):
    run, trainer, before = lars_resumed
    assert trainer.start_step == 2 and [r["global_batch"] for r in before] == [16] * 8  # no decision before
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 11))  # phase 2: ceil(64 samples / 16) = 4 steps, not 2
    # batch.adaptive_every=3: a decision after step 3 (and at phase 2's 3rd step); factor 3 and max 36 decide it (the
    # old factor 1 would give 24, the old max 64 gives 40)
    decided = [(r["step"], r["decision_new_batch"]) for r in records if r.get("decision_noise_scale") is not None]
    assert [s for s, _ in decided] == [3, 9]
    first = records[2]
    assert first["decision_new_batch"] == _decided(first["decision_noise_scale"], 16, 3, 20, 36) == 36
    assert _decided(first["decision_noise_scale"], 16, 1, 20, 36) != 36 != _decided(
        first["decision_noise_scale"], 16, 3, 20, 64)
    # phase 2 starts from the batch phase 1 reached (batch_from=adapted), at most batch.max, in multiples of its
    # micro-batch 8: 32, not its own 16
    assert [r["global_batch"] for r in records] == [16] * 3 + [36] * 3 + [32] * 4
    assert [(sp.micro_batch, sp.grad_accum) for sp in trainer.steps[6:]] == [(8, 4)] * 4
    # phase 2's LR: its lr 0.002 at its own batch 16 carried to 32 by the sqrt rule; warmup round(0.5 x 4) = 2
    # updates, then poly of power 2 over the other 2, floored at 0.1
    peak = 0.002 * (32 / 16) ** 0.5
    expected = [peak * f for f in (0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5**2)]
    assert [r["lr"] for r in records[6:]] == pytest.approx(expected, rel=1e-12)
    # LARS's momentum and trust coefficient in the optimizer the resumed start checkpointed
    (optim_file,) = (run / "checkpoints" / "step00000010").glob("*optim_states.pt")
    optim = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    groups = optim["base_optimizer_state"]["param_groups"]
    assert [(g["momentum"], g["trust_coefficient"]) for g in groups] == [(0.5, 0.01)] * 2
    recipe = json.loads((run / "recipe.json").read_text())
    assert set(recipe["resolved"]["changed_on_resume"]) == _keys(LARS_CHANGED)


def test_a_resumed_distillation_trains_with_this_starts_distill_settings(tiny_runs, corpus_file, tmp_path, trainers):
    """A distillation stopped after step 2 resumes with every distill key changed: the loss of each resumed step is
    the new alphas' sum of its terms (the old ones before), the student's KD runs at the new temperature, and the
    teacher is read from its new path (the same weights: a teacher is held to its sha256, not its path).
    distill.init and distill.layers choose a fresh student's first weights only: a resume loads the checkpoint's, so
    their effect is this start's recipe.json."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_runs("bert", 0), teacher)
    run = tmp_path / "student"
    args = ["train", "tiny_distil", "--run-dir", str(run), f"--data.sources={corpus_file}", "--schedule.steps=4",
            "--batch.global_batch=64", "--batch.micro_batch=16", "--run.eval_every=4", "--data.eval_samples=64",
            "--checkpoint.every_steps=2"]
    # a student of its own first weights (not the teacher's layers): loss terms far from 0, so each alpha shows
    assert main([*args, f"--distill.teacher={tiny_runs('bert', 0)}", "--distill.init=none"]) == 0
    shutil.rmtree(run / "checkpoints" / "step00000004")
    (run / "checkpoints" / "latest").write_text("step00000002")
    trainers.clear()
    # the student took the teacher's tokenizer by its path, and data.tokenizer is fixed by path: a teacher read from
    # elsewhere is resumed with the tokenizer (and so its vocabulary) the run started with
    data = json.loads((run / "recipe.json").read_text())["recipe"]["data"]
    changed = [f"--data.tokenizer={data['tokenizer']}", f"--data.vocab_size={data['vocab_size']}",
               f"--distill.teacher={teacher}", "--distill.temperature=4", "--distill.alpha_kd=0.5",
               "--distill.alpha_hard=2", "--distill.alpha_hidden=0.25", "--distill.init=teacher_layers",
               "--distill.layers=1"]
    assert main([*args, *changed, "--resume"]) == 0
    (trainer,) = trainers
    assert trainer.start_step == 2
    cfg = trainer.engine.module.cfg
    assert (cfg.temperature, cfg.alpha_kd, cfg.alpha_hard, cfg.alpha_hidden) == (4.0, 0.5, 2.0, 0.25)
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r, (kd, hard, hidden) in zip(records, [(1.0, 0.5, 0.5)] * 2 + [(0.5, 2.0, 0.25)] * 2):
        assert r["loss"] == pytest.approx(kd * r["loss_kd"] + hard * r["loss_hard"] + hidden * r["loss_hidden"],
                                          rel=1e-5), r["step"]
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["resolved"]["teacher"]["source"] == str(teacher.resolve())
    assert set(recipe["resolved"]["changed_on_resume"]) == _keys(changed[2:]) == DISTILL_RESUME


def test_every_changeable_leaf_is_changed_in_one_of_the_resumes_above():
    """A new changeable key fails here until a resume test changes it and shows where it acts."""
    shown = [_keys(APPLIED), SECOND_RESUME, _keys(LARS_CHANGED), DISTILL_RESUME]
    assert set().union(*shown) == CHANGEABLE_BY_SPEC


def test_the_tokenizer_is_fixed_by_its_bytes_not_its_path(tmp_path):
    """A teacher moved with its tokenizer keeps the run's tokenizer: the same bytes at another path resume; other
    bytes, or an old path that is gone, are refused by name."""
    old, copy_, other = tmp_path / "a.model", tmp_path / "moved" / "a.model", tmp_path / "b.model"
    copy_.parent.mkdir()
    old.write_bytes(b"pieces")
    copy_.write_bytes(b"pieces")
    other.write_bytes(b"other pieces")
    before = {"data": {"tokenizer": str(old)}}
    refuse_changes(before, {"data": {"tokenizer": str(copy_)}}, tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.tokenizer is .*b\.model"):
        refuse_changes(before, {"data": {"tokenizer": str(other)}}, tmp_path)
    old.unlink()
    with pytest.raises(ConfigError, match=r"^data\.tokenizer is "):
        refuse_changes(before, {"data": {"tokenizer": str(copy_)}}, tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.tokenizer is "):
        refuse_changes({"data": {"tokenizer": ""}}, {"data": {"tokenizer": str(copy_)}}, tmp_path)
