"""Documents -> packed sequences in one `datasets.map` step: tokenize, then pack. Parallel (`num_proc`), cached.

The step is a module-level function of its arguments only, so `datasets` can fingerprint it: a second run over the
same files with the same tokenizer (its bytes, not its path) and length reuses the cached Arrow file instead of
tokenizing again. Works on a map-style `Dataset` and, lazily, on a streaming `IterableDataset`.

Packing runs within each map batch of MAP_BATCH documents (rows never span two batches), and `num_proc` workers
split the corpus into contiguous shards whose batches start at the shard's start: the rows are a deterministic
function of the corpus, tokenizer, length and num_proc. A run keeps its packed rows in its run directory, so a
resume never repacks.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from bigbatch.config.errors import StorageFault
from bigbatch.data.packing import pack_bert, pack_gpt

# Sentence ends for BERT's sentence-aware packing: a full stop, question or exclamation mark followed by white
# space. Crude next to a trained splitter (abbreviations split too), but packing only needs plausible cut points.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PROCESSORS: dict[int, Any] = {}
MAP_BATCH = 1000  # documents per map call; GPT packing drops a ragged tail (< seq_len tokens) per call


def _processor(model_proto: bytes) -> Any:
    """A SentencePiece processor per model, built once per worker process."""
    key = hash(model_proto)
    if key not in _PROCESSORS:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.load_from_serialized_proto(model_proto)
        _PROCESSORS[key] = sp
    return _PROCESSORS[key]


def _tokenize(texts: list[str], sp: Any, sentences: bool) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids per document and, for sentence-aware packing, each sentence's end offset in them."""
    if not sentences:
        return sp.encode(texts), []
    split = [[s for s in _SENTENCE_END.split(doc) if s] for doc in texts]
    encoded = iter(sp.encode([s for doc in split for s in doc]))  # one C++ call for the whole batch
    ids, ends = [], []
    for doc in split:
        pieces = [next(encoded) for _ in doc]
        ids.append([t for p in pieces for t in p])
        ends.append(np.cumsum([len(p) for p in pieces]).tolist())
    return ids, ends


def encode_batch(batch: dict[str, list[str]], model_proto: bytes, arch: str, seq_len: int) -> dict[str, np.ndarray]:
    """One `map` step from documents to packed rows: no intermediate dataset of token lists is written, which is
    where most of the time would go (Arrow conversion of nested lists)."""
    ids, ends = _tokenize(batch["text"], _processor(model_proto), sentences=arch == "bert")
    rows = pack_bert(ids, ends, seq_len) if arch == "bert" else pack_gpt(ids, seq_len)
    return {"input_ids": rows}


def auto_num_proc(n_docs: int | None, num_proc: int) -> int:
    """data.num_proc, or when 0: one worker per core (at most 8) for corpora over 20,000 documents, else 1 (a pool
    costs about a second to start, more than a small corpus takes)."""
    if num_proc:
        return num_proc
    if n_docs is None or n_docs <= 20_000:
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0))))


def preprocess(ds: Any, tokenizer_path: Path, arch: str, seq_len: int, num_proc: int = 0,
               desc: str = "") -> Any:
    """Tokenize and pack a dataset of documents into a dataset of `input_ids` rows of exactly `seq_len` tokens."""
    kwargs: dict[str, Any] = {}
    if hasattr(ds, "cache_files"):  # map-style; a stream maps lazily, as it is read
        n = auto_num_proc(len(ds), num_proc)
        kwargs = {"num_proc": n if n > 1 else None, "desc": desc or None}
    return ds.map(encode_batch, batched=True, batch_size=MAP_BATCH, remove_columns=["text"],
                  fn_kwargs={"model_proto": Path(tokenizer_path).read_bytes(), "arch": arch, "seq_len": seq_len},
                  **kwargs)


def iter_rows(ds: Any, chunk: int = 8192) -> Iterator[np.ndarray]:
    """The packed rows of a dataset as int32 arrays of up to `chunk` rows, read through Arrow (the numpy formatter
    builds one array per row, 3x slower than the packing itself)."""
    for table in ds.with_format("arrow").iter(batch_size=chunk):
        column = table.column("input_ids").combine_chunks()
        if len(column):
            yield column.flatten().to_numpy(zero_copy_only=False).astype(np.int32).reshape(len(column), -1)


def reserve(fd: int, size: int) -> None:
    """Gives the file's first `size` bytes real blocks, so a full disk is an ENOSPC here and not a SIGBUS at a write
    into a mapped page that the filesystem cannot back. A filesystem without fallocate (EOPNOTSUPP) gets zeros
    written instead."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        block = bytes(1 << 20)
        os.lseek(fd, 0, os.SEEK_SET)
        for start in range(0, size, len(block)):
            os.write(fd, block[: min(len(block), size - start)])
        os.fsync(fd)


def _reserved_memmap(path: Path, shape: tuple[int, int]) -> np.memmap:
    """A .npy file of int32 `shape` with its blocks reserved, mapped for writing; StorageFault (one sentence, the
    partial file removed) when its filesystem cannot hold it."""
    try:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=shape)
        with open(path, "r+b") as f:
            reserve(f.fileno(), os.fstat(f.fileno()).st_size)
        return out
    except OSError as err:
        path.unlink(missing_ok=True)
        need = shape[0] * shape[1] * 4
        free = shutil.disk_usage(path.parent).free
        raise StorageFault(
            f"the packed data {path} needs {need:,} bytes but its filesystem has {free:,} bytes free "
            f"({err.strerror or err}); free space (or choose another "
            "--run-dir), then start again with --resume (a trained tokenizer is reused)") from err


def write_rows(ds: Any, path: Path, seq_len: int, limit: int | None = None,
               between_chunks: Callable[[], None] = lambda: None) -> int:
    """Writes (up to `limit`) packed rows to a .npy file chunk by chunk (a corpus larger than memory never sits in
    it; the trainer memory-maps the file); `between_chunks` runs before each chunk (a stop request raises there).
    Returns the number of rows."""
    n = len(ds) if limit is None else min(len(ds), limit)
    out = _reserved_memmap(path, (n, seq_len))
    done = 0
    for rows in iter_rows(ds.select(range(n)) if n < len(ds) else ds):
        between_chunks()
        out[done : done + len(rows)] = rows
        done += len(rows)
    out.flush()
    del out
    return n
