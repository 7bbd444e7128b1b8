"""`bigbatch sweep` without SLURM: the grid, validation of every point before submission, a task's arguments, and
the report (the SLURM job array itself runs in tests/test_slurm.py)."""

from __future__ import annotations

import json

import pytest

from bigbatch.cli import main
from bigbatch.config import ConfigError
from bigbatch.run.sweep import parse_grid, point_args


def test_grid_and_points(tmp_path, capsys):
    out = tmp_path / "sw"
    code = main(["sweep", "tiny", "--grid", "optimizer.lr=1e-3,2e-3,4e-3", "--grid", "batch.global_batch=2048,4096",
                 "--schedule.steps=5", "--out", str(out), "--no-submit", "--sbatch-args=--time=1:00:00"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 points" in printed and "sbatch --array=0-5" in printed and "--time=1:00:00" in printed
    grid = json.loads((out / "grid.json").read_text())
    assert [p["overrides"] for p in grid["points"]][:2] == [
        {"optimizer.lr": "1e-3", "batch.global_batch": "2048"}, {"optimizer.lr": "1e-3", "batch.global_batch": "4096"}]
    run_dir, recipe, *overrides = point_args(out, 5)
    assert run_dir == str(out / "point005") and recipe == "tiny"
    assert overrides == ["--schedule.steps=5", "--optimizer.lr=4e-3", "--batch.global_batch=4096"]
    # a second sweep into the same directory is refused
    assert main(["sweep", "tiny", "--grid", "optimizer.lr=1e-3,2e-3", "--out", str(out), "--no-submit"]) == 2


def test_bad_grids_are_one_sentence(tmp_path, capsys):
    with pytest.raises(ConfigError, match="must look like section.key=value1,value2"):
        parse_grid(["optimizer.lr"])
    # every point is validated as a recipe before anything is submitted
    assert main(["sweep", "tiny", "--grid", "optimizer.lr_rule=sqrt,cubic", "--out", str(tmp_path / "x"),
                 "--no-submit"]) == 2
    assert "optimizer.lr_rule='cubic' is not one of none, linear, sqrt" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_report_ranks_points_by_final_eval_loss(tmp_path):
    out = tmp_path / "sw"
    assert main(["sweep", "tiny", "--grid", "optimizer.lr=1e-3,2e-3,4e-3", "--out", str(out), "--no-submit"]) == 0
    grid = json.loads((out / "grid.json").read_text())
    for point, loss, steps in zip(grid["points"], (5.0, 4.0, None), (2, 2, 1)):
        run = tmp_path / point["run_dir"]
        run.mkdir(parents=True)
        (run / "recipe.json").write_text(json.dumps({"recipe": {}, "resolved": {"total_steps": 2}}))
        records = [{"step": s, "loss": 6.0} for s in range(1, steps + 1)]
        if loss is not None:
            records[-1]["eval_loss"] = loss
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / grid["points"][2]["run_dir"] / "PREEMPTED").write_text("{}")
    assert main(["sweep", "--report", str(out)]) == 0
    lines = (out / "report.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert rows == ["| 1 | 2e-3 | done | 2 | 4.0000 |", "| 0 | 1e-3 | done | 2 | 5.0000 |",
                    "| 2 | 4e-3 | preempted | 1 | - |"]
