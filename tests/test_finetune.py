"""bigbatch/finetune.py: an exported tiny model learns a held-out word-family task well above chance
(BERT and GPT-2, JSON lines and TSV input); bad input exits 2 with one sentence."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.cli import main as bigbatch
from bigbatch.models.finetune import main as finetune

from conftest import ROOT

WATER = ["river", "ocean", "water", "rain", "lake", "stream", "wave", "shore"]
MACHINE = ["engine", "piston", "gear", "motor", "wheel", "brake", "fuel", "valve"]
FILLER = ["the", "a", "of", "and", "is", "with", "in", "on", "to", "it", "for", "this"]


def word_families(n: int, seed: int) -> list[dict]:
    """Six filler words and two words of one family, shuffled: the family is the label."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        family = (WATER, MACHINE)[i % 2]
        words = rng.choices(FILLER, k=6) + rng.sample(family, 2)
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": ("water", "machine")[i % 2]})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arch,stage", [("bert", 2), ("gpt2", 3)])
def test_finetuned_export_classifies_held_out_text(tiny_runs, arch, stage, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tmp_path / "export"
    assert bigbatch(["export", str(tiny_runs(arch, stage)), "--out", str(model)]) == 0
    records, held_out = word_families(240, seed=1), word_families(80, seed=2)
    if arch == "gpt2":  # integer labels: ints in the JSON lines, their text in the TSV, read as the same classes
        records, held_out = ([{**r, "label": int(r["label"] == "water")} for r in rs] for rs in (records, held_out))
    train = write_jsonl(tmp_path / "train.jsonl", records)
    if arch == "bert":
        eval_file = write_jsonl(tmp_path / "eval.jsonl", held_out)
    else:
        eval_file = tmp_path / "eval.tsv"
        with open(eval_file, "w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "label"], delimiter="\t")
            writer.writeheader()
            writer.writerows(held_out)
    out = tmp_path / "classifier"
    assert finetune(["--model", str(model), "--train", str(train), "--eval", str(eval_file), "--epochs", "5",
                     "--lr", "3e-3", "--batch-size", "16", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 5 and metrics["eval_examples"] == 80
    assert metrics["eval_accuracy"] >= 0.85  # chance is 0.5
    names = ["machine", "water"] if arch == "bert" else ["0", "1"]
    assert metrics["labels"] == names
    classifier = AutoModelForSequenceClassification.from_pretrained(out)
    assert classifier.config.id2label == dict(enumerate(names)) and classifier.config.pad_token_id == 0
    assert (out / "tokenizer.model").is_file()
    # a second run into the same --out is refused
    assert finetune(["--model", str(model), "--train", str(train), "--out", str(out)]) == 2


@pytest.fixture
def fake_export(tmp_path) -> Path:
    """What the checks before loading look for: input errors are found before the model is read."""
    model = tmp_path / "export"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.model").write_bytes(b"")
    return model


@pytest.mark.parametrize("records,eval_records,message", [
    (None, None, "does not exist"),
    ([{"text": "a river", "class": 1}], None, 'record 1 has no "text" and "label" fields'),
    ([{"text": "a river", "label": "water"}, {"text": "a lake", "label": "water"}], None, "has one class only"),
    ([{"text": "a river", "label": 1.5}], None, "a label is an int or a non-empty string"),
    ([{"text": "a", "label": 0}, {"text": "b", "label": 1}], [{"text": "c", "label": 2}], "never shows"),
    ("{not json\n", None, "line 1 is not JSON"),
])
def test_bad_input_is_one_sentence(fake_export, tmp_path, capsys, records, eval_records, message):
    train = tmp_path / "train.jsonl"
    if isinstance(records, str):
        train.write_text(records)
    elif records is not None:
        write_jsonl(train, records)
    args = ["--model", str(fake_export), "--train", str(train), "--out", str(tmp_path / "out")]
    if eval_records is not None:
        args += ["--eval", str(write_jsonl(tmp_path / "eval.jsonl", eval_records))]
    assert finetune(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigbatch.finetune: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_not_an_export_and_existing_out_are_refused(fake_export, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", word_families(4, seed=0))
    assert finetune(["--model", str(tmp_path / "nowhere"), "--train", str(train)]) == 2
    assert "is not an exported model" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert finetune(["--model", str(fake_export), "--train", str(train), "--out", str(tmp_path / "out")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert finetune(["--model", str(fake_export), "--train", str(train), "--out", str(fake_export.parent),
                     "--overwrite"]) == 2
    assert "holds the model" in capsys.readouterr().err


def test_script_exit_code_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bigbatch.finetune", "--model", str(tmp_path), "--train",
                           str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "is not an exported model" in proc.stderr and "Traceback" not in proc.stderr
