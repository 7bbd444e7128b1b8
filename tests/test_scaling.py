"""Batch arithmetic, LR scaling rules and schedules against formulas written out here."""

from __future__ import annotations

import math

import pytest

from bigbatch.config import ConfigError, OptimizerConfig, ScheduleConfig
from bigbatch.config.schedule import lr_factor, scaled_lr, solve_batch, warmup_steps


def test_solve_for_each_missing_factor():
    assert (solve_batch(4096, 2, micro_batch=256).grad_accum) == 8
    assert (solve_batch(4096, 2, grad_accum=8).micro_batch) == 256
    assert (solve_batch(32768, 64, micro_batch=32, grad_accum=16).global_batch) == 32768
    assert str(solve_batch(4096, 2, micro_batch=256)) == "256 x 8 x 2 = 4096"


def test_indivisible_batch_names_nearest_valid():
    with pytest.raises(ConfigError, match=r"global_batch=32768 is not divisible by micro_batch 24 x world 64 = 1536; "
                                          r"nearest valid: 32256 or 33792"):  # 21 and 22 x 1536
        solve_batch(32768, 64, micro_batch=24)
    with pytest.raises(ConfigError, match="!= micro_batch 8 x grad_accum 2 x world 2 = 32"):
        solve_batch(64, 2, micro_batch=8, grad_accum=2)


@pytest.mark.parametrize("rule,expected", [("none", 1e-3), ("linear", 1e-3 * 32), ("sqrt", 1e-3 * math.sqrt(32))])
def test_lr_rules(rule, expected):
    lr, why = scaled_lr(OptimizerConfig(lr=1e-3, lr_rule=rule, base_batch=1024), 32768)
    assert lr == pytest.approx(expected)
    assert rule in why


def test_warmup_as_fraction_or_samples():
    assert warmup_steps(ScheduleConfig(steps=7038, warmup=0.2843), 65536) == round(0.2843 * 7038)
    # 1,000,000 samples at batch 4096 -> ceil(244.1) steps; at 8192 -> 123: the warmup keeps its length in samples.
    assert warmup_steps(ScheduleConfig(steps=1000, warmup=1_000_000), 4096) == 245
    assert warmup_steps(ScheduleConfig(steps=1000, warmup=1_000_000), 8192) == 123


def test_poly_schedule_written_out():
    total, warm, power = 100, 10, 0.5
    for step in range(total):
        if step < warm:
            expected = (step + 1) / warm
        else:
            expected = (1 - (step - warm) / (total - warm)) ** power
        assert lr_factor(step, total, warm, "poly", power) == pytest.approx(expected)
    assert lr_factor(total - 1, total, warm, "poly", 1.0) > 0  # the last update still moves


def test_cosine_and_constant_with_floor():
    total, warm = 50, 5
    for step in range(warm, total):
        p = (step - warm) / (total - warm)
        cosine = 0.5 * (1 + math.cos(math.pi * p))
        assert lr_factor(step, total, warm, "cosine", min_ratio=0.1) == pytest.approx(0.1 + 0.9 * cosine)
        assert lr_factor(step, total, warm, "constant") == 1.0
