"""Stop requests and kills at every moment of a run (bigbatch/preemption.py, bigbatch/faults.py, bigbatch/rundir.py).

Each case puts a real signal (SIGUSR1 or SIGTERM to the process), a STOP file or a SIGKILL at one named moment of a
start: start-up, tokenizer training, packing, writing the packed chunks, an evaluation, a checkpoint write, a phase
change. The start must end with exit 0 and PREEMPTED (or, killed, leave a directory `--resume` continues), and the
resumed run must log every step once with the losses of an uninterrupted run, bit for bit. World 1, in this process:
the handling is the same code on every rank, and the 2-rank agreement is covered by the SLURM and demo launches.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest

from bigbatch.cli import main
from bigbatch.config.errors import Preempted
from bigbatch.run import faults, preemption
from bigbatch.run.launch import start_id
from bigbatch.run.metrics import read_metrics
from bigbatch.run.preemption import (
    StopRequest,
    clear_markers,
    local_request,
    mark_preempted,
    stale_stop_file,
    stop_file_request,
)
from bigbatch.run.rundir import DIVERGED, OWNER, PREEMPTED, STOP, RunDir

from conftest import ROOT, launch_env

SMALL = ["--schedule.steps=6", "--batch.global_batch=32", "--batch.micro_batch=16", "--run.eval_every=3",
         "--checkpoint.every_steps=2", "--checkpoint.keep_last=5", "--data.vocab_size=400", "--data.eval_samples=64",
         "--model.dropout=0.1", "--schedule.warmup=0.67"]
# tiny with a second phase at another sequence length: the re-packing at its start is a moment of its own
TWO_PHASES = """import dataclasses
from bigbatch.config import PhaseConfig
from bigbatch.config.files import find_recipe, load_recipe_file
RECIPE = dataclasses.replace(load_recipe_file(find_recipe('tiny')), name='tiny_two_phases',
    phases=(PhaseConfig(global_batch=32, seq_len=32, steps=2, lr=2e-3, warmup=0.5),))
