"""bench/gpu_check.py's CPU mode (`--device cpu --tiny`), in one subprocess: every path of the GPU acceptance script
runs, writes its table with every row, and each row that ran has a finite ratio. Only FusedLamb (a CUDA kernel),
bigbatch's fused kernels (torch.compile's CPU build would take longer than the rest) and torch_optimizer (a
benchmark-only extra) may say why they did not run."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT, launch_env

ROWS = [
    "bert_large peak memory", "bert_large step time", "gpt2_medium peak memory", "gpt2_medium step time",
    "fp16 overflow: skip, halve, regrow", "optimizer step: bigbatch LAMB", "optimizer step: bigbatch LARS",
    "optimizer step: DeepSpeed FusedLamb", "optimizer step: torch_optimizer.Lamb",
    "optimizer step: bigbatch LAMB (fused)", "optimizer step: bigbatch LARS (fused)",
]


@pytest.mark.slow  # 13-19 s under the heavy lock on the VM
def test_gpu_check_runs_every_path_on_the_cpu_and_writes_every_row(tmp_path):
    out = tmp_path / "gpu_check-cpu.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], cwd=tmp_path, env=launch_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["check"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert list(rows) == ROWS
    table = out.read_text()
    assert all(f"| {name} |" in table for name in ROWS)
    cannot = {"optimizer step: DeepSpeed FusedLamb": "skipped: needs CUDA",
              "optimizer step: bigbatch LAMB (fused)": "skipped: needs CUDA here",
              "optimizer step: bigbatch LARS (fused)": "skipped: needs CUDA here"}
    if importlib.util.find_spec("torch_optimizer") is None:
        cannot["optimizer step: torch_optimizer.Lamb"] = "not installed"
    for name, row in rows.items():
        if name in cannot:
            assert row["note"].startswith(cannot[name]) and row["ratio"] is None
        else:
            assert row["ratio"] is not None and math.isfinite(row["ratio"]) and row["ratio"] > 0, row
    # an inf gradient skipped exactly at its step, weights untouched there and moved elsewhere, the scale as ruled
    assert rows["fp16 overflow: skip, halve, regrow"]["ratio"] == 1.0
    # LAMB against the paper's formula in fp64: the acceptance bound on relative deviation
    assert rows["optimizer step: bigbatch LAMB"]["deviation"] < 1e-5
    # the planner's bytes against the tensors the engine held and allocated: the same magnitude
    for shape in ("bert_large", "gpt2_medium"):
        assert 0.5 < rows[f"{shape} peak memory"]["ratio"] < 2.0


def test_gpu_check_starts_no_check_once_its_budget_is_spent(tmp_path):
    """--budget-s 0: every row is written, each saying the budget stopped it (a lent GPU's minutes are counted)."""
    out = tmp_path / "gpu_check-cpu.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--budget-s", "0", "--out", str(out)], cwd=tmp_path, env=launch_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["check"] for r in rows] == ROWS
    assert all(r["note"] == "skipped: --budget-s spent" and r["ratio"] is None for r in rows)
