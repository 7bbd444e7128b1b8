"""What bigbatch's training loop costs beyond a bare DeepSpeed loop, side by side in one run.

    .venv/bin/python bench/loop_overhead.py            # writes bench/results/loop_overhead-<host>.md

1. `bigbatch train` against a bare hand-written loop (forward, engine.backward, engine.step per micro-batch, the LR
   scheduler) on the same model, the same micro-batches (bigbatch's packed and masked data) and the same resolved
   DeepSpeed JSON, interleaved for --rounds rounds. bigbatch's throughput comes from the wall-clock stamps of its
   metrics records, so everything its loop does between steps (metrics, the overflow guard, the noise-scale hooks
   and all-reduce, progress) is inside it; evaluation and checkpoints are off here and costed separately. Goal: at
   least 0.97x the bare loop.
2. Gradient accumulation 1 -> 32 at a fixed micro-batch: time per sample relative to accumulation 1 (goal >= 0.95).
3. The costs bigbatch logs itself: one evaluation (`eval_s`), one checkpoint (`checkpoint_s`), and loss.png.

One process (world 1) on the CPU, fp32, ZeRO-1: a loop's overhead is per step and per micro-batch, not per rank.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bigbatch.cli import main as bigbatch  # noqa: E402
from bigbatch.config import load_recipe  # noqa: E402
from bigbatch.data import prepare  # noqa: E402
from bigbatch.engine import initialize  # noqa: E402
from bigbatch.metrics import plot_loss, read_metrics  # noqa: E402
from bigbatch.model import build_model  # noqa: E402
from bigbatch.optim import param_groups  # noqa: E402
from bigbatch.scaling import plan_steps  # noqa: E402
from common import RESULTS, machine  # noqa: E402

MODEL = ["--model.hidden_size=64", "--model.num_layers=2", "--model.num_heads=2", "--model.intermediate_size=256",
         "--data.seq_len=64", "--deepspeed.configs=zero1.json,fp32.json", "--checkpoint.every_steps=0"]


def run_bigbatch(work: Path, name: str, steps: int, batch: int, micro: int, extra: list[str]) -> list[dict]:
    run = work / name
    code = bigbatch(["train", "tiny", "--run-dir", str(run), "--overwrite", f"--schedule.steps={steps}",
                     f"--batch.global_batch={batch}", f"--batch.micro_batch={micro}", *MODEL, *extra])
    if code:
        raise SystemExit(f"bigbatch train exited {code}")
    return read_metrics(run / "metrics.jsonl")


def steady_samples_per_s(records: list[dict], skip: int = 2) -> float:
    """Samples per wall-clock second between the records of step `skip` and the step before the last (the last
    step also evaluates and checkpoints)."""
    steps = [r for r in records if "loss" in r]
    a, b = steps[skip - 1], steps[-2]
    return (b["samples"] - a["samples"]) / (b["time"] - a["time"])


def bare_samples_per_s(run: Path, steps: int, skip: int = 2) -> float:
    """The bare loop on the bigbatch run's own recipe, data and resolved DeepSpeed JSON."""
    recipe = load_recipe(str(run / "recipe.json"))
    ds_config = json.loads((run / "ds_config.json").read_text())
    data = prepare(recipe, run / "data", False, lambda x: x)
    table = plan_steps(recipe, world=1)
    torch.manual_seed(recipe.run.seed)
    model = build_model(recipe.model, data.vocab_size, pad_id=0)
    lr = table[0].lr

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: table[min(k, len(table) - 1)].lr / lr)

    engine, *_ = initialize(model=model, config=ds_config, model_parameters=param_groups(model, 0.01),
                            lr_scheduler=schedule)
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    stamps = []
    for step in range(steps):
        for m in range(accum):
            start = step * micro * accum + m * micro
            loss = engine(**data.train_batch(torch.arange(start, start + micro).numpy()))
            engine.backward(loss)
            engine.step()
        float(loss)  # bigbatch reads the loss every step; so does any loop that logs it
        stamps.append(time.perf_counter())
    engine.destroy()
    return micro * accum * (steps - 1 - skip) / (stamps[-2] - stamps[skip - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--micro", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    m = machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        quiet = ["--run.eval_every=100000", "--run.log_every=100000", "--run.trust_ratio_every=0"]
        # the tokenizer and packed data once; every run after reads the same tokenizer and datasets' cache
        first = run_bigbatch(work, "warm", 3, args.batch, args.micro, quiet)
        tok = [f"--data.tokenizer={work / 'warm' / 'data' / 'tokenizer.model'}"]
        ours, bare = [], []
        for r in range(args.rounds):
            records = run_bigbatch(work, "ours", args.steps, args.batch, args.micro, quiet + tok)
            ours.append(steady_samples_per_s(records))
            bare.append(bare_samples_per_s(work / "ours", args.steps))
            print(f"round {r + 1}: bigbatch {ours[-1]:.0f} samples/s, bare loop {bare[-1]:.0f} samples/s "
                  f"({ours[-1] / bare[-1]:.3f}x)", flush=True)
        accum_rows = []
        micro = 32
        for accum in (1, 2, 4, 8, 16, 32):
            steps = max(5, min(args.steps, 4 * 32 // accum))
            records = run_bigbatch(work, f"accum{accum}", steps, micro * accum, micro, quiet + tok)
            accum_rows.append((accum, steady_samples_per_s(records)))
            print(f"accumulation {accum}: {accum_rows[-1][1]:.0f} samples/s", flush=True)
        costs = run_bigbatch(work, "costs", 4, args.batch, args.micro,
                             ["--run.eval_every=1", "--checkpoint.every_steps=1", "--run.trust_ratio_every=0"] + tok)
        eval_s = statistics.median(r["eval_s"] for r in costs if "eval_s" in r)
        ckpt_s = statistics.median(r["checkpoint_s"] for r in costs if "checkpoint_s" in r)
        step_s = statistics.median(r["step_time_s"] for r in costs if "step_time_s" in r)
        started = time.perf_counter()
        plot_loss(work / "costs")
        plot_s = time.perf_counter() - started
        params = json.loads((work / "costs" / "recipe.json").read_text())["resolved"]["parameters"]
        eval_n = json.loads((work / "costs" / "data" / "data.json").read_text())["eval_sequences"]
        del first

    ratio = statistics.median(o / b for o, b in zip(ours, bare))
    base = accum_rows[0][1]
    lines = [
        f"# Training-loop overhead ({datetime.date.today()})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, host `{m['host']}`, torch {m['torch']}, Python {m['python']}; "
        "one process, 2 threads, fp32, ZeRO-1, no GPU.",
        f"Model: the tiny recipe at hidden 64, 2 layers, seq 64 ({params / 1e6:.2f}M parameters), global batch "
        f"{args.batch} = {args.micro} x {args.batch // args.micro}, {args.steps} steps a run, steady state from "
        "step 2 to the step before the last.",
        "",
        "## bigbatch train vs a bare DeepSpeed loop (interleaved)",
        "",
        "| round | bigbatch samples/s | bare loop samples/s | ratio |",
        "|---:|---:|---:|---:|",
        *[f"| {i + 1} | {o:.0f} | {b:.0f} | {o / b:.3f} |" for i, (o, b) in enumerate(zip(ours, bare))],
        "",
        f"**Median ratio: {ratio:.3f}x** (goal: at least 0.97x).",
        "",
        f"## Gradient accumulation at micro-batch {micro}",
        "",
        "| accumulation | global batch | samples/s | time per sample vs accumulation 1 |",
        "|---:|---:|---:|---:|",
        *[f"| {a} | {micro * a} | {t:.0f} | {base / t:.3f} |" for a, t in accum_rows],
        "",
        f"Lowest throughput ratio against accumulation 1: {min(t for _, t in accum_rows) / base:.3f} "
        "(goal: at least 0.95).",
        "",
        "## Costs bigbatch logs itself (metrics.jsonl)",
        "",
        "| what | seconds | in steps |",
        "|---|---:|---:|",
        f"| one evaluation ({eval_n} held-out sequences; `eval_s`) | {eval_s:.3f} | {eval_s / step_s:.2f} |",
        f"| one checkpoint (`checkpoint_s`, with its sha256 manifest) | {ckpt_s:.3f} | {ckpt_s / step_s:.2f} |",
        f"| loss.png (drawn at each evaluation) | {plot_s:.3f} | {plot_s / step_s:.2f} |",
        f"| one training step (reference) | {step_s:.3f} | 1 |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = args.out or RESULTS / f"loop_overhead-{socket.gethostname()}.md"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({
        "machine": m, "bigbatch": ours, "bare": bare, "ratio": ratio, "accumulation": accum_rows,
        "eval_s": eval_s, "checkpoint_s": ckpt_s, "plot_s": plot_s, "step_s": step_s}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
