"""Data: sources -> documents -> SentencePiece tokens -> packed sequences -> per-rank micro-batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bigbatch.config import ConfigError, Recipe
from bigbatch.data.corpus import load_documents
from bigbatch.data.masking import mask_tokens
from bigbatch.data.packing import pack_bert, pack_gpt, split_documents
from bigbatch.data.sampler import GlobalSampler
from bigbatch.data.tokenizer import PAD, Tokenizer, train_tokenizer


@dataclass
class TrainingData:
    """The packed train and held-out sequences of a run, and how to turn run positions into a micro-batch."""

    arch: str
    train: np.ndarray
    eval: np.ndarray
    tokenizer: Tokenizer
    seed: int
    mlm_probability: float
    whole_word_masking: bool = False

    def __post_init__(self) -> None:
        self.sampler = GlobalSampler(len(self.train), self.seed)
        self._word_start = self.tokenizer.word_starts() if self.whole_word_masking else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _batch(self, tokens: np.ndarray, ids: np.ndarray, epochs: np.ndarray) -> dict[str, torch.Tensor]:
        if self.arch == "bert":
            inputs, labels = mask_tokens(tokens, ids, epochs, self.seed, self.vocab_size, self.mlm_probability,
                                         self._word_start)
        else:
            inputs = labels = tokens.astype(np.int64)
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.from_numpy((tokens != PAD).astype(np.int64)),
            "labels": torch.from_numpy(np.array(labels, dtype=np.int64)),
        }

    def train_batch(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        ids, epochs = self.sampler.indices(positions)
        return self._batch(self.train[ids], ids, epochs)

    def eval_batches(self, rank: int, world: int, micro_batch: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the held-out set (a fixed masking), in micro-batches.

        The set is cut to a multiple of the world size so every rank runs the same number of forward passes (ZeRO-3
        gathers parameters collectively in each one).
        """
        usable = len(self.eval) - len(self.eval) % world
        ids = np.arange(rank, usable, world)
        return [
            self._batch(self.eval[chunk], chunk, np.full(len(chunk), -1))
            for chunk in np.array_split(ids, max(1, int(np.ceil(len(ids) / micro_batch))))
            if len(chunk)
        ]


def prepare(recipe: Recipe, data_dir: Path, is_writer: bool, share: Callable[[Any], Any], log=print) -> TrainingData:
    """Builds (writer rank) or loads (others) the tokenizer and packed arrays in `data_dir`.

    `share(x)` hands the writer's x to every rank (a broadcast): the writer's outcome, so that bad data stops every
    rank with the same sentence instead of leaving the others waiting. A resumed run finds the arrays there and
    reuses them, so it trains on exactly the same sequences.
    """
    d = recipe.data
    train_path, eval_path, info_path = data_dir / "train.npy", data_dir / "eval.npy", data_dir / "data.json"
    tokenizer_path = Path(d.tokenizer) if d.tokenizer else data_dir / "tokenizer.model"
    error = None
    if is_writer and not info_path.exists():
        try:
            _build(recipe, data_dir, tokenizer_path, log)
        except ConfigError as err:
            error = str(err)
    error = share(error)
    if error:
        raise ConfigError(error)
    tok = Tokenizer(tokenizer_path)
    return TrainingData(recipe.model.arch, np.load(train_path), np.load(eval_path), tok, recipe.run.seed,
                        d.mlm_probability, d.whole_word_masking)


def _build(recipe: Recipe, data_dir: Path, tokenizer_path: Path, log: Callable[[str], None]) -> None:
    d = recipe.data
    data_dir.mkdir(parents=True, exist_ok=True)
    log(f"reading {', '.join(d.sources)}")
    docs = load_documents(d.sources)
    train_idx, eval_idx = split_documents(len(docs), d.eval_fraction, recipe.run.seed)
    if not d.tokenizer:
        log(f"training a {d.vocab_size}-piece SentencePiece tokenizer on {len(train_idx)} documents")
        train_tokenizer([docs[i] for i in train_idx], data_dir / "tokenizer", d.vocab_size)
    tok = Tokenizer(tokenizer_path)
    pack = pack_bert if recipe.model.arch == "bert" else pack_gpt
    train = pack(tok.encode([docs[i] for i in train_idx]), d.seq_len)
    held_out = pack(tok.encode([docs[i] for i in eval_idx]), d.seq_len)[: d.eval_samples]
    if len(held_out) == 0:
        raise ConfigError(f"the held-out split ({d.eval_fraction:.0%} of {len(docs)} documents) is shorter than one "
                          f"sequence of {d.seq_len} tokens; raise --data.eval_fraction or add text.")
    if len(train) < recipe.batch.global_batch:
        raise ConfigError(f"the corpus packs into {len(train)} training sequences of {d.seq_len} tokens, fewer "
                          f"than one global batch of {recipe.batch.global_batch}; add text or lower "
                          "--batch.global_batch.")
    np.save(data_dir / "train.npy", train)
    np.save(data_dir / "eval.npy", held_out)
    info = {"documents": len(docs), "train_documents": len(train_idx), "eval_documents": len(eval_idx),
            "train_sequences": len(train), "eval_sequences": len(held_out), "seq_len": d.seq_len,
            "train_tokens": int(train.size), "tokenizer": str(tokenizer_path), "vocab_size": tok.vocab_size,
            "sources": list(d.sources)}
    (data_dir / "data.json").write_text(json.dumps(info, indent=1))
