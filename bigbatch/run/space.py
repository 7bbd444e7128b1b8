"""What a run directory will need on its filesystem, checked before any work: a run refused here has written nothing,
where a run that meets a full disk later stops with its last complete checkpoint (bigbatch.run.checkpoint.save).

The estimate is the directory at its fullest: the packed data, `checkpoint.keep_last` complete checkpoints plus the
one being written (each the planner's saved model and optimizer states, bigbatch.plan.memory), and the records.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from bigbatch.config.errors import StorageFault
from bigbatch.plan.memory import model_size, model_state_bytes
from bigbatch.resolve import ResolvedRun
from bigbatch.run.rundir import RunDir, filesystem

# Measured on a tiny run (DeepSpeed 0.19, torch's zip format): a checkpoint file holds its tensors plus ~2% of
# pickled names and zip headers, and every checkpoint directory gets DeepSpeed's two ~40 KB recovery scripts once.
FORMAT_OVERHEAD = 0.05
PER_CHECKPOINT = 64 << 10
SCRIPTS = 64 << 10
PER_RECORD = 1 << 10  # one metrics.jsonl line with trust ratios, at most
RECORDS = 256 << 10  # recipe.json, env.json, ds_config.json, logs, loss.png and the temporary file it is renamed from


@dataclass(frozen=True)
class Estimate:
    """Bytes of the run directory at its fullest; `data` is None until the data is packed (then it is known)."""

    checkpoint: int  # one checkpoint
    checkpoints: int  # the most held at once
    records: int
    data: Optional[int]

    @property
    def total(self) -> int:
        return self.checkpoint * self.checkpoints + self.records + (self.data or 0)


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _existing(path: Path) -> Path:
    """The directory itself or its nearest existing parent: where its files will land."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def estimate(run: ResolvedRun, run_dir: RunDir) -> Estimate:
    """The run directory's bytes at its fullest, for this recipe on `run.world` ranks."""
    r = run.recipe
    n_params, _, _ = model_size(r.model, r.data.vocab_size)
    # every rank's optimizer partition together is the whole optimizer state: the states of one rank at world 1
    states = model_state_bytes(n_params, run.ds.stage, run.ds.precision, r.optimizer.type.lower(), 1)
    one = int((states["params"] + states["optimizer"]) * (1 + FORMAT_OVERHEAD)) + PER_CHECKPOINT
    every, total_steps = r.checkpoint.every_steps, len(run.steps)
    saves = (total_steps - 1) // every + 1 if every else 1  # the end's and every `every_steps` before it
    data_dir = run_dir.data()
    data = _bytes_under(data_dir) if (data_dir / "data.json").is_file() else None  # every phase's, under it
    return Estimate(checkpoint=one, checkpoints=min(r.checkpoint.keep_last + 1, saves),
                    records=RECORDS + SCRIPTS + PER_RECORD * (total_steps + 1), data=data)


def refuse_unless_room(run: ResolvedRun, run_dir: RunDir) -> Optional[str]:
    """Before any work: StorageFault (one sentence) when the run directory cannot be written or its filesystem has
    less free space than the run still needs; else None, or a note where the estimate leaves the data out."""
    where = _existing(run_dir.path)
    if not os.access(where, os.W_OK | os.X_OK):
        raise StorageFault(f"run directory {run_dir} cannot be written ({where} is read-only or not writable by this "
                           "user); nothing was written: choose another --run-dir or fix its permissions")
    need = estimate(run, run_dir)
    still = max(0, need.total - _bytes_under(run_dir.path))  # what a resume finds is already there
    free = shutil.disk_usage(where).free
    if still > free:
        raise StorageFault(f"run directory {run_dir} needs about {still:,} more bytes ({need.checkpoints} "
                           f"checkpoints of {need.checkpoint:,}, records{', data' if need.data else ''}) but its "
                           f"filesystem ({filesystem(where)}) has {free:,} bytes free; nothing was written: free "
                           "space, lower --checkpoint.keep_last, or choose another --run-dir")
    if need.data is None:
        return (f"note: {still:,} bytes of checkpoints and records fit in the {free:,} free on {where}; the packed "
                "data is not counted (its size is known once tokenized), and packing stops with one sentence if it "
                "does not fit")
    return None


def record_failed(run_dir: RunDir, failed: str) -> str:
    """The sentence for a record the writer rank could not write (metrics.jsonl was cut back to its last whole line)."""
    latest = run_dir.latest_checkpoint()
    kept = f"the last complete checkpoint is {run_dir.checkpoints / latest}" if latest else "no checkpoint is complete"
    return (f"{failed}; its filesystem ({filesystem(run_dir.path)}) has "
            f"{shutil.disk_usage(_existing(run_dir.path)).free:,} bytes free and a record needs up to {PER_RECORD:,}; "
            f"{kept}: free space, then --resume")


def written_by_writer(write: Callable[[], None], is_writer: bool, share: Callable[[Any], Any], what: str,
                      run_dir: RunDir) -> None:
    """The writer rank runs `write()` (records only it writes); a write that fails raises StorageFault on every rank,
    whose `share` (a broadcast) hands them the writer's outcome instead of leaving them waiting."""
    fault = None
    if is_writer:
        try:
            write()
        except OSError as err:
            fault = StorageFault(record_failed(run_dir, f"writing {what} failed ({err.strerror or err})"))
    fault = share(fault)
    if fault is not None:
        raise fault
