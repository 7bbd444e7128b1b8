"""The adaptive batch (bigbatch/config/adaptive.py and its use by the step table, the loop and resume).

The controller's arithmetic runs under hypothesis against the rule written out here, a later phase's start (own or
carried, `phases.N.batch_from`) with it; one world-1 run carries its adapted batch into a second phase and resumes
inside it; one 2-rank launch trains `tiny` adaptively under ZeRO-1 and ZeRO-3, stops one run between two decisions
and resumes it, and resumes a world-1 run on 2 ranks (the batch re-rounded).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bigbatch.cli import main
from bigbatch.config import BatchConfig, OptimizerConfig, PhaseConfig, Recipe, ScheduleConfig
from bigbatch.config.adaptive import carried, carry, decide, due, rerounded
from bigbatch.config.schedule import step_table
from bigbatch.run.metrics import read_metrics

from conftest import ROOT, WORKERS, deepspeed_launch, read_json


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
        new = carried(recipe, steps, done, world)  # a later phase's first step, batch_from="adapted"
        if new is None and not due(steps, done, recipe.batch.adaptive_every):
            continue
        old = steps[done].global_batch
        if new is None:
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


@settings(max_examples=300, deadline=None)
@given(reached=st.integers(1, 1 << 20), micro=st.integers(1, 64), world=st.integers(1, 8), top=st.integers(1, 1 << 20))
@example(reached=1, micro=1, world=1, top=1)
@example(reached=1 << 20, micro=64, world=8, top=1 << 20)
@example(reached=100, micro=64, world=8, top=1 << 20)  # below one micro-batch per rank: one
@example(reached=96, micro=4, world=8, top=64)  # above max: max
@example(reached=96, micro=4, world=8, top=96)
def test_a_carried_batch_is_the_reached_one_clamped_to_max_and_rounded_down_on_the_phase(reached, micro, world, top):
    unit = micro * world
    got = carry(reached, unit, top)
    bound = min(reached, top)
    assert got % unit == 0
    # the largest multiple of micro x world at or below the reached batch and max; one micro-batch per rank at least
    assert (got <= bound < got + unit) if bound >= unit else got == unit


def phased(recipe: Recipe, batch_from: str, global_batch: int, micro: int, steps: int, lr: float = 0.0) -> Recipe:
    return dataclasses.replace(recipe, phases=(PhaseConfig(
        global_batch=global_batch, seq_len=64, steps=steps, micro_batch=micro, lr=lr, warmup=0.0, decay="constant",
        batch_from=batch_from),)).validate()


@settings(max_examples=200, deadline=None)
@given(world=st.integers(1, 8), micro=st.integers(1, 16), accum=st.integers(2, 4), phase_micro=st.integers(1, 32),
       phase_mult=st.integers(1, 8), top_mult=st.integers(1, 32), batch_from=st.sampled_from(["own", "adapted"]),
       noise=st.lists(noise_values, min_size=1, max_size=12))
@example(world=1, micro=1, accum=2, phase_micro=1, phase_mult=1, top_mult=1, batch_from="adapted", noise=[None])
@example(world=8, micro=16, accum=4, phase_micro=32, phase_mult=8, top_mult=32, batch_from="adapted", noise=[1e7])
@example(world=2, micro=4, accum=2, phase_micro=8, phase_mult=1, top_mult=4, batch_from="adapted", noise=[30.0])
@example(world=3, micro=5, accum=3, phase_micro=7, phase_mult=2, top_mult=9, batch_from="own", noise=[1e7])
def test_a_later_phase_starts_from_its_own_or_the_adapted_batch_as_the_recipe_says(
        world, micro, accum, phase_micro, phase_mult, top_mult, batch_from, noise):
    b0 = micro * accum * world
    unit = phase_micro * world
    recipe = phased(adaptive_recipe(world, micro, accum, 2.0, 3, top=b0 * top_mult, steps=6), batch_from,
                    unit * phase_mult, phase_micro, 6)
    steps, seen = simulate(recipe, world, noise)
    first, later = steps[:6], steps[6:]
    reached = first[-1].global_batch
    if batch_from == "adapted":  # the rule written out: the largest multiple of the phase's unit <= min(reached, max)
        start = max(unit, math.floor(min(reached, recipe.batch.max) / unit) * unit)
    else:
        start = unit * phase_mult
    assert later[0].global_batch == start
    assert [done for done, old, new, _ in seen if done == 6] == ([6] if batch_from == "adapted" else [])
    batches = [sp.global_batch for sp in later]
    assert batches == sorted(batches) and all(x % unit == 0 and x // unit == sp.grad_accum
                                              for x, sp in zip(batches, later))
    assert all(x <= max(recipe.batch.max, start) for x in batches)
    # constant schedule, no phase LR: the rule from the recipe's batch at every batch of the phase
    for sp in later:
        assert sp.lr == pytest.approx(1e-3 * math.sqrt(sp.global_batch / b0), rel=1e-12)
    assert [sp.offset for sp in later] == [sum(batches[:k]) for k in range(len(batches))]


def test_a_carried_batch_under_a_phase_lr_follows_the_rule_from_the_phases_own_batch():
    recipe = phased(adaptive_recipe(world=2, micro=4, accum=2, factor=1.0, every=3, top=512, steps=6), "adapted",
                    global_batch=32, micro=8, steps=6, lr=4e-3)
    steps = step_table(recipe, 2, decisions=[(3, 56)])
    assert carried(recipe, steps, 6, 2) == 48  # 56 down to a multiple of 8 x 2
    assert carried(recipe, steps, 5, 2) is None and carried(recipe, steps, 7, 2) is None
    table = step_table(recipe, 2, decisions=[(3, 56), (6, 48)])
    assert [sp.global_batch for sp in table] == [16, 16, 16, 56, 56, 56, 48, 48, 48, 48, 48, 48]
    assert [sp.grad_accum for sp in table[6:]] == [3] * 6
    assert table[6].lr == pytest.approx(4e-3 * math.sqrt(48 / 32), rel=1e-12)  # 4e-3 is the peak at its own 32
    assert carried(phased(recipe, "own", 32, 8, 6, 4e-3), table, 6, 2) is None


def test_resume_on_another_world_re_rounds_the_batch():
    recipe = adaptive_recipe(world=4, micro=4, accum=2, factor=1.0, every=2, top=512, steps=8)
    steps = step_table(recipe, 8, first=None, decisions=[(2, 48)])  # decided on 4 ranks, resumed on 8
    assert rerounded(steps, 5, 8) == (5, 32)  # down to a multiple of 4 x 8, at least one micro-batch per rank
    assert rerounded(step_table(recipe, 4, decisions=[(2, 48)]), 5, 4) is None
    assert rerounded(steps, 8, 8) is None  # past the last step


def expected_run(lr0: float, start: int, factor: float, target: float, budget: int) -> tuple[int, int] | None:
    """SGD on the noisy quadratic of tests/test_noise.py (d sigma^2 = 1024, Hessian I) in expectation, written out:
    E|e'|^2 = (1 - lr)^2 E|e|^2 + lr^2 d sigma^2 / B with lr = min(lr0 B / 32, 1) (linear rule, capped at 1 /
    curvature) from B_noise = 4; every 8 steps `decide` on the true B_noise = d sigma^2 / E|e|^2 (factor 0: fixed).
    Returns (steps, samples) at the first step with E|e|^2 <= target, None if `budget` samples do not reach it."""
    limits = BatchConfig(global_batch=32, micro_batch=8, adaptive=True, adaptive_factor=factor or 1.0,
                         adaptive_every=8, max=256)
    err, batch, samples, steps = 256.0, start, 0, 0
    while samples + batch <= budget:
        lr = min(lr0 * batch / 32, 1.0)
        err = (1 - lr) ** 2 * err + lr**2 * 1024 / batch
        samples, steps = samples + batch, steps + 1
        if err <= target:
            return steps, samples
        if factor and steps % 8 == 0:
            batch = decide(batch, 1024 / err, limits, 8)
    return None


def fixed_b0_loss(lr0: float, steps: int = 200) -> float:
    err = 256.0
    for _ in range(steps):
        err = (1 - lr0) ** 2 * err + lr0**2 * 1024 / 32
    return err


def test_on_the_known_noise_problem_adaptive_meets_the_claim_against_b0_and_fixed_8_b0_does_as_well():
    """bench/adaptive_known_noise.py's first table in expectation: with LR 0.02 at B0 = 32 (8 B0's LR 0.16, far below
    the cap) B_noise grows from 4 to 2,545 (80 B0) over fixed B0's 200 steps. Adaptive at k = 1 reaches B0's final
    loss in <= 0.5x its steps and <= 1.1x its samples; at k = 0.2 (the factor the McCandlish law suggests) it misses
    the steps goal; and fixed 8 B0 needs no more samples than B0 or adaptive (the linear rule is exact here while the
    LR is small: on this quadratic samples do not depend on the batch), in 1/8 of the steps."""
    target = fixed_b0_loss(0.02)
    assert 1024 / target == pytest.approx(2545.2, rel=1e-3)
    steps, samples = expected_run(0.02, 32, 1.0, target, 4 * 6400)
    assert (steps, samples) == (96, 6592) and steps <= 0.5 * 200 and samples <= 1.1 * 6400
    law_steps, law_samples = expected_run(0.02, 32, 0.2, target, 4 * 6400)
    assert law_steps > 0.5 * 200 and law_samples <= 1.1 * 6400
    assert expected_run(0.02, 256, 0.0, target, 4 * 6400) == (25, 6400)


def test_at_the_noise_floor_no_batch_grown_under_the_linear_rule_reaches_b0s_loss():
    """bench/adaptive_known_noise.py's second table: with LR 0.125 at B0 (8 B0 at the cap) fixed B0 sits at its
    noise floor lr d sigma^2 / (B (2 - lr)) by step 200; the linear rule keeps lr / B, so every batch up to 8 B0 has
    a floor at least as high and neither fixed 8 B0 nor adaptive at any factor reaches it."""
    target = fixed_b0_loss(0.125)
    assert target == pytest.approx(0.125 * 1024 / (32 * 1.875), rel=1e-9)
    for batch in range(40, 257, 8):
        lr = min(0.125 * batch / 32, 1.0)
        assert lr * 1024 / (batch * (2 - lr)) > target
    assert expected_run(0.125, 256, 0.0, target, 4 * 6400) is None
    for factor in (0.2, 1.0, 4.0):
        assert expected_run(0.125, 32, factor, target, 4 * 6400) is None


@pytest.mark.slow
def test_the_sampled_known_noise_benchmark_shows_the_same(monkeypatch):
    """bench/adaptive_known_noise.py itself, LR 0.02, seeds 1-3 (about 5 s): adaptive at k = 1 on the true B_noise
    meets <= 0.5x steps and <= 1.1x samples of fixed B0; on the project's estimator (micro-batch 8 against the global
    batch) <= 1.1x samples and <= 0.6x steps; fixed 8 B0 needs no more samples than adaptive."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("adaptive_known_noise", ROOT / "bench" / "adaptive_known_noise.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = bench.measure(0.02)["runs"]
    assert runs["k1"]["reached"] == runs["k1est"]["reached"] == runs["fixed8"]["reached"] == 3
    assert runs["k1"]["steps_ratio"] <= 0.5 and runs["k1"]["samples_ratio"] <= 1.1
    assert runs["k1est"]["steps_ratio"] <= 0.6 and runs["k1est"]["samples_ratio"] <= 1.1
    assert runs["fixed8"]["samples_ratio"] <= runs["k1"]["samples_ratio"]
    assert runs["fixed8"]["steps_ratio"] <= 0.125 + 1e-9


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
    # A world-1 run (micro-batch 4 x 4) whose batch min = max = 20 makes 20 at step 4, stopped after step 6: the
    # launch resumes it on 2 ranks, where 20 does not divide on 4 x 2.
    single = tmp_path / "world1"
    assert main(["train", "tiny", "--run-dir", str(single), f"--data.sources={corpus_file}",
                 "--batch.global_batch=16", "--batch.micro_batch=4", "--batch.adaptive=true",
                 "--batch.adaptive_every=4", "--batch.adaptive_factor=2", "--batch.min=20", "--batch.max=20",
                 "--optimizer.base_batch=16", "--optimizer.lr_rule=sqrt", "--run.noise_scale_ema=0.9",
                 "--schedule.steps=8", "--schedule.warmup=0", "--schedule.decay=constant", "--run.eval_every=8",
                 "--checkpoint.every_steps=6", "--data.vocab_size=400", "--data.eval_samples=32"]) == 0
    before = [r for r in read_metrics(single / "metrics.jsonl") if "loss" in r]
    assert [r["global_batch"] for r in before] == [16] * 4 + [20] * 4
    shutil.rmtree(single / "checkpoints" / "step00000008")
    (single / "checkpoints" / "latest").write_text("step00000006")
    out = tmp_path / "result.json"
    proc = deepspeed_launch([str(WORKERS / "adaptive_resume.py"), "--out", str(out), "--corpus", str(corpus_file),
                             "--root", str(tmp_path), "--reround", str(single)], world=2, timeout=1500)
    result = read_json(out)
    assert "adaptive batch: global batch 20 does not divide on 2 ranks; re-rounded to 16 from step 6" in proc.stdout
    assert result["reround"]["code"] == 0
    after = [r for r in result["reround"]["records"] if "loss" in r]
    assert [r["global_batch"] for r in after] == [16] * 4 + [20] * 2 + [16] * 2
    assert [r["samples"] for r in after[6:]] == [104 + 16, 104 + 32]  # read on from 4 x 16 + 2 x 20
    assert [r["lr"] for r in after[6:]] == [before[0]["lr"]] * 2  # the sqrt rule at 16 from base 16
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


