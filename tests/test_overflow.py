"""fp16 dynamic loss scaling and the overflow policy, through the real trainer (one process), and the skip of a
non-finite gradient at ZeRO stage 0 in fp32 (`bigbatch.engine.SkipNonFinite`) through `bigbatch.engine.initialize`.

fp16 on the CPU needs the test-only accelerator patch (DeepSpeed refuses fp16 on a CPU otherwise). Overflows are
injected as an inf in one parameter's gradient at chosen steps; a divergence as a NaN loss; a state that is no longer
finite as an inf written into a weight. The expectations are written out here from DeepSpeed's documented rule
(halve on an overflow once `hysteresis` is spent, double after `loss_scale_window` clean steps since the last
overflow), not read from DeepSpeed. The same skip at ZeRO 1-3 and in 16 bits, on 2 ranks, is checked in
tests/workers/mixed_precision.py.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from bigbatch.cli import main
from bigbatch.config.files import load_recipe
from bigbatch.config.schedule import step_table
from bigbatch.run.metrics import read_metrics

SMALL = ["--batch.global_batch=32", "--batch.micro_batch=16", "--run.eval_every=100", "--checkpoint.every_steps=1",
         "--checkpoint.keep_last=20", "--data.vocab_size=400", "--data.eval_samples=32", "--data.seq_len=32",
         "--model.max_position=64", "--optimizer.lr=2e-3", "--schedule.warmup=0.5"]


def train_tiny(tmp_path, corpus_file, steps: int, *extra: str) -> tuple[int, Path]:
    """`bigbatch train tiny`, shrunk, in this process: (exit code, run directory)."""
    run = tmp_path / "run"
    code = main(["train", "tiny", f"--data.sources={corpus_file}", "--run-dir", str(run), f"--schedule.steps={steps}",
                 *extra, *SMALL])
    return code, run


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
    """(module weights, fp32 masters, optimizer state: LAMB's moments or LARS's momentum) at `step`; at ZeRO stage 0
    in fp32 the optimizer steps the module's own weights, which are then the masters."""
    d = run / "checkpoints" / f"step{step:08d}"
    model_file = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    zero = next(d.glob("*optim_states.pt"), None)
    if zero is None:
        return model_file["module"], model_file["module"], model_file["optimizer"]["state"]
    osd = torch.load(zero, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    return model_file["module"], osd["single_partition_of_fp32_groups"], osd["base_optimizer_state"]["state"]


def tensors(tree):
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors(v)]
    return [tree] if isinstance(tree, torch.Tensor) else []


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
    code, run = train_tiny(tmp_path, corpus_file, 8, f"--optimizer.type={optimizer}",
                           fp16_fragment(tmp_path, initial_scale_power=8, loss_scale_window=3, min_loss_scale=1))
    assert code == 0
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
    table = [sp.lr for sp in step_table(load_recipe(str(run / "recipe.json")), world=1)]
    assert [r["lr"] for r in records] == pytest.approx([table[r["updates"] - (0 if r["skipped_this_step"] else 1)]
                                                        for r in records])
    assert records[4]["lr"] == records[3]["lr"]


@pytest.mark.slow
def test_overflows_at_the_minimum_scale_checkpoint_and_stop(tmp_path, corpus_file, inject, capsys):
    inject["inf_grad"] = set(range(3, 100))
    code, run = train_tiny(tmp_path, corpus_file, 12, "--run.overflow_patience=2",
                           fp16_fragment(tmp_path, initial_scale_power=2, loss_scale_window=1000, min_loss_scale=1))
    assert code == 3
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
    code, run = train_tiny(tmp_path, corpus_file, 6)
    assert code == 3
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


