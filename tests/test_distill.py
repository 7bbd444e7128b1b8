"""Distillation (bigbatch/models/distill.py, bigbatch/run/teacher.py): the loss against Hinton's formula written out,
the teacher frozen and kept out of the optimizer and the checkpoints, the student's start from the teacher's layers,
`bigbatch train tiny_distil --distill.teacher=<run>` in-process, bad input, and one 2-rank launch that stops and
resumes a distillation at ZeRO-1 and ZeRO-3, bit for bit."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bigbatch.cli import main
from bigbatch.config import DistillConfig, ModelConfig
from bigbatch.models.build import build_model
from bigbatch.models.distill import Distilled, every_other, init_from_teacher, kd_loss, weights_sha256
from bigbatch.run import teacher as teacher_module
from bigbatch.run.metrics import read_metrics

from conftest import WORKERS, deepspeed_launch

SMALL = ["--schedule.steps=3", "--batch.global_batch=64", "--batch.micro_batch=16", "--run.eval_every=3",
         "--data.eval_samples=64"]


def _hand_kd(zs: torch.Tensor, zt: torch.Tensor, t: float) -> float:
    """T^2 * mean over rows of sum_v p_t(v) (log p_t(v) - log p_s(v)), with p = softmax(z / T), in float64 loops."""
    total = 0.0
    for row_s, row_t in zip(zs.double().tolist(), zt.double().tolist()):
        es = [math.exp(v / t - max(row_s) / t) for v in row_s]
        et = [math.exp(v / t - max(row_t) / t) for v in row_t]
        ps = [e / sum(es) for e in es]
        pt = [e / sum(et) for e in et]
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    return t * t * total / max(len(zs), 1)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 6), vocab=st.integers(2, 9), t=st.floats(0.5, 8.0), seed=st.integers(0, 1000))
@example(rows=0, vocab=2, t=1.0, seed=0)
@example(rows=6, vocab=9, t=8.0, seed=1)
@example(rows=1, vocab=2, t=0.5, seed=2)
@example(rows=1, vocab=3, t=5.0, seed=939)  # a small KL at high T: 1.2e-6 off in fp32, 5e-5 relative
def test_the_kd_loss_is_t_squared_times_the_kl(rows, vocab, t, seed):
    g = torch.Generator().manual_seed(seed)
    zs, zt = torch.randn(rows, vocab, generator=g) * 3, torch.randn(rows, vocab, generator=g) * 3
    # kd_loss runs in fp32: each of the `vocab` terms p_t (log p_t - log p_s) carries a few fp32 ulps, scaled by T^2
    fp32 = t * t * vocab * 2e-7
    assert float(kd_loss(zs, zt, t)) == pytest.approx(_hand_kd(zs, zt, t), rel=1e-5, abs=fp32)


def test_at_temperature_one_it_is_the_plain_kl():
    from torch.distributions import Categorical, kl_divergence

    zs, zt = torch.randn(5, 7), torch.randn(5, 7)
    plain = kl_divergence(Categorical(logits=zt), Categorical(logits=zs)).mean()
    assert float(kd_loss(zs, zt, 1.0)) == pytest.approx(float(plain), rel=1e-6)


def _pair(arch: str, teacher_layers: int = 2, student_layers: int = 1, vocab: int = 50):
    cfg = ModelConfig(arch=arch, hidden_size=16, num_layers=teacher_layers, num_heads=2, intermediate_size=32,
                      max_position=16, dropout=0.0)
    torch.manual_seed(0)
    teacher = build_model(cfg, vocab, pad_id=0)
    student = build_model(dataclasses.replace(cfg, num_layers=student_layers), vocab, pad_id=0)
    return teacher, student


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_the_loss_covers_the_predicted_positions_and_skips_ignored_labels(arch):
    """BERT: the masked positions only; GPT: every next token; -100 labels never count. Recomputed from the two
    transformers models' full logits, apart from the student's code."""
    teacher, student = _pair(arch)
    t, vocab = 3.0, 50
    cfg = DistillConfig(teacher="x", temperature=t, alpha_kd=1.0, alpha_hard=0.25, alpha_hidden=0.5)
    model = Distilled(student.hf, teacher.hf, cfg, arch, vocab).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5], labels[2, 9], labels[2, 1] = 7, 11, 13, 17
    if arch == "gpt2":  # every token is a label but the padding
        labels = ids.clone()
        labels[1, 6:] = -100
    total = model(input_ids=ids, attention_mask=mask, labels=labels)
    terms = model.take_terms()
    with torch.no_grad():
        # the real vocabulary: the embedding's padded rows (56 here) are no token
        zs = student.hf(input_ids=ids, attention_mask=mask).logits[..., :vocab]
        zt = teacher.hf(input_ids=ids, attention_mask=mask).logits[..., :vocab]
    if arch == "bert":
        keep = labels != -100
        zs, zt, target = zs[keep], zt[keep], labels[keep]
    else:
        keep = labels[:, 1:] != -100
        zs, zt, target = zs[:, :-1][keep], zt[:, :-1][keep], labels[:, 1:][keep]
    assert len(target) == (4 if arch == "bert" else 3 * 9 - 4)
    assert terms["loss_kd"] == pytest.approx(_hand_kd(zs, zt, t), rel=1e-4)
    hard = float(torch.nn.functional.cross_entropy(zs.double(), target))
    assert terms["loss_hard"] == pytest.approx(hard, rel=1e-5)
    assert float(total.detach()) == pytest.approx(terms["loss_kd"] + 0.25 * hard + 0.5 * terms["loss_hidden"], rel=1e-5)
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    model.eval()
    assert float(model(input_ids=ids, attention_mask=mask, labels=labels)) == pytest.approx(hard, rel=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_the_student_starts_from_every_other_teacher_layer(arch):
    teacher, student = _pair(arch, teacher_layers=4, student_layers=2)
    layers = every_other(4, 2)
    assert layers == (0, 2)
    copied = init_from_teacher(student.hf, teacher.hf, layers)
    t, s = teacher.hf.state_dict(), student.hf.state_dict()
    layer_keys = [k for k in s if ".0." in k or ".1." in k]
    assert layer_keys and set(layer_keys) <= set(copied)
    for name in s:
        for j, i in enumerate(layers):
            for tag in ("layer", "h", "layers"):
                if f".{tag}.{j}." in name:
                    assert torch.equal(s[name], t[name.replace(f".{tag}.{j}.", f".{tag}.{i}.")]), name
        if name in t and not any(f".{tag}." in name for tag in ("layer", "h", "layers")):
            assert torch.equal(s[name], t[name]), name  # embeddings, head, final norm


@pytest.fixture(scope="module")
def teacher_run(tiny_runs):
    return tiny_runs("bert", 0)


@pytest.fixture(scope="module")
def distilled(teacher_run, corpus_file, tmp_path_factory):
    """`bigbatch train tiny_distil --distill.teacher=<a tiny run>` in this process, its teacher and engine kept."""
    import bigbatch.run.train as train_module

    seen = {}
    mp = pytest.MonkeyPatch()
    real_load, real_init = teacher_module.load, train_module.initialize

    def load(spec):
        seen["teacher"] = real_load(spec)
        return seen["teacher"]

    def initialize(**kwargs):
        seen["engine"] = real_init(**kwargs)[0]
        return (seen["engine"],)

    mp.setattr(teacher_module, "load", load)
    mp.setattr(train_module, "initialize", initialize)
    run = tmp_path_factory.mktemp("distil") / "student"
    try:
        assert main(["train", "tiny_distil", f"--distill.teacher={teacher_run}", "--run-dir", str(run),
                     f"--data.sources={corpus_file}", *SMALL]) == 0
    finally:
        mp.undo()
    return run, seen


@pytest.mark.slow
def test_the_teacher_stays_frozen_and_out_of_the_optimizer_and_checkpoints(distilled, teacher_run):
    run, seen = distilled
    tutor, engine = seen["teacher"], seen["engine"]
    assert weights_sha256(tutor.hf) == tutor.record["sha256"]  # bit-identical after the steps
    assert all(p.grad is None and not p.requires_grad for p in tutor.hf.parameters())
    assert not tutor.hf.training
    teacher_ids = {id(p) for p in tutor.hf.parameters()}
    assert not teacher_ids & {id(p) for p in engine.module.parameters()}
    optimized = [p for group in engine.optimizer.bit16_groups for p in group]  # ZeRO-1: the params it partitions
    assert optimized and not teacher_ids & {id(p) for p in optimized}
    assert sum(p.numel() for p in optimized) == sum(p.numel() for p in engine.module.parameters())
    record = json.loads((run / "recipe.json").read_text())["resolved"]
    assert record["teacher"]["source"] == str(teacher_run.resolve()) and record["teacher"]["init_layers"] == [0]
    assert record["parameters"] == sum(p.numel() for p in engine.module.parameters())
    saved = torch.load(next((run / "checkpoints").glob("step*/mp_rank_00_model_states.pt")), weights_only=False)
    assert set(saved["module"]) == set(engine.module.state_dict())
    assert all(k.startswith("hf.") for k in saved["module"])
    # the student took the teacher's 400-piece tokenizer, not the 2,000 tiny_distil names
    assert record["vocab_size"] == 400
    metrics = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    for r in metrics:
        assert r["loss"] == pytest.approx(r["loss_kd"] + 0.5 * r["loss_hard"] + 0.5 * r["loss_hidden"], rel=1e-5)


@pytest.mark.slow
def test_a_resume_with_another_teacher_is_refused_by_name(distilled, tiny_runs, corpus_file, capsys):
    run, _ = distilled
    other = tiny_runs("bert", 2)  # same tokenizer file, other weights
    tokenizer = json.loads((run / "recipe.json").read_text())["recipe"]["data"]["tokenizer"]
    before = (run / "recipe.json").read_text()
    code = main(["train", "tiny_distil", f"--distill.teacher={other}", "--run-dir", str(run), "--resume",
                 f"--data.sources={corpus_file}", f"--data.tokenizer={tokenizer}", "--data.vocab_size=400", *SMALL])
    assert code == 2
    err = capsys.readouterr().err
    assert "distill.teacher" in err and "other weights" in err and err.count("\n") == 1
    assert (run / "recipe.json").read_text() == before


def _other_tokenizer(tmp_path: Path) -> Path:
    from bigbatch.data.corpus import python_docs
    from bigbatch.data.tokenizer import train_tokenizer

    return train_tokenizer(python_docs()[:300], tmp_path / "other", 300)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "not_a_run", "hf_not_cached", "vocabulary", "alphas"])
def test_bad_input_is_one_sentence_and_exit_2_with_nothing_written(case, teacher_run, corpus_file, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    extra = {"missing": [f"--distill.teacher={tmp_path / 'nowhere'}"],
             "not_a_run": [f"--distill.teacher={empty}"],
             "hf_not_cached": ["--distill.teacher=hf:nobody/no-such-model"],
             "vocabulary": [f"--distill.teacher={teacher_run}", f"--data.tokenizer={_other_tokenizer(tmp_path)}",
                            "--data.vocab_size=300"],
             "alphas": [f"--distill.teacher={teacher_run}", "--distill.alpha_kd=0", "--distill.alpha_hard=0",
                        "--distill.alpha_hidden=0"]}[case]
    run = tmp_path / "run"
    assert main(["train", "tiny_distil", "--run-dir", str(run), f"--data.sources={corpus_file}", *SMALL, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigbatch: error: ") and err.count("\n") == 1
    assert {"missing": "does not exist", "not_a_run": "neither a bigbatch run", "hf_not_cached": "not in the local "
            "transformers cache", "vocabulary": "another vocabulary",
            "alphas": "alpha_kd=0"}[case] in err
    assert not run.exists()


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_rank_distillation_and_pruned_recovery_stopped_and_resumed_match_bit_for_bit(teacher_run, corpus_file,
                                                                                         tmp_path):
    """One launch (tests/workers/distill_resume.py): at ZeRO-1 and ZeRO-3, a distillation and a pruned model's recovery
    (`--model.init_from --model.hold_zeros`, what `bigbatch compress --recover` trains), each uninterrupted and stopped
    at step 3 then resumed. Losses equal bit for bit; every pruned weight exactly zero in every checkpoint."""
    from bigbatch.models.compression import prune_unstructured
    from bigbatch.run.compress import open_source

    model = open_source(teacher_run)[0]
    prune_unstructured(model.hf, 0.5)
    model.hf.save_pretrained(tmp_path / "pruned")
    out = tmp_path / "result.json"
    deepspeed_launch([str(WORKERS / "distill_resume.py"), str(teacher_run), str(corpus_file), str(tmp_path),
                      str(out), str(tmp_path / "pruned")], world=2)
    results = json.loads(out.read_text())
    for stage in ("1", "3"):
        for case, keys in ((stage, ("loss_kd", "loss_hard", "loss_hidden")), (f"recover{stage}", ())):
            r = results[case]
            assert r["codes"] == [0, 0, 0]
            fields = ("step", "loss", "grad_norm", *keys)
            plain = [{k: m[k] for k in fields} for m in r["plain"] if "loss" in m]
            stopped = [{k: m[k] for k in fields} for m in r["stopped"] if "loss" in m]
            assert [m["step"] for m in plain] == [1, 2, 3, 4]
            assert stopped == plain, case
            evals = [(m["step"], m["eval_loss"]) for m in r["plain"] if "eval_loss" in m]
            assert evals == [(m["step"], m["eval_loss"]) for m in r["stopped"] if "eval_loss" in m]
        for name, tags in results[f"recover{stage}"]["zeros"].items():
            assert "step00000004" in tags and len(tags) >= 2, name  # the stopped run saved at step 3 too
            for tag, (held, still, moved) in tags.items():
                assert held > 1000 and still == held, (stage, name, tag)  # every pruned weight still exactly zero
                assert moved > 1000, (stage, name, tag)  # and the others trained

def test_check_validates_the_distill_section(tmp_path, capsys):
    assert main(["check", "tiny_distil", f"--distill.teacher={tmp_path / 'nowhere'}"]) == 2
    assert "distill.teacher=" in capsys.readouterr().out
    assert main(["check", "tiny_distil", f"--distill.teacher={tmp_path}", "--distill.temperature=0"]) == 2
    assert "distill.temperature=0.0 must be positive" in capsys.readouterr().err
    assert main(["check", "tiny_distil"]) == 0  # no teacher: the section is off


@pytest.mark.slow
def test_plan_counts_the_teachers_weights_activations_and_forward_flops(teacher_run, capsys):
    from bigbatch.config.files import load_recipe
    from bigbatch.plan.teacher import teacher_cost

    recipe = load_recipe("tiny_distil", {"distill.teacher": str(teacher_run)})
    cost = teacher_cost(recipe, micro_batch=256, grad_accum=16, precision="bf16")
    teacher = teacher_module.load(str(teacher_run)).hf
    assert cost["parameters"] == sum(p.numel() for p in teacher.parameters())
    assert cost["weight_bytes"] == 2 * cost["parameters"]  # bf16, nothing else: no gradients, no optimizer state
    h, f, s, v, tokens = 64, 128, 64, 400, 256 * 64  # the tiny teacher: width 64, MLP 128, 400 pieces (padded: 400)
    per_layer = tokens * (2 * h * 3 * h + 2 * h * h + 2 * 2 * h * f) + tokens * 4 * s * h
    head = round(0.15 * tokens) * (2 * h * h + 2 * h * v)  # BERT's head at the masked rows only
    assert cost["forward_flops_per_step"] == 16 * (2 * per_layer + head)
    assert 0 < cost["forward_activation_bytes"]
    assert main(["plan", "tiny_distil", f"--distill.teacher={teacher_run}"]) == 0
    assert "teacher (" in capsys.readouterr().out


@pytest.mark.slow
def test_a_bf16_distillation_holds_its_teacher_in_bf16_and_frozen(teacher_run, corpus_file, tmp_path):
    seen = {}
    real_load = teacher_module.load

    def load(spec):
        seen["teacher"] = real_load(spec)
        return seen["teacher"]

    run = tmp_path / "student"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(teacher_module, "load", load)
        assert main(["train", "tiny_distil", f"--distill.teacher={teacher_run}", "--run-dir", str(run),
                     f"--data.sources={corpus_file}", "--deepspeed.configs=zero1.json,bf16.json", *SMALL]) == 0
    tutor = seen["teacher"].hf
    assert json.loads((run / "ds_config.json").read_text())["bf16"]["enabled"] is True
    assert {p.dtype for p in tutor.parameters()} == {torch.bfloat16}  # the run's precision
    fresh = real_load(str(teacher_run)).hf.to(torch.bfloat16).state_dict()
    assert all(torch.equal(t, fresh[name]) for name, t in tutor.state_dict().items())  # not moved by the steps
    assert not tutor.training and all(p.grad is None for p in tutor.parameters())
    metrics = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in metrics] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss_kd"] > 0 for r in metrics)
