"""bigbatch/plan/command.py: `bigbatch plan` end to end: its flags, exit codes, one-sentence errors, the text and
JSON reports, and reading a pilot run's noise scale."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bigbatch.cli import main
from bigbatch.config import ConfigError, DeepSpeedSection
from bigbatch.config.files import load_recipe
from bigbatch.plan import hardware
from bigbatch.plan.command import cmd_plan, parse_memory, read_noise_scale
from bigbatch.plan.timing import Cluster, estimate

from conftest import pinned


@pytest.mark.parametrize("text,expected", [("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("80", 80 * 2**30),
                                           ("40 gb", 40 * 10**9), ("1.5GiB", 3 * 2**29),
                                           # a card: what nvidia-smi reports, in MiB (hardware.CAPACITIES cites each)
                                           ("A100-80GB", 81_252 * 2**20), ("H100-SXM", 81_559 * 2**20)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


def test_gpu_recipes_plan_on_the_memory_the_card_reports(capsys):
    """The GPU recipes name their card, not the datasheet's decimal 80 GB (80e9 bytes = 74.5 GiB): the plan and
    "auto" run on the A100 80GB's 81,252 MiB, the smaller of the A100 and H100 80GB."""
    for name in ("bert_base", "bert_large", "gpt2_small", "gpt2_medium", "gpt2_xl", "llama_1b"):
        assert parse_memory(load_recipe(name).cluster.gpu_memory) == 81_252 * 2**20, name
    main(["plan", "gpt2_medium"])
    assert "of 79.35 GiB each" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["", "eighty", "80TB", "80MB", "-1", "0", "GB"])
def test_parse_memory_bad_input(text):
    with pytest.raises(ConfigError) as err:
        parse_memory(text)
    message = str(err.value)
    assert repr(text) in message and message.endswith(".") and ". " not in message


