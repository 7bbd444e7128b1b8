"""One 2-rank run interrupted again and again from outside, as a cluster does it, and resumed after each: a STOP
file, SIGUSR1 and SIGTERM to the ranks themselves (DeepSpeed's launcher turns a SIGTERM it receives into SIGKILL of
its ranks, so a clean stop is asked of the ranks), and SIGKILL of the whole launch. Each clean stop must end every
rank with exit 0 and PREEMPTED; after the last resume, every step is logged once with the uninterrupted run's
losses bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bigbatch.run.metrics import read_metrics
from bigbatch.run.rundir import PREEMPTED, STOP

from conftest import ROOT, _free_port, deepspeed_launch, launch_env

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

ARGS = ["--schedule.steps=8", "--batch.global_batch=64", "--batch.micro_batch=8", "--checkpoint.every_steps=2",
        "--checkpoint.keep_last=3", "--data.vocab_size=400", "--data.eval_samples=64", "--run.eval_every=3",
        "--deepspeed.configs=zero2.json,fp32.json"]


def _args(run_dir: Path, corpus: Path) -> list[str]:
    return ["--module", "bigbatch", "train", "tiny", "--run-dir", str(run_dir), f"--data.sources={corpus}", *ARGS]


def _ranks(root: int) -> list[int]:
    """The pids of the training ranks below the launcher `root` (processes running `-m bigbatch`)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            todo.append(child)
            try:
                cmd = (Path("/proc") / str(child) / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"bigbatch" in cmd and b"-m" in cmd and not any(b"deepspeed.launcher" in c for c in cmd):
                found.append(child)
    return found


def _launch(run_dir: Path, corpus: Path, resume: bool, port: int) -> subprocess.Popen:
    """The deepspeed launcher in a session of its own, so a kill can take the whole launch."""
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(port), *_args(run_dir, corpus)]
    return subprocess.Popen([*cmd, *(["--resume"] if resume else [])], cwd=ROOT, env=launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(proc: subprocess.Popen, seen: list[str], predicate, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "".join(seen)[-4000:]
        assert time.time() < deadline, "".join(seen)[-4000:]
        time.sleep(0.02)


def _interrupt(run_dir: Path, corpus: Path, how: str, when) -> tuple[int, str]:
    """One start, interrupted `how` once `when(run_dir, ranks)` holds; returns its exit code and output."""
    port = _free_port()
    proc = _launch(run_dir, corpus, resume=True, port=port)  # --resume on a missing or empty directory starts it
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    _wait_for(proc, seen, lambda: len(_ranks(proc.pid)) == 2 and when(run_dir, seen))
    ranks = _ranks(proc.pid)
    if how == "stop":
        (run_dir / STOP).write_text("")
    elif how == "kill":
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        # killed ranks cannot unlink DeepSpeed's CPU all-reduce buffers (66 MB each in /dev/shm, named by the port)
        for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            buffer.unlink(missing_ok=True)
    else:
        for pid in ranks:
            os.kill(pid, {"usr1": signal.SIGUSR1, "term": signal.SIGTERM}[how])
    code = proc.wait(timeout=600)
    reader.join(timeout=10)
    return code, "".join(seen)


def _metrics_step(run_dir: Path) -> int:
    return max((r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r), default=0)


def test_a_run_interrupted_every_way_resumes_to_the_uninterrupted_losses(tmp_path, corpus_file):
    plain = tmp_path / "plain"
    deepspeed_launch(_args(plain, corpus_file), world=2)
    run = tmp_path / "run"
    # (how, when): in start-up before any data exists, during data preparation, mid-training, right after a
    # checkpoint, and a kill of everything while training
    moments = [
        # once both ranks have run for a moment: imports, rendezvous. (Between a rank's exec and the first line of
        # `python -m bigbatch`, about 30 ms of interpreter start-up, no Python program can handle a signal yet.)
        ("usr1", lambda d, out: time.sleep(1.0) is None),
        ("stop", lambda d, out: any("tokenizing and packing" in line or "training a" in line for line in out)),
        ("term", lambda d, out: _metrics_step(d) >= 3),
        ("kill", lambda d, out: _metrics_step(d) >= 5),
        ("usr1", lambda d, out: (d / "checkpoints" / "latest").is_file()
         and (d / "checkpoints" / "latest").read_text().strip() == "step00000006"),
    ]
    for i, (how, when) in enumerate(moments):
        code, out = _interrupt(run, corpus_file, how, when)
        if how == "kill":
            assert code == -signal.SIGKILL, out[-3000:]
            continue
        # a clean stop: exit 0 (the launcher passes on its ranks' codes) and PREEMPTED; only the last request may
        # come too late, after the run's last step
        assert code == 0, out[-4000:]
        if i < len(moments) - 1 or "done:" not in out:
            marker = json.loads((run / PREEMPTED).read_text())
            assert marker["reason"] == {"usr1": "SIGUSR1", "term": "SIGTERM", "stop": "STOP file"}[how], marker
    if _metrics_step(run) < 8:
        deepspeed_launch([*_args(run, corpus_file), "--resume"], world=2)
    got = [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(run / "metrics.jsonl")
           if "loss" in r or "eval_loss" in r]
    want = [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(plain / "metrics.jsonl")
            if "loss" in r or "eval_loss" in r]
    assert [s for s, loss, _ in got if loss is not None] == list(range(1, 9))  # every step once
    assert got == want