def two_phase_file(tmp_path, **phase) -> str:
    """tiny with one later phase (`phase`: PhaseConfig's fields), as a recipe file: phases are not overrides."""
    path = tmp_path / "two_phase.py"
    path.write_text(
        "import dataclasses\n"
        "from bigbatch.config import PhaseConfig\n"
        "from bigbatch.config.files import find_recipe, load_recipe_file\n"
        "RECIPE = dataclasses.replace(load_recipe_file(find_recipe('tiny')), name='two_phase',\n"
        f"    phases=(PhaseConfig({', '.join(f'{k}={v!r}' for k, v in phase.items())}),))\n")
    return str(path)


@pytest.mark.parametrize("batch_from, adaptive, key", [
    ("adapted", "false", "phases.1.batch_from='adapted' starts the phase from the batch the adaptive batch reached"),
    ("adapte", "true", "phases.1.batch_from='adapte' is not one of own, adapted (did you mean 'adapted'?)"),
])
def test_bad_batch_from_is_one_sentence_and_exit_2(tmp_path, capsys, batch_from, adaptive, key):
    recipe = two_phase_file(tmp_path, global_batch=256, seq_len=64, steps=4, batch_from=batch_from)
    for command in (["check", recipe], ["train", recipe, "--run-dir", str(tmp_path / "run")]):
        code = main([*command, f"--batch.adaptive={adaptive}", "--batch.max=8192"])
        err = [line for line in capsys.readouterr().err.splitlines() if "get_accelerator" not in line]  # DeepSpeed's
        assert code == 2 and len(err) == 1 and key in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("batch_from, start", [("adapted", 5888), ("own", 512)])
