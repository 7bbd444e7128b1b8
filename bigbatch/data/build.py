"""A run's data directory: built by the writer rank (tokenizer, packed arrays, `data.json` last), loaded by every
rank as the `BatchSource` its recipe asks for (packed `TrainingData` or `StreamingData`)."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bigbatch.config import ConfigError, Recipe
from bigbatch.config.errors import Preempted, StorageFault
from bigbatch.data.batches import BatchSource
from bigbatch.data.blend import Blend
from bigbatch.data.corpus import check_sources, open_source
from bigbatch.data.masking import hash_uniform
from bigbatch.data.packed import TrainingData
from bigbatch.data.packing import split_documents
from bigbatch.data.pipeline import iter_rows, preprocess, write_rows
from bigbatch.data.streaming import StreamingData
from bigbatch.data.tokenizer import PAD, Tokenizer, train_tokenizer

TOKENIZER_DOCS = 200_000  # streamed documents a tokenizer is trained on


def _in_split(example: dict[str, Any], index: int, fraction: float, seed: int, held_out: bool) -> bool:
    """A stream's held-out documents: a seeded hash of the document's place in the (unshuffled) stream."""
    return bool(hash_uniform(np.asarray([index * 2654435761 + seed], dtype=np.uint64))[0] < fraction) == held_out


def prepare(recipe: Recipe, data_dir: Path, is_writer: bool, share: Callable[[Any], Any], log=print,
            rank: int = 0, world: int = 1,
            stop_requested: Callable[[str], str | None] = lambda moment: None) -> BatchSource:
    """Builds (writer rank) or loads (others) the tokenizer and packed arrays in `data_dir`.

    `share(x)` hands the writer's x to every rank (a broadcast): the writer's outcome, so that bad data, a failure or
    a stop request ends every rank the same way instead of leaving the others waiting. The writer asks
    `stop_requested(moment)` between the stages of the work (`tokenizer`, each source's `pack`, each written
    `chunk`); a
    request ends the preparation with `Preempted` on every rank. What was finished stays for the next start: a
    trained tokenizer in `data_dir` is reused, and `datasets`' cache keeps each finished packing map. A resumed run
    finds the arrays complete (`data.json` is written last) and reuses them, so it trains on the same sequences.
    """
    d = recipe.data
    eval_path, info_path = data_dir / "eval.npy", data_dir / "data.json"
    tokenizer_path = Path(d.tokenizer) if d.tokenizer else data_dir / "tokenizer.model"
    outcome: tuple[str, str] = ("ok", "")
    if is_writer and not info_path.exists():
        try:
            (_build_stream if d.streaming else _build)(recipe, data_dir, tokenizer_path, log,
                                                       _stop_check(stop_requested))
        except Preempted as stop:
            outcome = ("stop", stop.reason)
        except ConfigError as err:
            outcome = ("bad input", str(err))
        except StorageFault as err:
            outcome = ("storage", str(err))
        except Exception as err:  # any other failure too, or the other ranks would wait in `share` until timeout
            outcome = _full_disk(err, data_dir) or (
                "failure", f"preparing the data on the writer rank failed: {type(err).__name__}: {err}")
            if outcome[0] == "failure":
                share(outcome)
                raise
    kind, message = share(outcome)
    if kind == "stop":
        raise Preempted(message)
    if kind == "bad input":
        raise ConfigError(message)
    if kind == "storage":
        raise StorageFault(message)
    if kind == "failure":
        raise RuntimeError(message)
    tok = Tokenizer(tokenizer_path)
    common = {"arch": recipe.model.arch, "eval": np.load(eval_path), "tokenizer": tok, "seed": recipe.run.seed,
              "mlm_probability": d.mlm_probability, "whole_word_masking": d.whole_word_masking}
    if d.streaming:
        return StreamingData(_train_stream(recipe, tok.path, rank, world), rank, world, **common)
    info = json.loads(info_path.read_text())
    blend = Blend(info["train_sequences_per_source"], list(d.weights), recipe.run.seed) if d.weights else None
    return TrainingData(train=np.load(data_dir / "train.npy", mmap_mode="r"), blend=blend, **common)


def _full_disk(err: Exception, data_dir: Path) -> tuple[str, str] | None:
    """A write into the data directory that its filesystem refused (full, over quota, read-only), as an outcome."""
    if not isinstance(err, OSError) or err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return None
    return ("storage", f"writing the data into {data_dir} failed ({err.strerror}); its filesystem has "
                       f"{shutil.disk_usage(data_dir).free:,} bytes free: free space, then --resume")


def _write_last(path: Path, text: str) -> None:
    """data.json marks the directory complete: written whole (a temporary file renamed) or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _stop_check(stop_requested: Callable[[str], str | None]) -> Callable[[str], None]:
    def check(moment: str) -> None:
        reason = stop_requested(moment)
        if reason:
            raise Preempted(reason)

    return check