"""


def losses(run):
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(run / "metrics.jsonl") if "step" in r
            and ("loss" in r or "eval_loss" in r)]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "tiny_two_phases.py"
    path.write_text(TWO_PHASES)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, recipe_file, corpus_file):
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(_args(run, recipe_file, corpus_file)) == 0
    return run


@pytest.fixture
def fault(monkeypatch):
    """Arms BIGBATCH_FAULT for the next start in this process only."""
    def arm(spec: str) -> None:
        faults.reset()
        monkeypatch.setenv(faults.ENV, spec)

    yield arm
    faults.reset()


def _args(run, recipe_file, corpus_file):
    return ["train", str(recipe_file), "--run-dir", str(run), f"--data.sources={corpus_file}", *SMALL]


# every moment x a mix of the three ways to ask (each moment is asked at least one way; the kinds rotate)
MOMENTS = [("startup", "usr1"), ("tokenizer", "term"), ("pack", "usr1"), ("chunk", "stop"), ("eval", "term"),
           ("step3", "usr1"), ("checkpoint", "usr1"), ("phase", "term")]


@pytest.mark.slow
@pytest.mark.parametrize("moment,action", MOMENTS)
def test_a_stop_at_any_moment_exits_0_and_the_resume_matches(reference, tmp_path, recipe_file, corpus_file, fault,
                                                            monkeypatch, moment, action, capsys):
    run = tmp_path / "run"
    fault(f"{moment}:{action}")
    assert main(_args(run, recipe_file, corpus_file)) == 0  # a stop is not a failure: SLURM must see exit 0 and requeue
    marker = json.loads((run / PREEMPTED).read_text())
    assert marker["reason"] in ({"usr1": "SIGUSR1", "term": "SIGTERM", "stop": "STOP file"}[action],)
    assert not (run / STOP).exists()  # the request this start acted on is consumed, so it cannot stop the next
    out = capsys.readouterr().out
    assert "stopped" in out and "done:" not in out
    stopped_at = marker["step"]
    if moment in ("startup", "tokenizer", "pack", "chunk"):
        assert marker["during"] == "start-up" and stopped_at is None and not (run / "checkpoints").exists()
    elif moment == "eval":  # the first evaluation, before any update: nothing to save
        assert stopped_at == 0 and not (run / "checkpoints").exists()
    else:
        expected = {"step3": 3, "checkpoint": 2, "phase": 6}[moment]
        assert stopped_at == expected
        assert (run / "checkpoints" / "latest").read_text() == f"step{expected:08d}"
    monkeypatch.delenv(faults.ENV)
    assert main([*_args(run, recipe_file, corpus_file), "--resume"]) == 0
    assert not (run / PREEMPTED).exists()
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9))  # every step once
    assert losses(run) == losses(reference)


@pytest.mark.slow
def test_a_kill_during_the_first_start_up_leaves_a_run_that_resumes(reference, tmp_path, recipe_file, corpus_file):
    run = tmp_path / "run"
    env = {**launch_env(), faults.ENV: "pack:kill"}  # SIGKILL after the tokenizer was trained, while packing
    proc = subprocess.run([sys.executable, "-m", "bigbatch", *_args(run, recipe_file, corpus_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run / OWNER).is_file() and not (run / "recipe.json").exists()
    assert (run / "data" / "tokenizer.model").is_file() and not (run / "data" / "data.json").exists()
    tokenizer = (run / "data" / "tokenizer.model").read_bytes()
    # what a requeued SLURM job does (restart count > 0 implies --resume), and what --resume does
    assert RunDir(run).decide_mode(resume=True, overwrite=False) == "resume"
    assert main([*_args(run, recipe_file, corpus_file), "--resume"]) == 0
    assert (run / "data" / "tokenizer.model").read_bytes() == tokenizer  # the finished tokenizer was reused
    assert losses(run) == losses(reference)


def test_a_stop_file_names_the_start_it_is_for(tmp_path, monkeypatch):
    """The SLURM template writes `<job>.<restart>`: a leftover from an earlier start never stops a later one, an
    empty file (touch) is a request for whichever start runs, and a file for this start is one."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert start_id() == "77.2"
    assert stop_file_request(tmp_path) is None
    (tmp_path / STOP).write_text("77.1\n")
    assert stop_file_request(tmp_path) is None and stale_stop_file(tmp_path) == "77.1"
    (tmp_path / STOP).write_text("77.2\n")
    assert stop_file_request(tmp_path) == "STOP file" and stale_stop_file(tmp_path) is None
    (tmp_path / STOP).write_text("")
    assert stop_file_request(tmp_path) == "STOP file" and stale_stop_file(tmp_path) is None
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    (tmp_path / STOP).write_text("77.0")
    assert stop_file_request(tmp_path) == "STOP file"


def test_a_directory_with_only_the_templates_markers_is_new(tmp_path):
    """slurm/pretrain.sh creates the run directory and may write STOP before any rank starts."""
    run = tmp_path / "run"
    run.mkdir()
    (run / STOP).write_text("5.0")
    assert RunDir(run).decide_mode(resume=False, overwrite=False) == "new"
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no bigbatch run"):
        RunDir(run).decide_mode(resume=True, overwrite=False)


def test_a_stop_file_written_before_the_start_stops_it_at_once(tmp_path, recipe_file, corpus_file, monkeypatch):
    """A request made between `sbatch`'s launch and the ranks' start is not lost (nor deleted as stale)."""
    monkeypatch.delenv(faults.ENV, raising=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / STOP).write_text("")
    assert main(_args(run, recipe_file, corpus_file)) == 0
    marker = json.loads((run / PREEMPTED).read_text())
    assert marker == {"step": None, "reason": "STOP file", "during": "start-up"}
    assert not (run / STOP).exists()


