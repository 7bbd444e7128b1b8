"""Worker for tests/test_optim_zero.py: LAMB/LARS under ZeRO 0-3 against a single-process run of the same steps.

Launched once per world size by the `deepspeed` launcher; runs the whole matrix (stage x optimizer x accumulation)
inside this one launch and writes one JSON result that the test reads (rank 0 only).
"""

import argparse
import copy
import json
import os

import deepspeed
import torch
from torch import nn

from bigbatch.distributed import shutdown
from bigbatch.engine import client_optimizer, initialize
from bigbatch.optim import LAMB, LARS, param_groups

STEPS = 8
GLOBAL = 48  # divisible by accumulation 1, 2, 3 x world 2 and 4


class Net(nn.Module):
    """Odd sizes so that ZeRO partitions cut through parameters; 1-D tensors exercise the no-adapt group."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(13, 37)
        self.norm = nn.LayerNorm(37)
        self.hidden = nn.Linear(37, 29)
        self.out = nn.Linear(29, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.inp(x)))
        return nn.functional.mse_loss(self.out(torch.tanh(self.hidden(h))), y)


def batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(GLOBAL, 13, generator=g) * 3, torch.randn(GLOBAL, 5, generator=g) * 4) for _ in range(STEPS)]


OPT_PARAMS = {
    "lamb": {"lr": 0.02, "weight_decay": 0.01, "min_coeff": 0.01, "max_coeff": 10.0},
    "lars": {"lr": 0.5, "weight_decay": 1e-4, "momentum": 0.9, "trust_coefficient": 0.01},
}


def reference(kind, clip):
    torch.manual_seed(0)
    model = Net()
    cls = LAMB if kind == "lamb" else LARS
    opt = cls(param_groups(model, OPT_PARAMS[kind]["weight_decay"]), **OPT_PARAMS[kind])
    norms = []
    for x, y in batches():
        opt.zero_grad()
        model(x, y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))))
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt.trust_ratios(), max(norms)


def distributed(kind, stage, gas, clip, world, rank, naive=False, fused=False):
    torch.manual_seed(0)
    model = Net()
    micro = GLOBAL // (gas * world)
    config = {
        "train_batch_size": GLOBAL,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "LAMB" if kind == "lamb" else "lars", "params": {**OPT_PARAMS[kind], "fused": fused}},
    }
    groups = param_groups(model, OPT_PARAMS[kind]["weight_decay"])
    engine, *_ = initialize(model=model, config=config, model_parameters=groups)
    opt = client_optimizer(engine)
    if naive:  # forget the layouts: what a per-tensor optimizer does under ZeRO
        opt._layouts.clear()
    for x, y in batches():
        for m in range(gas):
            lo = m * micro * world + rank * micro
            loss = engine(x[lo : lo + micro], y[lo : lo + micro])
            engine.backward(loss)
            engine.step()
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        result = {n: p.detach().clone() for n, p in params.items()}
    ratios = opt.trust_ratios()
    engine.destroy()
    return result, ratios


def deviation(a, b):
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    results = []
    refs = {(k, c): reference(k, c) for k in ("lamb", "lars") for c in (1.0, 0.0)}
    for stage in (0, 1, 2, 3):
        for kind in ("lamb", "lars"):
            for gas, clip in ((1, 1.0), (2, 1.0), (3, 0.0)):
                params, ratios = distributed(kind, stage, gas, clip, world, rank)
                ref_params, ref_ratios, max_norm = refs[(kind, clip)]
                ratio_dev = max(abs(ratios[n] - r) / abs(r) for n, r in ref_ratios.items()) if ratios else None
                results.append({
                    "stage": stage, "optimizer": kind, "gas": gas, "clip": clip,
                    "deviation": deviation(params, ref_params), "ratio_deviation": ratio_dev,
                    "ratio_names": sorted(ratios), "ref_ratio_names": sorted(ref_ratios), "max_grad_norm": max_norm,
                    "fused": False,
                })
    # The compiled two-pass kernels (bigbatch.optim.kernels) over flat partitions that cut through parameters.
    for stage in (1, 3):
        for kind in ("lamb", "lars"):
            params, ratios = distributed(kind, stage, 2, 1.0, world, rank, fused=True)
            ref_params, ref_ratios, max_norm = refs[(kind, 1.0)]
            results.append({
                "stage": stage, "optimizer": kind, "gas": 2, "clip": 1.0, "fused": True,
                "deviation": deviation(params, ref_params),
                "ratio_deviation": max(abs(ratios[n] - r) / abs(r) for n, r in ref_ratios.items()),
                "ratio_names": sorted(ratios), "ref_ratio_names": sorted(ref_ratios), "max_grad_norm": max_norm,
            })
    # The same run without layouts must be far off: proves the comparison can fail.
    params, _ = distributed("lamb", 1, 1, 1.0, world, rank, naive=True)
    naive = deviation(params, refs[("lamb", 1.0)][0])
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "cases": results, "naive_zero1_deviation": naive}, f, indent=1)


if __name__ == "__main__":
    main()
    shutdown()
