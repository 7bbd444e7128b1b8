"""Worker for tests/test_ds_configs.py: every shipped stage x precision x checkpointing combination of ds_configs/,
resolved by bigbatch.resolve for the tiny recipe, runs 3 steps of a tiny BERT through bigbatch.engine.initialize.

One launch runs the whole matrix; rank 0 writes one JSON result. fp16 on the CPU relies on the test-only accelerator
patch below (never in the product).
"""

import argparse
import itertools
import json
import math

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param

from bigbatch.config import ConfigError, dsconfig
from bigbatch.config.files import load_recipe
from bigbatch.engine import client_optimizer, initialize
from bigbatch.models.build import build_model
from bigbatch.optim import param_groups
from bigbatch.resolve import resolve
from bigbatch.run.distributed import shutdown

STEPS = 3
VOCAB, SEQ, MICRO = 96, 16, 4


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(5, VOCAB, (MICRO, SEQ), generator=g)
    labels = torch.full_like(ids, -100)
    masked = torch.rand(MICRO, SEQ, generator=g) < 0.3
    masked[:, 0] = True
    labels[masked] = ids[masked]
    return ids, torch.ones_like(ids), labels


def optimizer_state_bytes(engine, model):
    """Bytes of fp32 master weights and optimizer state the rank holds: the base optimizer's parameters (ZeRO's fp32
    partitions, or the fp16 wrapper's fp32 copies) and their state tensors, each storage once, less the model's own
    weights (at stage 0 in fp32 the base optimizer steps them in place; at ZeRO-3 an aliased master would be the
    16-bit partition itself)."""
    base = client_optimizer(engine)
    model_storages = set()
    for p in model.parameters():
        model_storages.add(p.untyped_storage().data_ptr())
        if hasattr(p, "ds_tensor"):
            model_storages.add(p.ds_tensor.untyped_storage().data_ptr())
    # ZeRO-3 empties the base optimizer's param_groups after each sub-group's step: its state's keys are the masters
    tensors = [p for g in base.param_groups for p in g["params"]] + [p for p in base.state if torch.is_tensor(p)]
    tensors += [t for st in base.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
    seen, total = set(), 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or ptr in model_storages:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


def run(configs, optimizer, world, rank):
    recipe = load_recipe("tiny", {"deepspeed.configs": ",".join(configs), "optimizer.type": optimizer,
                                  "optimizer.lr": "1e-3", "optimizer.lr_rule": "none",
                                  "batch.global_batch": str(MICRO * world), "batch.micro_batch": str(MICRO),
                                  "model.num_layers": "2", "model.hidden_size": "32", "model.num_heads": "2",
                                  "model.intermediate_size": "64", "model.dropout": "0.1"})
    resolved = resolve(recipe, world)
    ds_config = resolved.ds_config
    torch.manual_seed(0)
    model = build_model(recipe.model, VOCAB, pad_id=0, checkpointing=resolved.ds.checkpointing)
    num_params = sum(p.numel() for p in model.parameters())
    engine, *_ = initialize(model=model, config=ds_config,
                            model_parameters=param_groups(model, recipe.optimizer.weight_decay))
    before = weights(engine)
    losses = []
    for step in range(STEPS):
        ids, mask, labels = batch(step, rank)
        loss = engine(ids, mask, labels)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    after = weights(engine)
    moved = sum(int(not torch.equal(after[n], before[n])) for n in after)
    result = {
        "configs": list(configs), "optimizer": optimizer, "losses": losses,
        "finite": all(math.isfinite(x) for x in losses), "moved": moved, "params": len(after),
        "stage": engine.zero_optimization_stage(), "fp16": engine.fp16_enabled(), "bf16": engine.bfloat16_enabled(),
        "checkpointing": bool(getattr(model.hf, "is_activation_checkpointing", None)
                              or getattr(model.hf, "is_gradient_checkpointing", False)),
        "skipped": engine.skipped_steps, "wrapper": type(engine.optimizer).__name__,
        "num_params": num_params, "optimizer_bytes": optimizer_state_bytes(engine, model),
    }
    engine.destroy()
    return result, (before, after)


def weights(engine):
    """Each parameter's fp32 master where DeepSpeed keeps one apart (ZeRO 1-3, BF16_Optimizer: 16-bit weights cannot
    show an update below half an ulp, a LayerNorm weight's at 1.0), else the parameter itself, whole (gathered at
    ZeRO-3, where the module holds empty placeholders between steps)."""
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        own = {n: p.detach().float().clone() for n, p in params.items()}
    masters = {n: safe_get_full_fp32_param(p) for n, p in params.items()}  # collective: every rank calls it
    return {n: own[n] if masters[n] is None else masters[n].detach().float().clone() for n in params}


def update_deviation(run, reference):
    """|a - b| / |b - b0| over all parameters at once: the 16-bit run's distance from the fp32 run in units of the
    fp32 run's whole update (per tensor ratios are noise on the attention key bias, which has no gradient)."""
    (_, a), (b0, b) = run, reference
    diff = torch.cat([(a[n] - b[n]).flatten() for n in b])
    update = torch.cat([(b[n] - b0[n]).flatten() for n in b])
    return (diff.norm() / update.norm()).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    type(get_accelerator()).is_fp16_supported = lambda self: True  # test only: fp16 on the CPU
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    stages = sorted(p.name for p in dsconfig.DS_CONFIGS.glob("zero*.json"))
    precisions = ("fp32.json", "fp16.json", "bf16.json")
    results = []
    fp32 = {}  # (optimizer, stage, checkpointing): the parameters of the fp32 run of that configuration
    for stage, precision, ckpt in itertools.product(stages, precisions, (False, True)):
        configs = [stage, precision] + (["act_ckpt.json"] if ckpt else [])
        optimizer = "lamb"
        if stage == "zero0.json" and precision != "fp32.json":
            # refused for every optimizer: DeepSpeed's stage-0 16-bit wrapper (FP16_UnfusedOptimizer) steps once on
            # zero gradients and divides by a loss scale never applied (measured for its AdamW: fp16 0.97 of an
            # update off, bf16 0.21); LAMB before DeepSpeed starts, AdamW once DeepSpeed has chosen the wrapper
            for refused_optimizer in ("lamb", "adamw"):
                try:
                    run(configs, refused_optimizer, world, rank)
                    refused = None
                except ConfigError as err:
                    refused = str(err)
                results.append({"configs": configs, "optimizer": refused_optimizer, "refused": refused})
            continue
        result, params = run(configs, optimizer, world, rank)
        if precision == "fp32.json":
            fp32[(optimizer, stage, ckpt)] = result, params
        else:  # against the same configuration in fp32
            ref_result, ref_params = fp32[(optimizer, stage, ckpt)]
            result["fp32_deviation"] = update_deviation(params, ref_params)
            result["fp32_loss_deviation"] = max(abs(a - b) for a, b in zip(result["losses"], ref_result["losses"]))
        results.append(result)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "shipped": sorted(p.name for p in dsconfig.DS_CONFIGS.glob("*.json")),
                       "cases": results}, f, indent=1)


if __name__ == "__main__":
    main()
    shutdown()