@pytest.mark.slow
@pytest.mark.parametrize("configs", ["zero0.json,fp32.json", "zero1.json,bf16.json"])
def test_non_finite_gradients_in_fp32_and_bf16_skip_and_stop_after_patience(tmp_path, corpus_file, inject, capsys,
                                                                            configs):
    inject["inf_grad"] = set(range(3, 100))
    code, run = train_tiny(tmp_path, corpus_file, 8, "--run.overflow_patience=2", f"--deepspeed.configs={configs}")
    assert code == 3
    sentence = ("stopped at step 4: 2 steps in a row were skipped with gradients that are not finite; checkpoint "
                "step00000004 holds the last applied update.")
    assert sentence in capsys.readouterr().err and sentence in (run / "DIVERGED").read_text()
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [(r["skipped_this_step"], r["skipped_steps"], r["updates"]) for r in records] == [
        (False, 0, 1), (False, 0, 2), (True, 1, 2), (True, 2, 2)]
    # the skipped steps changed nothing: the stop's checkpoint holds the state after step 2, bit for bit, all finite
    assert same(states(run, 2), states(run, 4))
    assert all(torch.isfinite(t).all() for t in tensors(states(run, 4)))


@pytest.mark.slow
def test_a_divergence_with_a_non_finite_state_keeps_the_last_good_checkpoint(tmp_path, corpus_file, inject, capsys):
    inject["inf_weight"] = {3}  # as if step 2's update had overflowed a weight: step 3's loss is NaN
    code, run = train_tiny(tmp_path, corpus_file, 6)
    assert code == 3
    sentence = ("stopped at step 3: the training loss is nan (not finite), so the run diverged; its update was not "
                "applied and the weights or optimizer state in memory are not finite, so no checkpoint was written; "
                "resume from checkpoint step00000002, the last one saved.")
    assert sentence in capsys.readouterr().err and sentence in (run / "DIVERGED").read_text()
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    assert all(torch.isfinite(t).all() for t in tensors(states(run, 2)))  # not overwritten by the stop


@pytest.mark.slow
def test_deepspeeds_raise_at_the_minimum_scale_is_caught_and_stops_with_a_checkpoint(tmp_path, corpus_file, inject,
                                                                                     capsys, monkeypatch):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    # the guard's switch-off does not take: ZeRO's scaler raises its bare Exception at the first overflow at minimum
    monkeypatch.setattr(DynamicLossScaler, "raise_error_at_min_scale", property(lambda s: True, lambda s, v: None),
                        raising=False)
    inject["inf_grad"] = set(range(3, 100))
    code, run = train_tiny(tmp_path, corpus_file, 12, "--run.overflow_patience=5",
                           fp16_fragment(tmp_path, initial_scale_power=2, loss_scale_window=1000, min_loss_scale=1))
    assert code == 3
    # scale 4 at step 3 -> 2, step 4 -> 1 (the minimum), step 5 overflows at the minimum: DeepSpeed raises in it
    err = capsys.readouterr().err
    assert "stopped at step 5: " in err and "Current loss scale" not in err
    # one step skipped at the minimum (step 4's scale was 2 when it began), said as it is, not as the patience
    assert ("stopped at step 5: 1 step was skipped with the fp16 loss scale at its minimum (1); checkpoint "
            "step00000004 holds the last applied update." in (run / "DIVERGED").read_text())
    assert same(states(run, 2), states(run, 4))  # steps 3 and 4 were skipped, step 5 raised before any update


OPTIMIZERS = {"lamb": {"lr": 0.02, "weight_decay": 0.01}, "lars": {"lr": 0.5, "weight_decay": 1e-4, "momentum": 0.9},
              "adamw": {"lr": 0.01, "torch_adam": True}}  # DeepSpeed's own optimizer: stepped unchecked there too


