"""`sbatch slurm/pretrain.sh` on a real 2-node SLURM cluster on this machine (tests/slurm_cluster.sh): a run across
both nodes (srun + torchrun, gloo), and the same run preempted by SLURM's warning signal, requeued by the template,
resumed by itself, with every loss bitwise equal to the uninterrupted run. Without the cluster: the template's choice
of run directory, with stub `srun`, `scontrol` and `deepspeed` commands."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigbatch.run.metrics import read_metrics

from conftest import ROOT, launch_env

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


def sbatch(env, run_dir: Path | None, log: Path, launcher: str = "torchrun", args: tuple[str, ...] = (),
           submit_dir: Path = ROOT) -> str:
    """Submits tiny from `submit_dir`; the run directory through BIGBATCH_RUN_DIR when `run_dir` is given."""
    env = {k: v for k, v in env.items() if k != "BIGBATCH_RUN_DIR"}
    out = subprocess.run(["sbatch", "--parsable", "--chdir", str(ROOT), "--output", str(log),
                          str(ROOT / "slurm" / "pretrain.sh"), "tiny", *ARGS, *args],
                         env={**env, **({"BIGBATCH_RUN_DIR": str(run_dir)} if run_dir else {}),
                              "BIGBATCH_LAUNCHER": launcher},
                         cwd=submit_dir, capture_output=True, text=True, timeout=60)
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


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_job_trains_and_finishes(uninterrupted):
    run_dir, log = uninterrupted
    text = log.read_text()
    assert "on 2 nodes x 1" in text and "world 2 |" in text and "done:" in text
    assert [s for s, _ in losses(run_dir)] == list(range(1, 31))
    assert not (run_dir / "PREEMPTED").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_deepspeed_launcher_runs_the_same_job(slurm, uninterrupted, tmp_path):
    # DeepSpeed's --launcher slurm: srun starts the ranks itself, bigbatch reads SLURM_PROCID/SLURM_NTASKS
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm, run_dir, log, launcher="deepspeed")
    assert wait_for(slurm, job, log) == "COMPLETED", log.read_text()[-4000:]
    assert "world 2 |" in log.read_text()
    assert losses(run_dir) == losses(uninterrupted[0])  # same world, same data: the same losses as torchrun's


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_requeues_resumes_and_matches(slurm, uninterrupted, tmp_path):
    # the run directory as the trainer's own flag, relative: the template resolves it against the submit directory
    # (not the job's --chdir), trains there, writes STOP there, and the requeued job resumes there
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm, None, log, args=("--run-dir", "run"), submit_dir=tmp_path)
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
    assert f"run {run_dir}" in text and not (tmp_path / "runs").exists()  # no STOP went to a default directory
    # every step once, each with the loss of the uninterrupted run, bit for bit
    assert losses(run_dir) == losses(uninterrupted[0])


@pytest.mark.slurm
@pytest.mark.slow
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


# A launcher stand-in for `srun` (torchrun) and for DeepSpeed's launcher: it records its arguments, sends the batch
# shell SLURM's warning (as --signal=B:USR1 does), and behaves as the ranks do: it waits for STOP in the run directory
# it was given (the last --run-dir, as argparse reads it), then writes PREEMPTED there and exits 0. With STUB_FAIL
# set it is a start that fails at once with that exit code (2, bad input, as a resume refused before training would;
# 4, a storage fault), after saying STUB_SAYS on stderr.
STUB_LAUNCHER = """#!/usr/bin/env bash
set -euo pipefail
printf '%s\\n' "$@" > "$STUB_LOG"
if [ -n "${STUB_SAYS:-}" ]; then echo "$STUB_SAYS" >&2; fi
if [ -n "${STUB_FAIL:-}" ]; then exit "$STUB_FAIL"; fi
dir=""
prev=""
for arg in "$@"; do
  if [ "$prev" = "--run-dir" ]; then dir="$arg"; fi
  prev="$arg"
done
kill -USR1 "$PPID"
for _ in $(seq 100); do
  if [ -f "$dir/STOP" ]; then echo 5 > "$dir/PREEMPTED"; exit 0; fi
  sleep 0.05
done
exit 1
"""
STUB_SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) printf 'node1\\nnode2\\n' ;;
  requeue) echo "$2" >> "$SCONTROL_LOG" ;;
esac
"""


