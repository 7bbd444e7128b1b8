"""What activation checkpointing costs under ZeRO-3, and why: parameter all-gathers and step time per training step,
checkpointing on and off, side by side in one launch.

    .venv/bin/python bench/zero3_checkpointing.py      # writes bench/results/zero3_checkpointing-<host>.md

bench/memory.py found checkpointing cost about two extra forwards at ZeRO-3 against one at stages 0-2, but it
switched checkpointing on and off on one engine, which makes DeepSpeed drop its prefetch trace. Here four ZeRO-3
engines live side by side, each with checkpointing fixed for its life as in a real run, and take their steps in
turn (so that the shared machine's drift falls on all four alike): checkpointing off and on, under DeepSpeed's
default parameter limits (the 5e7-element prefetch bucket and 1e9 live parameters hold this whole model, which is
then gathered once a step and kept) and under limits smaller than one layer (what a model far larger than its
buckets meets: each layer gathered when needed and released after). Counted per step on rank 0: the calls to
DeepSpeed's all-gather (deepspeed.comm.allgather_fn, through which stage 3 gathers parameters) and their elements.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import deepspeed_launch, machine, write_results  # noqa: E402

MODEL = {"model.num_layers": "4", "model.hidden_size": "256", "model.num_heads": "4", "model.intermediate_size": "1024",
         "model.dropout": "0", "model.max_position": "128", "data.seq_len": "128"}
VOCAB, SEQ, MICRO = 2000, 128, 8
SMALL_LIMIT = 300_000  # elements: below one layer's 0.79M parameters
CASES = [("default", False), ("default", True), ("below a layer", False), ("below a layer", True)]


class GatherCounter:
    """Counts deepspeed.comm.allgather_fn calls and elements. Wrapped by hand: DeepSpeed's comms logger reports
    per-op sizes and latencies averaged over the run, not per engine, and these engines step in turn."""

    def __init__(self) -> None:
        import deepspeed.comm as dscomm

        self.calls, self.elements = 0, 0
        inner = dscomm.allgather_fn

        def counted(output_tensor: torch.Tensor, input_tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.elements += output_tensor.numel()
            return inner(output_tensor, input_tensor, *args, **kwargs)

        dscomm.allgather_fn = counted


def worker(out: Path, warmup: int, steps: int) -> None:
    import deepspeed

    from bigbatch.config.files import load_recipe
    from bigbatch.engine import initialize
    from bigbatch.models.build import build_model
    from bigbatch.optim import param_groups
    from bigbatch.resolve import resolve
    from bigbatch.run.distributed import shutdown

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    counter = GatherCounter()
    engines = []
    for limits, ckpt in CASES:
        configs = "zero3.json,fp32.json" + (",act_ckpt.json" if ckpt else "")
        recipe = load_recipe("tiny", {**MODEL, "deepspeed.configs": configs, "optimizer.lr": "1e-3",
                                      "optimizer.lr_rule": "none", "batch.global_batch": str(MICRO * world),
                                      "batch.micro_batch": str(MICRO)})
        ds_config = resolve(recipe, world).ds_config
        zero = ds_config["zero_optimization"]
        zero["stage3_param_persistence_threshold"] = 0  # every parameter partitioned, small ones too
        if limits != "default":
            zero.update(stage3_prefetch_bucket_size=SMALL_LIMIT, stage3_max_live_parameters=SMALL_LIMIT,
                        stage3_max_reuse_distance=SMALL_LIMIT)
        torch.manual_seed(0)
        model = build_model(recipe.model, VOCAB, pad_id=0, checkpointing=ckpt)
        num_params = sum(p.numel() for p in model.parameters())
        layer = sum(p.numel() for p in model.hf.base_model.encoder.layer[0].parameters())
        engine, *_ = initialize(model=model, config=ds_config, model_parameters=param_groups(model, 0.01))
        engines.append({"engine": engine, "limits": limits, "ckpt": ckpt, "params": num_params, "layer": layer,
                        "gathers": [], "elements": [], "times": [], "forward": []})

    def step(case: dict[str, Any], i: int) -> None:
        g = torch.Generator().manual_seed(1000 * i + rank)
        ids = torch.randint(5, VOCAB, (MICRO, SEQ), generator=g)
        labels = ids.clone()
        labels[torch.rand(ids.shape, generator=g) > 0.15] = -100
        calls, elements = counter.calls, counter.elements
        torch.distributed.barrier()
        started = time.perf_counter()
        engine = case["engine"]
        loss = engine(ids, torch.ones_like(ids), labels)
        forward = time.perf_counter() - started
        engine.backward(loss)
        engine.step()
        torch.distributed.barrier()
        if i >= warmup:  # the first steps record DeepSpeed's prefetch trace
            case["times"].append(time.perf_counter() - started)
            case["forward"].append(forward)
            case["gathers"].append(counter.calls - calls)
            case["elements"].append(counter.elements - elements)

    for i in range(warmup + steps):
        for case in engines:
            step(case, i)
        if rank == 0:
            print(f"[zero3] step {i + 1}/{warmup + steps}", flush=True)
    if rank == 0:
        rows = [{k: v for k, v in case.items() if k != "engine"} for case in engines]
        out.write_text(json.dumps({"world": world, "cases": rows}, indent=1))
    for case in engines:
        case["engine"].destroy()
    shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.warmup, args.steps)
        return

    from bigbatch.run.distributed import free_port

    m = machine()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"

        def echo(line: str) -> None:
            if "[zero3]" in line:
                print(line.split("[zero3]", 1)[1].strip(), flush=True)

        deepspeed_launch(Path(__file__), ["--worker", str(result), "--warmup", str(args.warmup), "--steps",
                                          str(args.steps)], args.ranks, free_port(), echo)
        data = json.loads(result.read_text())
    wall = time.perf_counter() - started
    cases = data["cases"]
    params, layer = cases[0]["params"], cases[0]["layer"]
    by = {(c["limits"], c["ckpt"]): c for c in cases}
    lines = [
        f"# Activation checkpointing under ZeRO-3: all-gathers and step time ({datetime.date.today()})",
        "",
        f"Run by `bench/zero3_checkpointing.py` in {wall / 60:.1f} min: one `deepspeed --num_gpus {data['world']}` "
        f"launch on the CPU. Machine: {m['cpu']}, {m['cores']} cores, host `{m['host']}`, torch {m['torch']}, "
        f"Python {m['python']}.",
        f"Model: BERT, hidden 256, 4 layers, FFN 1024, sequence {SEQ}, micro-batch {MICRO} per rank, fp32, "
        f"{params / 1e6:.2f}M parameters ({layer / 1e6:.2f}M a transformer layer, "
        f"{4 * layer / 1e6:.2f}M the four). Four engines step in turn; "
        f"{args.steps} measured steps each after {args.warmup} that record DeepSpeed's prefetch trace. "
        f"Limits 'below a layer': stage3_prefetch_bucket_size = stage3_max_live_parameters = "
        f"stage3_max_reuse_distance = {SMALL_LIMIT:,}.",
        "",
        "| parameter limits | checkpointing | all-gathers a step | elements gathered a step | in model sizes | "
        "step s (median) | forward s | step vs checkpointing off | extra forwards |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        off = by[(c["limits"], False)]
        step_s = statistics.median(c["times"])
        lines.append(f"| {c['limits']} | {'on' if c['ckpt'] else 'off'} | {statistics.median(c['gathers']):.0f} | "
                     f"{statistics.median(c['elements']) / 1e6:.2f}M | "
                     f"{statistics.median(c['elements']) / params:.2f} | {step_s:.3f} | "
                     f"{statistics.median(c['forward']):.3f} | {step_s / statistics.median(off['times']):.2f} | "
                     f"{(step_s - statistics.median(off['times'])) / statistics.median(off['forward']):.2f} |")
    extra = {lim: (statistics.median(by[(lim, True)]["elements"]) - statistics.median(by[(lim, False)]["elements"]))
             for lim in ("default", "below a layer")}
    lines += [
        "",
        f"Checkpointing adds {extra['default'] / 1e6:.2f}M gathered elements a step under DeepSpeed's default "
        f"limits and {extra['below a layer'] / 1e6:.2f}M ({extra['below a layer'] / (4 * layer):.2f} x the "
        f"transformer layers' parameters) under limits below a layer.",
        "",
    ]
    text = "\n".join(lines)
    write_results("zero3_checkpointing", text, {"machine": m, "wall_s": wall, **data}, args.out)


if __name__ == "__main__":
    main()
