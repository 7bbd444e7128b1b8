"""`bigbatch sweep`: a grid of recipe overrides run as one SLURM job array, and a report of the final eval losses.

    bigbatch sweep tiny --grid optimizer.lr=5e-3,1e-2 --grid batch.global_batch=4096,8192 [--key=value ...]
    bigbatch sweep --report runs/sweep-tiny-<time>

The sweep directory holds `grid.json` (the recipe, the fixed overrides and one entry per point with its overrides and
run directory) and, after `--report`, `report.md`. Each array task of `slurm/sweep.sh` asks `bigbatch sweep --point`
for its arguments and runs `slurm/pretrain.sh` with them, so a point is preempted, requeued and resumed like any run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from bigbatch.config import ConfigError
from bigbatch.config.files import load_recipe
from bigbatch.config.overrides import parse_override_args
from bigbatch.run.metrics import read_metrics
from bigbatch.run.rundir import RunDir


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2,...` per --grid flag -> {key: [v1, v2, ...]}, keys in the order given."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not items:
            raise ConfigError(f"--grid {spec!r} must look like section.key=value1,value2; "
                              "e.g. --grid optimizer.lr=1e-3,2e-3.")
        if key in grid:
            raise ConfigError(f"--grid names {key} twice; give all its values in one flag.")
        grid[key] = items
    if not grid:
        raise ConfigError("a sweep needs at least one --grid section.key=value1,value2.")
    return grid


def make_points(recipe: str, fixed: dict[str, str], grid: dict[str, list[str]],
                sweep_dir: Path) -> list[dict[str, Any]]:
    """The Cartesian product of the grid; every point is validated as a recipe before anything is submitted."""
    points = []
    for i, values in enumerate(itertools.product(*grid.values())):
        overrides = dict(zip(grid, values))
        load_recipe(recipe, {**fixed, **overrides})  # a bad value fails here, naming the key, before any job runs
        points.append({"index": i, "overrides": overrides, "run_dir": str(sweep_dir / f"point{i:03d}")})
    return points


def point_args(sweep_dir: Path, index: int) -> list[str]:
    """What array task `index` passes to slurm/pretrain.sh: the recipe, then --run-dir-free overrides, one per line
    (the run directory goes through BIGBATCH_RUN_DIR, printed first)."""
    grid = json.loads((sweep_dir / "grid.json").read_text())
    if not 0 <= index < len(grid["points"]):
        raise ConfigError(f"point {index} is outside the sweep's {len(grid['points'])} points.")
    point = grid["points"][index]
    overrides = {**grid["fixed"], **point["overrides"]}
    return [point["run_dir"], grid["recipe"], *(f"--{k}={v}" for k, v in overrides.items())]


def _status(run_dir: Path) -> tuple[str, Optional[float], int]:
    """(state, last eval loss, last step) of one point's run directory."""
    run = RunDir(run_dir)
    records = read_metrics(run.metrics_file)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    steps = max((r.get("step", 0) for r in records), default=0)
    try:
        total = json.loads(run.recipe_file.read_text())["resolved"]["total_steps"]
    except (OSError, ValueError, KeyError):
        total = None
    if total is not None and steps == total:
        state = "done"
    elif run.preempted() is not None:
        state = "preempted"
    else:
        state = "running" if records else "not started"
    return state, (evals[-1] if evals else None), steps


