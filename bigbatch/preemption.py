"""Stopping cleanly before a time limit or a preemption: finish the step, checkpoint, say so, exit 0.

A stop is asked for by SIGUSR1 or SIGTERM reaching a rank, or by a `STOP` file in the run directory (what
`slurm/pretrain.sh` writes when SLURM's warning signal reaches the batch shell: a USR1 sent to the job steps would
kill torchrun instead). Ranks agree through one tiny all-reduce per step, so all of them finish the same step and
save together. The handler only sets a flag: a second signal during the checkpoint write changes nothing.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from bigbatch import distributed

STOP = "STOP"
PREEMPTED = "PREEMPTED"


class StopRequest:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.reason: Optional[str] = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.reason = signal.Signals(signum).name

    def _local(self) -> bool:
        if self.reason is None and (self.run_dir / STOP).exists():
            self.reason = f"{STOP} file"
        return self.reason is not None

    def agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (one all-reduce)."""
        local = 1.0 if self._local() else 0.0
        # on the accelerator's device, through distributed.sum_across_ranks: NCCL reduces no CPU tensor
        anyone = distributed.sum_across_ranks([local])[0] > 0 if dist.is_initialized() else bool(local)
        if anyone and self.reason is None:
            self.reason = "another rank"
        return anyone


def clear_markers(run_dir: Path) -> None:
    """Writer rank, at start: a new start is not stopped by the previous one's request."""
    from bigbatch.overflow import DIVERGED

    for name in (STOP, PREEMPTED, DIVERGED):
        (run_dir / name).unlink(missing_ok=True)


def mark_preempted(run_dir: Path, step: int, reason: str) -> None:
    (run_dir / PREEMPTED).write_text(json.dumps({"step": step, "reason": reason}) + "\n")
