"""`sbatch slurm/pretrain.sh` on a real 2-node SLURM cluster on this machine (tests/slurm_cluster.sh): a run across
both nodes (srun + torchrun, gloo), and the same run preempted by SLURM's warning signal, requeued by the template,
resumed by itself, with every loss bitwise equal to the uninterrupted run."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigbatch.metrics import read_metrics
from conftest import ROOT, launch_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ARGS = ["--schedule.steps=30", "--batch.global_batch=64", "--batch.micro_batch=16", "--data.vocab_size=400",
        "--data.eval_samples=64", "--run.eval_every=10", "--model.dropout=0.1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        why = f"missing {', '.join(missing)}" if missing else "not root"
        if os.environ.get("BIGBATCH_REQUIRE_SLURM"):  # .ci/run sets it: in CI these tests never skip
            pytest.fail(f"the SLURM tests cannot run ({why}); apt-get install slurm-wlm munge, as root")
        pytest.skip(f"SLURM tests need root and Debian's slurm-wlm and munge ({why})")
    state = tmp_path_factory.mktemp("slurm")
    script = ROOT / "tests" / "slurm_cluster.sh"
    out = subprocess.run(["bash", str(script), "start", str(state)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.fail(f"the local SLURM cluster did not start:\n{out.stdout}\n{out.stderr}")
    env = launch_env()
    env["SLURM_CONF"] = str(state / "slurm.conf")  # only ever this cluster
    env["BIGBATCH_PYTHON"] = sys.executable
    yield env
    subprocess.run(["bash", str(script), "stop", str(state)], capture_output=True, timeout=60)


def sbatch(env, run_dir: Path, log: Path, launcher: str = "torchrun") -> str:
    out = subprocess.run(["sbatch", "--parsable", "--chdir", str(ROOT), "--output", str(log),
                          str(ROOT / "slurm" / "pretrain.sh"), "tiny", *ARGS],
                         env={**env, "BIGBATCH_RUN_DIR": str(run_dir), "BIGBATCH_LAUNCHER": launcher},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "GONE"


def wait_for(env, job: str, log: Path, timeout: float = 420) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(env, job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "GONE"):
            return state
        time.sleep(2)
    pytest.fail(f"job {job} still {job_state(env, job)} after {timeout} s\n{log.read_text()[-4000:]}")


def losses(run_dir: Path):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    run_dir, log = root / "run one", root / "job.out"  # a space in the path, end to end
    job = sbatch(slurm, run_dir, log)
    assert wait_for(slurm, job, log) == "COMPLETED", log.read_text()[-4000:]
    return run_dir, log


def test_two_node_job_trains_and_finishes(uninterrupted):
    run_dir, log = uninterrupted
    text = log.read_text()
    assert "on 2 nodes x 1" in text and "world 2 |" in text and "done:" in text
    assert [s for s, _ in losses(run_dir)] == list(range(1, 31))
    assert not (run_dir / "PREEMPTED").exists()


def test_deepspeed_launcher_runs_the_same_job(slurm, uninterrupted, tmp_path):
    # DeepSpeed's --launcher slurm: srun starts the ranks itself, bigbatch reads SLURM_PROCID/SLURM_NTASKS
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm, run_dir, log, launcher="deepspeed")
    assert wait_for(slurm, job, log) == "COMPLETED", log.read_text()[-4000:]
    assert "world 2 |" in log.read_text()
    assert losses(run_dir) == losses(uninterrupted[0])  # same world, same data: the same losses as torchrun's


def test_preempted_job_requeues_resumes_and_matches(slurm, uninterrupted, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm, run_dir, log)
    deadline = time.time() + 300
    while not any(r.get("step", 0) >= 3 for r in read_metrics(run_dir / "metrics.jsonl")):
        assert time.time() < deadline, log.read_text()[-4000:] if log.exists() else "no log"
        time.sleep(0.2)
    # what SLURM sends before the time limit (#SBATCH --signal=B:USR1@180), to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True, timeout=30)
    assert wait_for(slurm, job, log) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    assert "stop requested" in text and "requeueing job" in text, text[-4000:]
    assert "(restart 1)" in text and "resumed" in text, text[-4000:]
    # every step once, each with the loss of the uninterrupted run, bit for bit
    assert losses(run_dir) == losses(uninterrupted[0])


def test_sweep_runs_as_a_job_array_and_reports(slurm, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "bigbatch", "sweep", "tiny", "--grid", "optimizer.lr=5e-3,2e-2",
           "--grid", "batch.global_batch=32,64", "--out", str(sweep_dir), "--schedule.steps=3",
           "--batch.micro_batch=16", "--data.vocab_size=400", "--data.eval_samples=64", "--run.eval_every=3"]
    out = subprocess.run(cmd, cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    job = out.stdout.split("Submitted batch job")[-1].split()[0]
    deadline = time.time() + 480
    while subprocess.run(["squeue", "--noheader", "--jobs", job], env=slurm, capture_output=True,
                         text=True).stdout.strip():
        assert time.time() < deadline, "the sweep's array tasks did not finish"
        time.sleep(3)
    rep = subprocess.run([sys.executable, "-m", "bigbatch", "sweep", "--report", str(sweep_dir)], cwd=ROOT, env=slurm,
                         capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0, rep.stderr
    rows = [line for line in rep.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4, rep.stdout
    assert all("| done | 3 |" in row for row in rows), rep.stdout
    losses = [float(row.rstrip(" |").rsplit("|", 1)[1]) for row in rows]
    assert losses == sorted(losses) and all(math.isfinite(x) for x in losses)  # best first
    assert (sweep_dir / "report.md").read_text() == rep.stdout
