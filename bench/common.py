"""What every benchmark reports beside its table: the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def deepspeed_launch(script: Path, argv: list[str], ranks: int, port: int,
                     on_line: Optional[Callable[[str], None]] = None,
                     env_extra: Optional[dict[str, str]] = None) -> None:
    """`deepspeed --num_gpus ranks script argv` from the repository root, each rank with an equal share of the cores;
    every output line goes to `on_line`, the last 60 into the error when it fails."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(max(len(os.sched_getaffinity(0)) // ranks, 1))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
           str(script), *argv]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line)
        if on_line:
            on_line(line)
    status = proc.wait()
    # DeepSpeed's CPU shared-memory all-reduce (ops/csrc/cpu/comm/shm.cpp) never unlinks its per-rank buffers, named
    # after the master address and port: without this, every launch leaves them in /dev/shm, in RAM, until reboot.
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
        leftover.unlink(missing_ok=True)
    if status:
        raise SystemExit(f"{' '.join(cmd)} exited {status}:\n{''.join(log[-60:])}")


def write_results(name: str, text: str, figures: dict[str, Any], out: Optional[Path] = None) -> Path:
    """Print the table, write it to results/<name>-<host>.md (or `out`) and its figures beside it as JSON."""
    print(text)
    out = out or RESULTS / f"{name}-{socket.gethostname()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")
    print(f"wrote {out}")
    return out
