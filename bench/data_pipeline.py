"""The data pipeline's throughput against the tiny recipe's training consumption, side by side in one run.

    .venv/bin/python bench/data_pipeline.py            # writes bench/results/data_pipeline-<host>.md

On the built-in corpus (English text that ships with Python) repeated --repeat times into a local .txt file:
  1. load: `datasets`' text builder turns the file into Arrow (once per file; cached after).
  2. tokenize + pack: bigbatch's `datasets.map` steps with a cold cache, at 1 and at every core's worth of workers.
  3. mask + assemble: `TrainingData.train_batch` (MLM masking, attention mask, tensors) over every packed row.
  4. training: `deepspeed --num_gpus 2 -m bigbatch train tiny` (the demo's setup: 2 CPU ranks, ZeRO-1, LAMB), the
     median tokens/s of its steps after the first two.
Throughput is in packed tokens (rows x sequence length, padding included), the unit the trainer consumes. The goal
(issue 7): the pipeline (2 + 3, one process) at least 5x faster than training consumes. Training here uses both
cores while the pipeline ran alone; a per-core ratio is printed too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bigbatch.config.files import load_recipe  # noqa: E402
from bigbatch.data import TrainingData  # noqa: E402
from bigbatch.data.corpus import open_source, python_docs  # noqa: E402
from bigbatch.data.pipeline import iter_rows, preprocess  # noqa: E402
from bigbatch.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

from common import machine, write_results  # noqa: E402


def pipeline(corpus: Path, tokenizer: Path, seq_len: int, num_proc: int, cache: Path) -> dict[str, float]:
    """Seconds to load the file and to tokenize + pack it with a cold `datasets` cache, and the packed rows."""
    started = time.perf_counter()
    docs = open_source(str(corpus), cache_dir=str(cache))
    loaded = time.perf_counter()
    rows = preprocess(docs, tokenizer, "bert", seq_len, num_proc=num_proc)
    packed = np.concatenate(list(iter_rows(rows)))  # the rows as the trainer's .npy file receives them
    done = time.perf_counter()
    return {"load_s": loaded - started, "pack_s": done - loaded, "rows": packed, "docs": len(docs)}


def masking(rows: np.ndarray, tokenizer: Path, micro_batch: int) -> float:
    """Seconds for `train_batch` (masking + tensors) over every row, micro-batch by micro-batch."""
    data = TrainingData("bert", rows, rows[:8], Tokenizer(tokenizer), seed=1, mlm_probability=0.15)
    started = time.perf_counter()
    for start in range(0, len(rows) - micro_batch + 1, micro_batch):
        data.train_batch(np.arange(start, start + micro_batch))
    return time.perf_counter() - started


def training_tokens_per_s(steps: int, workdir: Path) -> tuple[float, dict]:
    """The tiny recipe's consumption: a real 2-rank deepspeed run, median tokens/s after the first two steps."""
    run = workdir / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--module", "bigbatch", "train", "tiny",
           "--run-dir", str(run), f"--schedule.steps={steps}", f"--run.eval_every={steps}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"training run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]
    recipe = json.loads((run / "recipe.json").read_text())["resolved"]
    return statistics.median(timed), recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=4, help="copies of the built-in corpus in the file (default 4)")
    ap.add_argument("--train-steps", type=int, default=8, help="steps of the training run (default 8)")
    ap.add_argument("--out", type=Path, default=None, help="markdown table path (default bench/results/...)")
    args = ap.parse_args()
    recipe = load_recipe("tiny")
    seq_len, micro = recipe.data.seq_len, 256
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = python_docs()
        corpus = work / "corpus.txt"
        corpus.write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs * args.repeat))
        started = time.perf_counter()
        tokenizer = train_tokenizer(docs, work / "tok", recipe.data.vocab_size)
        tok_train_s = time.perf_counter() - started
        print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB; tokenizer trained in {tok_train_s:.1f} s", flush=True)
        results = {}
        for n in sorted({1, cores}):
            results[n] = pipeline(corpus, tokenizer, seq_len, n, work / f"cache{n}")
            r = results[n]
            print(f"tokenize + pack, {n} process(es): {r['rows'].size / r['pack_s'] / 1e6:.2f} M tokens/s "
                  f"(load {r['load_s']:.1f} s)", flush=True)
        rows = results[1]["rows"]
        # workers cut rows at their shard boundaries, but every token is there exactly as often
        counts = [np.bincount(r["rows"].ravel(), minlength=recipe.data.vocab_size)[5:] for r in results.values()]
        assert all(np.array_equal(counts[0], c) for c in counts)
        mask_s = masking(rows, tokenizer, micro)
        tokens = rows.size
        print(f"mask + assemble: {tokens / mask_s / 1e6:.2f} M tokens/s", flush=True)
        train_tps, resolved = training_tokens_per_s(args.train_steps, work)
        print(f"training (tiny, 2 ranks): {train_tps / 1e3:.1f} K tokens/s", flush=True)

    one = results[1]
    pipe_1 = tokens / (one["pack_s"] + mask_s)  # one process does it all
    pipe_n = tokens / (results[cores]["pack_s"] + mask_s / cores)  # workers for map, masking split across ranks
    rows_md = [
        ("load (text file -> Arrow, once per file)", tokens / one["load_s"], one["load_s"]),
        ("tokenize + pack, 1 process (datasets.map, cold cache)", tokens / one["pack_s"], one["pack_s"]),
        (f"tokenize + pack, {cores} processes", tokens / results[cores]["pack_s"], results[cores]["pack_s"]),
        ("mask + assemble micro-batches (1 process)", tokens / mask_s, mask_s),
        ("**pipeline: tokenize + pack + mask, 1 process**", pipe_1, tokens / pipe_1),
        (f"pipeline with {cores} processes", pipe_n, tokens / pipe_n),
        ("training consumption: tiny recipe, 2 CPU ranks", train_tps, tokens / train_tps),
    ]
    m = machine()
    text = "\n".join([
        f"# Data pipeline vs training consumption ({datetime.date.today()})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, host `{m['host']}`, torch {m['torch']}, Python {m['python']}. "
        "No GPU.",
        f"Corpus: the built-in text x{args.repeat} ({one['docs']} documents), {len(rows)} packed rows of {seq_len} "
        f"tokens = {tokens / 1e6:.2f} M tokens (padding included: the unit the trainer consumes). Tokenizer: "
        f"{recipe.data.vocab_size} pieces, trained once in {tok_train_s:.1f} s (not in the figures). Training: "
        f"`bigbatch train tiny` under `deepspeed --num_gpus 2` (global batch {resolved['global_batch']} = "
        f"{resolved['micro_batch']} x {resolved['grad_accum']} x {resolved['world']}), median of steps 3-"
        f"{args.train_steps}.",
        "",
        "| stage | tokens/s | seconds for the corpus |",
        "|---|---:|---:|",
        *[f"| {name} | {tps / 1e6:.2f} M | {sec:.2f} |" for name, tps, sec in rows_md],
        "",
        f"**Pipeline / training consumption: {pipe_1 / train_tps:.1f}x with one process** (goal: at least 5x); "
        f"{pipe_n / train_tps:.1f}x with {cores} processes. Per core (the training run used {cores} cores): "
        f"{pipe_1 / (train_tps / cores):.1f}x.",
        "A second run over the same files and tokenizer reads `datasets`' cache instead of tokenizing again "
        "(tested in tests/test_data.py), so the tokenize + pack cost is paid once per corpus, tokenizer and length.",
        "",
    ])
    write_results("data_pipeline", text, {
        "machine": m, "tokens": int(tokens), "stages": {name: tps for name, tps, _ in rows_md},
        "ratio_one_process": pipe_1 / train_tps, "ratio_all_processes": pipe_n / train_tps}, args.out)


if __name__ == "__main__":
    main()
