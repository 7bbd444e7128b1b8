"""Fine-tune an exported model (`bigbatch export`) for sequence classification on a local labelled file.

    python -m bigbatch.finetune --model runs/tiny-.../export --train train.jsonl [--eval eval.jsonl]
        [--epochs 3] [--lr 5e-5] [--batch-size 32] [--max-len 128] [--warmup 0.1] [--seed 0] [--out DIR] [--overwrite]

Input: JSON lines with "text" and "label" (an int or a string), or a .csv/.tsv file whose header names text and label.
Texts are tokenized by the run's SentencePiece model as in pretraining: [CLS] text [SEP] for BERT (whose classifier
reads [CLS] through the pooler), text [SEP] for GPT-2 and Llama (whose classifier reads the last token that is not
[PAD], here [SEP]). Writes <out> (default <model>-classifier): the model (save_pretrained), the tokenizer files and
metrics.json. Bad input ends with one sentence on stderr and exit code 2.

Plain single-process PyTorch, no DeepSpeed: a classifier fine-tune of these models fits one device. AdamW with linear
warmup then linear decay to 0, as in BERT's fine-tuning (Devlin et al. 2019, appendix A.3).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from bigbatch.config.errors import ConfigError, exit_code
from bigbatch.data.tokenizer import CLS, PAD, SEP, Tokenizer
from bigbatch.optim import param_groups


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bigbatch.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a directory written by `bigbatch export`")
    p.add_argument("--train", type=Path, required=True, help=".jsonl (text, label), .csv or .tsv")
    p.add_argument("--eval", type=Path, default=None, help="held-out examples in the same format")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128, help="tokens per text with its special tokens")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: <model>-classifier")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    return p


def read_examples(path: Path) -> list[tuple[str, str]]:
    """(text, label name) pairs; a label is an int or a string, named by its text so that 1 and "1" agree."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give a .jsonl, .csv or .tsv file of text and label.")
    if path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="") as f:
            rows: list[Any] = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path} line {n} is not JSON ({err.msg}); write one object per line, e.g. "
                                      '{"text": "...", "label": 1}.') from None
    examples = []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            raise ConfigError(f"{path} record {n} has no \"text\" and \"label\" fields; every record needs both.")
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)) or not str(label).strip():
            raise ConfigError(f"{path} record {n} has label {label!r}; a label is an int or a non-empty string.")
        examples.append((str(row["text"]), str(label).strip()))
    if not examples:
        raise ConfigError(f"{path} holds no examples; write one record per line with \"text\" and \"label\".")
    return examples


def label_names(examples: list[tuple[str, str]], path: Path) -> list[str]:
    """The classes in a stable order: numerically when every label is an integer, else alphabetically."""
    names = {label for _, label in examples}
    if len(names) < 2:
        raise ConfigError(f"{path} has one class only ({names.pop()!r}); a classifier needs at least two labels.")
    numeric = all(re.fullmatch(r"-?\d+", n) for n in names)
    return sorted(names, key=lambda n: (int(n), "") if numeric else (0, n))


def encode(tokenizer: Any, texts: list[str], bert: bool, max_len: int) -> list[list[int]]:
    """Token ids with the special tokens pretraining put around text (see bigbatch.data.packing), cut to max_len."""

    if bert:
        return [[CLS, *ids[: max_len - 2], SEP] for ids in tokenizer.encode(texts)]
    return [[*ids[: max_len - 1], SEP] for ids in tokenizer.encode(texts)]


def batches(ids: list[list[int]], labels: list[int], order: list[int], size: int) -> list[dict[str, Any]]:
    """Right-padded micro-batches with [PAD] and an attention mask."""
    import torch


    out = []
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), PAD, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        out.append({"input_ids": input_ids, "attention_mask": mask,
                    "labels": torch.tensor([labels[i] for i in chunk], dtype=torch.long)})
    return out


def accuracy(model: Any, data: list[dict[str, Any]], device: Any) -> float:
    import torch

    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in data:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            right += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    model.train()
    return right / total


