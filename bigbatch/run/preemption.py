"""Stopping cleanly before a time limit or a preemption, at any moment of a start: finish what is running, keep a
resumable state, write `PREEMPTED`, exit 0.

A stop is asked for by SIGUSR1 or SIGTERM reaching a rank, or by a `STOP` file in the run directory (what
`slurm/pretrain.sh` writes when SLURM's warning signal reaches the batch shell: a USR1 sent to the job steps would
kill torchrun instead). The handlers are installed as the first thing a rank does (`bigbatch.cli.main`), so a signal
during start-up (rendezvous, tokenizer training, packing, DeepSpeed's initialisation) is a request too, never the
default action that kills the rank. The handler only sets a flag: a second signal during a checkpoint write changes
nothing. The flag is looked at where every rank is at the same point (start-up's stages, each step's end, a phase
change) through one tiny all-reduce, and between the chunks of long data preparation on the writer rank, which
shares its outcome with the others.

Which `STOP` is a request for this start: a file that names a start (the template writes `<job id>.<restart count>`)
is for that start only, so one left by an earlier start is told apart and never stops a later one; an empty file
(`touch STOP`) is a request for whichever start is running or starts next. A request is never erased: only the start
that acts on it consumes it, recording it in `PREEMPTED`.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from bigbatch.config.errors import Preempted
from bigbatch.run.launch import drop_local_rank, start_id
from bigbatch.run.rundir import STOP, RunDir

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

log = logging.getLogger(__name__)
_requested: Optional[str] = None  # set by the handler, from the first moment of the process


def _handler(signum: int, frame: Any) -> None:
    global _requested
    _requested = _requested or signal.Signals(signum).name


def install_handlers() -> bool:
    """SIGUSR1 and SIGTERM become stop requests from now on; True when they were installed here (main thread).
    Installing starts with no request: until now a signal had its default action (or an earlier run's request,
    in the same process, was already acted on)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        return False  # signal handlers can only be set from the main thread
    if all(signal.getsignal(sig) is _handler for sig in SIGNALS):
        return False
    _requested = None
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    return True


def trains(argv: list[str]) -> bool:
    """Whether a `bigbatch` command line trains (the launcher's --local_rank may come first): only a training
    process turns signals into stop requests; `bigbatch plan` or `check` stay killable by SIGTERM."""
    words = drop_local_rank(list(argv))
    return bool(words) and words[0] == "train"


def restore_default_handlers() -> None:
    """For an in-process caller (tests, notebooks) after its run: signals act as usual again."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


def _stop_file_for(run_dir: Path) -> Optional[str]:
    """Whom a STOP file in `run_dir` is for: None without one; "" for this start (empty, naming this start, or
    unreadable mid-write on a network file system, where its presence is the request); else the start it names."""
    try:
        named = (run_dir / STOP).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    return "" if named in ("", start_id()) else named


def stop_file_request(run_dir: Path) -> Optional[str]:
    """The reason a STOP file in `run_dir` asks this start to stop, or None (no file, or one for another start)."""
    return f"{STOP} file" if _stop_file_for(run_dir) == "" else None


def stale_stop_file(run_dir: Path) -> Optional[str]:
    """Writer rank, at start: the name of the start a leftover STOP file was written for, if it is not this one."""
    return _stop_file_for(run_dir) or None


def local_request(run_dir: Optional[Path]) -> Optional[str]:
    """This rank's own reason to stop: a signal, or a STOP file meant for this start."""
    return _requested or (stop_file_request(run_dir) if run_dir is not None else None)


class StopRequest:
    """What every rank agrees on: whether any of them was asked to stop. `sum_across_ranks` is the run's all-reduce
    of a few numbers (`bigbatch.run.distributed.sum_across_ranks`); it is handed in so that this module, which a rank
    imports before torch, stays light."""

    def __init__(self, run_dir: Path, sum_across_ranks: Callable[[list[float]], list[float]]) -> None:
        self.run_dir = run_dir
        self.sum_across_ranks = sum_across_ranks
        self.reason: Optional[str] = None

    def agree(self, failing: bool = False) -> tuple[bool, bool]:
        """Collective, one all-reduce: (was any rank asked to stop, is `failing` true on any rank), the same on every
        rank. The loop folds its records' write check into this stop check, which it runs every step anyway."""
        self.reason = self.reason or local_request(self.run_dir)
        asked, failed = self.sum_across_ranks([1.0 if self.reason else 0.0, 1.0 if failing else 0.0])
        if asked > 0 and self.reason is None:
            self.reason = "another rank"
        return asked > 0, failed > 0

    def agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (one all-reduce; collective)."""
        return self.agree()[0]

    def raise_if_requested(self) -> None:
        """Collective: raises Preempted on every rank when any rank was asked to stop."""
        if self.agreed():
            raise Preempted(self.reason or "")


def clear_markers(run: RunDir) -> None:
    """Writer rank, at start: the previous start's outcome markers go; a STOP file stays (see the module doc)."""
    run.clear_outcome()
    stale = stale_stop_file(run.path)
    if stale is not None:
        log.warning("%s was written for start %s, not this one (%s): ignored", run.stop_file, stale, start_id())


def mark_preempted(run: RunDir, step: Optional[int], reason: str, during: str = "training") -> None:
    """Writer rank: PREEMPTED (what the SLURM template requeues on) with the step a resume continues from; the STOP
    file this start acted on is consumed with it."""
    run.mark_preempted(step, reason, during,
                       consume_stop=reason == f"{STOP} file" or stop_file_request(run.path) is not None)
