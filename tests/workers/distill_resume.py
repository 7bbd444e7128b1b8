"""Worker for tests/test_distill.py: `bigbatch train tiny_distil` on 2 ranks under ZeRO-1 and ZeRO-3, each run once
uninterrupted and once stopped (a STOP file at the start of step 3) and resumed, inside this one launch. Rank 0 writes
every run's metrics records (step, loss and the distillation terms) to one JSON file the test reads.

    python -m deepspeed.launcher.runner --num_gpus 2 tests/workers/distill_resume.py <teacher> <corpus> <root> <out>
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

if __name__ == "__main__":
    teacher, corpus, root, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    results = {}
    for stage in (1, 3):
        def args(name):
            return ["train", "tiny_distil", f"--distill.teacher={teacher}", f"--data.sources={corpus}",
                    "--run-dir", str(Path(root) / name), f"--deepspeed.configs=zero{stage}.json,fp32.json", *SMALL]

        codes = [main(args(f"plain{stage}"))]
        faults.reset()
        os.environ[faults.ENV] = "step3:stop"
        codes.append(main(args(f"stopped{stage}")))
        del os.environ[faults.ENV]
        faults.reset()
        codes.append(main([*args(f"stopped{stage}"), "--resume"]))
        results[stage] = {"codes": codes, **{name: read_metrics(Path(root) / f"{name}{stage}" / "metrics.jsonl")
                                             for name in ("plain", "stopped")}}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(results))