def _tokenizer(data_dir: Path, vocab_size: int, texts: Callable[[], Iterator[str]], log: Callable[[str], None],
               what: str) -> None:
    """The run's own tokenizer in `data_dir`: one a killed start finished is reused when it has the vocabulary asked
    for; a new one is trained under a temporary prefix and renamed, so `tokenizer.model` is never half-written."""
    done = data_dir / "tokenizer.model"
    if done.is_file():
        try:
            if Tokenizer(done).vocab_size == vocab_size:
                log(f"reusing the tokenizer a previous start trained ({done})")
                return
        except ConfigError:
            pass
    log(f"training a {vocab_size}-piece SentencePiece tokenizer on {what}")
    train_tokenizer(texts(), data_dir / "tokenizer.tmp", vocab_size)
    os.replace(data_dir / "tokenizer.tmp.vocab", data_dir / "tokenizer.vocab")
    os.replace(data_dir / "tokenizer.tmp.model", done)


def _open_sources(d: Any, streaming: bool) -> list[Any]:
    return [open_source(s, streaming=streaming, cache_dir=d.cache_dir) for s in d.sources]


def _texts(datasets_: list[Any]) -> Iterator[str]:
    for ds in datasets_:
        for batch in ds.iter(batch_size=1000):
            yield from batch["text"]


def _check_sizes(recipe: Recipe, n_train: int, n_eval: int, what: str) -> None:
    d = recipe.data
    if n_eval == 0:
        raise ConfigError(f"the held-out split ({d.eval_fraction:.0%} of {what}) is shorter than one "
                          f"sequence of {d.seq_len} tokens; raise --data.eval_fraction or add text.")
    if n_train < recipe.batch.global_batch:
        raise ConfigError(f"the corpus packs into {n_train} training sequences of {d.seq_len} tokens, fewer "
                          f"than one global batch of {recipe.batch.global_batch}; add text or lower "
                          "--batch.global_batch.")


def _build(recipe: Recipe, data_dir: Path, tokenizer_path: Path, log: Callable[[str], None],
           check_stop: Callable[[str], None]) -> None:
    import datasets

    d = recipe.data
    data_dir.mkdir(parents=True, exist_ok=True)
    log(f"reading {', '.join(d.sources)}")
    sources = _open_sources(d, streaming=False)
    splits = [split_documents(len(ds), d.eval_fraction, recipe.run.seed) for ds in sources]
    train_docs = [ds.select(tr) for ds, (tr, _) in zip(sources, splits)]
    eval_docs = [ds.select(ev) for ds, (_, ev) in zip(sources, splits)]
    n_docs = sum(len(ds) for ds in sources)
    check_stop("tokenizer")
    if not d.tokenizer:
        _tokenizer(data_dir, d.vocab_size, lambda: _texts(train_docs), log,
                   f"{sum(map(len, train_docs))} documents")
    tok = Tokenizer(tokenizer_path)
    log(f"tokenizing and packing {n_docs} documents into sequences of {d.seq_len} (datasets.map, cached)")

    def pack(ds: Any, what: str) -> Any:
        check_stop("pack")  # between maps: each finished one stays in datasets' cache for the next start
        return preprocess(ds, tok.path, recipe.model.arch, d.seq_len, d.num_proc, what)

    train = [pack(ds, f"pack {s}") for ds, s in zip(train_docs, d.sources)]
    held_out = datasets.concatenate_datasets([pack(ds, f"pack held-out {s}") for ds, s in zip(eval_docs, d.sources)])
    if len(held_out) > d.eval_samples:  # a seeded sample of every source's held-out text
        keep = np.sort(np.random.default_rng(recipe.run.seed).choice(len(held_out), d.eval_samples, replace=False))
        held_out = held_out.select(keep)
    sizes = [len(ds) for ds in train]
    for source, weight, size in zip(d.sources, d.weights, sizes):
        if weight and not size:
            raise ConfigError(f"data source {source} has weight {weight} but packs into no training sequence of "
                              f"{d.seq_len} tokens; give it weight 0 or more text.")
    _check_sizes(recipe, sum(sizes), len(held_out), f"{n_docs} documents")
    n_train = write_rows(datasets.concatenate_datasets(train), data_dir / "train.npy", d.seq_len,
                         between_chunks=lambda: check_stop("chunk"))
    n_eval = write_rows(held_out, data_dir / "eval.npy", d.seq_len, between_chunks=lambda: check_stop("chunk"))
    rows = np.load(data_dir / "train.npy", mmap_mode="r")
    info = {"documents": n_docs, "train_documents": sum(map(len, train_docs)),
            "eval_documents": sum(map(len, eval_docs)), "train_sequences": n_train, "eval_sequences": n_eval,
            "train_sequences_per_source": sizes, "seq_len": d.seq_len, "train_tokens": int(rows.size),
            "padding_fraction": float(np.mean(rows[: 100_000] == PAD)), "tokenizer": str(tokenizer_path),
            "vocab_size": tok.vocab_size, "sources": list(d.sources)}
    if d.weights:
        blend = Blend(sizes, list(d.weights), recipe.run.seed)
        info["mix"] = blend.describe(list(d.sources))
        log("blend per epoch: " + ", ".join(f"{m['source']} {m['share']:.1%} ({m['passes_per_epoch']:.2f} passes)"
                                            for m in info["mix"]))
    _write_last(data_dir / "data.json", json.dumps(info, indent=1))