@pytest.mark.parametrize("kind, clip", [("lamb", 1.0), ("lars", 0.0), ("adamw", 1.0)])
def test_stage0_fp32_skips_a_step_whose_gradient_is_not_finite(kind, clip):
    """ZeRO stage 0 in fp32, world 1, through bigbatch.engine.initialize: an inf gradient at step 2 and a NaN one at
    step 4 leave weights (the masters here) and optimizer state bit-identical, count as skipped and hold the LR;
    the other steps apply, and the reported gradient norm is the one before clipping."""
    from bigbatch.engine import client_optimizer, initialize
    from bigbatch.run import distributed

    distributed.ensure_env()
    distributed.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    bad = {2: math.inf, 4: math.nan}
    step = {"now": 0}
    model[0].weight.register_hook(lambda g: g * bad.get(step["now"], 1.0))
    config = {"train_batch_size": 8, "gradient_clipping": clip, "zero_optimization": {"stage": 0},
              "optimizer": {"type": kind, "params": OPTIMIZERS[kind]}}
    engine, *_ = initialize(model=model, config=config,
                            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (k + 1)))
    opt = client_optimizer(engine)
    g = torch.Generator().manual_seed(1)
    for step["now"] in range(1, 6):
        x, y = torch.randn(8, 6, generator=g) * 5, torch.randn(8, 3, generator=g) * 5
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
        weights, state = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())
        skipped = engine.skipped_steps
        engine.step()
        if step["now"] in bad:
            assert same(weights, list(model.parameters())) and same(state, opt.state_dict()), step["now"]
            assert engine.skipped_steps == skipped + 1 and not math.isfinite(engine.get_global_grad_norm())
        else:
            assert all(not torch.equal(a, b) and torch.isfinite(b).all() for a, b in zip(weights, model.parameters()))
            assert engine.skipped_steps == skipped and engine.get_global_grad_norm() == pytest.approx(norm, rel=1e-5)
        # the schedule follows applied updates: after u of them the factor is 1 / (u + 1)
        updates = step["now"] - engine.skipped_steps
        assert engine.get_lr()[0] == pytest.approx(OPTIMIZERS[kind]["lr"] / (updates + 1), rel=1e-12)
    assert engine.skipped_steps == 2
    engine.destroy()


def _three_groups():
    """LAMB over three param groups of two tensors each, with gradients and one applied step of state."""
    from bigbatch.optim import LAMB

    torch.manual_seed(0)
    groups = [{"params": [torch.randn(5, 4, requires_grad=True), torch.randn(4, requires_grad=True)],
               "weight_decay": wd} for wd in (0.01, 0.0, 0.1)]
    opt = LAMB(groups, lr=0.01)
    for g in groups:
        for p in g["params"]:
            p.grad = torch.randn_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("where", [(0, 0), (1, 1), (-1, -1)], ids=["first", "middle", "last-of-last-group"])
def test_the_stage0_guard_sees_every_tensor_of_every_group(where, bad):
    """SkipNonFinite without clipping: a non-finite element anywhere, the last element of the last tensor of the last
    of several groups included, skips the step with weights and optimizer state untouched."""
    from bigbatch.engine import SkipNonFinite

    opt = _three_groups()
    group, tensor = where
    target = opt.param_groups[group]["params"][tensor]
    target.grad.view(-1)[-1] = bad
    weights = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = copy.deepcopy(opt.state_dict())
    guard = SkipNonFinite(opt)
    guard.step()
    assert guard.overflow and not math.isfinite(guard._global_grad_norm)
    assert same(weights, [p for g in opt.param_groups for p in g["params"]]) and same(state, opt.state_dict())
    target.grad.view(-1)[-1] = 0.0
    guard.step()  # the same gradients made finite: applied
    assert not guard.overflow
    assert not any(torch.equal(a, b) for a, b in zip(weights, [p for g in opt.param_groups for p in g["params"]]))


def _zero1_engine():
    """A world-1 ZeRO-1 fp32 engine with LAMB after two steps: weights, flat fp32 masters and moments all distinct."""
    from bigbatch.engine import initialize
    from bigbatch.optim import param_groups
    from bigbatch.run import distributed

    distributed.ensure_env()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    config = {"train_batch_size": 4, "gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
              "optimizer": {"type": "LAMB", "params": {"lr": 1e-2, "weight_decay": 0.01}}}
    engine, *_ = initialize(model=model, config=config, model_parameters=param_groups(model, 0.01))
    for _ in range(2):
        engine.backward(engine(torch.randn(4, 6)).square().mean())
        engine.step()
    return engine


