"""`bigbatch plan tiny --gpu cpu --nodes 1 --gpus-per-node 2` against the demo's own first steps on this machine;
writes results/plan_vs_demo-<host>.md. Goal: predicted / measured step time within 30%.

The prediction is the command line's JSON (its cpu device is probed on the spot), taken right before and right
after the run, since a shared machine's speed drifts; the measurement is the median `step_time_s` in metrics.jsonl
of the demo's steps 2-10 (step 1 pays one-off costs), run as `make demo` runs it (2 ranks through the deepspeed
launcher, one thread each) with the schedule cut to 12 steps.

    .venv/bin/python bench/plan_vs_demo.py      # about a minute; runs 2 processes
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, deepspeed_launch, machine, write_results  # noqa: E402

STEPS = 12
PLAN = ["tiny", "--gpu", "cpu", "--nodes", "1", "--gpus-per-node", "2", "--json"]


def predict() -> dict:
    out = subprocess.run([sys.executable, "-m", "bigbatch", "plan", *PLAN], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)


def main() -> None:
    before = predict()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "demo"
        deepspeed_launch(ROOT / "recipes" / "tiny.py", [f"--schedule.steps={STEPS}", f"--run-dir={run_dir}"], 2,
                         29731)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    after = predict()
    times = [r["step_time_s"] for r in records if "step_time_s" in r and 2 <= r.get("step", 0) <= 10]
    measured = statistics.median(times)
    rows = []
    for name, pred in (("before the run", before), ("after the run", after)):
        p = pred["phases"][0]
        rows.append({"when": name, "predicted_step_s": p["step_time_s"], "ratio": p["step_time_s"] / measured,
                     "compute_s": p["compute_s"], "comm_s": p["comm_s"], "optimizer_s": p["optimizer_s"],
                     "device": pred["device"]["source"]})
    m = machine()
    lines = [f"# `bigbatch plan tiny --gpu cpu` against the demo's steps ({m['host']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}. Run by "
             "`bench/plan_vs_demo.py`: the demo's recipe (2 ranks, ZeRO-1, fp32, LAMB, batch 256 x 8 x 2) for "
             f"{STEPS} steps; measured: the median step time of steps 2-10 from metrics.jsonl, "
             f"{measured:.3f} s (all: {', '.join(f'{t:.2f}' for t in times)}). Goal: within 30%.", "",
             "| prediction | predicted step s | compute s | comm s | optimizer s | predicted / measured | within 30% "
             "| the cpu probe |", "|---|---:|---:|---:|---:|---:|:---:|---|"]
    for r in rows:
        lines.append(f"| {r['when']} | {r['predicted_step_s']:.3f} | {r['compute_s']:.3f} | {r['comm_s']:.4f} | "
                     f"{r['optimizer_s']:.4f} | {r['ratio']:.2f} | {'yes' if 0.7 <= r['ratio'] <= 1.3 else '**no**'}"
                     f" | {r['device']} |")
    write_results("plan_vs_demo", "\n".join(lines) + "\n",
                  {"machine": m, "measured_step_s": measured, "step_times": times, "predictions": rows})


if __name__ == "__main__":
    main()
