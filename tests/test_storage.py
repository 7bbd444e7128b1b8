"""Storage faults (bigbatch.run.space, checkpoint.save, metrics.MetricsLog, data.pipeline.reserve): a full disk, a
read-only run directory, a damaged checkpoint end in one sentence and exit code 4, with the last good state kept and
`--resume` (after space is freed) giving the uninterrupted run's losses bit for bit.

The small filesystems are real tmpfs mounts, which need root: elsewhere these tests skip and say why, and CI
(BIGBATCH_REQUIRE_ROOT=1, set by .ci/run) fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bigbatch.config.errors import EXIT_STORAGE, StorageFault
from bigbatch.config.files import load_recipe
from bigbatch.config.overrides import parse_override_args
from bigbatch.data.pipeline import write_rows
from bigbatch.resolve import resolve
from bigbatch.run import checkpoint, faults, space
from bigbatch.run.metrics import read_metrics
from bigbatch.run.rundir import RunDir

from conftest import ROOT, deepspeed_launch, launch_env

SMALL = ["--schedule.steps=4", "--batch.global_batch=64", "--batch.micro_batch=16", "--run.eval_every=2",
         "--data.vocab_size=400", "--data.eval_samples=64", "--checkpoint.every_steps=1", "--checkpoint.keep_last=2"]


@pytest.fixture
def tmpfs(tmp_path):
    """`tmpfs(size)`: a fresh tmpfs of `size` (mount's syntax: 2M, 6600k) mounted on a temporary directory;
    `.remount(size)` grows it without losing files. Unmounted at the end."""
    if os.geteuid() != 0:
        if os.environ.get("BIGBATCH_REQUIRE_ROOT") == "1":
            pytest.fail("BIGBATCH_REQUIRE_ROOT=1 but this is not root: the storage-fault tests mount tmpfs")
        pytest.skip("mounting a small tmpfs needs root (CI runs as root and sets BIGBATCH_REQUIRE_ROOT=1)")
    mounted: list[Path] = []

    class Mount:
        def __call__(self, size: str, options: str = "") -> Path:
            point = tmp_path / f"fs{len(mounted)}"
            point.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(point)], check=True)
            mounted.append(point)
            return point

        def remount(self, point: Path, options: str) -> None:
            subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)

    yield Mount()
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _train(run_dir: Path, corpus: Path, *extra: str, fault: str = "") -> subprocess.CompletedProcess:
    """`python -m bigbatch train tiny` at world 1 in its own process: its exit code and output, as a user sees them."""
    env = {**launch_env(), "HF_HUB_OFFLINE": "1"}
    env.pop("BIGBATCH_FAULT", None)
    if fault:
        env["BIGBATCH_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "bigbatch", "train", "tiny", "--run-dir", str(run_dir),
                           f"--data.sources={corpus}", *SMALL, *extra], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)


def _one_sentence(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The storage fault's sentence: exit code 4, one line on stderr naming `words`, no traceback."""
    assert proc.returncode == EXIT_STORAGE, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bigbatch: storage fault:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_file) -> Path:
    """The uninterrupted run on an ordinary disk."""
    run_dir = tmp_path_factory.mktemp("storage") / "reference"
    proc = _train(run_dir, corpus_file)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _resolved(corpus: Path, world: int = 1):
    overrides, _ = parse_override_args([f"--data.sources={corpus}", *SMALL])
    return resolve(load_recipe("tiny", overrides), world)


@pytest.mark.slow
def test_estimate_is_within_a_quarter_above_a_real_run_directory(reference, corpus_file):
    # At its fullest the directory held keep_last complete checkpoints and the last one being written: the bytes it
    # ends up holding plus one checkpoint (measured from its manifest).
    held = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file())
    one = checkpoint.checkpoint_bytes(reference / "checkpoints" / checkpoint.tag_for(4))
    fullest = held + one
    estimate = space.estimate(_resolved(corpus_file), RunDir(reference))
    assert estimate.data is not None and estimate.checkpoints == 3
    assert fullest <= estimate.total <= 1.25 * fullest, (estimate, fullest)
    assert one <= estimate.checkpoint <= 1.25 * one


def test_too_little_space_is_refused_before_any_work(tmpfs, corpus_file):
    fs = tmpfs("2M")
    proc = _train(fs / "run", corpus_file)
    sentence = _one_sentence(proc, str(fs / "run"), "bytes free", "needs about")
    assert "nothing was written" in sentence
    assert list(fs.iterdir()) == []


def test_a_read_only_run_directory_is_refused_before_any_work(tmpfs, corpus_file):
    fs = tmpfs("64M", ",ro")
    _one_sentence(_train(fs / "run", corpus_file), "cannot be written")
    assert list(fs.iterdir()) == []