@pytest.mark.parametrize("kind", ["weight", "master", "exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_the_finite_state_check_sees_weights_masters_and_moments(kind, bad):
    """What `state_is_finite` must refuse to save as the last good state: a non-finite element in a weight, in an
    fp32 master or in either Adam moment, here the last element of the last group's tensor."""
    from bigbatch.engine import client_optimizer
    from bigbatch.run.overflow import state_is_finite

    engine = _zero1_engine()
    opt = client_optimizer(engine)
    master = opt.param_groups[-1]["params"][-1]
    assert master.data_ptr() not in {p.data_ptr() for p in engine.module.parameters()}  # a copy, not the weights
    target = {"weight": list(engine.module.parameters())[-1], "master": master,
              "exp_avg": opt.state[master]["exp_avg"], "exp_avg_sq": opt.state[master]["exp_avg_sq"]}[kind]
    assert state_is_finite(engine)
    with torch.no_grad():
        kept = target.view(-1)[-1].item()
        target.view(-1)[-1] = bad
    assert not state_is_finite(engine)
    with torch.no_grad():
        target.view(-1)[-1] = kept
    assert state_is_finite(engine)
    engine.destroy()


def _flat_lamb_engine():
    """A stand-in for a ZeRO-1 engine, no DeepSpeed: the model's weights, and a LAMB stepping separate fp32 masters
    (one flat tensor per group, as DeepSpeed hands them) after one step, behind a wrapper with `.optimizer`."""
    from types import SimpleNamespace

    from bigbatch.optim import LAMB

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    masters = [torch.randn(8, requires_grad=True), torch.randn(6, requires_grad=True)]
    opt = LAMB([{"params": [m]} for m in masters], lr=0.01)
    for m in masters:
        m.grad = torch.randn_like(m)
    opt.step()
    return SimpleNamespace(module=model, optimizer=SimpleNamespace(optimizer=opt), zero_optimization_stage=lambda: 1)


@pytest.mark.parametrize("kind", ["weight", "first master", "master", "exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_the_finite_state_check_without_an_engine(kind, bad):
    """state_is_finite over the pieces an engine holds (weights, the client's masters, its moments), built here
    without DeepSpeed so that a mutation run, which cannot fork a live engine, reaches it: the last element of the
    last tensor of each kind."""
    from bigbatch.run.overflow import state_is_finite

    engine = _flat_lamb_engine()
    opt = engine.optimizer.optimizer
    master = opt.param_groups[-1]["params"][-1]
    target = {"weight": list(engine.module.parameters())[-1], "first master": opt.param_groups[0]["params"][0],
              "master": master, "exp_avg": opt.state[master]["exp_avg"],
              "exp_avg_sq": opt.state[master]["exp_avg_sq"]}[kind]
    assert state_is_finite(engine)
    with torch.no_grad():
        target.view(-1)[-1] = bad
    assert not state_is_finite(engine)


def test_skip_non_finite_wraps_only_an_unchecked_optimizer_and_clips_at_the_engines_norm(monkeypatch):
    """skip_non_finite on a stand-in engine: an optimizer DeepSpeed checks itself (it has `overflow`) or none is left
    alone; an unchecked one is wrapped, and the engine's clipping hook clips at gradient_clipping() and keeps the
    norm before clipping, which the step then judges. DeepSpeed's clip_grad_norm_ needs a process group: torch's,
    the same on one rank, stands in, and is handed the engine's mpu."""
    from types import SimpleNamespace

    import deepspeed.runtime.utils

    from bigbatch.engine import SkipNonFinite, skip_non_finite

    mpus = []

    def clip_grad_norm_(parameters, max_norm, mpu):
        mpus.append(mpu)
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)

    monkeypatch.setattr(deepspeed.runtime.utils, "clip_grad_norm_", clip_grad_norm_)

    checked = SimpleNamespace(overflow=False)
    for optimizer in (None, checked):
        engine = SimpleNamespace(optimizer=optimizer)
        skip_non_finite(engine)
        assert engine.optimizer is optimizer
    opt = _three_groups()
    params = [p for g in opt.param_groups for p in g["params"]]
    engine = SimpleNamespace(optimizer=opt, module=SimpleNamespace(parameters=lambda: iter(params)), mpu="mpu",
                             gradient_clipping=lambda: 0.5)
    skip_non_finite(engine)
    assert isinstance(engine.optimizer, SkipNonFinite) and engine.optimizer.optimizer is opt
    norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))
    assert norm > 0.5
    engine.clip_fp32_gradients()
    clipped = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))
    assert clipped == pytest.approx(0.5, rel=1e-5) and mpus == ["mpu"]
    params[-1].grad.view(-1)[-1] = math.nan  # after clipping: the kept norm, not this, decides
    engine.optimizer.step()
    assert not engine.optimizer.overflow and engine.optimizer._global_grad_norm == pytest.approx(norm, rel=1e-5)


