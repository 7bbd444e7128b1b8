"""The adaptive batch (bigbatch/config/adaptive.py and its use by the step table, the loop and resume).

The controller's arithmetic runs under hypothesis against the rule written out here; one 2-rank launch trains `tiny`
adaptively under ZeRO-1 and ZeRO-3, stops one run between two decisions and resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bigbatch.cli import main
from bigbatch.config import BatchConfig, OptimizerConfig, PhaseConfig, Recipe, ScheduleConfig
from bigbatch.config.adaptive import decide, due, rerounded
from bigbatch.config.schedule import step_table

from conftest import WORKERS, deepspeed_launch, read_json


def adaptive_recipe(world: int, micro: int, accum: int, factor: float, every: int, top: int, floor: int = 0,
                    opt: str = "lamb", steps: int = 24, warmup: float = 0.0, decay: str = "constant") -> Recipe:
    b0 = micro * accum * world
    rule = {"lamb": "sqrt", "lars": "linear", "adamw": "linear"}[opt]
    return Recipe(
        optimizer=OptimizerConfig(type=opt, lr=1e-3, lr_rule=rule, base_batch=0),
        schedule=ScheduleConfig(steps=steps, warmup=warmup, decay=decay),
        batch=BatchConfig(global_batch=b0, micro_batch=micro, adaptive=True, adaptive_factor=factor,
                          adaptive_every=every, min=floor, max=max(top, b0, floor)),
    ).validate()


def simulate(recipe: Recipe, world: int, noise: list) -> tuple[list, list]:
    """The loop's use of the controller, without a launch: a decision wherever one is due, on that step's B_noise."""
    steps, decisions, seen = step_table(recipe, world), [], []
    for done in range(1, len(steps)):
        if not due(steps, done, recipe.batch.adaptive_every):
            continue
        old = steps[done].global_batch
        new = decide(old, noise[done % len(noise)], recipe.batch, steps[done].micro_batch * world)
        if new != old:
            decisions.append((done, new))
            steps = step_table(recipe, world, decisions=decisions)
        seen.append((done, old, new, steps))
    return steps, seen


noise_values = st.one_of(st.none(), st.floats(-1e3, 1e7, allow_nan=False), st.just(math.inf))


@settings(max_examples=200, deadline=None)
@given(world=st.integers(1, 8), micro=st.integers(1, 64), accum=st.integers(1, 8), factor=st.floats(0.01, 64.0),
       every=st.integers(1, 7), top_mult=st.integers(1, 64), floor_mult=st.integers(0, 4),
       opt=st.sampled_from(["lamb", "lars", "adamw"]), noise=st.lists(noise_values, min_size=1, max_size=30))
@example(world=1, micro=1, accum=2, factor=0.01, every=1, top_mult=1, floor_mult=0, opt="lamb", noise=[1e7])
@example(world=8, micro=64, accum=8, factor=64.0, every=7, top_mult=64, floor_mult=4, opt="lars", noise=[1e7])
@example(world=2, micro=16, accum=2, factor=4.0, every=5, top_mult=16, floor_mult=0, opt="lamb",
         noise=[None, -5.0, 42.0, math.inf, 0.0, 1e7])
@example(world=3, micro=5, accum=1, factor=1.0, every=1, top_mult=7, floor_mult=3, opt="adamw", noise=[1.0])
def test_decisions_never_shrink_stay_below_max_divide_and_carry_the_lr_rule(world, micro, accum, factor, every,
                                                                          top_mult, floor_mult, opt, noise):
    if world * accum == 1:
        accum = 2  # a world of one needs accumulation (refused otherwise: see the bad-input tests)
    b0 = micro * accum * world
    recipe = adaptive_recipe(world, micro, accum, factor, every, top=b0 * top_mult, floor=b0 * floor_mult // 2,
                             opt=opt)
    b = recipe.batch
    unit = micro * world
    steps, seen = simulate(recipe, world, noise)
    for done, old, new, table in seen:
        # the rule written out: clamp(k B_noise, max(current, min), max), down to a multiple of micro x world
        value = noise[done % len(noise)]
        if value is None or not 0 < value < math.inf:
            expected = old
        else:
            expected = max(old, math.floor(min(max(factor * value, b.min, old), b.max) / unit) * unit)
        assert new == expected
        assert old <= new <= b.max and new % unit == 0
        assert table[done].global_batch == new and table[done].grad_accum * micro * world == new
    batches = [sp.global_batch for sp in steps]
    assert batches[0] == b0 and batches == sorted(batches)
    for sp in steps:
        assert sp.global_batch % unit == 0 and sp.micro_batch == micro
        # constant schedule without warmup: the LR is the rule's at the step's batch, from the recipe's own batch
        ratio = sp.global_batch / b0
        assert sp.lr == pytest.approx(1e-3 * (math.sqrt(ratio) if opt == "lamb" else ratio), rel=1e-12)
    assert [sp.offset for sp in steps] == [sum(batches[:k]) for k in range(len(batches))]


def test_warmup_in_samples_ends_when_they_are_consumed():
    recipe = adaptive_recipe(world=1, micro=8, accum=2, factor=1.0, every=2, top=256, steps=8, warmup=100.0)
    steps = step_table(recipe, 1, decisions=[(2, 64)])
    assert [sp.global_batch for sp in steps] == [16, 16, 64, 64, 64, 64, 64, 64]
    assert [sp.offset for sp in steps[:4]] == [0, 16, 32, 96]
    peak = [1e-3 * math.sqrt(sp.global_batch / 16) for sp in steps]
    # samples consumed after each step / 100 until they reach it (after step 4: 160 >= 100), then the constant decay
    factors = [16 / 100, 32 / 100, 96 / 100, 1.0, 1.0]
    assert [sp.lr for sp in steps[:5]] == pytest.approx([p * f for p, f in zip(peak, factors)], rel=1e-12)


def test_a_later_phase_starts_from_its_own_batch():
    recipe = dataclasses.replace(
        adaptive_recipe(world=2, micro=4, accum=2, factor=1.0, every=3, top=512, steps=6),
        phases=(PhaseConfig(global_batch=32, seq_len=64, steps=6, warmup=0.0, decay="constant"),))
    steps = step_table(recipe, 2, decisions=[(3, 64)])
    assert [sp.global_batch for sp in steps] == [16, 16, 16, 64, 64, 64, 32, 32, 32, 32, 32, 32]
    assert not due(steps, 6, 3)  # no decision at a phase's first step
    assert due(steps, 9, 3) and due(steps, 3, 3) and not due(steps, 4, 3) and not due(steps, 12, 3)
    later = step_table(recipe, 2, decisions=[(3, 64), (9, 96)])
    assert [sp.global_batch for sp in later[6:]] == [32, 32, 32, 96, 96, 96]
    assert [sp.offset for sp in later[6:]] == [0, 32, 64, 96, 192, 288]


def test_resume_on_another_world_re_rounds_the_batch():
    recipe = adaptive_recipe(world=4, micro=4, accum=2, factor=1.0, every=2, top=512, steps=8)
    steps = step_table(recipe, 8, first=None, decisions=[(2, 48)])  # decided on 4 ranks, resumed on 8
    assert rerounded(steps, 5, 8) == (5, 32)  # down to a multiple of 4 x 8, at least one micro-batch per rank
    assert rerounded(step_table(recipe, 4, decisions=[(2, 48)]), 5, 4) is None
    assert rerounded(steps, 8, 8) is None  # past the last step


@pytest.mark.parametrize("args, key", [
    (["--batch.adaptive_factor=0"], "batch.adaptive_factor=0"),
    (["--batch.adaptive_factor=-2"], "batch.adaptive_factor=-2"),
    (["--batch.min=8192", "--batch.max=6144"], "batch.max=6144"),
    (["--batch.max=0"], "batch.max=0"),
    (["--run.noise_scale_ema=0"], "run.noise_scale_ema=0"),
    (["--batch.micro_batch=4096"], "batch.adaptive=true with world 1"),  # world 1 without accumulation
    (["--batch.adaptive_every=0"], "batch.adaptive_every=0"),
    (["--batch.ramp_start=1024", "--batch.ramp_increment=1024", "--batch.ramp_samples=8192"], "batch.ramp_start"),
])
def test_bad_adaptive_input_is_one_sentence_and_exit_2(tmp_path, capsys, args, key):
    run_dir = tmp_path / "run"
    code = main(["train", "tiny", "--run-dir", str(run_dir), "--batch.adaptive=true", "--batch.max=8192", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert key in err and len(err.splitlines()) == 1, err
    assert not run_dir.exists()  # nothing written on bad input


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_adapt_under_zero1_and_zero3_and_resume_between_decisions_bit_for_bit(tmp_path, corpus_file):
    out = tmp_path / "result.json"
    deepspeed_launch([str(WORKERS / "adaptive_resume.py"), "--out", str(out), "--corpus", str(corpus_file),
                      "--root", str(tmp_path)], world=2, timeout=1500)
    result = read_json(out)
    stop_at, every = result["stop_at"], 5
    assert stop_at % every  # the stop lands between two decisions
    for stage, runs in result["stages"].items():
        assert runs["codes"] == [0, 0, 0], stage
        assert f"step{stop_at:08d}" in runs["checkpoints"], stage  # the stopped start saved there
        whole = [r for r in runs["whole"] if "loss" in r]
        resumed = [r for r in runs["resumed"] if "loss" in r]
        assert [r["step"] for r in whole] == list(range(1, 41)) == [r["step"] for r in resumed]
        for key in ("loss", "global_batch", "lr", "eval_loss", "noise_scale", "decision_new_batch", "samples"):
            assert [r.get(key) for r in resumed] == [r.get(key) for r in whole], (stage, key)
        batches = [r["global_batch"] for r in whole]
        changes = [k for k in range(1, len(batches)) if batches[k] != batches[k - 1]]
        assert batches == sorted(batches) and all(b % 8 == 0 for b in batches) and batches[-1] <= 512, batches
        assert len(changes) >= 2, (stage, batches)
        assert min(changes) < stop_at < max(changes), (stage, changes)  # decisions both before and after the stop
        for k in changes:  # each change is a logged decision of the step before it, on its noise scale
            record = whole[k - 1]
            assert record["decision_old_batch"] == batches[k - 1] and record["decision_new_batch"] == batches[k]
            assert record["decision_lr"] == whole[k]["lr"]
            bound = min(max(2 * record["decision_noise_scale"], batches[k - 1]), 512)
            assert batches[k] == bound // 8 * 8


def test_plan_predicts_an_adaptive_run_by_mccandlish(tmp_path, capsys):
    pilot = tmp_path / "pilot"
    pilot.mkdir()
    (pilot / "metrics.jsonl").write_text('{"step": 40, "noise_scale": 3000.0}\n')
    assert main(["plan", "tiny", "--json", "--noise-scale", str(pilot), "--nodes", "1", "--gpus-per-node", "2",
                 "--batch.adaptive=true", "--batch.adaptive_every=5", "--batch.adaptive_factor=2",
                 "--batch.max=32768", "--batch.global_batch=1024", "--batch.micro_batch=64"]) == 0
    grid = json.loads(capsys.readouterr().out)["noise_scale"]
    a = grid["adaptive"]
    s_min = 60 / (1 + 3000 / 1024)  # the recipe's 60 steps at 1,024 fix S_min (S = S_min (1 + B_noise / B))
    assert grid["s_min"] == pytest.approx(s_min)
    assert a["adapted_batch"] == 6000 // 128 * 128  # 2 x 3,000 down to a multiple of 64 x 2
    # 5 steps at 1,024, then the rest of S_min's progress at the adapted batch
    steps = 5 + math.ceil((s_min - 5 / (1 + 3000 / 1024)) * (1 + 3000 / a["adapted_batch"]))
    assert a["steps"] == steps and a["samples"] == 5 * 1024 + (steps - 5) * a["adapted_batch"]
    assert a["fits"] and a["time_to_train_s"] > 0
