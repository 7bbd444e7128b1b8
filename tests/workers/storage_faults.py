"""Worker for tests/test_storage.py, launched once on 2 ranks: the storage faults that need two ranks, one after
the other in the same processes, each `bigbatch train` called in-process for its exit code.

1. the uninterrupted run on an ordinary disk (the reference);
2. the same run in a tmpfs (mounted by the test) that rank 1 fills after step 2's record: the save of step 2 fails,
   both ranks agree and exit 4; rank 0 records what the checkpoint directory holds, frees the space and remounts;
3. `--resume`: continues from step 1 to the end;
4. one flipped byte in rank 1's optimizer file of the newest checkpoint, then `--resume`: falls back to the
   previous checkpoint and names the damaged one;
5. every checkpoint's manifest damaged, then `--resume`: exit 4 on both ranks, nothing deleted.

argv: <results.json> <reference dir> <tmpfs mount> <corpus file>. Rank 0 writes the results.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

from bigbatch.cli import main
from bigbatch.run import checkpoint, faults
from bigbatch.run.launch import drop_local_rank
from bigbatch.run.metrics import read_metrics

SMALL = ["--schedule.steps=4", "--batch.global_batch=64", "--batch.micro_batch=16", "--run.eval_every=2",
         "--data.vocab_size=400", "--data.eval_samples=64", "--checkpoint.every_steps=1", "--checkpoint.keep_last=2"]


def train(run_dir: Path, corpus: str, *extra: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `bigbatch train tiny` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", "tiny", "--run-dir", str(run_dir), f"--data.sources={corpus}", *SMALL, *extra])
    return code, out.getvalue(), err.getvalue()


def losses(run_dir: Path) -> list[list[float]]:
    return [[r["step"], r["loss"]] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def main_(results: Path, reference: Path, mount: Path, corpus: str) -> None:
    out: dict = {}
    rank = int(os.environ["RANK"])
    out["reference"] = train(reference, corpus)[0]
    run = mount / "run"
    ckpts = run / "checkpoints"
    os.environ[faults.ENV] = "step2:fill:1"
    out["full"] = train(run, corpus)
    del os.environ[faults.ENV]
    dist.barrier()
    if rank == 0:
        out["after_full"] = {"listing": sorted(p.name for p in ckpts.iterdir()),
                             "latest": (ckpts / "latest").read_text(),
                             "verified": checkpoint.verify(ckpts / "step00000001")}
        (mount / faults.FILL).unlink()
        subprocess.run(["mount", "-o", "remount,size=64M", str(mount)], check=True)
    dist.barrier()
    out["resume"] = train(run, corpus, "--resume")[0]
    out["resume_losses"] = losses(run)
    if rank == 0:
        damaged = ckpts / "step00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        data = bytearray(damaged.read_bytes())
        data[len(data) // 2] ^= 0xFF
        damaged.write_bytes(bytes(data))
    dist.barrier()
    out["damaged"] = train(run, corpus, "--resume")
    out["damaged_losses"] = losses(run)
    if rank == 0:
        for tag in checkpoint.list_tags(ckpts):
            (ckpts / tag / checkpoint.MANIFEST).write_text("{}")
        out["before_all_damaged"] = listing(ckpts)
    dist.barrier()
    out["all_damaged"] = train(run, corpus, "--resume")
    dist.barrier()
    if rank == 0:
        out["after_all_damaged"] = listing(ckpts)
    out["reference_losses"] = losses(reference)
    gathered = [None, None]
    dist.all_gather_object(gathered, out)
    if rank == 0:
        results.write_text(json.dumps(gathered))


if __name__ == "__main__":
    args = drop_local_rank(sys.argv[1:])  # the deepspeed launcher adds --local_rank
    main_(Path(args[0]), Path(args[1]), Path(args[2]), args[3])
