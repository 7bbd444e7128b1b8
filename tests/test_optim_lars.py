"""LARS against the paper's Algorithm 1 written out element by element (You, Gitman, Ginsburg 2017)."""

from __future__ import annotations

import math

import pytest
import torch

from bigbatch.optim import LARS

from conftest import MUTATING, compiled_calls, step_nan_gapped


def lars_reference(weights, grads_per_step, lr, momentum=0.9, wd=1e-4, tc=0.001, eps=0.0, adapt=True):
    w = [list(t) for t in weights]
    vel = [[0.0] * len(t) for t in w]
    ratios = []
    for grads in grads_per_step:
        ratios = []
        for i, g in enumerate(grads):
            w_norm = math.sqrt(sum(x * x for x in w[i]))
            g_norm = math.sqrt(sum(x * x for x in g))
            local = tc * w_norm / (g_norm + wd * w_norm + eps) if adapt and w_norm > 0 and g_norm > 0 else 1.0
            ratios.append(local)
            for k in range(len(w[i])):
                vel[i][k] = momentum * vel[i][k] + lr * local * (g[k] + wd * w[i][k])
                w[i][k] -= vel[i][k]
    return w, ratios


def run_lars(weights, grads_per_step, **kw):
    """(weights after the steps, the optimizer, how many times the steps entered compiled code)."""
    params = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in weights]
    adapt = kw.pop("adapt", True)
    opt = LARS([{"params": params, "adapt": adapt}], **kw)

    def run():
        for grads in grads_per_step:
            for p, g in zip(params, grads):
                p.grad = torch.tensor(g, dtype=torch.float64)
            opt.step()

    compiled = compiled_calls(run)
    return [p.detach().tolist() for p in params], opt, compiled


def expected_compiled_calls(fused, grads_per_step):
    """The fused path runs one compiled pass per tensor and step; foreach none."""
    return sum(len(grads) for grads in grads_per_step) if fused else 0


def case(seed, shapes=(6, 10, 4), steps=5):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n, generator=g, dtype=torch.float64).tolist() for n in shapes]
    grads = [[torch.randn(n, generator=g, dtype=torch.float64).tolist() for n in shapes] for _ in range(steps)]
    return weights, grads


def close(a, b, tol=1e-12):
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return all(torch.allclose(f64(x), f64(y), rtol=tol, atol=tol) for x, y in zip(a, b))


@pytest.mark.parametrize("kw", [
    dict(lr=1.0),
    dict(lr=2.0, momentum=0.5, wd=1e-2, tc=0.02, eps=1e-3),
    dict(lr=0.1, momentum=0.0, wd=0.0),
])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_matches_algorithm_1(kw, fused):
    weights, grads = case(0)
    expected, ratios = lars_reference(weights, grads, **kw)
    names = {"wd": "weight_decay", "tc": "trust_coefficient"}
    got, opt, compiled = run_lars(weights, grads, fused=fused, **{names.get(k, k): v for k, v in kw.items()})
    assert close(got, expected)
    assert MUTATING or compiled == expected_compiled_calls(fused, grads)
    assert list(opt.trust_ratios().values()) == pytest.approx(ratios, rel=1e-12)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_zero_weights_or_grads_use_local_lr_one(fused):
    weights = [[0.0, 0.0, 0.0], [1.0, 2.0]]
    grads = [[[1.0, -1.0, 0.5], [0.0, 0.0]]] * 3
    expected, ratios = lars_reference(weights, grads, lr=0.1)
    got, _, compiled = run_lars(weights, grads, fused=fused, lr=0.1)
    assert close(got, expected)
    assert MUTATING or compiled == expected_compiled_calls(fused, grads)
    assert ratios[1] == 1.0


def test_group_without_adaptation_is_momentum_sgd():
    weights, grads = case(1)
    expected, _ = lars_reference(weights, grads, lr=0.05, adapt=False)
    got, opt, _ = run_lars(weights, grads, lr=0.05, adapt=False)
    assert close(got, expected)
    assert opt.trust_ratios() == {}


def test_state_dict_names_momentum_buffer():
    weights, grads = case(2, steps=1)
    _, opt, _ = run_lars(weights, grads, lr=0.1)
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_flat_partition_steps_each_parameter_by_its_own_local_lr(fused):
    """As tests/test_optim_lamb.py's flat test: three parameters of different norms in one flat tensor with NaN gaps
    move as Algorithm 1 moves each alone."""
    weights, grads = case(4)
    weights = [[x * s for x in w] for w, s in zip(weights, (1.0, 30.0, 0.01))]
    expected, ratios = lars_reference(weights, grads, lr=1.0)
    got, opt = step_nan_gapped(lambda params: LARS(params, lr=1.0, fused=fused), weights, grads)
    assert close(got, expected)
    assert opt.trust_ratios() == pytest.approx(dict(zip("abc", ratios)), rel=1e-12)
    assert len(set(ratios)) == 3


@pytest.mark.parametrize("kw,message", [
    (dict(lr=-1e-9), r"^LARS lr=-1e-09 must be >= 0$"),
    (dict(momentum=1.0), r"^LARS momentum=1.0 must lie in \[0, 1\)$"), (dict(momentum=-1e-9), "momentum"),
    (dict(weight_decay=-1e-9), None), (dict(eps=-1e-9), None), (dict(trust_coefficient=0.0), None)])
def test_hyperparameters_refused_exactly_past_each_bound(kw, message):
    message = message or r"^LARS weight_decay and eps must be >= 0 and trust_coefficient > 0$"
    with pytest.raises(ValueError, match=message):
        LARS([torch.nn.Parameter(torch.zeros(2))], **{"lr": 0.1, **kw})


def test_hyperparameters_at_each_bound_are_accepted_and_fused_is_kept():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kw in (dict(lr=0.0), dict(momentum=0.0), dict(weight_decay=0.0, eps=0.0), dict(trust_coefficient=5e-324)):
        LARS(p, **{"lr": 0.1, **kw})
    assert LARS(p, lr=0.1, fused=True).fused is True and LARS(p, lr=0.1).fused is None


@pytest.mark.parametrize("fused,adapt,runs", [(True, True, True), (False, True, False), (None, True, False),
                                              (True, False, False)])
def test_the_fused_flag_picks_the_kernel_for_adapted_groups_only(monkeypatch, fused, adapt, runs):
    from test_optim_lamb import _counting

    from bigbatch.optim import lars

    calls = _counting(monkeypatch, lars, ["LARS_APPLY"])
    weights, grads = case(5)
    expected, _ = lars_reference(weights, grads, lr=0.5, adapt=adapt)
    got, _, _ = run_lars(weights, grads, lr=0.5, fused=fused, adapt=adapt)
    assert close(got, expected)
    assert calls == {"LARS_APPLY": 15 if runs else 0}
