"""The gradient noise scale on a problem whose noise is known in closed form, through a real DeepSpeed engine.

Per-sample loss 1/2 |w - x|^2 with x ~ N(mu, sigma^2 I_d): the per-sample gradient is w - x, so the true gradient is
G = w - mu and the per-sample covariance is sigma^2 I, tr(Sigma) = d sigma^2, and B_simple = d sigma^2 / |w - mu|^2.
The learning rate is 0, so w (and the truth) stays put while the estimator averages.
"""

from __future__ import annotations

import math

import pytest
import torch

from bigbatch.run.noise import GradientNoiseScale, held_gradient_norm, loss_multiplier

from conftest import in_fresh_process

D, SIGMA, TRUE_B = 64, 1.5, 48.0


class Quadratic(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.w - x) ** 2).sum(dim=1).mean()


def estimate(stage: int, micro: int, accum: int) -> dict[str, float]:
    """300 steps of the quadratic through a DeepSpeed engine (world 1, ZeRO `stage`); the estimator's last output and
    the truth."""
    from bigbatch.engine import initialize
    from bigbatch.run import distributed

    distributed.ensure_env()
    distributed.init()
    g = torch.Generator().manual_seed(stage)
    trace = D * SIGMA**2
    mu = torch.randn(D, generator=g)
    mu *= math.sqrt(trace / TRUE_B) / mu.norm()  # |w - mu|^2 = tr(Sigma) / B_simple, with w = 0
    config = {"train_batch_size": micro * accum, "train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": accum, "gradient_clipping": 1e9, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "LAMB", "params": {"lr": 0.0, "weight_decay": 0.0}}}
    model = Quadratic()
    engine, *_ = initialize(model=model, config=config, model_parameters=model.parameters())
    gns = GradientNoiseScale(engine.module, ema=0.98)
    out = {}
    for _ in range(300):
        for m in range(accum):
            engine.set_gradient_accumulation_boundary(m == accum - 1)
            engine.backward(engine(mu + SIGMA * torch.randn(micro, D, generator=g)))
            gns.micro_batch_done(loss_multiplier(engine))
            big = held_gradient_norm(engine.module) if stage == 0 and m == accum - 1 else None
            engine.step()
        total, count = distributed.sum_across_ranks(list(gns.take_local()))  # as bigbatch.run.step.train_step does
        out = gns.update(total, count, micro, micro * accum, big if stage == 0 else engine.get_global_grad_norm(),
                         applied=True)
    engine.destroy()
    return {**out, "true_trace": trace, "true_grad_sq": float(mu.norm() ** 2)}


def check(out: dict[str, float]) -> None:
    assert out["gns_trace"] == pytest.approx(out["true_trace"], rel=0.2)
    assert out["gns_grad_sq"] == pytest.approx(out["true_grad_sq"], rel=0.2)
    assert out["noise_scale"] == pytest.approx(TRUE_B, rel=0.2)


@pytest.mark.parametrize("stage,micro,accum", [(0, 4, 16), (2, 8, 8)])
def test_noise_scale_matches_the_closed_form(stage, micro, accum):
    check(estimate(stage, micro, accum))


def test_noise_scale_under_zero3_in_a_process_of_its_own():
    check(in_fresh_process("estimate(3, 16, 4)", "test_noise"))


def test_one_batch_size_gives_no_estimate():
    gns = GradientNoiseScale(Quadratic())
    assert gns.update(*gns.take_local(), micro_batch=8, global_batch=8, big_norm=1.0, applied=True) == {}
