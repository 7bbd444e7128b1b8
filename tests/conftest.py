"""Shared helpers: launching real multi-rank DeepSpeed runs on the CPU (gloo) and reading their result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "tests" / "workers"


def launch_env() -> dict[str, str]:
    # In-process tests leave this process's rendezvous (RANK=0, WORLD_SIZE=1, MASTER_PORT of a live store) in
    # os.environ; a launched job must not inherit it.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # 2 cores shared by every rank
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def deepspeed_launch(args: list[str], world: int, timeout: int = 900, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus <world> <args>` on the CPU accelerator; fails the test with the output on error."""
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(world), "--master_port", str(_free_port()), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A few hundred paragraphs of the built-in English text, as a local file source."""
    from bigbatch.data.corpus import python_docs

    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(d.replace("\n\n", "\n") for d in python_docs()[:600]))
    return path
