"""metrics.jsonl (one JSON object a line), DeepSpeed's monitors, and loss.png."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

from bigbatch.run.rundir import RunDir

log = logging.getLogger("bigbatch")


class RankLog(logging.FileHandler):
    """A rank's log file. A line it cannot write (a full disk) is dropped without logging's "--- Logging error ---"
    traceback on stderr: the run's own writes meet the same fault and stop it with one sentence."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def say(message: str) -> None:
    """The writer rank's word to the user: on stdout and in its log file."""
    log.info(message)
    print(message, flush=True)

class MetricsLog:
    """Appends records to metrics.jsonl (writer rank) and forwards scalars to DeepSpeed's monitors when enabled."""

    def __init__(self, path: Path, monitor: Any = None, enabled: bool = True) -> None:
        self.path, self.monitor, self.enabled = path, monitor, enabled
        self.failed: Optional[str] = None  # why a write failed; the loop stops every rank on it (`Trainer.fit`)

    def write(self, record: dict[str, Any]) -> None:
        """Appends one whole line, or nothing: a write that fails (a full disk) is cut back to the last whole line,
        and no later record is written, so the file never has a gap or a torn line."""
        if not self.enabled or self.failed:
            return
        line = (json.dumps(record) + "\n").encode()
        try:
            with self.path.open("ab", buffering=0) as f:  # unbuffered: each write is the system call, its error seen
                size = f.tell()
                try:
                    while line:  # a raw write may write part of the line and return its count
                        line = line[f.write(line):]
                except OSError:
                    f.truncate(size)
                    raise
        except OSError as err:
            self.failed = f"writing {self.path} failed at step {record.get('step')} ({err.strerror or err})"
            return
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            x = record.get("samples", record.get("step", 0))
            events = [(f"bigbatch/{k}", float(v), x) for k, v in record.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "samples")]
            self.monitor.write_events(events)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records; a last line cut short by a kill mid-write is left out (a resume records that step again)."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    try:
        records += [json.loads(line) for line in lines[-1:]]
    except ValueError:
        if text.endswith("\n"):  # a whole line that does not parse is not a torn write
            raise
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keeps the records up to `step` (a resume from that step's checkpoint records the later steps again)."""
    records = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def plot_loss(run: RunDir) -> None:
    """loss.png: train and eval loss against samples, skipped (overflow) steps marked; below it, when estimated, the
    gradient noise scale (the critical batch) beside the global batch, and the adaptive batch's changes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run.metrics_file)
    train = [(r["samples"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["samples"], r["eval_loss"]) for r in records if "eval_loss" in r]
    skipped = [r["samples"] for r in records if r.get("skipped_this_step")]
    noise = [(r["samples"], r["noise_scale"], r["global_batch"]) for r in records if r.get("noise_scale", 0) > 0]
    fig, axes = plt.subplots(2 if noise else 1, 1, figsize=(7, 6.4 if noise else 4.2), dpi=110, sharex=True,
                             squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.2, ms=3)
    for i, s in enumerate(skipped):
        ax.axvline(s, color="red", alpha=0.3, lw=0.8, label="skipped step" if i == 0 else None)
    ax.set_ylabel("loss")
    ax.set_title(run.path.name)
    ax.grid(alpha=0.3)
    ax.legend()
    if noise:
        low = axes[1][0]
        x, b_simple, batch = zip(*noise)
        low.plot(x, b_simple, lw=1.2, label="gradient noise scale B_simple (critical batch)")
        low.plot(x, batch, "--", lw=1.0, label="global batch")
        changes = [(r["samples"], r["decision_new_batch"]) for r in records
                   if r.get("decision_new_batch", 0) != r.get("decision_old_batch", 0)]
        if changes:
            low.plot(*zip(*changes), "^", ms=5, label="adaptive batch decision")
        low.set_yscale("log")
        low.set_ylabel("samples")
        low.grid(alpha=0.3)
        low.legend()
    axes[-1][0].set_xlabel("samples")
    fig.tight_layout()
    tmp = run.loss_plot.with_name(run.loss_plot.name + ".tmp")
    try:
        fig.savefig(tmp, format="png")
        tmp.replace(run.loss_plot)
    except OSError as err:  # a picture of metrics.jsonl, drawn again at the next evaluation: a full disk skips it
        tmp.unlink(missing_ok=True)
        log.warning("loss.png not updated: %s", err)
    finally:
        plt.close(fig)