def test_plan_predicts_a_later_phase_from_the_adapted_batch_when_the_recipe_says_so(tmp_path, capsys, batch_from,
                                                                                    start):
    pilot = tmp_path / "pilot"
    pilot.mkdir()
    (pilot / "metrics.jsonl").write_text('{"step": 40, "noise_scale": 3000.0}\n')
    recipe = two_phase_file(tmp_path, global_batch=512, seq_len=128, steps=10, micro_batch=32, batch_from=batch_from)
    argv = ["plan", recipe, "--noise-scale", str(pilot), "--nodes", "1", "--gpus-per-node", "2",
            "--batch.adaptive=true", "--batch.adaptive_every=5", "--batch.adaptive_factor=2", "--batch.max=32768",
            "--batch.global_batch=1024", "--batch.micro_batch=64", "--model.max_position=128"]
    assert main([*argv, "--json"]) == 0
    a = json.loads(capsys.readouterr().out)["noise_scale"]["adaptive"]
    assert a["adapted_batch"] == 5888  # 2 x 3,000 down to a multiple of 64 x 2
    # phase 2 starts from 5,888 (a multiple of its 32 x 2) or its own 512; its first decision: 2 x 3,000 down to a
    # multiple of 32 x 2, never below where it starts
    assert a["phases"] == [{"phase": 2, "batch_from": batch_from, "start_batch": start, "adapted_batch": 5952}]
    assert main(argv) == 0
    assert f"phase 2 starts from {start:,} (batch_from={batch_from}) -> 5,952 at its first decision" in \
        capsys.readouterr().out


