"""Worker for tests/test_optim_precision.py: LAMB/LARS under fp16 (dynamic loss scale) and bf16, ZeRO 0-3, and the
skip of a non-finite gradient at every stage x precision (fp32 too).

Trust ratios must come from fp32 masters and *unscaled* gradients: LARS's ratio is inversely proportional to the
gradient norm, so a ratio taken on loss-scaled gradients would be off by the scale (2^8 here); LAMB's first step is
sign-like and hides the scale, its later steps do not (clipping sees the scaled norm). Each case is compared with the
fp32 single-process run of tests/workers/zero_exactness.py's model, step by step, to the rounding of 16-bit formats.
A control run with DeepSpeed's unscale switched off shows the comparison can fail.

The skip cases inject an inf (step 2) and a NaN (step 4) into one gradient on rank 0 only and record, on every rank,
whether weights, fp32 masters and optimizer state stayed bit-identical across each of those steps.
"""

import argparse
import json
import math

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from bigbatch.config import ConfigError
from bigbatch.engine import client_optimizer, initialize
from bigbatch.optim import param_groups
from bigbatch.run import distributed
from bigbatch.run.distributed import shutdown
from bigbatch.run.overflow import state_tensors

import zero_exactness
from zero_exactness import GLOBAL, OPT_PARAMS, Net, batches, reference

STEPS = 4
BAD = {2: math.inf, 4: math.nan}  # 1-based step: what rank 0's gradient is multiplied by
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BF16_OPTIMIZER = {"data_types": {"grad_accum_dtype": "fp32"}}  # DeepSpeed's BF16_Optimizer at ZeRO-1


def engine_for(kind, precision, stage, world, extra=None, hook=None):
    torch.manual_seed(0)
    model = Net(world)
    if hook is not None:
        model.inp.weight.register_hook(hook)
    config = {
        "train_batch_size": GLOBAL,
        "train_micro_batch_size_per_gpu": GLOBAL // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": kind, "params": OPT_PARAMS[kind]},
        **(extra or {}),
    }
    if precision != "fp32":
        config[precision] = {"enabled": True,
                             **({"initial_scale_power": 8, "loss_scale": 0} if precision == "fp16" else {})}
    engine, *_ = initialize(model=model, config=config,
                            model_parameters=param_groups(model, OPT_PARAMS[kind]["weight_decay"]))
    return engine


