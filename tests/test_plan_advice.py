"""bigbatch/plan/advice.py: the micro-batch search against a scan (and at the byte, in tests/test_plan_memory.py),
McCandlish et al.'s step and sample laws, the noise-scale grid, and node scaling against the step-time model's own
estimates."""

from __future__ import annotations

import dataclasses
import math

import pytest

from bigbatch.config.files import load_recipe
from bigbatch.plan import hardware
from bigbatch.plan.advice import (
    largest_micro_batch,
    mccandlish_samples,
    mccandlish_steps,
    node_scaling,
    noise_grid,
)
from bigbatch.plan.timing import Cluster, estimate

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
    recipe = load_recipe("bert_base")
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
    grid = noise_grid(load_recipe("gpt2_xl"), Cluster(1, 8, A100, HDR), pilot, 2 * 10**9, [1])
    assert not any(p["fits"] for p in grid["points"])
    assert all("why" in p for p in grid["points"])
    assert not any(p["fastest"] or p["cheapest"] for p in grid["points"])


def test_scaling_efficiency_is_samples_per_node_against_the_first():
    recipe = load_recipe("gpt2_small")
    cluster = Cluster(1, 8, A100, HDR)
    rows = node_scaling(recipe, cluster, [1, 4, 3])
    by_nodes = {r["nodes"]: r for r in rows}
    one = estimate(recipe, cluster)
    four = estimate(recipe, dataclasses.replace(cluster, nodes=4))
    sps = [sum(p.samples for p in e.phases) / e.time_to_train_s for e in (one, four)]
    assert by_nodes[4]["scaling_efficiency"] == pytest.approx((sps[1] / 4) / sps[0])
    assert by_nodes[4]["scaling_efficiency"] < 1  # 4 nodes add inter-node all-reduces
    assert by_nodes[3]["samples_per_s"] is None and "divisible" in by_nodes[3]["error"]  # 4,096 over 24 GPUs