def test_full_while_packing_is_one_sentence_and_no_partial_file(tmpfs):
    import datasets

    fs = tmpfs("256k")
    rows = datasets.Dataset.from_dict({"input_ids": [[1] * 64] * 2048})  # 512 KiB of int32: twice the filesystem
    with pytest.raises(StorageFault, match=r"needs 524,288 bytes but its filesystem has .* bytes free") as err:
        write_rows(rows, fs / "train.npy", 64)
    assert "\n" not in str(err.value) and not (fs / "train.npy").exists()
    small = datasets.Dataset.from_dict({"input_ids": [[7] * 64] * 16})  # after the failure: what fits is written
    assert write_rows(small, fs / "train.npy", 64) == 16
    assert (np.load(fs / "train.npy") == 7).all()


@pytest.mark.slow
def test_full_at_a_checkpoint_stops_keeps_latest_and_resumes_bit_for_bit(tmpfs, reference, corpus_file):
    fs = tmpfs("16M")
    run_dir = fs / "run"
    # another job fills the disk after step 2's record: step 2's checkpoint cannot be written
    proc = _train(run_dir, corpus_file, fault="step2:fill")
    _one_sentence(proc, "step00000002", "bytes free", "step00000001", "free space, then --resume")
    assert "storage fault (exit 4)" not in proc.stdout  # the SLURM template's line, not the CLI's
    ckpts = run_dir / "checkpoints"
    assert not list(ckpts.glob("*.tmp")) and (ckpts / "latest").read_text() == "step00000001"
    assert checkpoint.verify(ckpts / "step00000001") is None
    assert all(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    (fs / faults.FILL).unlink()
    tmpfs.remount(fs, "size=32M")
    proc = _train(run_dir, corpus_file, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(run_dir) == _losses(reference)


@pytest.mark.slow
def test_full_at_a_metrics_record_leaves_no_torn_line_and_resumes_bit_for_bit(tmpfs, reference, corpus_file):
    fs = tmpfs("16M")
    run_dir = fs / "run"
    # No checkpoint before the end, and trust ratios in every record (1.7 KB lines, a reporting setting that changes
    # no number trained), so the file outgrows its last tmpfs page before the end: the write to fail after the disk
    # fills is a metrics.jsonl record.
    extra = ["--checkpoint.every_steps=0", "--run.trust_ratio_every=1"]
    proc = _train(run_dir, corpus_file, *extra, fault="step1:fill")
    sentence = _one_sentence(proc, "metrics.jsonl", "bytes free", "free space, then --resume")
    assert "no checkpoint is complete" in sentence
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    (fs / faults.FILL).unlink()
    proc = _train(run_dir, corpus_file, *extra, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(run_dir) == _losses(reference)


@pytest.mark.slow
def test_a_damaged_checkpoint_falls_back_and_all_damaged_is_one_sentence(reference, corpus_file, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    ckpts = run_dir / "checkpoints"
    newest = next((ckpts / "step00000004").glob("*optim_states.pt"))
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the optimizer file
    newest.write_bytes(bytes(data))
    proc = _train(run_dir, corpus_file, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {ckpts / 'step00000004'} is incomplete and is skipped" in proc.stdout
    assert "resumed" in proc.stdout and "at step 3" in proc.stdout
    assert _losses(run_dir) == _losses(reference)
    for tag in checkpoint.list_tags(ckpts):  # now every complete checkpoint damaged
        (ckpts / tag / checkpoint.MANIFEST).write_text("{}")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if "checkpoints" in p.parts)
    _one_sentence(_train(run_dir, corpus_file, "--resume"), "is damaged", "nothing was deleted")
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if "checkpoints" in p.parts) == before


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_agree_on_a_full_disk_and_fall_back_from_a_damaged_rank_file(tmpfs, tmp_path, corpus_file):
    """One 2-rank launch (tests/workers/storage_faults.py): a checkpoint that cannot be written, a resume, one
    flipped byte in rank 1's optimizer file, every checkpoint damaged."""
    fs = tmpfs("16M")
    results = tmp_path / "results.json"
    deepspeed_launch([str(ROOT / "tests" / "workers" / "storage_faults.py"), str(results), str(tmp_path / "reference"),
                      str(fs), str(corpus_file)], world=2)
    ranks = json.loads(results.read_text())
    reference = ranks[0]["reference_losses"]
    assert [r[0] for r in reference] == [1, 2, 3, 4]
    for rank in ranks:
        assert rank["reference"] == 0
        code, _, err = rank["full"]
        assert code == EXIT_STORAGE and "Traceback" not in err
        assert err.count("bigbatch: storage fault:") == 1 and "free space, then --resume" in err, err
        assert rank["resume"] == 0 and rank["resume_losses"] == reference
        assert rank["damaged"][0] == 0 and rank["damaged_losses"] == reference
        code, _, err = rank["all_damaged"]
        assert code == EXIT_STORAGE and "is damaged" in err and "nothing was deleted" in err, err
    writer = ranks[0]
    assert writer["after_full"]["latest"] == "step00000001" and writer["after_full"]["verified"] is None
    assert not [name for name in writer["after_full"]["listing"] if name.endswith(".tmp")]
    assert "step00000004 is incomplete and is skipped" in writer["damaged"][1]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its sha256" in writer["damaged"][1]
    assert "at step 3" in writer["damaged"][1]
    assert writer["after_all_damaged"] == writer["before_all_damaged"]
