"""The adaptive batch on a problem whose gradient noise is known in closed form (issue 25): steps and samples to
fixed B0's final loss, for fixed B0, fixed 8 B0 and the project's controller (`bigbatch.config.adaptive.decide`).

    .venv/bin/python bench/adaptive_known_noise.py   # writes bench/results/adaptive_known_noise-<host>.{md,json}

The problem is tests/test_noise.py's: per-sample loss 1/2 |w - x|^2 with x ~ N(mu, sigma^2 I_d), so the gradient is
G = w - mu, tr(Sigma) = d sigma^2 whatever w is, the Hessian is I and B_noise = d sigma^2 / |w - mu|^2 grows without
bound as w nears mu. The loss compared is the expected excess loss E 1/2 |w - mu|^2 (the rest, d sigma^2 / 2, no step
can remove) under the run's own batches and LRs, in closed form: E|e'|^2 = (1 - lr)^2 E|e|^2 + lr^2 d sigma^2 / B,
so that a target and its crossing are not one draw's fluctuation (at the noise floor a single draw dips below any
level near it sooner or later); the batches follow the sampled run's B_noise.
Plain SGD, LR = LR0 B / B0 (the linear rule), capped at 1 = 1 / (the Hessian's eigenvalue): above it a step
overshoots the optimum of the mean loss, above 2 the iteration diverges; 1 is also McCandlish's epsilon_max here.
Adaptive runs start at B0 and decide every EVERY steps with `decide` (max 8 B0, unit = micro-batch 8), fed by the
true B_noise or by the project's estimator (`bigbatch.run.noise.GradientNoiseScale`, micro-batch 8 against the
global batch). Target: fixed B0's final loss of the same seed; steps and samples are counted to the first step at or
below it. Every run may use up to 4x B0's samples.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bigbatch.config import BatchConfig  # noqa: E402
from bigbatch.config.adaptive import decide  # noqa: E402
from bigbatch.run.noise import GradientNoiseScale  # noqa: E402

from common import machine, write_results  # noqa: E402

D, SIGMA, START_NOISE = 1024, 1.0, 4.0  # B_noise at the start: |w0 - mu|^2 = d sigma^2 / 4
B0, MICRO, CAP, STEPS, EVERY = 32, 8, 1.0, 200, 8
LRS = (0.02, 0.125)  # LR at B0: the linear rule stays far below the cap up to 8 B0; it meets the cap at 8 B0
SEEDS = (1, 2, 3)


def lr_at(batch: int, lr0: float) -> float:
    """The linear rule from (B0, lr0), capped at 1 (see the module docstring)."""
    return min(lr0 * batch / B0, CAP)


class Quadratic(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.w - x) ** 2).sum(dim=1).mean()


def train(seed: int, lr0: float, batch: int, budget: int, target: float = -1.0, factor: float = 0.0,
          noise: str = "true") -> dict[str, Any]:
    """SGD from w = 0 at `batch` (adaptive when `factor` > 0, B_noise from `noise`: "true" or "estimated") until
    `budget` samples are spent or `target` is reached: the expected excess loss after every step, the batches, and
    (steps, samples) at the first step at or below `target` (None if never)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(D, generator=g)
    mu *= math.sqrt(D * SIGMA**2 / START_NOISE) / mu.norm()
    model = Quadratic()
    gns = GradientNoiseScale(model, ema=0.9) if noise == "estimated" else None
    limits = BatchConfig(global_batch=B0, micro_batch=MICRO, adaptive=True, adaptive_factor=max(factor, 1e-9),
                         adaptive_every=EVERY, max=8 * B0)
    samples, steps, losses, batches, reached = 0, 0, [], [], None
    expected = 0.5 * float(mu.norm() ** 2)
    while samples + batch <= budget:
        model.w.grad = None
        for x in (mu + SIGMA * torch.randn(batch, D, generator=g)).split(MICRO):
            (model(x) * x.shape[0] / batch).backward()  # the batch's mean loss, micro-batch by micro-batch
            if gns:
                gns.micro_batch_done(batch / x.shape[0])
        if gns and batch > MICRO:
            gns.update(*gns.take_local(), MICRO, batch, float(model.w.grad.norm()), applied=True)
        lr = lr_at(batch, lr0)
        with torch.no_grad():
            model.w -= lr * model.w.grad
        expected = (1 - lr) ** 2 * expected + 0.5 * lr**2 * D * SIGMA**2 / batch
        samples, steps = samples + batch, steps + 1
        losses.append(expected)
        batches.append(batch)
        if losses[-1] <= target:
            reached = (steps, samples)
            break
        if factor > 0 and steps % EVERY == 0:
            true = D * SIGMA**2 / float((model.w.detach() - mu).norm() ** 2)
            measured = gns.estimate if gns else true
            batch = decide(batch, measured, limits, MICRO)
    return {"losses": losses, "batches": batches, "reached": reached, "samples": samples, "steps": steps}


