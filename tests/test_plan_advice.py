"""bigbatch/plan/advice.py: the micro-batch search against a scan (and at the byte, in tests/test_plan_memory.py),
McCandlish et al.'s step and sample laws, the noise-scale grid, and node scaling against the step-time model's own
estimates."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bigbatch.cli import main
from bigbatch.config import ConfigError
from bigbatch.config.files import load_recipe
from bigbatch.plan import hardware
from bigbatch.plan.advice import (
    choose_at_start,
    choose_auto,
    device_memory,
    largest_micro_batch,
    mccandlish_samples,
    mccandlish_steps,
    node_scaling,
    noise_grid,
    plan,
    with_batches,
)
from bigbatch.plan.timing import Cluster, estimate
from bigbatch.resolve import phase_recipe, resolve

from conftest import pinned

A100 = hardware.DEVICES["A100-80GB"]
HDR = hardware.INTERCONNECTS["hdr200"]


def test_largest_micro_batch_against_a_scan():
    # 300 fits, 301 does not; of 1..300 the largest that divides 4,096 on one rank is 256, on 3 ranks none divides
    for world, expected in ((1, (300, 256)), (2, (300, 256)), (16, (256, 256)), (3, (300, 0))):
        assert largest_micro_batch(lambda m: m <= 300, 4096, world) == expected
    for limit in (0, 1, 7, 255, 1000, 5000):
        for world in (1, 2, 3, 16, 5000):
            fitting = max((m for m in range(1, max(4096 // world, 1) + 1) if m <= limit), default=0)
            valid = max((m for m in range(1, fitting + 1) if 4096 % (m * world) == 0), default=0)
            assert largest_micro_batch(lambda m: m <= limit, 4096, world) == (fitting, valid), (limit, world)


def _pilot(noise_scale: float) -> dict:
    """What `bigbatch plan --noise-scale` reads from a pilot run (bigbatch.plan.command.read_noise_scale)."""
    return {"run_dir": "pilot", "step": 1, "noise_scale": noise_scale}


def test_mccandlish_laws_written_out():
    # S = S_min (1 + B_noise / B), E = E_min (1 + B / B_noise): at B = B_noise twice the minimum of each
    assert mccandlish_steps(1000, 256, 256) == 2000
    assert mccandlish_steps(1000, 256, 1024) == 1000 * (1 + 0.25)
    assert mccandlish_samples(256_000, 256, 64) == 256_000 * (1 + 0.25)
    assert mccandlish_samples(256_000, 256, 256) == 512_000


def test_noise_grid_predicts_steps_and_marks_fastest_and_cheapest():
    recipe = pinned("bert_base")
    b_noise = 16384.0
    pilot = _pilot(b_noise)
    grid = noise_grid(recipe, Cluster(4, 8, A100, HDR), pilot, 80 * 10**9, [1, 4, 16])
    s_min = 7038 / (1 + b_noise / 65536)  # the recipe's 7,038 steps at batch 65,536 fix S_min
    assert grid["s_min"] == pytest.approx(s_min) and grid["e_min"] == pytest.approx(s_min * b_noise)
    ok = [p for p in grid["points"] if p["fits"]]
    assert ok and {p["global_batch"] for p in grid["points"]} >= {2048, 16384, 131072}
    for p in grid["points"]:
        b = p["global_batch"]
        assert p["steps"] == math.ceil(s_min * (1 + b_noise / b))
        # the samples follow E = E_min (1 + B / B_noise), E_min = S_min B_noise, up to the last step's rounding
        assert 0 <= p["samples"] - s_min * b_noise * (1 + b / b_noise) < b
    fastest = [p for p in grid["points"] if p["fastest"]]
    cheapest = [p for p in grid["points"] if p["cheapest"]]
    assert len(fastest) == len(cheapest) == 1
    assert fastest[0]["time_to_train_s"] == min(p["time_to_train_s"] for p in ok)
    assert cheapest[0]["gpu_hours"] == min(p["gpu_hours"] for p in ok)
    # more nodes never cost fewer GPU-hours at one batch, and a huge batch wastes samples: the fastest is not the
    # largest batch on the fewest nodes
    assert fastest[0]["nodes"] == 16


def test_noise_grid_marks_what_does_not_fit():
    pilot = _pilot(4096.0)
    grid = noise_grid(pinned("gpt2_xl"), Cluster(1, 8, A100, HDR), pilot, 2 * 10**9, [1])
    assert not any(p["fits"] for p in grid["points"])
    assert all("why" in p for p in grid["points"])
    assert not any(p["fastest"] or p["cheapest"] for p in grid["points"])


def test_scaling_efficiency_is_samples_per_node_against_the_first():
    recipe = pinned("gpt2_small")
    cluster = Cluster(1, 8, A100, HDR)
    rows = node_scaling(recipe, cluster, [1, 4, 3])
    by_nodes = {r["nodes"]: r for r in rows}
    one = estimate(recipe, cluster)
    four = estimate(recipe, dataclasses.replace(cluster, nodes=4))
    sps = [sum(p.samples for p in e.phases) / e.time_to_train_s for e in (one, four)]
    assert by_nodes[4]["scaling_efficiency"] == pytest.approx((sps[1] / 4) / sps[0])
    assert by_nodes[4]["scaling_efficiency"] < 1  # 4 nodes add inter-node all-reduces
    assert by_nodes[3]["samples_per_s"] is None and "divisible" in by_nodes[3]["error"]  # 4,096 over 24 GPUs


H100 = hardware.DEVICES["H100-SXM"]
XL = Cluster(16, 8, H100, hardware.INTERCONNECTS["ndr400"])
AUTO = {"batch.micro_batch": "auto", "deepspeed.activation_checkpointing": "auto"}


def test_auto_takes_the_fastest_fitting_micro_batch_and_checkpointing_by_the_time_model():
    recipe = load_recipe("gpt2_xl", AUTO)
    chosen, change = choose_auto(recipe, XL, H100.memory_bytes)
    # the ramp from 512 on 128 GPUs allows micro-batch 4 at most; it fits without checkpointing, which saves the
    # recompute: the time model's own ratio of the two
    on = estimate(pinned("gpt2_xl"), XL).time_to_train_s
    off = estimate(chosen, XL).time_to_train_s
    assert (chosen.batch.micro_batch, change.micro_batches, change.checkpointing) == (4, (4,), False)
    assert "act_ckpt.json" not in chosen.deepspeed.configs and not resolve(chosen, 128).ds.checkpointing
    assert change.what == (f"micro-batch 4, checkpointing off: fits in {change.peak / 2**30:.1f} of 79.6 GiB, "
                           f"{on / off:.2f}x faster than 4 with checkpointing on")
    assert change.peak <= H100.memory_bytes


def test_auto_ties_go_to_less_accumulation_and_an_explicit_number_wins():
    recipe = load_recipe("bert_large", {"deepspeed.activation_checkpointing": ""})  # as shipped: "auto" micro-batches
    c = Cluster(8, 8, A100, HDR)
    chosen, change = choose_auto(recipe, c, A100.memory_bytes)
    for phase, micro in enumerate(change.micro_batches):
        r = phase_recipe(chosen, phase)
        fits = [m for m in range(1, r.batch.global_batch // 64 + 1) if r.batch.global_batch % (64 * m) == 0
                and plan_fits(r, m, c)]
        assert micro == max(fits)  # no larger micro-batch fits and splits: the least accumulation
    assert not change.checkpointing  # as the configs say: activation_checkpointing is not "auto" here
    explicit, _ = choose_auto(load_recipe("bert_large", {"phases.1.micro_batch": "32"}), c, A100.memory_bytes)
    assert explicit.phases[0].micro_batch == 32  # the recipe's own number for phase 2 stands
    assert choose_auto(pinned("bert_large"), c, A100.memory_bytes) == (pinned("bert_large"), None)


def plan_fits(recipe, micro, c):
    return plan(with_batches(recipe, [micro]), c.nodes, c.gpus_per_node, A100.memory_bytes).own.fits


def test_auto_at_start_keeps_the_last_choice_on_as_many_gpus_and_chooses_again_on_another():
    recipe = load_recipe("gpt2_xl", AUTO)
    kept = {"world": 128, "micro_batches": [2], "checkpointing": True, "reason": "earlier"}
    same, why = choose_at_start(recipe, 128, kept)
    assert (same.batch.micro_batch, resolve(same, 128).ds.checkpointing, why) == (2, True, "earlier")
    other, why = choose_at_start(recipe, 64, kept)  # no GPU here: the recipe's cluster.gpu_memory, 80GB
    assert other.batch.micro_batch == 8 and why.startswith("micro-batch 8, checkpointing off: fits in ")
    assert choose_at_start(pinned("gpt2_xl"), 64, kept) == (pinned("gpt2_xl"), "")


def test_auto_on_a_gpu_fits_the_free_memory_the_ranks_agree_on(monkeypatch):
    """A fake H100 (torch.cuda monkeypatched): this rank has 70 GiB free, another rank only 20. Once the ranks agree
    (an all-reduce MIN, here a stand-in), the choice is the one for 20 GiB, and its reason says so; before they can
    agree, every rank reads the same total; one rank alone takes its own free memory."""
    total = hardware.DEVICES["H100-SXM"].memory_bytes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (70 * 2**30, total))
    recipe = load_recipe("gpt2_xl", AUTO)

    def least(free):
        return min(free, 20 * 2**30)

    words = "free (the least of 128 ranks)"
    assert device_memory(recipe, 128, least) == (20 * 2**30, words, "H100-SXM")
    agreed, why = choose_at_start(recipe, 128, agree=least)
    expected, change = choose_auto(recipe, XL, 20 * 2**30, words)
    assert (agreed, why) == (expected, change.what) and agreed.batch.micro_batch == 2
    assert f"of 20.0 GiB {words}," in why
    assert device_memory(recipe, 128)[:2] == (total, "in all (free memory is agreed over the 128 ranks once they "
                                                     "start)")
    assert choose_at_start(recipe, 128)[0].batch.micro_batch == 4  # the total: as much as 79.65 GiB allows
    assert device_memory(recipe, 1) == (70 * 2**30, "free", "H100-SXM")


def test_auto_is_parsed_resolved_only_after_the_choice_and_shown_by_check_and_plan(capsys):
    recipe = load_recipe("gpt2_xl", AUTO)
    assert recipe.batch.micro_batch == "auto"
    assert load_recipe("gpt2_xl", {"batch.micro_batch": "8"}).batch.micro_batch == 8
    with pytest.raises(ConfigError, match="'auto' micro-batch or checkpointing"):
        resolve(recipe, 128)
    with pytest.raises(ConfigError, match="batch.micro_batch='eight' must be a whole number >= 0 or 'auto'"):
        load_recipe("gpt2_xl", {"batch.micro_batch": "eight"})
    assert main(["check", "gpt2_xl", "--batch.micro_batch=auto", "--deepspeed.activation_checkpointing=auto"]) == 0
    assert "auto chose micro-batch 4, checkpointing off: fits in " in capsys.readouterr().out
    assert main(["plan", "gpt2_xl", "--gpu", "H100-SXM", "--batch.micro_batch=auto",
                 "--deepspeed.activation_checkpointing=auto"]) == 0
    out = capsys.readouterr().out
    assert "auto chose micro-batch 4, checkpointing off: fits in " in out and "checkpointing off, micro-batch 4" in out