def report(sweep_dir: Path) -> str:
    """A markdown table of every point, best final eval loss first; written to `<sweep_dir>/report.md`."""
    grid = json.loads((sweep_dir / "grid.json").read_text())
    keys = list(grid["grid"])
    rows = []
    for point in grid["points"]:
        state, loss, steps = _status(Path(point["run_dir"]))
        rows.append((loss if loss is not None else math.inf, point, state, steps, loss))
    rows.sort(key=lambda r: (r[0], r[1]["index"]))
    lines = [f"# Sweep of {grid['recipe']}: {len(rows)} points", "",
             "| point | " + " | ".join(keys) + " | state | steps | final eval loss |",
             "|---|" + "---|" * len(keys) + "---|---:|---:|"]
    for _, point, state, steps, loss in rows:
        values = " | ".join(point["overrides"][k] for k in keys)
        shown = f"{loss:.4f}" if loss is not None else "-"
        lines.append(f"| {point['index']} | {values} | {state} | {steps} | {shown} |")
    text = "\n".join(lines) + "\n"
    (sweep_dir / "report.md").write_text(text)
    return text


def cmd_sweep(args: list[str]) -> int:
    """`bigbatch sweep <recipe> --grid k=v1,v2 ...` submits a job array; `--report DIR` tabulates; `--point DIR I`
    prints one array task's arguments (used by slurm/sweep.sh)."""
    overrides, rest = parse_override_args(args)
    p = argparse.ArgumentParser(prog="bigbatch sweep", description=cmd_sweep.__doc__)
    p.add_argument("recipe", nargs="?", help="a shipped recipe name, a recipes/*.py path, or a recipe.json")
    p.add_argument("--grid", action="append", default=[], help="section.key=value1,value2 (repeat for a grid)")
    p.add_argument("--out", type=Path, default=None, help="the sweep directory (default: runs/sweep-<recipe>-<time>)")
    p.add_argument("--no-submit", action="store_true", help="write grid.json and print the sbatch command only")
    p.add_argument("--sbatch-args", default="",
                   help='options for every array task, e.g. --sbatch-args="--nodes=2 --time=4:00:00"')
    p.add_argument("--report", type=Path, default=None, metavar="DIR", help="tabulate the final eval losses of DIR")
    p.add_argument("--point", nargs=2, default=None, metavar=("DIR", "INDEX"), help=argparse.SUPPRESS)
    known, unknown = p.parse_known_args(rest)
    if unknown:
        raise ConfigError(f"unknown argument {unknown[0]!r}; see `bigbatch sweep --help`.")
    if known.point:
        print("\n".join(point_args(Path(known.point[0]), int(known.point[1]))))
        return 0
    if known.report:
        if not (known.report / "grid.json").is_file():
            raise ConfigError(f"{known.report} holds no grid.json; give the directory `bigbatch sweep` created.")
        print(report(known.report), end="")
        return 0
    if not known.recipe:
        raise ConfigError("bigbatch sweep needs a recipe (or --report DIR); see `bigbatch sweep --help`.")
    # slurm/sweep.sh, like pretrain.sh, takes the directory sbatch ran in for the repository: submit from its root
    script = Path("slurm") / "sweep.sh"
    if not known.no_submit and not script.is_file():
        raise ConfigError(f"{Path.cwd()} has no slurm/sweep.sh; run `bigbatch sweep` from the repository root.")
    grid = parse_grid(known.grid)
    name = Path(known.recipe).stem
    sweep_dir = (known.out or Path("runs") / f"sweep-{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if (sweep_dir / "grid.json").exists():
        raise ConfigError(f"{sweep_dir} already holds a sweep (grid.json); choose another --out.")
    points = make_points(known.recipe, overrides, grid, sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "grid.json").write_text(json.dumps(
        {"recipe": known.recipe, "fixed": overrides, "grid": grid, "points": points}, indent=1) + "\n")
    command = ["sbatch", f"--array=0-{len(points) - 1}", "--output", str(sweep_dir / "point%a-%A.out"),
               *shlex.split(known.sbatch_args), str(script.resolve()), str(sweep_dir)]
    print(f"{len(points)} points in {sweep_dir / 'grid.json'}")
    if known.no_submit:
        print(shlex.join(command))
        return 0
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"sbatch refused the job array: {out.stderr.strip()}")
    print(out.stdout.strip())
    print(f"when it is done: bigbatch sweep --report {sweep_dir}")
    return 0