def _stream(recipe: Recipe, held_out: bool) -> Any:
    """The documents of all sources as one stream, split into its held-out or its training part."""
    import datasets

    d = recipe.data
    parts = _open_sources(d, streaming=True)
    stream = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return stream.filter(_in_split, with_indices=True,
                         fn_kwargs={"fraction": d.eval_fraction, "seed": recipe.run.seed, "held_out": held_out})


def _train_stream(recipe: Recipe, tokenizer_path: Path, rank: int, world: int) -> Any:
    from datasets.distributed import split_dataset_by_node

    d = recipe.data
    stream = _stream(recipe, held_out=False).shuffle(seed=recipe.run.seed, buffer_size=d.shuffle_buffer)
    mine = split_dataset_by_node(stream, rank=rank, world_size=world)
    return preprocess(mine, tokenizer_path, recipe.model.arch, d.seq_len)


def _build_stream(recipe: Recipe, data_dir: Path, tokenizer_path: Path, log: Callable[[str], None],
                  check_stop: Callable[[str], None]) -> None:
    """A streamed corpus: the tokenizer (trained on the stream's first documents) and the held-out set on disk."""
    d = recipe.data
    data_dir.mkdir(parents=True, exist_ok=True)
    check_sources(d.sources)
    check_stop("tokenizer")
    if not d.tokenizer:
        _tokenizer(data_dir, d.vocab_size,
                   lambda: (ex["text"] for ex in _stream(recipe, held_out=False).take(TOKENIZER_DOCS)), log,
                   f"the first {TOKENIZER_DOCS} streamed documents")
    check_stop("pack")
    tok = Tokenizer(tokenizer_path)
    held = preprocess(_stream(recipe, held_out=True), tok.path, recipe.model.arch, d.seq_len)
    rows = list(itertools.islice((r for chunk in iter_rows(held, chunk=256) for r in chunk), d.eval_samples))
    first = next(iter_rows(preprocess(_stream(recipe, held_out=False), tok.path, recipe.model.arch, d.seq_len),
                           chunk=1), None)
    _check_sizes(recipe, recipe.batch.global_batch if first is not None else 0, len(rows), "the streamed documents")
    np.save(data_dir / "eval.npy", np.stack(rows).astype(np.int32))
    info = {"streaming": True, "eval_sequences": len(rows), "seq_len": d.seq_len, "tokenizer": str(tokenizer_path),
            "vocab_size": tok.vocab_size, "sources": list(d.sources), "shuffle_buffer": d.shuffle_buffer}
    _write_last(data_dir / "data.json", json.dumps(info, indent=1))