def test_faults_are_parsed_strictly_and_fire_once_on_their_rank(monkeypatch):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        monkeypatch.setenv(faults.ENV, "eval:explode")
        faults.reset()
        with pytest.raises(ValueError, match="action 'explode'"):
            faults.at("eval")
        monkeypatch.setenv(faults.ENV, "eval:usr1:1")  # armed for rank 1 only
        monkeypatch.setenv("RANK", "0")
        faults.at("eval")
        assert received == []
        monkeypatch.setenv("RANK", "1")
        faults.at("pack")  # another moment: nothing
        faults.at("eval")
        faults.at("eval")  # once per process
        assert received == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
        faults.reset()


def test_a_metrics_line_torn_by_a_kill_is_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')  # a whole line that does not parse: an error
    with pytest.raises(ValueError):
        read_metrics(path)


def test_only_a_training_process_turns_signals_into_requests():
    from bigbatch.run.preemption import trains

    assert trains(["train", "tiny"]) and trains(["--local_rank=1", "train", "tiny"])
    assert trains(["--local_rank", "1", "train"]) and trains(["--local-rank=0", "train"])
    assert not trains(["check", "x.json"]) and not trains(["plan", "tiny", "--train"]) and not trains([])


@pytest.mark.parametrize("content", ["77.1\n", "77.2\n", "", "77.3"], ids=["earlier", "this", "empty", "later"])
def test_a_request_is_never_erased_by_a_start_that_did_not_act_on_it(tmp_path, monkeypatch, content):
    """clear_markers at start removes the previous start's PREEMPTED and DIVERGED and keeps every STOP file, whoever
    it names, byte for byte; a stop for another reason (a signal) consumes only a STOP meant for this start."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    run = RunDir(tmp_path)
    for name in (PREEMPTED, DIVERGED):
        (tmp_path / name).write_text("from the start before\n")
    (tmp_path / STOP).write_text(content)
    clear_markers(run)
    assert not (tmp_path / PREEMPTED).exists() and not (tmp_path / DIVERGED).exists()
    assert (tmp_path / STOP).read_text() == content
    mark_preempted(run, 4, "SIGTERM")
    for_this_start = content.strip() in ("", "77.2")
    assert (tmp_path / STOP).exists() == (not for_this_start)
    assert json.loads((tmp_path / PREEMPTED).read_text()) == {"step": 4, "reason": "SIGTERM", "during": "training"}


def test_clear_markers_says_which_start_a_stale_stop_was_for_and_needs_no_markers(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    run = RunDir(tmp_path)
    clear_markers(run)  # nothing to clear: no error
    (tmp_path / STOP).write_text("77.1\n")
    with caplog.at_level("WARNING"):
        clear_markers(run)
    assert f"{tmp_path / STOP} was written for start 77.1, not this one (77.2): ignored" in caplog.messages
    caplog.clear()
    (tmp_path / STOP).write_text("77.2\n")
    with caplog.at_level("WARNING"):
        clear_markers(run)
    assert caplog.messages == []
    (tmp_path / STOP).unlink()
    mark_preempted(run, 3, "STOP file")  # the request acted on is already gone (another rank's view): no error
    assert json.loads((tmp_path / PREEMPTED).read_text())["step"] == 3


def test_an_unreadable_stop_file_is_a_request(tmp_path):
    """On a network file system a STOP file may be unreadable mid-write: its presence is the request."""
    (tmp_path / STOP).mkdir()  # reading it raises an OSError, as an unreadable file does
    assert stop_file_request(tmp_path) == "STOP file" and stale_stop_file(tmp_path) is None


def test_decide_mode_never_replaces_a_run_unless_told(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    run = RunDir(tmp_path / "run")
    assert str(run) == str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"^--resume and --overwrite contradict each other; pass one of them\.$"):
        run.decide_mode(resume=True, overwrite=True)
    assert run.decide_mode(resume=False, overwrite=False) == "new"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / OWNER).write_text("{}")  # marked as a run before its recipe.json exists
    assert run.holds_run()
    with pytest.raises(ValueError, match=rf"^run directory {re.escape(str(run))} already holds a run; pass --resume "
                                         r"to continue it, --overwrite to replace it, or choose another --run-dir\.$"):
        run.decide_mode(resume=False, overwrite=False)
    assert run.decide_mode(resume=True, overwrite=False) == "resume"
    assert run.decide_mode(resume=False, overwrite=True) == "overwrite"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued job continues its run without --resume
    assert run.decide_mode(resume=False, overwrite=False) == "resume"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(ValueError, match="already holds a run"):
        run.decide_mode(resume=False, overwrite=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert RunDir(other).decide_mode(resume=False, overwrite=True) == "overwrite"
    refused = (rf"^run directory {re.escape(str(other))} is not empty and holds no bigbatch run; choose another "
               r"--run-dir or pass --overwrite to replace its contents\.$")
    with pytest.raises(ValueError, match=refused):
        RunDir(other).decide_mode(resume=False, overwrite=False)


def test_every_rank_agrees_on_a_request_and_names_whose_it_was(tmp_path, monkeypatch):
    """StopRequest without a launch: `sum_across_ranks` stands in for the all-reduce (this rank's flag plus the
    others'); a signal or a STOP file for this start is this rank's reason, anyone else's is "another rank"."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(preemption, "_requested", None)
    sent = []

    def others(flags):  # the other ranks: one of them asks once `others.asking` is set
        sent.append(flags[0])
        return [flags[0] + others.asking, *flags[1:]]

    others.asking = 0.0
    request = StopRequest(tmp_path, others)
    assert not request.agreed() and request.reason is None and local_request(tmp_path) is None
    request.raise_if_requested()  # nothing asked: returns
    others.asking = 1.0
    assert request.agreed() and request.reason == "another rank" and sent[-1] == 0.0
    with pytest.raises(Preempted, match="another rank"):
        StopRequest(tmp_path, others).raise_if_requested()
    others.asking = 0.0
    (tmp_path / STOP).write_text("")
    request = StopRequest(tmp_path, others)
    assert request.agreed() and request.reason == "STOP file" and sent[-1] == 1.0
    (tmp_path / STOP).unlink()
    monkeypatch.setattr(preemption, "_requested", "SIGUSR1")
    assert local_request(tmp_path) == local_request(None) == "SIGUSR1"
    with pytest.raises(Preempted, match="SIGUSR1"):
        StopRequest(tmp_path, others).raise_if_requested()
    monkeypatch.setattr(preemption, "_requested", None)
    assert local_request(None) is None


def test_preempted_reads_the_marker_or_none(tmp_path):
    run = RunDir(tmp_path)
    assert run.preempted() is None
    (tmp_path / PREEMPTED).write_text("{torn")
    assert run.preempted() is None
    run.mark_preempted(7, "SIGTERM", "training", consume_stop=False)
    assert run.preempted() == {"step": 7, "reason": "SIGTERM", "during": "training"}


def test_one_all_reduce_carries_the_stop_request_and_a_failed_record(tmp_path, monkeypatch):
    """The loop's per-step check: whether any rank was asked to stop and whether the writer's record failed travel
    in the same all-reduce (one collective a step), each summed over the ranks independently of the other."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(preemption, "_requested", None)
    calls = []

    def total(flags):  # another rank adds its own failed-record flag
        calls.append(list(flags))
        return [flags[0], flags[1] + total.other_failing]

    total.other_failing = 0.0
    request = StopRequest(tmp_path, total)
    assert request.agree() == (False, False)
    assert request.agree(failing=True) == (False, True)
    total.other_failing = 1.0
    assert request.agree(failing=False) == (False, True)
    (tmp_path / STOP).write_text("")
    assert request.agree() == (True, True) and request.reason == "STOP file"
    assert calls == [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