def train_step(engine, x, y, precision, world, rank):
    lo = rank * (GLOBAL // world)
    dtype = DTYPES[precision]
    loss = engine(x[lo : lo + GLOBAL // world].to(dtype), y[lo : lo + GLOBAL // world].to(dtype))
    engine.backward(loss)
    engine.step()


def gathered(engine):
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().float().clone() for n, p in params.items()}


def run(kind, precision, stage, world, rank, extra=None, broken_unscale=False):
    """(parameters after STEPS, trust ratios after each step, DeepSpeed's wrapper, skipped steps)."""
    engine = engine_for(kind, precision, stage, world, extra)
    if broken_unscale:  # the control: gradients reach the optimizer still multiplied by the loss scale
        engine.optimizer.unscale_and_clip_grads = lambda *args: None
    opt = client_optimizer(engine)
    ratios = []
    for x, y in batches()[:STEPS]:
        train_step(engine, x, y, precision, world, rank)
        ratios.append(opt.trust_ratios())
    result = gathered(engine), ratios, type(engine.optimizer).__name__, engine.skipped_steps
    engine.destroy()
    return result


def local_state(engine):
    return [t.detach().clone() for t in state_tensors(engine)]


def unchanged(a, b):
    """Bit for bit, NaN and -0.0 included."""
    return len(a) == len(b) and all(torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
                                    for x, y in zip(a, b))


def skip_case(kind, precision, stage, world, rank, extra=None):
    """Five steps, rank 0's gradient made inf at step 2 and NaN at step 4: per bad step, whether every rank's state
    stayed bit-identical and how much skipped_steps grew; then whether the good steps applied and all is finite."""
    step = {"now": 0}
    engine = engine_for(kind, precision, stage, world, extra,
                        hook=lambda g: g * BAD.get(step["now"], 1.0) if rank == 0 else g)
    identical, counted, applied = {}, {}, []
    for step["now"], (x, y) in enumerate(batches()[:5], start=1):
        before, skipped = local_state(engine), engine.skipped_steps
        train_step(engine, x, y, precision, world, rank)
        after = local_state(engine)
        changed = torch.tensor([float(not unchanged(before, after))])
        torch.distributed.all_reduce(changed)  # the state of every rank
        if step["now"] in BAD:
            identical[step["now"]] = changed.item() == 0
            counted[step["now"]] = engine.skipped_steps - skipped
        else:
            applied.append(changed.item() > 0)
    finite = all(bool(torch.isfinite(t.float()).all()) for t in local_state(engine))
    wrapper = type(engine.optimizer).__name__
    engine.destroy()
    return {"optimizer": kind, "precision": precision, "stage": stage, "wrapper": wrapper,
            "identical": identical, "counted": counted, "applied": applied, "finite": finite}


def reference_steps(kind, world):
    """The fp32 single-process run: parameters after STEPS steps and the trust ratios after each step."""
    saved = zero_exactness.STEPS
    try:
        runs = []
        for steps in range(1, STEPS + 1):
            zero_exactness.STEPS = steps
            runs.append(reference(kind, 1.0, world))
    finally:
        zero_exactness.STEPS = saved
    return runs[-1][0], [r[1] for r in runs]


def deviation(a, b):
    """Per tensor max|a - b| / max|b|, the worst tensor."""
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


def ratio_deviations(ratios, ref_ratios):
    """Per step, the worst relative deviation of a trust ratio from the reference's."""
    return [max(abs(got[n] - r) / abs(r) for n, r in ref.items()) for got, ref in zip(ratios, ref_ratios)]


def precision_cases(kind, world, rank):
    ref_params, ref_ratios = reference_steps(kind, world)
    cases = [(p, s, None) for p in ("fp16", "bf16") for s in (0, 1, 2, 3)] + [("bf16", 1, BF16_OPTIMIZER)]
    results, params_of = [], {}
    for precision, stage, extra in cases:
        label = {"optimizer": kind, "precision": precision, "stage": stage, "bf16_optimizer": extra is not None}
        try:
            params, ratios, wrapper, skipped = run(kind, precision, stage, world, rank, extra)
        except ConfigError as err:  # 16-bit at stage 0 is refused (see bigbatch.engine)
            results.append({**label, "refused": str(err)})
            continue
        params_of[(precision, stage, extra is not None)] = params
        results.append({**label, "refused": None, "wrapper": wrapper, "skipped": skipped,
                        "deviation": deviation(params, ref_params),
                        "ratio_deviations": ratio_deviations(ratios, ref_ratios),
                        "names_match": all(sorted(r) == sorted(ref) for r, ref in zip(ratios, ref_ratios))})
    # the same precision under the other ZeRO layouts: only the partitioning differs
    for c in results:
        if c["refused"]:
            continue
        mine = params_of[(c["precision"], c["stage"], c["bf16_optimizer"])]
        others = {s: p for (prec, s, bf), p in params_of.items()
                  if prec == c["precision"] and not bf and (s, bf) != (c["stage"], c["bf16_optimizer"])}
        c["cross_stages"] = sorted(others)
        c["cross_stage_deviation"] = max(deviation(mine, p) for p in others.values())
    params, ratios, _, skipped = run(kind, "fp16", 1, world, rank, broken_unscale=True)
    control = {"optimizer": kind, "skipped": skipped, "deviation": deviation(params, ref_params),
               "ratio_deviations": ratio_deviations(ratios, ref_ratios)}
    return results, control


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    # Test only: DeepSpeed refuses fp16 on a CPU; the fp16 path itself (loss scaler, fp32 masters) is device-neutral.
    type(get_accelerator()).is_fp16_supported = lambda self: True
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    cases, controls = [], []
    for kind in ("lamb", "lars"):
        results, control = precision_cases(kind, world, rank)
        cases += results
        controls.append(control)
    skips = [skip_case(kind, precision, stage, world, rank, extra)
             for kind in ("lamb", "lars")
             for precision, stage, extra in [(p, s, None) for p in ("fp32", "fp16", "bf16") for s in (0, 1, 2, 3)
                                             if s or p == "fp32"] + [("bf16", 1, BF16_OPTIMIZER)]]
    # rides this launch (no launch of its own): the free memory "auto" fits in is the least over the ranks
    least = distributed.min_across_ranks(1000 + 7 * (world - rank))
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "cases": cases, "unscale_off": controls, "skips": skips,
                       "min_across_ranks": least}, f, indent=1)


if __name__ == "__main__":
    main()
    shutdown()
