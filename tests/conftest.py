"""Shared helpers: launching real multi-rank DeepSpeed runs on the CPU (gloo) and reading their result files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any, Optional

import pytest

from bigbatch.config.files import load_recipe
from bigbatch.run import faults

ROOT = Path(__file__).resolve().parent.parent
# Tests never reach the Hugging Face hub (CI has no internet): offline, an `hf:` source that is not cached fails at
# once instead of after ~25 s of retries per call. Tests of the hub paths set their own environment.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORKERS = ROOT / "tests" / "workers"


def check_messages(config: dict[str, Any], world: Optional[int] = None, level: str = "error") -> list[str]:
    """The sentences of one level ("error" or "note") that `bigbatch check` finds in a DeepSpeed config dict."""
    from bigbatch.check.dsjson import check_config  # here, not above: it loads torch, which most tests never need

    return [f.message for f in check_config(config, world) if f.level == level]


def launch_env() -> dict[str, str]:
    # In-process tests leave this process's rendezvous (RANK=0, WORLD_SIZE=1, MASTER_PORT of a live store) in
    # os.environ; a launched job must not inherit it.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # 2 cores shared by every rank
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def in_fresh_process(call: str, module: str, timeout: int = 600) -> Any:
    """`module.call`'s JSON result, computed in a new Python process. An in-process ZeRO-3 engine leaves process-wide
    state behind that changed the last bits of later in-process runs (a bitwise resume test failed after it)."""
    code = f"import json, {module} as m; print(json.dumps(m.{call}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=launch_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def deepspeed_launch(args: list[str], world: int, timeout: int = 900, cwd: Path = ROOT,
                     port: int = 0) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus <world> <args>` on the CPU accelerator; fails the test with the output on error."""
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(world), "--master_port", str(port or _free_port()), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A few hundred paragraphs of the built-in English text, as a local file source."""
    from bigbatch.data.corpus import python_docs

    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(d.replace("\n\n", "\n") for d in python_docs()[:600]))
    return path


# `bigbatch train tiny` in this process at world 1, shrunk as tests/test_train.py shrinks it.
TINY_RUN = ["--schedule.steps=4", "--batch.global_batch=64", "--batch.micro_batch=16", "--run.eval_every=2",
            "--data.vocab_size=400", "--data.eval_samples=64"]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, corpus_file):
    """`tiny_runs(arch, stage)`: the run directory of a finished tiny run of that arch (bert, gpt2, llama) under ZeRO
    `stage` (fp32), trained once per session. The first run trains the tokenizer; the others name it in
    data.tokenizer, which saves the time and covers a recipe that brings its own tokenizer."""
    from bigbatch.cli import main

    root = tmp_path_factory.mktemp("tiny-runs")
    done: dict[tuple[str, int], Path] = {}

    def get(arch: str, stage: int) -> Path:
        if (arch, stage) not in done:
            run_dir = root / f"{arch}-zero{stage}"
            extra = [f"--data.tokenizer={next(iter(done.values())) / 'data' / 'tokenizer.model'}"] if done else []
            assert main(["train", "tiny", "--run-dir", str(run_dir), f"--data.sources={corpus_file}",
                         f"--model.arch={arch}", f"--deepspeed.configs=zero{stage}.json,fp32.json", *TINY_RUN,
                         *extra]) == 0
            done[(arch, stage)] = run_dir
        return done[(arch, stage)]

    return get


def held_out_loss(model: Any, run_dir: Path) -> float:
    """A run's eval loss recomputed from a transformers model's logits: token-weighted cross-entropy over the run's
    fixed held-out batches (every rank's share), at the masked positions (BERT) or on every next token (GPT)."""
    import torch
    import torch.nn.functional as F

    from bigbatch.config.files import load_recipe_file
    from bigbatch.data import prepare

    recipe = load_recipe_file(run_dir / "recipe.json")
    world = read_json(run_dir / "recipe.json")["resolved"]["world"]
    data = prepare(recipe, run_dir / "data", True, lambda x: x)
    total = count = 0.0
    with torch.no_grad():
        for batch in (b for rank in range(world) for b in data.eval_batches(rank, world, 64)):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            if recipe.model.arch == "bert":
                logits, labels = logits[labels != -100], labels[labels != -100]
            else:
                logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            total += float(F.cross_entropy(logits.double(), labels, reduction="sum"))
            count += labels.numel()
    return total / count


# Under `make mutate` whether the fused kernels run compiled depends on mutmut's phase, not on the code: its stats pass
# wraps them in a trampoline Dynamo cannot trace, and kernels.Compiled's eager fallback then holds for the process.
# There the tests check the numbers (the same arithmetic either way), not how many compiled regions ran.
MUTATING = "MUTANT_UNDER_TEST" in os.environ


def compiled_calls(run: Any) -> int:
    """How many times `run()` entered code compiled by `torch.compile`, counted from the profiler events Dynamo
    emits around every compiled region: tells a compiled path from a silent eager fallback."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return sum(e.name.startswith("Torch-Compiled Region") for e in prof.events())


@pytest.fixture
def inject(monkeypatch):
    """Steps (1-based) at which a gradient gets an inf, the loss a NaN, or a weight an inf before the forward pass,
    through the trainer's public per-step hook (`bigbatch.run.faults.on_step`)."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)  # test only
    plan = {"inf_grad": set(), "nan_loss": set(), "inf_weight": set(), "step": 0}
    hooked = weakref.WeakSet()

    def corrupt(step, model):
        plan["step"] = step
        if model in hooked:
            return
        hooked.add(model)
        first = next(p for p in model.parameters() if p.requires_grad)
        first.register_hook(lambda g: g * math.inf if plan["step"] in plan["inf_grad"] else g)

        def break_weight(m, args):
            if m.training and plan["step"] in plan["inf_weight"]:
                first.data.fill_(math.inf)

        model.register_forward_pre_hook(break_weight)
        model.register_forward_hook(
            lambda m, a, out: out * math.nan if m.training and plan["step"] in plan["nan_loss"] else out)

    remove = faults.on_step(corrupt)
    yield plan
    remove()


# The GPU recipes ship with micro_batch and activation_checkpointing "auto" (chosen at start by the planner); tests of
# fixed arithmetic pin the numbers they shipped with before, so their figures stay worked out by hand.
PINNED = {
    "bert_base": {"batch.micro_batch": "512", "phases.1.micro_batch": "64"},
    "bert_large": {"batch.micro_batch": "256", "phases.1.micro_batch": "32"},
    "bert_large_32k": {"batch.micro_batch": "256", "phases.1.micro_batch": "32"},
    "gpt2_small": {"batch.micro_batch": "32"},
    "gpt2_medium": {"batch.micro_batch": "16"},
    "gpt2_xl": {"batch.micro_batch": "4", "deepspeed.configs": "zero2.json,bf16.json,act_ckpt.json"},
    "llama_1b": {"batch.micro_batch": "4", "deepspeed.configs": "zero2.json,bf16.json,act_ckpt.json"},
}


def pinned(name: str, overrides: dict | None = None):
    """The shipped recipe `name` at the micro-batch and checkpointing it had before "auto" (tiny: as shipped)."""
    extra = {"deepspeed.activation_checkpointing": ""} if name in PINNED else {}
    return load_recipe(name, {**PINNED.get(name, {}), **extra, **(overrides or {})})


def step_nan_gapped(make: Any, weights: list[list[float]], grads: list[list[list[float]]],
                    gap: int = 2) -> tuple[list, Any]:
    """The parameters `weights` as one flat fp64 tensor with `gap` NaN elements after each (the alignment gaps of a
    ZeRO flat partition), given to the optimizer `make([flat])` with its layout (names a, b, c, ...) and stepped once
    per entry of `grads` (NaN in the gaps too); returns each parameter's values after the steps, and the optimizer."""
    import torch

    from bigbatch.optim.layerwise import FlatLayout

    starts = [sum(len(w) + gap for w in weights[:i]) for i in range(len(weights))]
    flat = torch.full((starts[-1] + len(weights[-1]) + gap,), math.nan, dtype=torch.float64)
    for s, w in zip(starts, weights):
        flat[s:s + len(w)] = torch.tensor(w, dtype=torch.float64)
    opt = make([flat])
    opt.set_layout(flat, FlatLayout(tuple("abcdefgh"[:len(weights)]), tuple(
        (s, len(w), i) for i, (s, w) in enumerate(zip(starts, weights))), None))
    for step_grads in grads:
        g = torch.full_like(flat, math.nan)
        for s, gi in zip(starts, step_grads):
            g[s:s + len(gi)] = torch.tensor(gi, dtype=torch.float64)
        flat.grad = g
        opt.step()
    return [flat[s:s + len(w)].tolist() for s, w in zip(starts, weights)], opt
