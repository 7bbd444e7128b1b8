"""LAMB against the paper's Algorithm 2 written out element by element (You et al. 2020), plus its edge cases."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

from bigbatch.optim import LAMB, kernels, param_groups

from conftest import MUTATING, compiled_calls, step_nan_gapped


def lamb_reference(weights, grads_per_step, lr, betas=(0.9, 0.999), eps=1e-6, wd=0.01, bias_correction=True,
                   min_coeff=0.01, max_coeff=10.0, adapt=True):
    """Plain Python floats and loops: one list of floats per parameter tensor; a gradient of None skips the tensor
    that step (no moment update, its step count t stays)."""
    b1, b2 = betas
    w = [list(t) for t in weights]
    m = [[0.0] * len(t) for t in w]
    v = [[0.0] * len(t) for t in w]
    steps = [0] * len(w)
    ratios = []
    for grads in grads_per_step:
        ratios = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            steps[i] += 1
            t = steps[i]
            u = []
            for k in range(len(w[i])):
                m[i][k] = b1 * m[i][k] + (1 - b1) * g[k]
                v[i][k] = b2 * v[i][k] + (1 - b2) * g[k] * g[k]
                m_hat = m[i][k] / (1 - b1**t) if bias_correction else m[i][k]
                v_hat = v[i][k] / (1 - b2**t) if bias_correction else v[i][k]
                u.append(m_hat / (math.sqrt(v_hat) + eps) + wd * w[i][k])
            w_norm = math.sqrt(sum(x * x for x in w[i]))
            u_norm = math.sqrt(sum(x * x for x in u))
            ratio = 1.0
            if adapt and w_norm > 0 and u_norm > 0:
                ratio = min(max(w_norm / u_norm, min_coeff), max_coeff)
            ratios.append(ratio)
            w[i] = [w[i][k] - lr * ratio * u[k] for k in range(len(u))]
    return w, ratios


def run_lamb(weights, grads_per_step, **kw):
    """(weights after the steps, the optimizer, how many times the steps entered compiled code)."""
    params = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in weights]
    adapt = kw.pop("adapt", True)
    opt = LAMB([{"params": params, "adapt": adapt}], **kw)

    def run():
        for grads in grads_per_step:
            for p, g in zip(params, grads):
                p.grad = None if g is None else torch.tensor(g, dtype=torch.float64)
            opt.step()

    compiled = compiled_calls(run)
    return [p.detach().tolist() for p in params], opt, compiled


def expected_compiled_calls(fused, grads_per_step):
    """The fused path runs two compiled passes per tensor with a gradient and step; foreach none."""
    return 2 * sum(g is not None for grads in grads_per_step for g in grads) if fused else 0


def random_case(seed, shapes=(7, 12, 3), steps=5, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(n, generator=g, dtype=torch.float64) * scale).tolist() for n in shapes]
    grads = [[torch.randn(n, generator=g, dtype=torch.float64).tolist() for n in shapes] for _ in range(steps)]
    return weights, grads


def assert_close(a, b, tol=1e-12):
    for x, y in zip(a, b):
        x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
        assert torch.allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("kw", [
    dict(lr=0.01),
    dict(lr=0.1, betas=(0.8, 0.99), eps=1e-4, wd=0.1),
    dict(lr=0.05, bias_correction=False),
    dict(lr=0.05, wd=0.0),
])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_matches_algorithm_2(kw, fused):
    weights, grads = random_case(0)
    ref_kw = dict(kw)
    ours_kw = {("weight_decay" if k == "wd" else k): v for k, v in kw.items()}
    expected, ratios = lamb_reference(weights, grads, **ref_kw)
    got, opt, compiled = run_lamb(weights, grads, fused=fused, **ours_kw)
    assert_close(got, expected)
    assert list(opt.trust_ratios().values()) == pytest.approx(ratios, rel=1e-12)
    assert MUTATING or compiled == expected_compiled_calls(fused, grads)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_clamp_engages_both_ends(fused):
    # Large weights and tiny updates push the ratio above max_coeff; tiny weights push it below min_coeff.
    big, grads = random_case(1, shapes=(5,), scale=1e4)
    small, _ = random_case(2, shapes=(5,), scale=1e-6)
    for weights, bound in ((big, 10.0), (small, 0.01)):
        expected, ratios = lamb_reference(weights, grads, lr=1e-3)
        got, opt, compiled = run_lamb(weights, grads, fused=fused, lr=1e-3)
        assert_close(got, expected)
        assert MUTATING or compiled == expected_compiled_calls(fused, grads)
        assert ratios[0] == pytest.approx(bound)
        assert list(opt.trust_ratios().values())[0] == pytest.approx(bound)


def test_unclamped_lamb_equals_optax_form():
    weights, grads = random_case(3, scale=1e3)
    expected, ratios = lamb_reference(weights, grads, lr=1e-3, min_coeff=0.0, max_coeff=math.inf)
    got, _, _ = run_lamb(weights, grads, lr=1e-3, min_coeff=0.0, max_coeff=math.inf)
    assert_close(got, expected)
    assert max(ratios) > 10.0  # the clamp would have changed this case


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_zero_weights_and_zero_grads_use_ratio_one(fused):
    weights = [[0.0] * 4, [1.0, -2.0, 3.0]]
    grads = [[[0.5, -0.5, 1.0, 2.0], [0.0, 0.0, 0.0]]] * 3
    expected, ratios = lamb_reference(weights, grads, lr=0.01)
    got, opt, compiled = run_lamb(weights, grads, fused=fused, lr=0.01)
    assert_close(got, expected)
    assert MUTATING or compiled == expected_compiled_calls(fused, grads)
    # zero weights: ratio 1 on the first step; zero gradients with decay: u = wd * w, ratio 1/wd clamped to 10
    assert ratios[1] == pytest.approx(10.0)


def test_group_without_adaptation_is_adamw_like():
    weights, grads = random_case(4)
    expected, _ = lamb_reference(weights, grads, lr=0.01, wd=0.0, adapt=False)
    got, opt, _ = run_lamb(weights, grads, lr=0.01, weight_decay=0.0, adapt=False)
    assert_close(got, expected)
    assert opt.trust_ratios() == {}


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_each_tensor_keeps_its_own_step_count(fused):
    # The second tensor has no gradient in the first two steps: its bias correction uses t = 1, 2, 3, not 3, 4, 5.
    weights, grads = random_case(6, steps=5)
    grads = [[None if i == 1 and step < 2 else g for i, g in enumerate(gs)] for step, gs in enumerate(grads)]
    expected, _ = lamb_reference(weights, grads, lr=0.02)
    got, opt, compiled = run_lamb(weights, grads, fused=fused, lr=0.02)
    assert_close(got, expected)
    assert MUTATING or compiled == expected_compiled_calls(fused, grads)


def test_a_compiler_failure_falls_back_to_eager(monkeypatch):
    # Dynamo raises compiler failures (no C++ compiler, say) before the compiled code runs: the eager rerun is safe.
    def fail_to_compile(*args):
        raise BackendCompilerFailed(fail_to_compile, RuntimeError("no C++ compiler"), None)

    monkeypatch.setattr(kernels.LAMB_APPLY, "_compiled", fail_to_compile)
    monkeypatch.setattr(kernels.LAMB_APPLY, "_eager", False)
    weights, grads = random_case(7)
    expected, _ = lamb_reference(weights, grads, lr=0.01)
    got, _, compiled = run_lamb(weights, grads, fused=True, lr=0.01)
    assert_close(got, expected)
    assert kernels.LAMB_APPLY._eager
    assert MUTATING or compiled == expected_compiled_calls(True, grads) // 2  # the first pass stayed compiled


def test_a_failure_after_the_moments_moved_is_raised_not_rerun(monkeypatch):
    # A kernel that fails after writing m and v in place: an eager rerun would update the moments a second time.
    def write_then_fail(*args):
        kernels.lamb_moments_and_norms(*args)
        raise RuntimeError("kernel failed after writing")

    monkeypatch.setattr(kernels.LAMB_MOMENTS_AND_NORMS, "_compiled", write_then_fail)
    monkeypatch.setattr(kernels.LAMB_MOMENTS_AND_NORMS, "_eager", False)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    g = torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64)
    p.grad = g
    opt = LAMB([p], lr=0.01, betas=(0.9, 0.999), fused=True)
    with pytest.raises(RuntimeError, match="kernel failed after writing"):
        opt.step()
    # moved once: m = (1 - beta1) g, v = (1 - beta2) g^2
    assert torch.allclose(opt.state[p]["exp_avg"], 0.1 * g, rtol=1e-12, atol=0)
    assert torch.allclose(opt.state[p]["exp_avg_sq"], 0.001 * g * g, rtol=1e-12, atol=0)
    assert not kernels.LAMB_MOMENTS_AND_NORMS._eager


def test_refuses_a_flat_partition_without_a_layout():
    # What plain deepspeed.initialize does under ZeRO: the group's parameters replaced by one flat partition.
    model = torch.nn.Linear(4, 3)
    opt = LAMB(param_groups(model, weight_decay=0.01), lr=0.01)
    flat = torch.cat([p.detach().view(-1) for p in opt.param_groups[0]["params"]])
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="bigbatch.engine.initialize"):
        opt.step()


def test_param_groups_split_matrices_from_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    groups = param_groups(model, weight_decay=0.05)
    assert groups[0]["param_names"] == ["0.weight", "2.weight"] and groups[0]["weight_decay"] == 0.05
    assert groups[1]["param_names"] == ["0.bias", "1.weight", "1.bias", "2.bias"]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["adapt"] is False
    opt = LAMB(groups, lr=0.01)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    assert set(opt.trust_ratios()) == {"0.weight", "2.weight"}


def test_unnamed_params_get_group_keys():
    a, b = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(2, 2))
    opt = LAMB([a, b], lr=0.01)
    a.grad, b.grad = torch.randn(3, 3), torch.randn(2, 2)
    opt.step()
    assert set(opt.trust_ratios()) == {"group0.0", "group0.1"}


def test_state_dict_round_trip_continues_exactly():
    weights, grads = random_case(5, steps=6)
    full, _, _ = run_lamb(weights, grads, lr=0.02)
    params = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in weights]
    opt = LAMB(params, lr=0.02)
    for step in grads[:3]:
        for p, g in zip(params, step):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = LAMB(params2, lr=0.02)
    opt2.load_state_dict(saved)
    for step in grads[3:]:
        for p, g in zip(params2, step):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt2.step()
    assert_close([p.tolist() for p in params2], full, tol=0)


def test_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="betas"):
        LAMB(p, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="min_coeff"):
        LAMB(p, min_coeff=2.0, max_coeff=1.0)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_flat_partition_steps_each_parameter_by_its_own_ratio(fused):
    """Three parameters of very different norms back to back in one flat tensor, as DeepSpeed's ZeRO hands it, with
    NaN in the alignment gaps between them: each parameter's slice moves as Algorithm 2 moves it alone (its own trust
    ratio, not the first parameter's), and the gaps stay out of every norm."""
    weights, grads = random_case(3, shapes=(7, 12, 3))
    weights = [[x * s for x in w] for w, s in zip(weights, (1.0, 30.0, 0.01))]
    expected, ratios = lamb_reference(weights, grads, lr=0.05)
    got, opt = step_nan_gapped(lambda params: LAMB(params, lr=0.05, fused=fused), weights, grads)
    assert_close(got, expected)
    assert opt.trust_ratios() == pytest.approx(dict(zip("abc", ratios)), rel=1e-12)
    assert len(set(ratios)) == 3
