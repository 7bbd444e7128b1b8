"""Worker for tests/test_optim_precision.py: LAMB/LARS under fp16 (dynamic loss scale) and bf16, ZeRO 0-3.

Trust ratios must come from fp32 masters and *unscaled* gradients: LARS's ratio is inversely proportional to the
gradient norm, so a ratio taken on loss-scaled gradients would be off by the scale (2^8 here). Each case is compared
with the fp32 single-process run of tests/workers/zero_exactness.py's model, to the rounding of 16-bit formats.
"""

import argparse
import json

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from bigbatch.config import ConfigError
from bigbatch.distributed import shutdown
from bigbatch.engine import client_optimizer, initialize
from bigbatch.optim import param_groups
from zero_exactness import GLOBAL, OPT_PARAMS, Net, batches, reference

STEPS = 4


def run(kind, precision, stage, world, rank, extra=None):
    torch.manual_seed(0)
    model = Net()
    config = {
        "train_batch_size": GLOBAL,
        "train_micro_batch_size_per_gpu": GLOBAL // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": kind, "params": OPT_PARAMS[kind]},
        precision: {"enabled": True, **({"initial_scale_power": 8, "loss_scale": 0} if precision == "fp16" else {})},
        **(extra or {}),
    }
    engine, *_ = initialize(model=model, config=config,
                            model_parameters=param_groups(model, OPT_PARAMS[kind]["weight_decay"]))
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    opt = client_optimizer(engine)
    first_ratios = None
    for x, y in batches()[:STEPS]:
        lo = rank * (GLOBAL // world)
        loss = engine(x[lo : lo + GLOBAL // world].to(dtype), y[lo : lo + GLOBAL // world].to(dtype))
        engine.backward(loss)
        engine.step()
        if first_ratios is None:
            first_ratios = opt.trust_ratios()
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        result = {n: p.detach().float().clone() for n, p in params.items()}
    wrapper = type(engine.optimizer).__name__
    skipped = engine.skipped_steps
    engine.destroy()
    return result, first_ratios, wrapper, skipped


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    # Test only: DeepSpeed refuses fp16 on a CPU; the fp16 path itself (loss scaler, fp32 masters) is device-neutral.
    type(get_accelerator()).is_fp16_supported = lambda self: True
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    cases = [(p, s, None) for p in ("fp16", "bf16") for s in (0, 1, 2, 3)]
    cases.append(("bf16", 1, {"data_types": {"grad_accum_dtype": "fp32"}}))  # DeepSpeed's BF16_Optimizer
    results = []
    for kind in ("lamb", "lars"):
        # the fp32 reference, first step only and after STEPS steps
        torch.manual_seed(0)
        ref_first = reference_steps(kind, 1)
        ref_final = reference_steps(kind, STEPS)
        stage1 = {}
        for precision, stage, extra in cases:
            try:
                params, ratios, wrapper, skipped = run(kind, precision, stage, world, rank, extra)
            except ConfigError as err:  # 16-bit at stage 0 is refused (see bigbatch.engine)
                results.append({"optimizer": kind, "precision": precision, "stage": stage, "refused": str(err)})
                continue
            stage1.setdefault(precision, params)
            dev = max(((params[n] - ref_final[0][n]).abs().max() / ref_final[0][n].abs().max()).item()
                      for n in ref_final[0])
            # the same precision under another ZeRO layout: only the partitioning differs
            cross = max(((params[n] - stage1[precision][n]).abs().max() / stage1[precision][n].abs().max()).item()
                        for n in params)
            ratio_dev = max(abs(ratios[n] - r) / abs(r) for n, r in ref_first[1].items())
            results.append({"optimizer": kind, "precision": precision, "stage": stage, "wrapper": wrapper,
                            "skipped": skipped, "deviation": dev, "ratio_deviation": ratio_dev, "refused": None,
                            "cross_stage_deviation": cross, "names_match": sorted(ratios) == sorted(ref_first[1])})
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "cases": results}, f, indent=1)


def reference_steps(kind, steps):
    import zero_exactness

    saved = zero_exactness.STEPS
    zero_exactness.STEPS = steps
    try:
        params, ratios, _ = reference(kind, 1.0)
    finally:
        zero_exactness.STEPS = saved
    return params, ratios


if __name__ == "__main__":
    main()
    shutdown()