def test_cmd_plan_tiny_fits_in_a_huge_gpu(capsys):
    assert cmd_plan(["tiny", "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory", "1000GB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny fits as written on 2 GPUs (1 x 2) of 931.32 GiB each: ZeRO-1 fp32")
    assert "stage  precision" not in out  # the full tables only with --detail
    assert cmd_plan(["tiny", "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory", "1000GB", "--detail"]) == 0
    detail = capsys.readouterr().out
    assert "stage  precision" in detail and detail.count("\n") > out.count("\n") + 12


def test_cmd_plan_tiny_does_not_fit_in_a_tiny_gpu(capsys):
    assert cmd_plan(["tiny", "--nodes=1", "--gpus-per-node=2", "--gpu-memory=1GB", "--data.seq_len=32"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("tiny does not fit as written") and "not even micro-batch 1 fits" in out


def test_cmd_plan_world_the_global_batch_does_not_divide(capsys):
    assert cmd_plan(["tiny", "--gpus-per-node=3", "--gpu-memory=1000GB", "--detail"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("tiny does not run as written on 3 GPUs (1 x 3) of 931.32 GiB each: "
                          "batch.global_batch=4096 is not divisible")
    assert "no micro-batch that fits does" in out


def test_the_answer_comes_first_and_its_gain_is_the_time_model_s(capsys):
    """gpt2_xl on its 128 H100s: checkpointing is on though the micro-batch its ramp allows (4: every ramp batch
    from 512 must split over 128 GPUs) fits without it; switching it off saves the recompute."""
    pin = ["--batch.micro_batch=4", "--deepspeed.configs=zero2.json,bf16.json,act_ckpt.json",
           "--deepspeed.activation_checkpointing="]  # as gpt2_xl shipped before "auto"
    assert main(["plan", "gpt2_xl", "--gpu", "H100-SXM", *pin]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("gpt2_xl fits as written on 128 GPUs (16 x 8) of 79.65 GiB each: ZeRO-2 bf16, "
                               "checkpointing on")
    assert lines[1].startswith("Time to train on 16 x 8 H100-SXM: ") and "GPU-hours" in lines[1]
    assert lines[2].startswith("Helps most: micro-batch 4, checkpointing off")
    recipe = pinned("gpt2_xl")
    cluster = Cluster(16, 8, hardware.DEVICES["H100-SXM"], hardware.INTERCONNECTS["ndr400"])
    off = dataclasses.replace(recipe, deepspeed=DeepSpeedSection(("zero2.json", "bf16.json")))
    gain = estimate(recipe, cluster).time_to_train_s / estimate(off, cluster).time_to_train_s
    assert f"{gain:.2f}x faster" in lines[2] and gain > 1.2
    assert lines[3].startswith("Memory per GPU at ZeRO-2 bf16")
    assert lines[4].startswith("  phase 1 of 1 (sequence length 1024, global batch 4096), micro-batch 4: ")
    assert not lines[5]  # one line per phase, then the time table
    assert main(["plan", "gpt2_xl", "--gpu", "H100-SXM", "--json", *pin]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["best_change"]["speedup"] == pytest.approx(gain) and got["auto"] is None
    # as shipped, "auto": the plan shows the choice (the same change) and why, and nothing is left to gain
    assert main(["plan", "gpt2_xl", "--gpu", "H100-SXM"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "checkpointing off, micro-batch 4" in lines[0] and lines[2].startswith("Helps most: nothing faster")
    peak = float(lines[0].split("needs ")[1].split(" GiB")[0])
    assert lines[3] == (f"auto chose micro-batch 4, checkpointing off: fits in {peak:.1f} of 79.6 GiB, {gain:.2f}x "
                        "faster than 4 with checkpointing on.")


def _pilot(tmp_path, values):
    lines = [json.dumps({"step": i, "loss": 5.0, **({"noise_scale": v} if v is not None else {})})
             for i, v in enumerate(values, 1)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path)


def test_read_noise_scale_takes_the_last_logged_value(tmp_path):
    got = read_noise_scale(_pilot(tmp_path, [100.0, None, 300.0, None]))
    assert (got["noise_scale"], got["step"]) == (300.0, 3)
    with pytest.raises(ConfigError, match="--noise-scale=.*no positive noise_scale"):
        read_noise_scale(_pilot(tmp_path, [None, None]))
    with pytest.raises(ConfigError, match="--noise-scale=.*no metrics.jsonl"):
        read_noise_scale(str(tmp_path / "missing"))


def test_read_noise_scale_names_a_line_that_is_not_json_and_skips_a_torn_last_one(tmp_path):
    good = json.dumps({"step": 1, "noise_scale": 100.0})
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n\n{{\"step\": 2, \"lo\n{good}\n")
    with pytest.raises(ConfigError, match="line 3 of metrics.jsonl is not JSON"):
        read_noise_scale(str(tmp_path))
    # a kill mid-write cuts the last line short: the values before it stand (bigbatch.run.metrics.read_metrics)
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n{{\"step\": 2, \"lo")
    assert read_noise_scale(str(tmp_path))["noise_scale"] == 100.0


@pytest.mark.parametrize("argv,needle", [
    (["--gpu", "V100"], "--gpu='V100' is not in the catalogue"),
    (["--interconnect", "myrinet"], "--interconnect='myrinet' is not in the catalogue"),
    (["--efficiency", "1.5"], "--efficiency=1.5 is above 1"),
    (["--efficiency", "-1"], "--efficiency=-1.0 must be a positive number"),
    (["--scan-nodes", "1,x"], "--scan-nodes='1,x' is not a list of node counts"),
    (["--noise-scale", "/nonexistent"], "--noise-scale='/nonexistent' holds no metrics.jsonl"),
])
def test_bad_flags_end_with_one_sentence_and_exit_2(argv, needle, capsys):
    assert main(["plan", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_cli_json_has_phases_memory_scaling_and_noise_grid(tmp_path, capsys):
    run = _pilot(tmp_path, [2000.0])
    assert main(["plan", "bert_base", "--gpu", "H100-SXM", "--nodes", "2", "--json", "--scan-nodes", "1,2",
                 "--noise-scale", run]) == 0
    out = json.loads(capsys.readouterr().out)
    keys = {"seq_len", "global_batch", "micro_batch", "grad_accum", "steps", "step_time_s", "samples_per_s",
            "tokens_per_s", "mfu", "compute_s", "comm_s", "optimizer_s", "time_s"}
    assert len(out["phases"]) == 2 and all(keys <= set(p) for p in out["phases"])
    assert out["time_to_train_s"] == pytest.approx(sum(p["time_s"] for p in out["phases"]))
    assert out["device"]["name"] == "H100-SXM" and out["world"] == 16
    assert [r["nodes"] for r in out["scaling"]] == [1, 2] and out["scaling"][0]["scaling_efficiency"] == 1
    assert out["memory"]["fits"] and len(out["memory"]["phases"]) == 2
    assert out["noise_scale"]["noise_scale"] == 2000.0


def test_cli_text_prints_the_time_table(capsys):
    assert main(["plan", "bert_large", "--gpu", "A100-80GB", "--nodes", "32"]) == 0
    out = capsys.readouterr().out
    assert "Time on 32 x 8 A100-80GB, hdr200 between nodes" in out and "Time to train:" in out
    assert "samples/s and tokens/s: all 256 GPUs together" in out and "tokens/s/GPU" in out


def test_a_recipe_that_does_not_fit_gets_no_time(capsys):
    argv = ["plan", "tiny", "--nodes=1", "--gpus-per-node=2", "--gpu-memory=1GB", "--data.seq_len=32"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("Time to train: none. tiny does not fit as written")
    assert "GPU-hours" not in out and "samples/s" not in out and "no time for a run that cannot start" in out
    assert main([*argv, "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert got["time_to_train_s"] is None and got["phases"] == [] and "does not fit" in got["time_error"]


@pytest.mark.slow
def test_stdout_carries_no_deepspeed_chatter(tmp_path):
    """A fresh process (DeepSpeed imported for the first time inside `bigbatch plan`): its "Setting accelerator"
    warning goes to stderr, so the report's first line is bigbatch's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bigbatch", "plan", "tiny", "--gpu", "H100-SXM"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "accelerator" not in done.stdout.lower() and "[WARNING]" not in done.stdout
    assert done.stdout.startswith("tiny")


def test_auto_that_finds_nothing_is_a_report_that_does_not_fit(capsys):
    assert main(["plan", "gpt2_xl", "--gpu-memory=4GB"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("gpt2_xl does not fit as written") and "micro-batch 1 needs" in lines[0]
    assert lines[3].startswith("auto: recipe gpt2_xl: no micro-batch fits in 3.73 GiB per GPU")


def test_the_teachers_memory_decides_whether_a_distillation_fits_and_its_auto_micro_batch(tmp_path, capsys):
    """A teacher of BERT-large's shape: its fp32 weights on every GPU (ZeRO partitions none of it) and its forward
    activations are in the total, so tiny_distil, which fits 4 GiB alone, does not with it, and "auto" picks a smaller
    micro-batch."""
    import torch
    from transformers import AutoConfig, BertForMaskedLM

    from bigbatch.config import ModelConfig
    from bigbatch.plan.memory import activation_bytes

    teacher = tmp_path / "teacher"
    config = AutoConfig.for_model("bert", vocab_size=400, hidden_size=1024, num_hidden_layers=24,
                                  num_attention_heads=16, intermediate_size=4096, max_position_embeddings=512)
    config.save_pretrained(teacher)
    (teacher / "tokenizer.model").write_bytes(b"")  # the planner reads the teacher's shape only

    def planned(*extra: str) -> tuple[int, dict, dict]:
        code = main(["plan", "tiny_distil", "--json", "--gpu-memory=4", *extra])
        out = json.loads(capsys.readouterr().out)
        phase = out["memory"]["phases"][0]
        own = next(r for r in phase["rows"] if (r["stage"], r["precision"]) == (phase["stage"], phase["precision"]))
        return code, out, own

    code, alone, own = planned()
    assert code == 0 and alone["memory"]["fits"] and own["teacher"] == 0 and own["total"] < 4 * 2**30
    code, taught, with_teacher = planned(f"--distill.teacher={teacher}")
    phase = taught["memory"]["phases"][0]
    assert phase["precision"] == "fp32"
    with torch.device("meta"):
        weights = 4 * sum(p.numel() for p in BertForMaskedLM(config).parameters())
    layer = ModelConfig(hidden_size=1024, num_layers=1, num_heads=16, intermediate_size=4096, pad_vocab_to_multiple=1)
    activations = activation_bytes(layer, 400, 64, phase["micro_batch"], "fp32")  # no_grad: one layer at a time
    assert with_teacher["teacher"] == weights + activations
    assert with_teacher["total"] == own["total"] + weights + activations > 4 * 2**30
    assert code == 1 and not taught["memory"]["fits"]

    _, alone, _ = planned("--batch.micro_batch=auto")
    _, taught, own = planned("--batch.micro_batch=auto", f"--distill.teacher={teacher}")
    assert taught["auto"]["micro_batches"][0] < alone["auto"]["micro_batches"][0]
    assert taught["memory"]["fits"] and own["teacher"] > weights and own["total"] <= 4 * 2**30
