"""Checkpoints: atomic (staging directory, manifest, `latest` last), verified at load, and a clean stop on request
that resumes to the same losses as an uninterrupted run (one process, fp32)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bigbatch.cli import main
from bigbatch.run import checkpoint
from bigbatch.run.metrics import read_metrics

from conftest import ROOT, WORKERS, launch_env

SMALL = ["--schedule.steps=6", "--batch.global_batch=32", "--batch.micro_batch=16", "--run.eval_every=3",
         "--checkpoint.every_steps=2", "--checkpoint.keep_last=5", "--data.vocab_size=400", "--data.eval_samples=64",
         "--model.dropout=0.1", "--schedule.warmup=0.67"]  # 4 warmup steps: a stop at 3 or 4 falls inside


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_file):
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", "tiny", "--run-dir", str(run), f"--data.sources={corpus_file}", *SMALL]) == 0
    return run


def losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_checkpoints_are_complete_with_a_manifest(reference):
    root = reference / "checkpoints"
    assert checkpoint.list_tags(root) == ["step00000002", "step00000004", "step00000006"]
    assert (root / "latest").read_text() == "step00000006"
    assert not list(root.glob("*.tmp"))
    for tag in checkpoint.list_tags(root):
        assert checkpoint.verify(root / tag) is None
        manifest = json.loads((root / tag / "manifest.json").read_text())["files"]
        assert any(name.endswith("model_states.pt") for name in manifest)


def test_truncated_or_half_written_checkpoints_are_skipped(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    root = run / "checkpoints"
    # a save killed mid-way leaves a staging directory, never named by `latest`
    shutil.copytree(root / "step00000006", root / "step00000008.tmp")
    # the newest complete one is truncated on disk
    victim = next((root / "step00000006").rglob("*model_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    assert checkpoint.newest_complete(root) == "step00000004"
    out = capsys.readouterr().out
    assert "step00000006 is incomplete and is skipped" in out and "truncated" in out


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(reference, tmp_path, corpus_file):
    run = tmp_path / "run"
    args = ["train", "tiny", "--run-dir", str(run), f"--data.sources={corpus_file}", *SMALL]
    # the worker's steps 1-2 meet the reference's bit for bit only with as many threads (reduction order)
    env = {**launch_env(), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, str(WORKERS / "killed_save.py"), "4", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    root = run / "checkpoints"
    assert (root / "step00000004.tmp").is_dir()  # DeepSpeed's files of step 4, never completed
    assert (root / "latest").read_text() == "step00000002" and checkpoint.newest_complete(root) == "step00000002"
    assert main([*args, "--resume"]) == 0
    assert losses(run) == losses(reference)  # resumed at step 2: every later step again, as uninterrupted
    assert not (root / "step00000004.tmp").exists()  # the next save of step 4 replaced the leftover


def test_a_stop_request_checkpoints_and_resume_matches_the_uninterrupted_run(reference, tmp_path, corpus_file, capsys):
    run = tmp_path / "run"

    def ask_to_stop():  # what slurm/pretrain.sh does on SLURM's warning signal, once step 3 is recorded
        while not any(r.get("step", 0) >= 3 for r in read_metrics(run / "metrics.jsonl")):
            time.sleep(0.05)
        (run / "STOP").write_text("")

    watcher = threading.Thread(target=ask_to_stop, daemon=True)
    watcher.start()
    args = ["train", "tiny", "--run-dir", str(run), f"--data.sources={corpus_file}", *SMALL]
    assert main(args) == 0  # a clean stop is not a failure: the launcher must not tear the job down
    watcher.join(timeout=5)
    marker = json.loads((run / "PREEMPTED").read_text())
    stopped = marker["step"]
    assert 3 <= stopped < 6 and marker["reason"] == "STOP file"
    assert (run / "checkpoints" / "latest").read_text() == checkpoint.tag_for(stopped)
    assert f"checkpoint {checkpoint.tag_for(stopped)} saved" in capsys.readouterr().out

    first_env = json.loads((run / "env.json").read_text())
    assert main([*args, "--resume"]) == 0
    assert not (run / "PREEMPTED").exists() and not (run / "STOP").exists()
    # the first start's records are kept beside the resumed start's
    assert json.loads((run / "starts" / "1" / "env.json").read_text()) == first_env
    assert sorted(p.name for p in (run / "starts" / "1").iterdir()) == ["ds_config.json", "env.json", "recipe.json"]
    assert (run / "env.json").is_file() and not (run / "starts" / "2").exists()
    # every step once, with the same losses bit for bit, and the same final eval
    assert losses(run) == losses(reference)
    def final_eval(path):
        return [r for r in read_metrics(path / "metrics.jsonl") if "eval_loss" in r][-1]["eval_loss"]

    assert final_eval(run) == final_eval(reference)


LARS = ["--optimizer.type=lars", "--optimizer.lr=2.0", "--optimizer.trust_coefficient=0.01"]


@pytest.fixture(scope="module")
def lars_reference(tmp_path_factory, corpus_file):
    run = tmp_path_factory.mktemp("lars") / "run"
    assert main(["train", "tiny", "--run-dir", str(run), f"--data.sources={corpus_file}", *SMALL, *LARS]) == 0
    return run


@pytest.mark.parametrize("optimizer", ["lamb", "lars"])
def test_where_loading_can_run_pickled_code(optimizer, request, tmp_path, corpus_file, monkeypatch, capsys):
    """bigbatch reads its own files as JSON (manifest, metrics, recipe); the one DeepSpeed file it reads itself, LARS's
    optimizer states on the way to a universal checkpoint, it loads with weights_only=True and DeepSpeed's few
    classes allowed by name. DeepSpeed's checkpoint engine unpickles its model and optimizer files with
    weights_only=False and exposes no setting to change that (so does its converter, in a process of its own). The
    manifest's sha256s (verified before any load) catch a file changed after the save, not a hostile writer.

    LARS resumes here through the universal path (the manifest says another world wrote it), the path that reads
    LARS's momentum out of DeepSpeed's files."""
    import inspect

    calls = []
    real = torch.load

    def recording_load(*args, **kwargs):
        caller = inspect.stack()[1].filename
        calls.append((caller, kwargs.get("weights_only")))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    reference = request.getfixturevalue("reference" if optimizer == "lamb" else "lars_reference")
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "checkpoints" / "latest").write_text("step00000004")
    if optimizer == "lars":
        manifest = run / "checkpoints" / "step00000004" / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "world": 2}))
    extra = LARS if optimizer == "lars" else []
    args = ["train", "tiny", "--run-dir", str(run), f"--data.sources={corpus_file}", *SMALL, *extra, "--resume"]
    assert main(args) == 0
    assert ("through a universal checkpoint" in capsys.readouterr().out) == (optimizer == "lars")
    assert calls, "the resume loaded nothing through torch.load"
    import deepspeed

    import bigbatch

    package, ds = Path(bigbatch.__file__).parent, Path(deepspeed.__file__).parent
    ours = [c for c in calls if Path(c[0]).resolve().is_relative_to(package)]
    assert all(c[1] is True for c in ours), ours  # bigbatch never unpickles arbitrary objects
    assert bool(ours) == (optimizer == "lars")  # LARS's momentum is read in bigbatch; nothing else is
    assert all(Path(c[0]).resolve().is_relative_to(ds) and c[1] is False for c in calls if c not in ours), calls
    # the momentum came through: the resumed steps are the uninterrupted run's
    assert dict(losses(run)) == pytest.approx(dict(losses(reference)), rel=1e-6)


class FilesEngine:
    """Stands in for a DeepSpeed engine at save: writes one file into the directory it is given."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag).mkdir(parents=True)
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")


