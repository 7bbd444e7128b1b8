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
from pathlib import Path
from typing import Any, Optional

from bigbatch.config import ConfigError


def default_run_dir(root: str, recipe_name: str) -> Path:
    return Path(root) / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def slurm_restart() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


OWNER = "bigbatch-run.json"  # written first by a start in a new directory: this directory is a bigbatch run
MARKERS = ("STOP", "PREEMPTED")  # may be written by the SLURM template before any rank has started


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "recipe.json").exists() or (run_dir / OWNER).exists()


def decide_mode(run_dir: Path, resume: bool, overwrite: bool) -> str:
    """'new', 'resume' or 'overwrite'; an existing run is never replaced unless --overwrite says so.

    Read-only, so every rank can call it before the writer rank touches the directory.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them.")
    if holds_run(run_dir):
        if resume or slurm_restart() > 0:
            return "resume"
        if overwrite:
            return "overwrite"
        raise ConfigError(f"run directory {run_dir} already holds a run; pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --run-dir.")
    if run_dir.exists() and any(p.name not in MARKERS for p in run_dir.iterdir()):
        if overwrite:
            return "overwrite"
        raise ConfigError(f"run directory {run_dir} is not empty and holds no bigbatch run; choose another --run-dir "
                          "or pass --overwrite to replace its contents.")
    return "new"


def prepare(run_dir: Path, mode: str) -> None:
    """Writer rank only: create (or, with --overwrite, empty) the directory and mark it as a run. A STOP file
    survives --overwrite: it may be the request of this very start."""
    stop = run_dir / "STOP"
    request = stop.read_bytes() if stop.is_file() else None
    if mode == "overwrite" and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if request is not None and not stop.exists():
        stop.write_bytes(request)
    (run_dir / "logs").mkdir(exist_ok=True)
    if not (run_dir / OWNER).exists():
        (run_dir / OWNER).write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


RECORDS = ("recipe.json", "env.json", "ds_config.json")


def keep_records(run_dir: Path) -> Optional[Path]:
    """Writer rank, on a resume: copies the records of the previous start (recipe, environment, DeepSpeed JSON) to
    `starts/<n>/` before this start writes its own, so the run keeps how each of its starts was made. A copy, not a
    move: recipe.json is what marks the directory as a run, should this start fail before writing its own."""
    present = [name for name in RECORDS if (run_dir / name).exists()]
    if not present:
        return None
    starts = run_dir / "starts"
    target = starts / str(len(list(starts.iterdir())) + 1 if starts.is_dir() else 1)
    target.mkdir(parents=True)
    for name in present:
        shutil.copy2(run_dir / name, target / name)
    return target


def _git(*args: str) -> str:
    """git's answer about the checkout bigbatch runs from; "" for an installed package (a wheel has no commit, and
    git run in site-packages would answer for whatever repository holds the environment)."""
    checkout = Path(__file__).resolve().parent.parent
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