RUNS = {  # name -> (label, start batch, factor, noise)
    "fixed8": ("fixed 8 B0 = 256", 8 * B0, 0.0, "true"),
    "k0.2": ("adaptive k = 0.2, true B_noise", B0, 0.2, "true"),
    "k1": ("adaptive k = 1, true B_noise", B0, 1.0, "true"),
    "k1est": ("adaptive k = 1, estimated B_noise", B0, 1.0, "estimated"),
}


def measure(lr0: float, seeds=SEEDS, runs=RUNS) -> dict[str, Any]:
    """Per seed: fixed B0's STEPS steps set the target; every other run trains until it reaches it (or 4x B0's
    samples). Returns the per-seed figures and the per-run means of the ratios to fixed B0."""
    out: dict[str, Any] = {"lr0": lr0, "seeds": {}, "runs": {}}
    for seed in seeds:
        base = train(seed, lr0, B0, B0 * STEPS)
        target = base["losses"][-1]
        per = {"target": target, "fixed": {"steps": STEPS, "samples": B0 * STEPS, "largest": B0,
                                           "noise_at_end": D * SIGMA**2 / (2 * target)}}
        for name, (_, start, factor, noise) in runs.items():
            r = train(seed, lr0, start, 4 * B0 * STEPS, target, factor, noise)
            steps, samples = r["reached"] or (None, None)
            per[name] = {"steps": steps, "samples": samples, "largest": max(r["batches"])}
        out["seeds"][seed] = per
    for name in ["fixed", *runs]:
        rows = [out["seeds"][s][name] for s in seeds]
        hit = [r for r in rows if r["steps"] is not None]
        out["runs"][name] = {
            "reached": len(hit),
            "steps": statistics.mean(r["steps"] for r in hit) if hit else None,
            "samples": statistics.mean(r["samples"] for r in hit) if hit else None,
            "steps_ratio": statistics.mean(r["steps"] / STEPS for r in hit) if hit else None,
            "samples_ratio": statistics.mean(r["samples"] / (B0 * STEPS) for r in hit) if hit else None,
            "largest": max(r["largest"] for r in rows),
        }
    return out


def cell(value: Optional[float], ratio: Optional[float], digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f} ({ratio:.2f}x)"


def section(res: dict[str, Any]) -> list[str]:
    ends = [res["seeds"][s]["fixed"]["noise_at_end"] for s in res["seeds"]]
    lines = [
        f"## LR {res['lr0']} at B0 (fixed 8 B0: LR {lr_at(8 * B0, res['lr0']):g})",
        "",
        f"B_noise at fixed B0's end (d sigma^2 / E|w - mu|^2): {min(ends):,.0f}-{max(ends):,.0f} "
        f"({min(ends) / B0:.0f}-{max(ends) / B0:.0f} B0).",
        "",
        "| run | reached | steps to target (x B0's) | samples to target (x B0's) | largest batch |",
        "|---|:---:|---:|---:|---:|",
    ]
    for name, label in [("fixed", f"fixed B0 = {B0}"), *((k, v[0]) for k, v in RUNS.items())]:
        r = res["runs"][name]
        lines.append(f"| {label} | {r['reached']}/{len(res['seeds'])} | {cell(r['steps'], r['steps_ratio'])} | "
                     f"{cell(r['samples'], r['samples_ratio'])} | {r['largest']} |")
    return lines + [""]


def table(results: list[dict[str, Any]]) -> str:
    m = machine()
    lines = [
        "# Adaptive batch on a problem with known noise",
        "",
        f"Machine: host {m['host']}, cpu {m['cpu']}, cores {m['cores']}, threads {m['threads']}, torch {m['torch']}, "
        f"python {m['python']}.",
        f"Noisy quadratic 1/2 |w - x|^2, x ~ N(mu, {SIGMA:g}^2 I_{D}): B_noise = d sigma^2 / |w - mu|^2, "
        f"{START_NOISE:g} at the start. SGD at a constant LR, linear rule from B0 = {B0}, capped at {CAP:g} "
        f"(1 / curvature). Fixed B0: {STEPS} steps; the others run to its final loss (per seed) or 4x its samples. "
        f"Adaptive: `decide` every {EVERY} steps, max {8 * B0}, unit {MICRO}. Seeds "
        f"{', '.join(map(str, SEEDS))}; means over the seeds that reach the target, in brackets the mean ratio to "
        "fixed B0's of the same seed.",
        "",
    ]
    for res in results:
        lines += section(res)
    return "\n".join(lines)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    results = [measure(lr0) for lr0 in LRS]
    write_results("adaptive_known_noise", table(results), {"machine": machine(), "results": results})
