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


def test_a_compiler_failure_falls_back_to_eager(monkeypatch, caplog):
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
    assert any(m.startswith("torch.compile of lamb_apply failed (") and "no C++ compiler" in m
               for m in caplog.messages)
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


@pytest.mark.parametrize("kw,message", [
    (dict(lr=-1e-9), r"LAMB lr=-1e-09 must be >= 0"), (dict(betas=(0.9, 1.0)), r"LAMB betas=\(0.9, 1.0\) must lie"),
    (dict(betas=(-0.1, 0.9)), "betas"), (dict(eps=-1e-9), r"LAMB eps=-1e-09 and weight_decay=0.01 must be >= 0"),
    (dict(weight_decay=-1e-9), "weight_decay=-1e-09"), (dict(min_coeff=1.0, max_coeff=0.5), "min_coeff=1.0 exceeds")])
def test_hyperparameters_refused_exactly_past_each_bound(kw, message):
    with pytest.raises(ValueError, match=message):
        LAMB([torch.nn.Parameter(torch.zeros(2))], **kw)


def test_hyperparameters_at_each_bound_are_accepted():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kw in (dict(lr=0.0), dict(betas=(0.0, 0.0)), dict(eps=0.0, weight_decay=0.0),
               dict(min_coeff=1.0, max_coeff=1.0)):
        LAMB(p, **kw)
    assert LAMB(p).defaults["lr"] == 1e-3


def test_a_zero_update_keeps_ratio_one():
    """u = 0 (zero gradients, no decay) with weights that are not zero: ratio 1, not ||w|| / 0 clamped to max_coeff."""
    weights = [[1.0, -2.0, 3.0]]
    _, opt, _ = run_lamb(weights, [[[0.0, 0.0, 0.0]]], lr=0.01, weight_decay=0.0)
    assert list(opt.trust_ratios().values()) == [1.0]


def _counting(monkeypatch, module, names):
    calls = dict.fromkeys(names, 0)
    for name in names:
        kernel = getattr(module, name)

        def counted(*args, name=name, kernel=kernel):
            calls[name] += 1
            return kernel(*args)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("fused,adapt,runs", [(True, True, True), (False, True, False), (None, True, False),
                                              (True, False, False)])
def test_the_fused_flag_picks_the_kernels_for_adapted_groups_only(monkeypatch, fused, adapt, runs):
    """`fused` True runs an adapted group through the kernels, False or auto on a small CPU group through foreach
    ops; a group without adaptation never (its plain AdamW update has no fused form): counted at the kernels."""
    from bigbatch.optim import lamb

    calls = _counting(monkeypatch, lamb, ["LAMB_MOMENTS_AND_NORMS", "LAMB_APPLY"])
    weights, grads = random_case(8)
    expected, _ = lamb_reference(weights, grads, lr=0.01, adapt=adapt)
    got, _, _ = run_lamb(weights, grads, lr=0.01, fused=fused, adapt=adapt)
    assert_close(got, expected)
    assert calls == dict.fromkeys(calls, 15 if runs else 0)


def test_a_fused_tensor_with_no_segment_on_this_rank_stays_as_it_is():
    """A flat tensor of which this rank steps no element (its layout has no segment): the fused path leaves it as it
    is and steps the others as Algorithm 2 does."""
    from bigbatch.optim.layerwise import FlatLayout

    weights, grads = random_case(9, shapes=(5, 4), steps=2)
    expected, _ = lamb_reference(weights[1:], [g[1:] for g in grads], lr=0.01)
    params = [torch.tensor(w, dtype=torch.float64, requires_grad=True) for w in weights]
    opt = LAMB(params, lr=0.01, fused=True)
    opt.set_layout(params[0], FlatLayout(("elsewhere",), (), None))
    for step in grads:
        for p, g in zip(params, step):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    assert params[0].tolist() == weights[0]
    assert_close([params[1].tolist()], expected)


def test_the_first_pass_sums_squares_in_fp32_at_least():
    """kernels.lamb_moments_and_norms on bf16 tensors returns fp32 sums (bf16 would round them), on fp32 fp32 and on
    fp64 fp64: called eagerly here."""
    for dtype, acc in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64)):
        g, m, v, w = (torch.full((300,), x, dtype=dtype) for x in (1.0, 0.0, 0.0, 1.0 + 2**-7))
        one = kernels.scalar(1.0, w)
        u2, w2 = kernels.lamb_moments_and_norms(g, m, v, w, kernels.scalar(0.9, w), kernels.scalar(0.1, w),
                                                kernels.scalar(0.999, w), kernels.scalar(0.001, w), one,
                                                kernels.scalar(1e-6, w), kernels.scalar(0.0, w))
        assert u2.dtype == w2.dtype == acc, dtype
        assert float(w2) == pytest.approx(300 * float(w[0].double()) ** 2, rel=1e-6)


def test_use_fused_and_scalar_decide_by_the_first_tensors_device_and_the_group_size():
    big = torch.empty(kernels.AUTO_FUSE_NUMEL, device="meta")
    cpu_big, cpu_small = torch.empty(kernels.AUTO_FUSE_NUMEL), torch.empty(3)
    assert kernels.use_fused(None, [cpu_big]) and kernels.use_fused(None, [cpu_small, torch.empty(
        kernels.AUTO_FUSE_NUMEL - 3)])
    assert not kernels.use_fused(None, [torch.empty(kernels.AUTO_FUSE_NUMEL - 1)])
    assert not kernels.use_fused(None, [big]) and not kernels.use_fused(None, [big, cpu_small])
    assert kernels.use_fused(True, [cpu_small]) is True and kernels.use_fused(False, [cpu_big]) is False
    for like, dtype in ((cpu_small, torch.float32), (cpu_small.double(), torch.float64),
                        (cpu_small.bfloat16(), torch.float32), (big, torch.float32)):
        s = kernels.scalar(0.5, like)
        assert (s.dtype, s.device, s.dim()) == (dtype, like.device, 0)


def test_compiled_builds_its_kernel_on_first_use_and_runs_it_compiled():
    """kernels.Compiled over a function of this test (the module's kernels are built at import): not compiled nor
    eager before the first call, then compiled code runs and gives the function's result."""
    def axpy(x, y, a):
        return x * a + y

    fn = kernels.Compiled(axpy)
    assert (fn.fn, fn._compiled, fn._eager) == (axpy, None, False)
    x, y = torch.arange(5.0), torch.ones(5)
    out = [None]
    calls = compiled_calls(lambda: out.__setitem__(0, fn(x, y, torch.tensor(2.0))))
    assert torch.equal(out[0], x * 2 + 1) and calls == 1 and not fn._eager
