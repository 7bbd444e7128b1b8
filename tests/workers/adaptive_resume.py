"""Worker for tests/test_adaptive.py: adaptive-batch runs of `tiny` on the ranks of one `deepspeed` launch, under
ZeRO-1 and ZeRO-3. Per stage: an uninterrupted run, and the same run stopped between two decisions (a STOP file after
step `--stop-at`, as SLURM's preemption warning leaves it) and resumed. Then, with `--reround RUN`, the resume on
these 2 ranks of an adaptive run the test stopped at world 1 (its batch re-rounded to 2 ranks). Writes every run's
metrics.jsonl records into one JSON result (rank 0), which the test compares.

    deepspeed --num_gpus 2 tests/workers/adaptive_resume.py --out R.json --corpus docs.txt --root DIR [--reround RUN]
"""

import argparse
import json
import os
from pathlib import Path

from bigbatch.cli import main
from bigbatch.run import faults
from bigbatch.run.metrics import read_metrics

# 2 ranks of micro-batch 4: decisions land on multiples of 8; the batch starts at 16 and may reach 512. At a constant
# LR of 0.02 (LAMB, tuned at 16 and carried by the square-root rule) the toy's noise scale is about 30 early, falls
# to about 20, then grows past 100 (measured at world 1): a change at the first decision, more after the stop.
ADAPTIVE = ["--batch.global_batch=16", "--batch.micro_batch=4", "--batch.adaptive=true", "--batch.adaptive_every=5",
            "--batch.adaptive_factor=2", "--batch.max=512", "--run.noise_scale_ema=0.9", "--optimizer.lr=0.02",
            "--optimizer.base_batch=16"]
SHAPE = ["--schedule.steps=40", "--schedule.warmup=64", "--schedule.decay=constant", "--run.eval_every=20",
         "--data.vocab_size=400", "--data.eval_samples=32", "--checkpoint.every_steps=0"]


def run(argv: list[str], fault: str = "") -> int:
    os.environ.pop(faults.ENV, None)
    if fault:
        os.environ[faults.ENV] = fault
    faults.reset()
    return main(argv)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--stop-at", type=int, default=23)
    parser.add_argument("--reround", default="")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.root)
    result: dict = {"stop_at": args.stop_at, "stages": {}}
    tokenizer: list[str] = []
    for stage in (1, 3):
        common = ["train", "tiny", f"--data.sources={args.corpus}", f"--deepspeed.configs=zero{stage}.json,fp32.json",
                  *ADAPTIVE, *SHAPE, *tokenizer]
        whole, parted = root / f"zero{stage}-whole", root / f"zero{stage}-stopped"
        codes = [run([*common, "--run-dir", str(whole)]),
                 run([*common, "--run-dir", str(parted)], fault=f"step{args.stop_at}:stop"),
                 run([*common, "--run-dir", str(parted), "--resume"])]
        tokenizer = [f"--data.tokenizer={whole / 'data' / 'tokenizer.model'}"]  # trained once, by the first run
        result["stages"][stage] = {
            "codes": codes, "whole": read_metrics(whole / "metrics.jsonl"),
            "resumed": read_metrics(parted / "metrics.jsonl"),
            "checkpoints": sorted(p.name for p in (parted / "checkpoints").iterdir()),
        }
    if args.reround:
        other = Path(args.reround)
        result["reround"] = {"code": run(["train", str(other / "recipe.json"), "--run-dir", str(other), "--resume"]),
                             "records": read_metrics(other / "metrics.jsonl")}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(result))