def test_the_guard_before_its_first_step_passes_the_closure_and_reads_through():
    """SkipNonFinite before any step reports no overflow and no norm (the engine may read both); a step hands the
    closure on and returns its loss; other attributes are the wrapped optimizer's; a copy is made without recursion."""
    from bigbatch.engine import SkipNonFinite

    opt = _three_groups()
    guard = SkipNonFinite(opt)
    assert guard.overflow is False and guard._global_grad_norm is None
    assert guard.param_groups is opt.param_groups and guard.state is opt.state
    assert guard.step(lambda: 1.5) == 1.5 and guard.overflow is False
    copied = copy.copy(guard)
    assert copied.optimizer is opt


def _zero3_stand_in():
    """A ZeRO-3 engine's pieces on rank 1 of 2, no DeepSpeed: parameters of 5, 4 and 2 elements sharded 3, 2 and 1 per
    rank (rank 1 holds 2, 2 and 1 real elements, the first shard with one element of padding), the flat fp32 master
    of their shards end to end (6 elements), and its moments."""
    from types import SimpleNamespace

    def param(numel, shard):
        p = torch.nn.Parameter(torch.empty(0))
        p.ds_tensor, p.ds_numel, p.ds_process_group = torch.ones(shard), numel, "group"
        p.partition_numel = lambda: shard
        return p

    a, b, c = param(5, 3), param(4, 2), param(2, 1)
    flat = torch.ones(6)
    client = SimpleNamespace(param_groups=[{"params": [flat]}],
                             state={flat: {"exp_avg": torch.ones(6), "exp_avg_sq": torch.ones(6), "step": 1}})
    ds = SimpleNamespace(optimizer=client, fp16_groups=[[a, b, c]], sub_group_process_groups=["group"],
                         fp32_partitioned_groups_flat=[flat])
    return SimpleNamespace(module=SimpleNamespace(parameters=lambda: [a, b, c]), optimizer=ds,
                           zero_optimization_stage=lambda: 3), a, c, flat, client.state[flat]


@pytest.mark.parametrize("where,counts", [
    ("a.shard", [(0, False), (1, False), (2, True)]), ("c.shard", [(0, False)]),
    ("master", [(0, False), (1, False), (2, True), (3, False), (4, False), (5, False)]),
    ("exp_avg_sq", [(1, False), (2, True), (5, False)])])
def test_the_finite_state_check_at_zero3_reads_real_elements_only(monkeypatch, where, counts):
    """ZeRO-3 pads a shard with memory that is never written: NaN there is not the state going bad, NaN in a real
    element of a shard, the flat master or a moment is (rank 1's view; dist's rank in the shards' group stood in
    for)."""
    from bigbatch.run import overflow

    monkeypatch.setattr(overflow.dist, "get_rank", lambda group: {"group": 1}[group])
    for index, padding in counts:
        engine, a, c, flat, state = _zero3_stand_in()
        target = {"a.shard": a.ds_tensor, "c.shard": c.ds_tensor, "master": flat,
                  "exp_avg_sq": state["exp_avg_sq"]}[where]
        assert overflow.state_is_finite(engine)
        target[index] = math.nan
        assert overflow.state_is_finite(engine) == padding, (where, index)