def _check_args(a: argparse.Namespace) -> Path:
    """Refuses what would fail after the model has loaded; returns the output directory."""
    for key in ("epochs", "batch_size", "max_len"):
        if getattr(a, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')}={getattr(a, key)} must be a positive integer.")
    if not 0.0 <= a.warmup < 1.0 or a.lr <= 0:
        raise ConfigError(f"--lr={a.lr} must be positive and --warmup={a.warmup} a fraction in [0, 1).")
    if not (a.model / "config.json").is_file() or not (a.model / "tokenizer.model").is_file():
        raise ConfigError(f"{a.model} is not an exported model (it needs config.json and tokenizer.model); make one "
                          "with `bigbatch export <run_dir>`.")
    out = a.out if a.out is not None else a.model.resolve().with_name(f"{a.model.resolve().name}-classifier")
    if a.model.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--out {out} holds the model it fine-tunes; choose another --out.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not a.overwrite:
        raise ConfigError(f"{out} already exists and is not empty; choose another --out or pass --overwrite to "
                          "replace it.")
    return out


def finetune(a: argparse.Namespace) -> dict[str, Any]:
    """Trains, evaluates after each epoch, saves to the output directory; returns the metrics it wrote."""
    import torch
    from transformers import AutoConfig

    out = _check_args(a)
    train = read_examples(a.train)
    names = label_names(train, a.train)
    index = {n: i for i, n in enumerate(names)}
    held_out = read_examples(a.eval) if a.eval is not None else []
    unknown = sorted({label for _, label in held_out} - set(index))
    if unknown:
        raise ConfigError(f"{a.eval} has labels {unknown} that {a.train} never shows; the classifier only knows "
                          f"{names}.")

    config = AutoConfig.from_pretrained(a.model)
    bert = config.model_type == "bert"
    max_len = a.max_len
    if max_len > config.max_position_embeddings:  # position embeddings end there
        max_len = config.max_position_embeddings
        print(f"--max-len {a.max_len} cut to {max_len}, the model's max_position_embeddings")
    tokenizer = Tokenizer(a.model / "tokenizer.model")
    train_ids = encode(tokenizer, [t for t, _ in train], bert, max_len)
    train_labels = [index[label] for _, label in train]
    eval_data = batches(encode(tokenizer, [t for t, _ in held_out], bert, max_len),
                        [index[label] for _, label in held_out], list(range(len(held_out))), a.batch_size)

    torch.manual_seed(a.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _classifier(a.model, names, index).to(device).train()
    epochs = _train_epochs(a, model, train_ids, train_labels, eval_data, device)
    _save(model, a.model, out)
    metrics = {"model": str(a.model), "train": str(a.train), "eval": str(a.eval) if a.eval else None,
               "labels": names, "train_examples": len(train), "eval_examples": len(held_out), "max_len": max_len,
               "epochs": epochs, "eval_accuracy": epochs[-1].get("eval_accuracy"),
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"saved {out}")
    return metrics


def _classifier(export: Path, names: list[str], index: dict[str, int]) -> Any:
    from transformers import AutoModelForSequenceClassification

    # pad_token_id: GPT-2 and Llama classify from the last token that is not [PAD]
    return AutoModelForSequenceClassification.from_pretrained(
        export, num_labels=len(names), id2label=dict(enumerate(names)), label2id=index, pad_token_id=PAD)


def _train_epochs(a: argparse.Namespace, model: Any, train_ids: list[list[int]], train_labels: list[int],
                  eval_data: list[dict[str, Any]], device: Any) -> list[dict[str, Any]]:
    """AdamW with a linear warmup and decay, clipped at norm 1; one record per epoch (with the held-out accuracy)."""
    import torch

    optimizer = torch.optim.AdamW(param_groups(model, a.weight_decay), lr=a.lr)
    steps = a.epochs * math.ceil(len(train_ids) / a.batch_size)
    warmup = int(a.warmup * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: (k + 1) / warmup if k < warmup else max(0.0, (steps - k) / (steps - warmup)))
    shuffle = torch.Generator().manual_seed(a.seed)
    epochs = []
    for epoch in range(1, a.epochs + 1):
        order = torch.randperm(len(train_ids), generator=shuffle).tolist()
        total = 0.0
        for batch in batches(train_ids, train_labels, order, a.batch_size):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach()) * len(batch["labels"])
        record: dict[str, Any] = {"epoch": epoch, "train_loss": total / len(train_ids)}
        if eval_data:
            record["eval_accuracy"] = accuracy(model, eval_data, device)
        epochs.append(record)
        print(f"epoch {epoch}/{a.epochs}: train loss {record['train_loss']:.4f}"
              + (f", eval accuracy {record['eval_accuracy']:.4f} ({sum(len(b['labels']) for b in eval_data)} "
                 "examples)" if eval_data else ""), flush=True)
    return epochs


def _save(model: Any, export: Path, out: Path) -> None:
    """The classifier, with the export's tokenizer files so that AutoTokenizer.from_pretrained(out) works as there."""
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    model.save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        if (export / name).is_file():
            shutil.copyfile(export / name, out / name)


def main(argv: Optional[list[str]] = None) -> int:
    return exit_code(lambda: _run(argv), prog="bigbatch.finetune")


def _run(argv: Optional[list[str]]) -> int:
    finetune(_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
