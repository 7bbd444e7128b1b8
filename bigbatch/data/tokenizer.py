"""SentencePiece tokenizers: trained on the corpus, with BERT's special tokens at fixed ids."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from bigbatch.config import ConfigError
from bigbatch.data.corpus import load_documents

# Fixed ids so every model trained here agrees on them: [PAD]=0 [UNK]=1 [CLS]=2 (bos) [SEP]=3 (eos, end of document
# for GPT) [MASK]=4.
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
# SentencePiece keeps every line it is handed in memory before sampling `input_sentence_size` of them: a corpus is
# read only this far for the tokenizer.
TOKENIZER_LINES = 4_000_000


def train_tokenizer(docs: Iterable[str], prefix: Path, vocab_size: int, model_type: str = "unigram",
                    size_flag: str = "--data.vocab_size") -> Path:
    """Trains SentencePiece on `docs` (read up to TOKENIZER_LINES lines); writes `<prefix>.model` and `<prefix>.vocab`
    and returns the model path. `size_flag` is how the caller's user sets the size, for the error sentence."""
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise ConfigError(f"tokenizer model type {model_type!r} is not one of unigram, bpe.")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # SentencePiece trains on "sentences": lines, capped in length; long lines are cut rather than dropped.
    lines = itertools.islice((line[:4000] for d in docs for line in d.splitlines() if line.strip()), TOKENIZER_LINES)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD,
            unk_id=UNK,
            bos_id=CLS,
            eos_id=SEP,
            pad_piece="[PAD]",
            unk_piece="[UNK]",
            bos_piece="[CLS]",
            eos_piece="[SEP]",
            user_defined_symbols=["[MASK]"],
            character_coverage=1.0,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as err:
        most = re.search(r"Vocabulary size too high .*value <= (\d+)", str(err))
        if most:
            raise ConfigError(f"{size_flag}={vocab_size} is more pieces than this corpus can make (at most "
                              f"{most.group(1)}); lower {size_flag} or add text.") from None
        raise ConfigError(f"SentencePiece could not train a {vocab_size}-piece tokenizer on this corpus ({err}); "
                          f"lower {size_flag} or add text.") from None
    return Path(f"{prefix}.model")


@dataclass
class Tokenizer:
    path: Path

    def __post_init__(self) -> None:
        import sentencepiece as spm

        if not self.path.is_file():
            raise ConfigError(f"tokenizer {self.path} does not exist; train one with `bigbatch tokenizer train` "
                              "or leave --data.tokenizer empty to train one at the start of the run.")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(self.path))
        except (OSError, RuntimeError):
            raise ConfigError(f"tokenizer {self.path} is not a SentencePiece model; point --data.tokenizer at a "
                              ".model file.") from None
        expected = {PAD: "[PAD]", CLS: "[CLS]", SEP: "[SEP]", MASK: "[MASK]"}
        for i, piece in expected.items():
            if self.sp.id_to_piece(i) != piece:
                raise ConfigError(f"tokenizer {self.path} has {self.sp.id_to_piece(i)!r} at id {i}, not {piece!r}; "
                                  "train it with `bigbatch tokenizer train` so the special tokens sit at fixed ids.")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def word_starts(self) -> np.ndarray:
        """A bool per id: the piece begins a word (SentencePiece marks it with U+2581) or is a special token."""
        starts = np.array([self.sp.id_to_piece(i).startswith("\u2581") for i in range(self.vocab_size)])
        starts[: MASK + 1] = True
        return starts

    def encode(self, docs: list[str]) -> list[list[int]]:
        return self.sp.encode(docs)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def check_tokenizer(tokenizer: str, vocab_size: int) -> None:
    """A recipe that names its tokenizer must state its size: `bigbatch plan` and recipe.json take the vocabulary from
    data.vocab_size, and a tokenizer of another size would build another embedding than the one planned (or than a
    checkpoint of the run holds)."""
    if not tokenizer:
        return
    size = Tokenizer(Path(tokenizer)).vocab_size
    if size != vocab_size:
        raise ConfigError(f"data.vocab_size={vocab_size} but tokenizer {tokenizer} has {size} pieces; "
                          f"set --data.vocab_size={size}.")


def cmd_tokenizer(args: list[str]) -> int:
    """`bigbatch tokenizer train --input SRC [SRC ...] --vocab-size N --out PREFIX [--model-type unigram|bpe]`."""
    import argparse


    p = argparse.ArgumentParser(prog="bigbatch tokenizer", description=cmd_tokenizer.__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a SentencePiece model with bigbatch's special tokens at fixed ids")
    t.add_argument("--input", nargs="+", required=True,
                   help="text sources: files, directories, builtin:python-docs or hf:<dataset>[:<config>]")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", type=Path, required=True, help="model prefix: writes <out>.model and <out>.vocab")
    t.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"))
    t.add_argument("--overwrite", action="store_true", help="replace an existing <out>.model")
    known = p.parse_args(args)
    model = Path(f"{known.out}.model")
    if model.exists() and not known.overwrite:
        raise ConfigError(f"{model} already exists; choose another --out or pass --overwrite to replace it.")
    if known.vocab_size < 8:
        raise ConfigError(f"--vocab-size={known.vocab_size} is too small; give at least 8 (5 special tokens + text).")
    docs = load_documents(tuple(known.input))
    path = train_tokenizer(docs, known.out, known.vocab_size, known.model_type, size_flag="--vocab-size")
    print(f"wrote {path} ({Tokenizer(path).vocab_size} pieces, {known.model_type}, {len(docs)} documents); "
          f"use it with --data.tokenizer={path} --data.vocab_size={known.vocab_size}")
    return 0
