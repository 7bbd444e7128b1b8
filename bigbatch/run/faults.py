"""Faults at named moments of a run: how tests (and anyone checking a deployment) put a real signal, a kill or a STOP
file at an exact point of start-up, data preparation, evaluation, a checkpoint write or a phase change.

`BIGBATCH_FAULT="<moment>:<action>[:<rank>][,...]"` in the environment arms them; unset, `at()` costs one dict
lookup. Moments are the names passed to `at()` below (`startup`, `tokenizer`, `pack`, `eval`, `checkpoint`,
`phase`, `step<N>`). Actions: `usr1` and `term` send that signal to this process, `kill` sends SIGKILL to it,
`stop` writes an empty STOP file into the run directory, `fill` fills the run directory's filesystem
(a file `bigbatch-fill` beside it). Each armed fault fires once per process, on every rank or
on the rank given. A fault changes nothing else: what follows is the run's own handling of a real signal or kill.
`on_step` is the in-process counterpart for numerical faults: a callback at the start of every step.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable, Optional

from bigbatch.run.rundir import RunDir

ENV = "BIGBATCH_FAULT"
FILL = "bigbatch-fill"  # the `fill` action's file, beside the run directory: a test frees the space by removing it
ACTIONS = {"usr1": signal.SIGUSR1, "term": signal.SIGTERM, "kill": signal.SIGKILL}
_fired: set[str] = set()


def _armed() -> dict[str, tuple[str, Optional[int]]]:
    spec = os.environ.get(ENV, "")
    out: dict[str, tuple[str, Optional[int]]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        moment, action, *rank = item.split(":")
        if action not in ACTIONS and action not in ("stop", "fill"):
            raise ValueError(f"{ENV}={spec!r}: action {action!r} is not one of "
                             f"{', '.join([*ACTIONS, 'stop', 'fill'])}.")
        out[moment] = (action, int(rank[0]) if rank else None)
    return out


def at(moment: str, run_dir: Optional[Path] = None) -> None:
    """The run reached `moment`: fire the fault armed for it, if any (once per process)."""
    if ENV not in os.environ or moment in _fired:
        return
    armed = _armed().get(moment)
    if armed is None:
        return
    action, rank = armed
    if rank is not None and rank != int(os.environ.get("RANK", "0")):
        return
    _fired.add(moment)
    if action == "stop":
        if run_dir is not None:
            RunDir(run_dir).stop_file.write_text("")
        return
    if action == "fill":
        if run_dir is not None:
            _fill(run_dir.parent / FILL)
        return
    os.kill(os.getpid(), ACTIONS[action])


def _fill(path: Path) -> None:
    """Writes zeros into `path` until its filesystem is full: what another job filling a shared disk does."""
    block = bytes(1 << 16)
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError:
            pass
    # the last partial pages too: a full disk, not one with a few kilobytes left
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass


def reset() -> None:
    """Arms every moment again (an in-process caller that runs several times)."""
    _fired.clear()


_step_callbacks: list[Callable[[int, Any], None]] = []


def on_step(callback: Callable[[int, Any], None]) -> Callable[[], None]:
    """Calls `callback(step, model)` as each training step starts (1-based step, the engine's module): how a test
    corrupts a gradient, a weight or a loss at a chosen step without patching the trainer. Returns its remover."""
    _step_callbacks.append(callback)
    return lambda: _step_callbacks.remove(callback)


def step_started(step: int, model: Any) -> None:
    for callback in list(_step_callbacks):
        callback(step, model)
