"""The adaptive batch (issue 25) against fixed batches: steps, samples and wall time to a target held-out loss.

    .venv/bin/python bench/adaptive_batch.py      # writes bench/results/adaptive_batch-<host>.{md,json,png}

The `tiny` recipe's BERT with LAMB (square-root rule) on the built-in corpus, trained by bigbatch's own trainer in
this process (world 1, ZeRO-1, fp32, micro-batch 16), per seed:
  fixed B0:      batch B0 = 32 for STEPS steps (its samples are every run's budget),
  fixed 8 B0:    batch 256 for STEPS / 2 steps: 4x B0's samples, as many steps as the adaptive run (at B0's budget
                 it does not reach the target, so the question is how many samples it needs; 4x is the cap),
                 once with the LR the sqrt rule gives it, once at B0's LR unscaled,
  adaptive:      from B0, `batch.adaptive` with factor 1 every 16 steps up to 8 B0, for STEPS / 2 steps.
The LR is tuned at B0 (0.02, bench/results/large_batch_quality) and carried by the rule; warmup is 10% of the budget
in samples, then linear decay to 0 over each run's steps. Target: fixed B0's final held-out loss (same seed). Steps
and samples to the target are read at the first evaluation at or below it (every run evaluates 32 times).
Runs live in --work; a run whose metrics.jsonl is complete is not run again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bigbatch.cli import main as bigbatch  # noqa: E402
from bigbatch.run.metrics import read_metrics  # noqa: E402

from common import RESULTS, machine, write_results  # noqa: E402

B0, MICRO, STEPS, LR = 32, 16, 512, 0.02
RUNS = {  # name -> (label, extra overrides, steps)
    "fixed": ("fixed B0 = 32", [f"--batch.global_batch={B0}"], STEPS),
    "fixed8": ("fixed 8 B0 = 256", [f"--batch.global_batch={8 * B0}"], STEPS // 2),
    # the same with B0's LR unscaled: whether the sqrt rule's larger LR is what holds it back
    "fixed8_lr": (f"fixed 8 B0 = 256 at lr {LR} (unscaled)",
                  [f"--batch.global_batch={8 * B0}", f"--optimizer.base_batch={8 * B0}"], STEPS // 2),
    "adaptive": ("adaptive from B0 (k = 1, every 16, max 256)",
                 [f"--batch.global_batch={B0}", "--batch.adaptive=true", "--batch.adaptive_factor=1",
                  "--batch.adaptive_every=16", f"--batch.max={8 * B0}"], STEPS // 2),
}


def run(work: Path, name: str, seed: int, tokenizer: Optional[Path]) -> dict[str, Any]:
    """One run (skipped when its records are complete): its evaluations, steps, noise scale and wall time."""
    label, extra, steps = RUNS[name]
    run_dir = work / f"{name}-{seed}"
    result = run_dir / "bench.json"
    if not result.exists():
        argv = ["train", "tiny", "--run-dir", str(run_dir), "--overwrite", f"--run.seed={seed}",
                f"--batch.micro_batch={MICRO}", f"--optimizer.lr={LR}", f"--optimizer.base_batch={B0}",
                f"--schedule.steps={steps}", f"--schedule.warmup={STEPS * B0 // 10}", "--schedule.decay=poly",
                f"--run.eval_every={max(steps // 32, 1)}", "--data.eval_samples=512", *extra]
        if tokenizer is not None:
            argv.append(f"--data.tokenizer={tokenizer}")
        started = time.perf_counter()
        assert bigbatch(argv) == 0, argv
        wall = time.perf_counter() - started
        records = read_metrics(run_dir / "metrics.jsonl")
        steps_rec = [r for r in records if "loss" in r]
        result.write_text(json.dumps({
            "wall_s": wall, "step_s": sum(r["step_time_s"] for r in steps_rec),
            "evals": [(r["step"], r["samples"], r["eval_loss"]) for r in records if "eval_loss" in r],
            "noise": [(r["samples"], r.get("noise_scale"), r["global_batch"]) for r in steps_rec],
        }))
    return {"name": name, "label": label, "seed": seed, **json.loads(result.read_text())}


def to_target(r: dict[str, Any], target: float) -> tuple[Optional[int], Optional[int]]:
    """(steps, samples) at the first evaluation at or below `target`; None when the run never gets there."""
    for step, samples, loss in r["evals"]:
        if step and loss <= target:
            return step, samples
    return None, None


def _mean(values: list[float], form: str = ",.0f", unit: str = "") -> str:
    return f"{statistics.mean(values):{form}}{unit}" if values else "-"


def table(results: list[dict[str, Any]], seeds: list[int]) -> tuple[str, dict[str, Any]]:
    targets = {s: next(r for r in results if r["name"] == "fixed" and r["seed"] == s)["evals"][-1][2] for s in seeds}
    base = {r["seed"]: to_target(r, targets[r["seed"]]) for r in results if r["name"] == "fixed"}
    rows, figures = [], {"targets": targets, "runs": {}}
    for name in RUNS:
        mine = [r for r in results if r["name"] == name]
        reached = [to_target(r, targets[r["seed"]]) for r in mine]
        figures["runs"][name] = {"per_seed": [{**{k: r[k] for k in ("seed", "wall_s", "step_s")},
                                               "final_eval": r["evals"][-1][2], "steps_to_target": st,
                                               "samples_to_target": sa} for r, (st, sa) in zip(mine, reached)]}
        ok = [x for x in reached if x[0] is not None]
        # each seed against fixed B0 of the same seed (its own target)
        ratios = [(x[0] / base[r["seed"]][0], x[1] / base[r["seed"]][1]) for r, x in zip(mine, reached) if x[0]]
        rows.append(f"| {RUNS[name][0]}, {RUNS[name][2]} steps | {len(ok)}/{len(mine)} | {_mean([x[0] for x in ok])} "
                    f"({_mean([q[0] for q in ratios], '.2f', 'x')}) | {_mean([x[1] for x in ok])} "
                    f"({_mean([q[1] for q in ratios], '.2f', 'x')}) | "
                    f"{statistics.mean(r['evals'][-1][2] for r in mine):.4f} | "
                    f"{_mean([r['wall_s'] for r in mine])} s | {_mean([r['step_s'] for r in mine])} s | "
                    f"{max(b for r in mine for _, _, b in r['noise']):,} |")
    text = "\n".join([
        f"# Adaptive batch against fixed batches ({datetime.date.today()})", "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()) + ". Shared with other jobs.",
        f"tiny (BERT, width 64, 2 layers, sequence 64), LAMB lr {LR} at {B0} (sqrt rule), world 1, ZeRO-1 fp32, "
        f"micro-batch {MICRO}; seeds {', '.join(map(str, seeds))}. Budget: {STEPS * B0:,} samples (fixed 8 B0: up to "
        f"{STEPS // 2 * 8 * B0:,}, 4x, its cap). Steps and samples to the target are means over the seeds that reach "
        "it, in brackets the mean ratio to fixed B0's of the same seed. Target: fixed "
        "B0's final held-out loss, per seed (" + ", ".join(f"{t:.4f}" for t in targets.values()) + ").", "",
        "| run | reached target | steps to target (x B0's) | samples to target (x B0's) | final held-out loss (mean) | "
        "wall time (mean) | time in steps (mean) | largest batch |",
        "|---|:---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"![noise scale and batch](adaptive_batch-{socket.gethostname()}.png)", ""])
    return text, figures


def plot(results: list[dict[str, Any]], seed: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for r in (r for r in results if r["seed"] == seed):
        points = [(s, b) for s, b, _ in r["noise"] if b and b > 0]
        if points:
            ax.plot(*zip(*points), lw=1.0, label=f"B_noise, {RUNS[r['name']][0]}")
        if r["name"] == "adaptive":
            ax.plot([s for s, _, _ in r["noise"]], [g for _, _, g in r["noise"]], "--", lw=1.2,
                    label="adaptive run's global batch")
    ax.set_yscale("log")
    ax.set_xlabel("samples")
    ax.set_ylabel("samples (log)")
    ax.set_title(f"gradient noise scale over the run (seed {seed})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-adaptive"))
    parser.add_argument("--seeds", default="1234,1235,1236")
    args = parser.parse_args()
    work, seeds = Path(args.work), [int(s) for s in args.seeds.split(",")]
    results, tokenizer = [], None
    for seed in seeds:
        for name in RUNS:
            results.append(run(work, name, seed, tokenizer))
            tokenizer = tokenizer or work / f"{name}-{seed}" / "data" / "tokenizer.model"
    text, figures = table(results, seeds)
    plot(results, seeds[0], RESULTS / f"adaptive_batch-{socket.gethostname()}.png")
    write_results("adaptive_batch", text, figures)
