"""Data pipeline pieces: masking statistics, the sampler's disjointness/coverage/resume, packing, bad sources."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigbatch.config import ConfigError
from bigbatch.data.corpus import load_documents
from bigbatch.data.masking import IGNORE, mask_tokens
from bigbatch.data.packing import pack_bert, pack_gpt
from bigbatch.data.sampler import GlobalSampler
from bigbatch.data.tokenizer import CLS, MASK, PAD, SEP


def test_masking_rates_match_bert():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 1000, size=(2000, 64)).astype(np.int32)
    tokens[:, 0], tokens[:, -1] = CLS, SEP
    inputs, labels = mask_tokens(tokens, np.arange(2000), np.zeros(2000, dtype=np.int64), seed=1, vocab_size=1000)
    selected = labels != IGNORE
    n = selected.sum()
    regular = 2000 * 62
    # 124,000 candidate positions: the binomial standard deviation of the 15% rate is about 0.1 points
    assert abs(n / regular - 0.15) < 0.005
    assert not selected[:, 0].any() and not selected[:, -1].any()  # special tokens are never predicted
    assert (labels[selected] == tokens[selected]).all()
    masked = (inputs == MASK) & selected
    unchanged = (inputs == tokens) & selected
    random = selected & ~masked & ~unchanged
    assert abs(masked.sum() / n - 0.8) < 0.01
    assert abs(unchanged.sum() / n - 0.1) < 0.01 + 1 / 1000  # a random draw may hit the same token
    assert abs(random.sum() / n - 0.1) < 0.01
    assert (inputs[random] > MASK).all() and (inputs[random] < 1000).all()


def test_whole_word_masking_selects_words_together_at_the_same_token_rate():
    rng = np.random.default_rng(2)
    vocab = 1000
    word_start = rng.random(vocab) < 0.6  # 40% of pieces continue a word (1.7 pieces a word on average)
    word_start[: MASK + 1] = True
    tokens = rng.integers(5, vocab, size=(2000, 64)).astype(np.int32)
    tokens[:, 0], tokens[:, -1] = CLS, SEP
    inputs, labels = mask_tokens(tokens, np.arange(2000), np.zeros(2000, dtype=np.int64), seed=1, vocab_size=vocab,
                                 word_start=word_start)
    selected = labels != IGNORE
    # each piece inherits its word's draw, so the expected token rate is still exactly 15%
    assert abs(selected.sum() / (2000 * 62) - 0.15) < 0.006
    assert not selected[:, 0].any() and not selected[:, -1].any()
    # a continuation piece is selected exactly when the piece before it is (within one word; the piece after [CLS]
    # begins one)
    cont = ~word_start[tokens[:, 1:-1]]
    cont[:, 0] = False
    assert (selected[:, 1:-1][cont] == selected[:, :-2][cont]).all()
    assert cont.sum() > 30000 and selected[:, 1:-1][cont].sum() > 3000  # the check saw many multi-piece words
    # 80/10/10 stays per token
    masked = (inputs == MASK) & selected
    assert abs(masked.sum() / selected.sum() - 0.8) < 0.015


def test_masking_depends_only_on_sample_and_epoch():
    tokens = np.random.default_rng(1).integers(5, 500, size=(8, 32)).astype(np.int32)
    ids, epochs = np.arange(100, 108), np.zeros(8, dtype=np.int64)
    a = mask_tokens(tokens, ids, epochs, seed=3, vocab_size=500)
    b = mask_tokens(tokens[4:], ids[4:], epochs[4:], seed=3, vocab_size=500)  # another micro-batch split
    assert (a[0][4:] == b[0]).all() and (a[1][4:] == b[1]).all()
    c = mask_tokens(tokens, ids, epochs + 1, seed=3, vocab_size=500)
    assert (a[1] != c[1]).any()  # a new epoch masks anew


@pytest.mark.parametrize("world,micro", [(2, 4), (4, 2), (1, 8)])
def test_sampler_disjoint_full_coverage_and_resume(world, micro):
    n, global_batch = 40, 16
    sampler = GlobalSampler(n, seed=5)
    accum = global_batch // (world * micro)

    def step_indices(step):
        per_rank = []
        for rank in range(world):
            pos = np.concatenate([sampler.positions(step * global_batch, m, rank, world, micro) for m in range(accum)])
            per_rank.append(pos)
        return per_rank

    read = []
    for step in range(5):  # 80 positions: exactly two epochs
        allpos = np.concatenate(step_indices(step))
        assert len(np.unique(allpos)) == global_batch  # ranks disjoint
        read.append(allpos)
    positions = np.sort(np.concatenate(read))
    assert (positions == np.arange(80)).all()  # no gap, no repeat
    seen = sampler.indices(positions)[0]
    assert sorted(seen[:40]) == list(range(40)) and sorted(seen[40:]) == list(range(40))  # each epoch covers all
    # the same global batch whatever the world size: the set of positions of a step is fixed
    assert set(np.concatenate(step_indices(3)).tolist()) == set(range(48, 64))
    # resume: a fresh sampler with the same seed maps positions identically
    assert (GlobalSampler(n, seed=5).indices(np.arange(48, 64))[0] == sampler.indices(np.arange(48, 64))[0]).all()


def test_packing_shapes():
    docs = [[10] * 50, [11] * 30, [12] * 70]
    gpt = pack_gpt(docs, 32)
    assert gpt.shape == ((50 + 30 + 70 + 3) // 32, 32)
    assert (gpt.reshape(-1)[50] == SEP)  # end-of-document token after the first document


def test_bert_packing_keeps_sentences_whole():
    # three documents of sentences of 5..20 tokens; each sentence's tokens carry its own id so a cut would show
    rng = np.random.default_rng(0)
    docs, ends, sentences = [], [], []
    for _ in range(3):
        lengths = rng.integers(5, 21, size=12)
        doc = [100 + len(sentences) + i for i, n in enumerate(lengths) for _ in range(n)]
        sentences += [(100 + len(sentences) + i, int(n)) for i, n in enumerate(lengths)]
        docs.append(doc)
        ends.append(np.cumsum(lengths).tolist())
    docs[1] = docs[1][:0] + [999] * 70 + docs[1]  # a 70-token sentence: longer than a 30-token row body
    ends[1] = [70] + [e + 70 for e in ends[1]]
    rows = pack_bert(docs, ends, 32)
    assert rows.shape[1] == 32 and (rows[:, 0] == CLS).all()
    body = [r[1:][r[1:] != PAD] for r in rows]
    assert all(b[-1] == SEP for b in body)  # each row closes with [SEP], then padding
    pieces = {}
    for r, b in enumerate(body):
        for t in b[:-1]:
            if t >= 100:
                pieces.setdefault(int(t), set()).add(r)
    assert all(len(rows_of) == 1 for t, rows_of in pieces.items() if t != 999)  # no sentence straddles rows
    assert len(pieces[999]) == 3  # the long one fills 30 + 30 and leaves 10
    # nothing is lost: every token of every document appears once
    assert sum(int((b >= 100).sum()) for b in body) == sum(map(len, docs))
    # documents are separated by [SEP] inside a row (RoBERTa's extra separator)
    assert sum(int((b[:-1] == SEP).sum()) for b in body) >= 1


def test_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\n\nsecond one\n")
    (tmp_path / "b.jsonl").write_text('{"text": "json doc"}\n\n{"text": "another"}\n{"text": "  "}\n')
    assert load_documents((str(tmp_path / "a.txt"),)) == ["first paragraph\nstill first", "second one"]
    assert load_documents((str(tmp_path),)) == ["first paragraph\nstill first", "second one", "json doc", "another"]
    (tmp_path / "json").mkdir()  # .json: one JSON array of records (JSON lines under that suffix load too)
    (tmp_path / "json" / "d.json").write_text('[{"text": "from json", "id": 1}, {"text": ""}, {"text": "two"}]')
    (tmp_path / "json" / "e.json").write_text('{"text": "a line"}\n{"text": "and another"}\n')
    assert load_documents((str(tmp_path / "json" / "d.json"),)) == ["from json", "two"]
    assert load_documents((str(tmp_path / "json"),)) == ["from json", "two", "a line", "and another"]
    (tmp_path / "json" / "e.json").write_text('{"body": "no text field"}\n')
    with pytest.raises(ConfigError, match=r"e.json has no \"text\" field \(fields: body\); rename"):
        load_documents((str(tmp_path / "json" / "e.json"),))
    with pytest.raises(ConfigError, match=r"json could not be read \(.*body.*\); fix the file") as err:
        load_documents((str(tmp_path / "json"),))  # one file of the directory lacks the field
    assert "\n" not in str(err.value)  # datasets' multi-line cast error, folded into the one sentence
    pq.write_table(pa.table({"text": ["from parquet", None, "more"], "id": [1, 2, 3]}), tmp_path / "c.parquet")
    assert load_documents((str(tmp_path / "c.parquet"),)) == ["from parquet", "more"]
    with pytest.raises(ConfigError, match=r"data source .*missing.txt does not exist"):
        load_documents((str(tmp_path / "missing.txt"),))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no text"):
        load_documents((str(tmp_path / "empty.txt"),))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl has no \"text\" field \(fields: txt\); rename"):
        load_documents((str(tmp_path / "bad.jsonl"),))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl could not be read \(.*JSON.*\); fix the file"):
        load_documents((str(tmp_path / "bad.jsonl"),))


def _recipe(corpus, **data):
    from bigbatch.config.files import load_recipe

    overrides = {"data.sources": str(corpus), "data.vocab_size": "300", "batch.global_batch": "16",
                 "data.eval_samples": "64", **{f"data.{k}": str(v) for k, v in data.items()}}
    return load_recipe("tiny", overrides)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory, corpus_file):
    from bigbatch.data.tokenizer import train_tokenizer

    return train_tokenizer(load_documents((str(corpus_file),)), tmp_path_factory.mktemp("tok") / "t", 300)


def test_preprocessing_is_cached_and_parallel_runs_give_the_same_rows(tmp_path, corpus_file, small_tokenizer):
    from bigbatch.data import prepare

    def build(name, num_proc, cache):
        recipe = _recipe(corpus_file, tokenizer=small_tokenizer, cache_dir=cache, num_proc=num_proc)
        data = prepare(recipe, tmp_path / name, True, lambda x: x, log=lambda m: None)
        return data, {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")}

    first, files = build("a", 1, tmp_path / "cache")
    again, files_again = build("b", 1, tmp_path / "cache")
    assert files_again == files  # nothing written again: datasets found its cached map results
    assert np.array_equal(first.train, again.train) and np.array_equal(first.eval, again.eval)
    # two worker processes, on a cold cache of their own: packing restarts at each worker's shard, so rows may be cut
    # elsewhere, but every token of the corpus is there exactly as often
    parallel, files_parallel = build("c", 2, tmp_path / "cache2")
    assert sum("_00001_of_00002" in p.name for p in files_parallel)  # datasets really ran a second worker
    text_tokens = lambda rows: np.bincount(rows[rows > MASK].ravel(), minlength=300)  # noqa: E731
    assert np.array_equal(text_tokens(np.asarray(first.train)), text_tokens(np.asarray(parallel.train)))
    info = json.loads((tmp_path / "a" / "data.json").read_text())
    assert info["train_sequences"] == len(first.train) and 0 < info["padding_fraction"] < 0.5
    # the rows decode back to the corpus' text
    text = corpus_file.read_text()
    row = first.train[3]
    words = first.tokenizer.decode([int(t) for t in row if t > 4]).split()
    assert len(words) > 3 and all(w in text for w in words)


def test_weighted_blend_draws_sources_in_proportion_and_cycles_them(tmp_path, corpus_file, small_tokenizer):
    from bigbatch.data import prepare

    paragraphs = corpus_file.read_text().split("\n\n")
    (tmp_path / "small.txt").write_text("\n\n".join(paragraphs[:60]))
    (tmp_path / "large.txt").write_text("\n\n".join(paragraphs[60:]))
    recipe = _recipe(f"{tmp_path / 'small.txt'},{tmp_path / 'large.txt'}", tokenizer=small_tokenizer, weights="3,1")
    data = prepare(recipe, tmp_path / "run" / "data", True, lambda x: x, log=lambda m: None)
    mix = json.loads((tmp_path / "run" / "data" / "data.json").read_text())["mix"]
    small_n, large_n = mix[0]["sequences"], mix[1]["sequences"]
    total = small_n + large_n
    assert [m["per_epoch"] for m in mix] == [round(0.75 * total), total - round(0.75 * total)]
    assert mix[0]["passes_per_epoch"] > 2  # the small source is up-weighted: cycled more than twice an epoch
    # an independent count: which stored rows the sampler reads over three epochs
    n = data.sampler.n
    assert n == total
    ids, epochs = data.sampler.indices(np.arange(3 * n))
    rows = data.blend.rows(ids, epochs)
    from_small = rows < small_n
    for e in range(3):
        share = from_small[e * n:(e + 1) * n].mean()
        assert abs(share - 0.75) <= 1 / n
    # over three epochs the large source, down-weighted, shows all its rows (fresh ones each epoch, then wraps)
    large_rows = rows[~from_small]
    assert len(np.unique(large_rows)) == min(large_n, len(large_rows))
    assert len(np.unique(rows[from_small])) == small_n  # every small row used
    # a batch reads the rows the blend names
    batch = data.train_batch(np.arange(8))
    expect = data.train[data.blend.rows(*data.sampler.indices(np.arange(8)))]
    assert np.array_equal(batch["attention_mask"].numpy(), (expect != 0).astype(np.int64))
    with pytest.raises(ConfigError, match=r"data.weights=1.0 must give one non-negative weight per source"):
        dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, weights=(1.0,))).validate()


def test_streaming_ranks_read_disjoint_shares_and_resume_exactly(tmp_path, corpus_file, small_tokenizer):
    from bigbatch.data import StreamingData, prepare

    world, micro = 2, 4
    unique = tmp_path / "unique.txt"  # the corpus repeats some docstrings; held-out rows must differ from training
    unique.write_text("\n\n".join(dict.fromkeys(corpus_file.read_text().split("\n\n"))))
    recipe = _recipe(unique, tokenizer=small_tokenizer, streaming="true", shuffle_buffer=50)
    ranks = [prepare(recipe, tmp_path / "data", r == 0, lambda x: x, log=lambda m: None, rank=r, world=world)
             for r in range(world)]
    assert all(isinstance(d, StreamingData) for d in ranks) and 0 < len(ranks[0].eval) <= 64

    # tokens of each batch, read through the public path: input_ids where nothing is masked equals the rows
    def tokens_of(data, rank, step, m):
        pos = data.sampler.positions(step * 16, m, rank, world, micro)
        batch = data.train_batch(pos)
        ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
        return np.where(labels >= 0, labels, ids)

    seen = {r: [tokens_of(ranks[r], r, s, m) for s in range(6) for m in range(2)] for r in range(world)}
    rows = {r: {tuple(x) for b in seen[r] for x in b} for r in range(world)}
    assert not rows[0] & rows[1]  # the ranks' shares are disjoint
    # resume at step 4 on a fresh reader: the same rows as the uninterrupted reader
    fresh = prepare(recipe, tmp_path / "data", False, lambda x: x, rank=1, world=world)
    resumed = [tokens_of(fresh, 1, s, m) for s in range(4, 6) for m in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(resumed, seen[1][8:]))
    held = {tuple(x) for x in ranks[0].eval}
    assert not held & (rows[0] | rows[1])  # held-out documents never train


def test_tokenizer_cli_and_vocabulary_mismatch(tmp_path, corpus_file, capsys):
    from bigbatch.cli import main
    from bigbatch.data.tokenizer import MASK, PAD, Tokenizer

    prefix = tmp_path / "tok" / "wiki"
    assert main(["tokenizer", "train", "--input", str(corpus_file), "--vocab-size", "300", "--out", str(prefix),
                 "--model-type", "bpe"]) == 0
    assert "wrote" in capsys.readouterr().out
    tok = Tokenizer(prefix.with_suffix(".model"))
    assert tok.vocab_size == 300 and prefix.with_suffix(".vocab").is_file()
    assert tok.sp.id_to_piece(PAD) == "[PAD]" and tok.sp.id_to_piece(MASK) == "[MASK]"
    starts = tok.word_starts()  # whole-word masking's view of the vocabulary
    assert starts[: MASK + 1].all() and 0.2 < starts.mean() < 0.95
    # never overwritten unless told to
    again = ["tokenizer", "train", "--input", str(corpus_file), "--vocab-size", "300", "--out", str(prefix)]
    assert main(again) == 2
    assert "already exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    # a recipe whose vocabulary does not match its tokenizer is refused with one sentence
    code = main(["train", "tiny", "--run-dir", str(tmp_path / "run"), f"--data.sources={corpus_file}",
                 f"--data.tokenizer={prefix}.model", "--data.vocab_size=256", "--schedule.steps=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.vocab_size=256 but tokenizer" in err and "has 300 pieces; set --data.vocab_size=300" in err


@pytest.mark.slow
def test_streaming_and_blended_runs_train_and_a_streamed_run_resumes_exactly(tmp_path, corpus_file, capsys):
    """Through the trainer (one process, fp32): a streamed run resumes bit for bit; a blended run writes its mix."""
    import shutil

    from bigbatch.cli import main
    from bigbatch.run.metrics import read_metrics

    small = ["--batch.global_batch=32", "--batch.micro_batch=16", "--run.eval_every=2", "--checkpoint.every_steps=1",
             "--checkpoint.keep_last=9", "--data.vocab_size=400", "--data.eval_samples=64", "--data.seq_len=32",
             "--model.max_position=64", "--schedule.steps=4"]
    run = tmp_path / "stream"
    assert main(["train", "tiny", f"--data.sources={corpus_file}", "--data.streaming=true", "--run-dir", str(run),
                 *small]) == 0
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(records) == 4 and records[-1]["eval_loss"] < records[0]["loss"]
    assert json.loads((run / "data" / "data.json").read_text())["streaming"] is True
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for step in (3, 4):
        shutil.rmtree(resumed / "checkpoints" / f"step{step:08d}")
    (resumed / "checkpoints" / "latest").write_text("step00000002")
    assert main(["train", str(run / "recipe.json"), "--run-dir", str(resumed), "--resume"]) == 0
    after = [r for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r and r["step"] > 2]
    assert [r["loss"] for r in after] == [r["loss"] for r in records[2:]]

    paragraphs = corpus_file.read_text().split("\n\n")
    (tmp_path / "a.txt").write_text("\n\n".join(paragraphs[:200]))
    (tmp_path / "b.txt").write_text("\n\n".join(paragraphs[200:]))
    blended = tmp_path / "blend"
    assert main(["train", "tiny", f"--data.sources={tmp_path / 'a.txt'},{tmp_path / 'b.txt'}",
                 "--data.weights=1,1", "--run-dir", str(blended), *small]) == 0
    assert "blend per epoch:" in capsys.readouterr().out
    mix = json.loads((blended / "data" / "data.json").read_text())["mix"]
    assert [m["share"] for m in mix] == pytest.approx([0.5, 0.5], abs=1e-3)


def test_a_held_out_set_smaller_than_the_world_is_one_sentence():
    # every rank scores len(eval) // world sequences; with none, eval_loss would read 0.0 and perplexity 1
    from bigbatch.data import TrainingData

    data = TrainingData.__new__(TrainingData)  # only the held-out rows matter here
    data.eval = np.zeros((3, 8), dtype=np.int32)
    with pytest.raises(ConfigError, match="held-out set has 3 sequences, fewer than the 4 ranks .* at least 4"):
        data.eval_batches(0, 4, 2)


def test_a_writer_failure_reaches_every_rank(tmp_path, monkeypatch):
    # not bad input but a crash (a full disk, a bug): the writer shares it before raising, so the other ranks raise
    # too instead of waiting in the broadcast until the process group times out
    import bigbatch.data.build as data_module
    from bigbatch.config.files import load_recipe

    def crash(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(data_module, "_build", crash)
    shared = []
    with pytest.raises(OSError, match="No space left"):
        data_module.prepare(load_recipe("tiny"), tmp_path / "data", True, lambda x: shared.append(x) or x,
                            log=lambda m: None)
    assert shared[0][0] == "failure" and "OSError: No space left on device" in shared[0][1]
    with pytest.raises(RuntimeError, match="preparing the data on the writer rank failed: OSError"):
        data_module.prepare(load_recipe("tiny"), tmp_path / "data", False, lambda x: shared[0], rank=1, world=2)


def test_automatic_num_proc_is_one_per_core_up_to_8_above_20000_documents(monkeypatch):
    from bigbatch.data import pipeline

    cores = list(range(16))
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(cores))
    assert [pipeline.auto_num_proc(n, 0) for n in (None, 5, 20_000)] == [1, 1, 1]  # a pool costs more than it saves
    assert pipeline.auto_num_proc(20_001, 0) == 8  # one per core, at most 8
    cores[:] = range(3)
    assert pipeline.auto_num_proc(20_001, 0) == 3
    assert pipeline.auto_num_proc(10, 5) == pipeline.auto_num_proc(10**6, 5) == 5  # data.num_proc as given

    # and preprocess hands that choice to datasets.map (no 20,000 documents go through workers here)
    class Corpus:
        cache_files: list = []

        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def map(self, fn, **kwargs):
            return kwargs

    tok = Path(__file__)  # preprocess reads the model's bytes only
    assert pipeline.preprocess(Corpus(50_000), tok, "bert", 64)["num_proc"] == 3
    assert pipeline.preprocess(Corpus(50_000), tok, "bert", 64, num_proc=1)["num_proc"] is None
    assert pipeline.preprocess(Corpus(100), tok, "bert", 64)["num_proc"] is None


def test_tokenizer_cli_names_its_own_flag_when_the_vocabulary_is_too_large(tmp_path, capsys):
    from bigbatch.cli import main
    from bigbatch.data.tokenizer import train_tokenizer

    corpus = tmp_path / "small.txt"
    corpus.write_text("A short corpus. It has few distinct words.\n\nNot enough for many pieces.\n")
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "5000",
                 "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigbatch: error: --vocab-size=5000 is more pieces than this corpus can make (at most ")
    assert err.endswith("); lower --vocab-size or add text.\n") and "--data." not in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "tok.model").exists()
    # the trainer's own tokenizer training names the recipe key
    with pytest.raises(ConfigError, match=r"^--data.vocab_size=5000 is more pieces .*; lower --data.vocab_size or"):
        train_tokenizer([corpus.read_text()], tmp_path / "t", 5000)


def test_an_unreachable_hub_is_one_sentence_before_the_run_directory(tmp_path):
    # a real process (the console's view: exit code, stderr, no traceback), offline and pointed at a closed port so
    # that nothing ever reaches the internet, with an empty cache of its own
    import subprocess
    import sys

    from conftest import ROOT, launch_env

    env = {**launch_env(), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "bigbatch", "train", "tiny", "--run-dir", str(run_dir),
                           "--data.sources=hf:bigbatch-tests/no-such-corpus"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("bigbatch: error: data source hf:bigbatch-tests/no-such-corpus is not in the "
                                  "local cache and the Hugging Face hub could not be reached (")
    assert proc.stderr.endswith("or cache the dataset first where the hub is reachable.\n")
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not run_dir.exists()  # refused before anything was written


def test_a_corpus_shorter_than_one_global_batch_is_one_sentence(tmp_path, corpus_file, small_tokenizer, capsys):
    from bigbatch.cli import main

    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(corpus_file.read_text().split("\n\n")[:40]))
    code = main(["train", "tiny", "--run-dir", str(tmp_path / "run"), f"--data.sources={short}",
                 f"--data.tokenizer={small_tokenizer}", "--data.vocab_size=300", "--data.eval_fraction=0.2",
                 "--batch.global_batch=256", "--batch.micro_batch=16", "--schedule.steps=1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.fullmatch(r"bigbatch: error: the corpus packs into \d+ training sequences of 64 tokens, fewer than one "
                        r"global batch of 256; add text or lower --batch.global_batch.\n", err), err


def test_a_tokenizer_that_does_not_exist_is_one_sentence(tmp_path, capsys):
    from bigbatch.cli import main

    missing = tmp_path / "no" / "such.model"
    assert main(["train", "tiny", "--run-dir", str(tmp_path / "run"), f"--data.tokenizer={missing}"]) == 2
    assert capsys.readouterr().err == (
        f"bigbatch: error: tokenizer {missing} does not exist; train one with `bigbatch tokenizer train` or leave "
        "--data.tokenizer empty to train one at the start of the run.\n")
    assert not (tmp_path / "run").exists()