def test_pruning_keeps_the_checkpoint_just_written_when_a_newer_one_was_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    save = lambda step: checkpoint.save(FilesEngine(), root, step, {}, 1, True, lambda: None, 1)  # noqa: E731
    save(100)
    # step 100 turns out truncated: the next start finds nothing to resume, trains from step 0 and saves step 50
    (root / "step00000100" / "mp_rank_00_model_states.pt").write_bytes(b"w")
    assert checkpoint.newest_complete(root) is None
    save(50)
    # counted with the newer, skipped 100 it was pruned at once
    assert checkpoint.newest_complete(root) == "step00000050"
    assert checkpoint.list_tags(root) == ["step00000050", "step00000100"]  # 100 left as it was, for a look


def test_a_resume_with_another_batch_is_one_sentence(reference, tmp_path, corpus_file, capsys):
    # the sampler position follows the step table: a changed batch would silently repeat or skip data
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    # without recipe.json (a first start killed before writing it) the checkpoint's own sample count is the guard;
    # with it, the changed key is refused first (tests/test_resume_settings.py)
    (run / "recipe.json").unlink()
    code = main(["train", "tiny", "--run-dir", str(run), f"--data.sources={corpus_file}", *SMALL,
                 "--batch.global_batch=64", "--schedule.steps=8", "--resume"])
    assert code == 2
    err = capsys.readouterr().err
    assert "was saved after 192 samples, but this recipe reaches step 6 after 384" in err, err[-500:]


def test_a_resume_without_a_checkpoint_starts_the_metrics_over(reference, tmp_path, corpus_file):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints")
    assert main(["train", "tiny", "--run-dir", str(run), f"--data.sources={corpus_file}", *SMALL, "--resume"]) == 0
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 7))  # each step once, not the old run's and the new run's
    assert losses(run) == losses(reference)


def test_a_flipped_byte_of_the_same_size_fails_its_sha256(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint.save(FilesEngine(), root, 2, {}, 3, True, lambda: None, 1)
    for name in ("optim_states.pt", "zero_pp_rank_1_model_states.pt"):  # several files: hashed in threads
        (root / "step00000002" / name).write_bytes(b"more" * 1000)
    checkpoint.write_manifest(root / "step00000002", 1)
    assert checkpoint.verify(root / "step00000002") is None
    victim = root / "step00000002" / "optim_states.pt"
    victim.write_bytes(b"mora" + victim.read_bytes()[4:])
    assert checkpoint.verify(root / "step00000002") == f"{victim} does not match its sha256 in the manifest"
