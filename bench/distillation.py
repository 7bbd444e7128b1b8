"""Distillation (issue 22): does a student learn more from a teacher than from the labels alone, at the same steps?

    .venv/bin/python bench/distillation.py      # writes bench/results/distillation-<host>.{md,json}

On the built-in English text, by bigbatch's own trainer in this process (world 1, LAMB, ZeRO-1, fp32):
- the teacher: a larger tiny BERT (width 128, 4 layers, MLP 256), trained first;
- students of the demo's size (width 64, 2 layers, MLP 128), from scratch (`tiny`) and distilled (`tiny_distil`,
  init=none: the widths differ), with the same steps, samples, batch and LR rule, for each seed;
- whether starting from the teacher's layers helps: students of the teacher's width (128, 2 layers) distilled from
  scratch (init=none) and from teacher layers 0 and 2 (init=teacher_layers), for each seed.
Every run uses the teacher's tokenizer and is scored on the same held-out split (its final eval_loss: the student's own
MLM loss). Runs live in --work; a run whose metrics say it finished is reused.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bigbatch.cli import main as bigbatch  # noqa: E402
from bigbatch.run.metrics import read_metrics  # noqa: E402

from common import RESULTS, machine  # noqa: E402

BATCH = ["--batch.global_batch=1024", "--batch.micro_batch=256", "--data.vocab_size=2000"]
TEACHER = ["--model.hidden_size=128", "--model.num_layers=4", "--model.num_heads=4", "--model.intermediate_size=256"]
WIDE_STUDENT = ["--model.hidden_size=128", "--model.num_layers=2", "--model.num_heads=4",
                "--model.intermediate_size=256"]


def final_eval(run: Path) -> float:
    return [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r][-1]["eval_loss"]


def train(run: Path, recipe: str, steps: int, extra: list[str]) -> float:
    done = run / "metrics.jsonl"
    if not (done.is_file() and any(r.get("step") == steps and "eval_loss" in r for r in read_metrics(done))):
        code = bigbatch(["train", recipe, "--run-dir", str(run), "--overwrite", f"--schedule.steps={steps}",
                         f"--run.eval_every={steps}", *BATCH, *extra])
        if code != 0:
            raise SystemExit(f"{recipe} {' '.join(extra)} exited {code}")
    return final_eval(run)


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "spread": (max(values) - min(values)) / 2, "n": len(values)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, default=Path("/tmp/bigbatch-bench-distillation"))
    p.add_argument("--teacher-steps", type=int, default=40)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    teacher = args.work / "teacher"
    teacher_loss = train(teacher, "tiny", args.teacher_steps, TEACHER)
    tok = [f"--data.tokenizer={teacher / 'data' / 'tokenizer.model'}"]
    arms: dict[str, list[float]] = {k: [] for k in ("scratch", "distilled", "wide_distilled_init_none",
                                                     "wide_distilled_init_teacher_layers")}
    for seed in range(1, args.seeds + 1):
        s = [f"--run.seed={seed}"]
        arms["scratch"].append(train(args.work / f"scratch-{seed}", "tiny", args.steps, [*s, *tok]))
        distil = [*s, f"--distill.teacher={teacher}", "--model.num_layers=2", "--distill.alpha_hidden=0"]
        arms["distilled"].append(train(args.work / f"distilled-{seed}", "tiny_distil", args.steps,
                                       [*distil, "--distill.init=none"]))
        for init in ("none", "teacher_layers"):
            arms[f"wide_distilled_init_{init}"].append(train(
                args.work / f"wide-{init}-{seed}", "tiny_distil", args.steps,
                [*s, f"--distill.teacher={teacher}", *WIDE_STUDENT, f"--distill.init={init}"]))
    write(args, teacher_loss, arms)


def write(args: Any, teacher_loss: float, arms: dict[str, list[float]]) -> None:
    stats = {k: summary(v) for k, v in arms.items()}
    diffs = [d - s for d, s in zip(arms["distilled"], arms["scratch"])]
    init = [t - n for t, n in zip(arms["wide_distilled_init_teacher_layers"], arms["wide_distilled_init_none"])]
    result = {"machine": machine(), "teacher_eval_loss": teacher_loss, "arms": arms, "stats": stats,
              "distilled_minus_scratch": summary(diffs), "teacher_layers_minus_none": summary(init),
              "settings": {"teacher_steps": args.teacher_steps, "steps": args.steps, "batch": BATCH,
                           "teacher": TEACHER, "wide_student": WIDE_STUDENT}}
    host = socket.gethostname()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"distillation-{host}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Distillation: held-out MLM loss ({machine()['cpu']}, {machine()['cores']} cores)", "",
             f"Teacher (width 128, 4 layers, {args.teacher_steps} steps): {teacher_loss:.4f}. Students: "
             f"{args.steps} steps at batch 1024, LAMB (sqrt rule), {args.seeds} seeds; mean ± half-range.", "",
             "| student | held-out loss |", "| --- | --- |"]
    names = {"scratch": "demo size (64 x 2), from scratch", "distilled": "demo size (64 x 2), distilled",
             "wide_distilled_init_none": "teacher width (128 x 2), distilled, init none",
             "wide_distilled_init_teacher_layers": "teacher width (128 x 2), distilled, from teacher layers 0, 2"}
    lines += [f"| {names[k]} | {v['mean']:.4f} ± {v['spread']:.4f} |" for k, v in stats.items()]
    d, i = summary(diffs), summary(init)
    lines += ["", f"Distilled minus scratch (same seed): {d['mean']:+.4f} ± {d['spread']:.4f}.",
              f"From teacher layers minus init none (same seed): {i['mean']:+.4f} ± {i['spread']:.4f}."]
    (RESULTS / f"distillation-{host}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