@pytest.mark.slow
def test_a_run_carries_the_adapted_batch_into_its_next_phase_and_a_resume_inside_it_replays_it(tmp_path, capsys,
                                                                                                corpus_file):
    # world 1, micro-batch 4 x 4: min = max = 20 makes the first decision (step 4) exactly 20 whatever B_noise is;
    # phase 2 (own batch 32, micro-batch 8) starts from 20 rounded down on 8: 16, its LR the sqrt rule's from 8
    recipe = two_phase_file(tmp_path, global_batch=32, seq_len=32, steps=6, micro_batch=8, warmup=0.0,
                            decay="constant", batch_from="adapted")
    args = ["train", recipe, f"--data.sources={corpus_file}", "--batch.global_batch=16", "--batch.micro_batch=4",
            "--batch.adaptive=true", "--batch.adaptive_every=4", "--batch.adaptive_factor=2", "--batch.min=20",
            "--batch.max=20", "--optimizer.lr=0.01", "--optimizer.lr_rule=sqrt", "--optimizer.base_batch=8",
            "--schedule.steps=12", "--schedule.warmup=0", "--schedule.decay=constant", "--run.noise_scale_ema=0.9",
            "--run.eval_every=9", "--checkpoint.every_steps=7", "--checkpoint.keep_last=9", "--data.seq_len=32",
            "--data.vocab_size=400", "--data.eval_samples=32"]
    run = tmp_path / "run"
    assert main([*args, "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step 12: adaptive batch 32 -> 16 (phase 2 starts from the batch phase 1 reached: batch_from=adapted)" \
        in out
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["global_batch"] for r in records] == [16] * 4 + [20] * 8 + [16] * 6
    assert [r["lr"] for r in records] == pytest.approx([0.01 * math.sqrt(r["global_batch"] / 8) for r in records],
                                                       rel=1e-12)
    carried_record = records[11]
    assert carried_record["decision_carried"] and carried_record["decision_noise_scale"] is None
    assert (carried_record["decision_old_batch"], carried_record["decision_new_batch"]) == (32, 16)
    assert carried_record["decision_lr"] == records[12]["lr"]
    assert records[-1]["samples"] == 4 * 16 + 8 * 20 + 6 * 16
    # A resume inside phase 2 (from step 14): the carried batch comes back from the checkpoint, the rest bit for bit.
    resumed = tmp_path / "resumed"
    run.rename(resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000018")
    (resumed / "checkpoints" / "latest").write_text("step00000014")
    assert main([*args, "--run-dir", str(resumed), "--resume"]) == 0
    after = [r for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in after] == list(range(1, 19))
    for key in ("loss", "lr", "global_batch", "samples", "eval_loss"):
        assert [r.get(key) for r in after[14:]] == [r.get(key) for r in records[14:]], key
