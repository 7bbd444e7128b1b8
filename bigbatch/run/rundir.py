"""The run directory: refuse to overwrite, record what ran (env.json), pick a default name.

A directory bigbatch started is always resumable, whatever moment its first start reached: the writer rank marks it
as a run (`OWNER`) before anything else is written, so a start killed outright during start-up (SIGKILL, a node
failure, an out-of-memory kill while training the tokenizer) leaves a directory that `--resume` and a requeued
SLURM job continue, not one that is refused as foreign.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from bigbatch.config import ConfigError
from bigbatch.run.launch import slurm_restart


def default_run_dir(root: str, recipe_name: str) -> Path:
    return Path(root) / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


OWNER = "bigbatch-run.json"  # written first by a start in a new directory: this directory is a bigbatch run
STOP = "STOP"  # a stop request (bigbatch.run.preemption says which start it is for)
PREEMPTED = "PREEMPTED"  # the last start ended on a stop request: the SLURM template requeues on it
DIVERGED = "DIVERGED"  # the run stopped itself (overflow policy, divergence): the sentence why; not requeued
MARKERS = (STOP, PREEMPTED)  # may be written by the SLURM template before any rank has started
RECORDS = ("recipe.json", "env.json", "ds_config.json")  # how a start was made; kept per start in starts/<n>/


@dataclass(frozen=True)
class RunDir:
    """Every path, marker file and record of one run directory: the one place their names are spelled."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)

    # -- paths --------------------------------------------------------------------------------------------------------
    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.json"

    @property
    def env_file(self) -> Path:
        return self.path / "env.json"

    @property
    def ds_config_file(self) -> Path:
        return self.path / "ds_config.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def stop_file(self) -> Path:
        return self.path / STOP

    def data(self, phase: int = 0) -> Path:
        """The packed data (and trained tokenizer) of phase `phase` (0-based)."""
        return self.path / "data" / (f"phase{phase + 1}" if phase else "")

    def log_file(self, rank: int) -> Path:
        return self.path / "logs" / f"rank{rank}.log"

    # -- what the directory holds ---------------------------------------------------------------------------------
    def holds_run(self) -> bool:
        return self.recipe_file.exists() or (self.path / OWNER).exists()

    def decide_mode(self, resume: bool, overwrite: bool) -> str:
        """'new', 'resume' or 'overwrite'; an existing run is never replaced unless --overwrite says so.

        Read-only, so every rank can call it before the writer rank touches the directory.
        """
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pass one of them.")
        if self.holds_run():
            if resume or slurm_restart() > 0:
                return "resume"
            if overwrite:
                return "overwrite"
            raise ConfigError(f"run directory {self} already holds a run; pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --run-dir.")
        if self.path.exists() and any(p.name not in MARKERS for p in self.path.iterdir()):
            if overwrite:
                return "overwrite"
            raise ConfigError(f"run directory {self} is not empty and holds no bigbatch run; choose another "
                              "--run-dir or pass --overwrite to replace its contents.")
        return "new"

    def claim(self, mode: str) -> None:
        """Writer rank only: create (or, with --overwrite, empty) the directory and mark it as a run. A STOP file
        survives --overwrite: it may be the request of this very start."""
        request = self.stop_file.read_bytes() if self.stop_file.is_file() else None
        if mode == "overwrite" and self.path.exists():
            shutil.rmtree(self.path)
        (self.path / "logs").mkdir(parents=True, exist_ok=True)
        if request is not None and not self.stop_file.exists():
            self.stop_file.write_bytes(request)
        if not (self.path / OWNER).exists():
            (self.path / OWNER).write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")

    # -- records ----------------------------------------------------------------------------------------------------
    def keep_records(self) -> Optional[Path]:
        """Writer rank, on a resume: copies the records of the previous start (recipe, environment, DeepSpeed JSON)
        to `starts/<n>/` before this start writes its own, so the run keeps how each of its starts was made. A copy,
        not a move: recipe.json marks the directory as a run, should this start fail before writing its own."""
        present = [name for name in RECORDS if (self.path / name).exists()]
        if not present:
            return None
        starts = self.path / "starts"
        target = starts / str(len(list(starts.iterdir())) + 1 if starts.is_dir() else 1)
        target.mkdir(parents=True)
        for name in present:
            shutil.copy2(self.path / name, target / name)
        return target

    def read_recipe(self) -> Optional[dict[str, Any]]:
        """The recipe tree the last start wrote; None when no start got as far as writing it."""
        try:
            return json.loads(self.recipe_file.read_text())["recipe"]
        except (OSError, ValueError, KeyError):
            return None

    def read_resolved(self) -> Optional[dict[str, Any]]:
        """What the last start resolved from its recipe (recipe.json's "resolved"); None when there is none."""
        try:
            return json.loads(self.recipe_file.read_text())["resolved"]
        except (OSError, ValueError, KeyError):
            return None

    def write_records(self, recipe: dict[str, Any], resolved: dict[str, Any], env: dict[str, Any],
                      ds_config: dict[str, Any]) -> None:
        """Writer rank: this start's recipe.json (the tree and what was resolved from it), env.json, ds_config.json."""
        for path, text in ((self.ds_config_file, json.dumps(ds_config, indent=2) + "\n"),
                           (self.recipe_file, json.dumps({"recipe": recipe, "resolved": resolved}, indent=1)),
                           (self.env_file, json.dumps(env, indent=1))):
            _write_whole(path, text)

    # -- markers ----------------------------------------------------------------------------------------------------
    def clear_outcome(self) -> None:
        """Writer rank, at start: the previous start's PREEMPTED and DIVERGED go (a STOP file stays: see
        bigbatch.run.preemption)."""
        for name in (PREEMPTED, DIVERGED):
            (self.path / name).unlink(missing_ok=True)

    def mark_preempted(self, step: Optional[int], reason: str, during: str, consume_stop: bool) -> None:
        """Writer rank: PREEMPTED with the step a resume continues from; the STOP request acted on is consumed."""
        record = {"step": step, "reason": reason, "during": during}
        (self.path / PREEMPTED).write_text(json.dumps(record) + "\n")
        if consume_stop:
            self.stop_file.unlink(missing_ok=True)

    def preempted(self) -> Optional[dict[str, Any]]:
        try:
            return json.loads((self.path / PREEMPTED).read_text())
        except (OSError, ValueError):
            return None

    def mark_diverged(self, sentence: str) -> None:
        (self.path / DIVERGED).write_text(sentence + "\n")

    def latest_checkpoint(self) -> Optional[str]:
        """The tag `checkpoints/latest` names, if any."""
        latest = self.checkpoints / "latest"
        return latest.read_text().strip() if latest.is_file() else None


def filesystem(path: Path) -> Path:
    """The mount point of the filesystem that holds (or will hold) `path`: what a storage fault's sentence names."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def _write_whole(path: Path, text: str) -> None:
    """A record written whole (a temporary file renamed) or not at all: a full disk leaves the previous one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _git(*args: str) -> str:
    """git's answer about the checkout bigbatch runs from; "" for an installed package (a wheel has no commit, and
    git run in site-packages would answer for whatever repository holds the environment)."""
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / ".git").exists():
        return ""
    try:
        out = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def environment(argv: list[str], world: int, hostnames: list[str]) -> dict[str, Any]:
    """What env.json records: code version, library versions, command line, where it ran."""
    import deepspeed
    import torch
    import transformers

    commit = _git("rev-parse", "HEAD")
    return {
        "git_commit": commit or None,
        "git_dirty": bool(_git("status", "--porcelain")) if commit else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "argv": [sys.executable, *argv],
        "hostnames": hostnames,
        "world_size": world,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": slurm_restart() if "SLURM_RESTART_COUNT" in os.environ else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