@pytest.fixture
def template(tmp_path):
    """`template(args, env_run_dir=None, launcher="torchrun")` runs slurm/pretrain.sh tiny as SLURM would start it,
    submitted from tmp_path/"submit" and run from another directory, with stub srun, scontrol and deepspeed."""
    bin_dir, submit, elsewhere = tmp_path / "bin", tmp_path / "submit", tmp_path / "elsewhere"
    for d in (bin_dir, submit, elsewhere):
        d.mkdir()
    for name, text in (("srun", STUB_LAUNCHER), ("deepspeed", STUB_LAUNCHER), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def run(args, env_run_dir=None, launcher="torchrun", fail=0, says=""):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BIGBATCH_", "STUB_"))}
        if fail:
            env["STUB_FAIL"] = str(fail)
        if says:
            env["STUB_SAYS"] = says
        env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_SUBMIT_DIR=str(submit), SLURM_JOB_ID="42",
                   SLURM_RESTART_COUNT="1",
                   SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NUM_NODES="2", BIGBATCH_PYTHON=str(bin_dir / "python"),
                   BIGBATCH_LAUNCHER=launcher, STUB_LOG=str(tmp_path / "launcher.args"),
                   SCONTROL_LOG=str(tmp_path / "requeued"))
        if env_run_dir is not None:
            env["BIGBATCH_RUN_DIR"] = env_run_dir
        proc = subprocess.run(["bash", str(ROOT / "slurm" / "pretrain.sh"), "tiny", *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=60)
        launched = tmp_path / "launcher.args"
        return proc, launched.read_text().splitlines() if launched.exists() else None

    run.submit, run.root = submit, tmp_path
    return run


@pytest.mark.parametrize("launcher,args,env_run_dir,expected", [
    ("torchrun", ["--run-dir", "my run"], None, "submit/my run"),  # relative: from the submit directory
    ("deepspeed", ["--run-dir=ABS/given"], None, "given"),
    ("torchrun", [], "from env", "submit/from env"),
    ("torchrun", ["--run-dir", "sub/../same"], "ABS/submit/same", "submit/same"),  # both ways, one directory
    ("deepspeed", [], None, "submit/runs/tiny-42"),
])
def test_template_and_trainer_share_one_run_directory(template, launcher, args, env_run_dir, expected):
    fill = lambda text: text.replace("ABS", str(template.root))  # noqa: E731
    args, env_run_dir = [fill(a) for a in args], env_run_dir and fill(env_run_dir)
    proc, launched = template(["--schedule.steps=3", *args, "--batch.global_batch=32"], env_run_dir, launcher)
    run_dir = template.root / expected
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"run {run_dir}\n" in proc.stdout and "requeueing job 42" in proc.stdout
    # the ranks get that directory once, as an absolute path, and the user's other arguments unchanged, in order
    assert launched.count("--run-dir") == 1 and launched[launched.index("--run-dir") + 1] == str(run_dir)
    assert [a for a in launched if a.startswith("--") and "." in a] == ["--schedule.steps=3", "--batch.global_batch=32"]
    # the template's STOP reached the directory the ranks train in, so they checkpointed and the job requeued; it
    # names this start (job 42, restart 1), so a later start of the job does not take it for its own request
    assert (run_dir / "STOP").read_text() == "42.1\n" and (run_dir / "PREEMPTED").exists()
    assert (template.root / "requeued").read_text() == "42\n"


@pytest.mark.parametrize("args,env_run_dir,message", [
    (["--run-dir", "a"], "b", "BIGBATCH_RUN_DIR=b and --run-dir a name different run directories; give the run "
                              "directory one way only."),
    (["--run-dir", "a", "--run-dir=b"], None, "--run-dir a and --run-dir=b name different run directories"),
    (["--schedule.steps=3", "--run-dir"], None, "--run-dir is given without a directory; pass --run-dir DIR."),
    (["--run-dir=", "--schedule.steps=3"], None, "--run-dir is given without a directory; pass --run-dir DIR."),
])
def test_template_refuses_a_run_directory_given_two_ways_before_srun(template, args, env_run_dir, message):
    proc, launched = template(args, env_run_dir)
    assert proc.returncode == 2 and launched is None  # refused before srun
    assert proc.stderr.startswith("bigbatch: error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not any((template.submit / d).exists() for d in ("a", "b", "runs"))


def test_a_failed_start_is_not_requeued_on_the_previous_start_s_preempted(template):
    # the requeued start fails (say, a resume refused, exit 2): PREEMPTED from the start before it must not requeue it
    # again, or the job would loop through failing starts until someone cancels it
    run_dir = template.submit / "runs" / "tiny-42"
    run_dir.mkdir(parents=True)
    (run_dir / "PREEMPTED").write_text('{"step": 6}\n')
    proc, launched = template([], fail=2)
    assert launched is not None and proc.returncode == 2, proc.stdout + proc.stderr
    assert "requeueing" not in proc.stdout and not (template.root / "requeued").exists()


def test_a_storage_fault_is_not_requeued_and_its_sentence_is_in_the_job_log(template):
    # exit 4 (a full disk): a requeue would fail the same way, so the job ends; the ranks' sentence and the template's
    # line are in the job log (SLURM's --output collects both streams)
    sentence = "bigbatch: storage fault: writing checkpoint step00000002 ... free space, then --resume"
    proc, launched = template([], fail=4, says=sentence)
    assert launched is not None and proc.returncode == 4, proc.stdout + proc.stderr
    assert sentence in proc.stderr and "not requeued: free space" in proc.stdout
    assert "requeueing" not in proc.stdout and not (template.root / "requeued").exists()
