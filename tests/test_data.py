"""Data pipeline pieces: masking statistics, the sampler's disjointness/coverage/resume, packing, bad sources."""

from __future__ import annotations

import numpy as np
import pytest

from bigbatch.config import ConfigError
from bigbatch.data.corpus import load_documents
from bigbatch.data.masking import IGNORE, mask_tokens
from bigbatch.data.packing import pack_bert, pack_gpt
from bigbatch.data.sampler import GlobalSampler
from bigbatch.data.tokenizer import CLS, MASK, SEP


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
    bert = pack_bert(docs, 32)
    assert bert.shape[1] == 32 and (bert[:, 0] == CLS).all() and (bert[:, -1] == SEP).all()
    assert bert.shape[0] == (50 + 30 + 70 + 3) // 30
    gpt = pack_gpt(docs, 32)
    assert gpt.shape == ((50 + 30 + 70 + 3) // 32, 32)
    assert (gpt.reshape(-1)[50] == SEP)  # end-of-document token after the first document


def test_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond one\n")
    (tmp_path / "b.jsonl").write_text('{"text": "json doc"}\n\n{"text": "another"}\n')
    assert load_documents((str(tmp_path / "a.txt"),)) == ["first paragraph\nstill first", "second one"]
    assert load_documents((str(tmp_path),)) == ["first paragraph\nstill first", "second one", "json doc", "another"]
    with pytest.raises(ConfigError, match=r"data source .*missing.txt does not exist"):
        load_documents((str(tmp_path / "missing.txt"),))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no text"):
        load_documents((str(tmp_path / "empty.txt"),))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ConfigError, match=r"line 1 has no string \"text\" field"):
        load_documents((str(tmp_path / "bad.jsonl"),))


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
