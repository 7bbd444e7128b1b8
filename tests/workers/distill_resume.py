"""Worker for tests/test_distill.py and tests/test_compress.py: on 2 ranks, under ZeRO-1 and ZeRO-3, inside this one
launch, each run once uninterrupted and once stopped (a STOP file at the start of step 3) and resumed:
- `bigbatch train tiny_distil --distill.teacher=<teacher>` (distillation);
- `bigbatch train tiny --model.init_from=<pruned> --model.hold_zeros=true` (the recovery `bigbatch compress --recover`
  runs), with, for every checkpoint, whether each weight that is zero in <pruned> is still exactly zero.
Rank 0 writes the runs' metrics records and those findings to one JSON file the test reads.

    deepspeed --num_gpus 2 tests/workers/distill_resume.py <teacher> <corpus> <root> <out> <pruned>
"""

import json
import os
import sys
from pathlib import Path

from bigbatch.cli import main
from bigbatch.run import faults
from bigbatch.run.metrics import read_metrics

SMALL = ["--schedule.steps=4", "--batch.global_batch=64", "--batch.micro_batch=16", "--run.eval_every=2",
         "--data.eval_samples=64", "--checkpoint.every_steps=2"]


def stopped_and_resumed(args):
    """Exit codes of: the uninterrupted run, the run stopped at step 3, its resume."""
    codes = [main(args("plain"))]
    faults.reset()
    os.environ[faults.ENV] = "step3:stop"
    codes.append(main(args("stopped")))
    del os.environ[faults.ENV]
    faults.reset()
    codes.append(main([*args("stopped"), "--resume"]))
    return codes


def zeros_held(pruned, run_dir):
    """Per checkpoint: (weights held at zero, of them still exactly zero, weights that moved in training)."""
    import transformers

    from bigbatch.models.compression import prunable_linears
    from bigbatch.run.export import consolidate

    start = transformers.AutoModelForMaskedLM.from_pretrained(pruned)
    out = {}
    for tag in sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step")):
        saved, held, still, moved = consolidate(tag), 0, 0, 0
        for name, m in prunable_linears(start):
            w0, w = m.weight.detach(), saved[f"hf.{name}.weight"]
            held += int((w0 == 0).sum())
            still += int((w[w0 == 0] == 0).sum())
            moved += int((w[w0 != 0] != w0[w0 != 0]).sum())
        out[tag.name] = [held, still, moved]
    return out


if __name__ == "__main__":
    teacher, corpus, root, out, pruned = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    root, results = Path(root), {}
    for stage in (1, 3):
        def distil(name):
            return ["train", "tiny_distil", f"--distill.teacher={teacher}", f"--data.sources={corpus}",
                    "--run-dir", str(root / f"{name}{stage}"), f"--deepspeed.configs=zero{stage}.json,fp32.json",
                    *SMALL]

        def recover(name):
            return ["train", "tiny", f"--model.init_from={pruned}", "--model.hold_zeros=true",
                    f"--data.tokenizer={Path(teacher) / 'data' / 'tokenizer.model'}", "--data.vocab_size=400",
                    f"--data.sources={corpus}", "--run-dir", str(root / f"recover-{name}{stage}"),
                    f"--deepspeed.configs=zero{stage}.json,fp32.json", *SMALL]

        codes = stopped_and_resumed(distil)
        results[stage] = {"codes": codes, **{name: read_metrics(root / f"{name}{stage}" / "metrics.jsonl")
                                             for name in ("plain", "stopped")}}
        codes = stopped_and_resumed(recover)
        results[f"recover{stage}"] = {"codes": codes, **{
            name: read_metrics(root / f"recover-{name}{stage}" / "metrics.jsonl") for name in ("plain", "stopped")}}
        if int(os.environ.get("RANK", "0")) == 0:
            results[f"recover{stage}"]["zeros"] = {
                name: zeros_held(pruned, root / f"recover-{name}{stage}") for name in ("plain", "stopped")}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(results))
