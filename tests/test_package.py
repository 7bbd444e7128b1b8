"""bigbatch as an installed package: the wheel carries the recipes and DeepSpeed fragments, and `python -m bigbatch`
plans, checks and trains from a directory outside the checkout with only the installed package on PYTHONPATH;
slurm/pretrain.sh finds the Python of an installation that has no .venv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

TINY = ["--schedule.steps=2", "--data.vocab_size=400", "--batch.global_batch=64", "--batch.micro_batch=16",
        "--data.eval_samples=64"]


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip wheel --no-deps .` of a copy of the checkout (the build writes build/ and egg-info beside the sources),
    installed with `pip install --no-deps --target`; returns the wheel's path."""
    tmp = tmp_path_factory.mktemp("package")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "bench"))
    # no build isolation: the build uses this environment's setuptools instead of downloading one
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheel"), ".", cwd=source)
    (wheel,) = (tmp / "wheel").glob("bigbatch-*.whl")
    _pip("install", "--no-deps", "--target", str(tmp / "site"), str(wheel), cwd=tmp)
    return wheel


def test_the_wheel_holds_every_module_recipe_and_fragment(installed):
    names = set(zipfile.ZipFile(installed).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "bigbatch").rglob("*.py")}
    recipes = {f"bigbatch/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.py")}
    fragments = {f"bigbatch/ds_configs/{p.name}" for p in (ROOT / "ds_configs").glob("*.json")}
    assert modules <= names  # pyproject.toml lists the packages: a new one must be added there
    assert "bigbatch/recipes/tiny.py" in recipes and "bigbatch/ds_configs/zero1.json" in fragments
    assert recipes | fragments <= names


@pytest.mark.slow
def test_plan_check_and_train_from_outside_the_checkout(installed, tmp_path):
    site = installed.parent.parent / "site"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                              "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")

    def bigbatch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bigbatch", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)

    where = subprocess.run([sys.executable, "-c", "import bigbatch; print(bigbatch.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(site), where  # the installed copy, not the checkout
    for command in (["plan", "bert_large"], ["check", "bert_large"], ["train", "tiny", *TINY]):
        proc = bigbatch(*command)
        assert proc.returncode == 0, (command, proc.stdout[-3000:], proc.stderr[-3000:])
    (run,) = (tmp_path / "runs").glob("tiny-*")
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2]
    assert json.loads((run / "env.json").read_text())["git_commit"] is None  # no checkout to name


SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUB_LOG"
"""
SCONTROL = """#!/usr/bin/env bash
echo node1
"""


@pytest.mark.parametrize("venv,env_python,expected", [
    (False, False, "bin/python3"),  # an installed bigbatch: python3 on PATH
    (True, False, "submit/.venv/bin/python"),  # the checkout's .venv
    (True, True, "chosen/python"),  # BIGBATCH_PYTHON over both
])
def test_pretrain_sh_finds_the_python_of_an_installation(tmp_path, venv, env_python, expected):
    stubs = {"bin/srun": SRUN, "bin/scontrol": SCONTROL, "bin/python3": "", "chosen/python": ""}
    if venv:
        stubs["submit/.venv/bin/python"] = ""
    for name, text in stubs.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BIGBATCH_"))}
    env.update(PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path / "submit"),
               SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node1", SLURM_JOB_NUM_NODES="1", STUB_LOG=str(tmp_path / "srun"))
    if env_python:
        env["BIGBATCH_PYTHON"] = str(tmp_path / "chosen" / "python")
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "pretrain.sh"), "tiny"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "srun").read_text().splitlines()[1] == str(tmp_path / expected)
