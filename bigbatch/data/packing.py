"""Token streams -> fixed-length training sequences, with a held-out split made at the document level."""

from __future__ import annotations

import numpy as np

from bigbatch.data.tokenizer import CLS, SEP


def split_documents(n_docs: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices): a seeded shuffle, the first `eval_fraction` held out (at least one document)."""
    order = np.random.default_rng(seed).permutation(n_docs)
    n_eval = max(1, int(round(eval_fraction * n_docs)))
    if n_eval >= n_docs:
        n_eval = n_docs - 1
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def pack_bert(token_docs: list[list[int]], seq_len: int) -> np.ndarray:
    """[CLS] chunk [SEP] sequences of exactly `seq_len` tokens from the concatenated documents, [SEP] between
    documents (RoBERTa's FULL-SENTENCES style, crossing document boundaries); the ragged tail is dropped."""
    body = seq_len - 2
    stream = _concat(token_docs, SEP)
    n = len(stream) // body
    chunks = stream[: n * body].reshape(n, body)
    out = np.empty((n, seq_len), dtype=np.int32)
    out[:, 0], out[:, -1], out[:, 1:-1] = CLS, SEP, chunks
    return out


def pack_gpt(token_docs: list[list[int]], seq_len: int) -> np.ndarray:
    """Documents concatenated with an end-of-document token ([SEP]) and cut into `seq_len` windows."""
    stream = _concat(token_docs, SEP)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len).astype(np.int32)


def _concat(token_docs: list[list[int]], separator: int) -> np.ndarray:
    pieces = []
    for doc in token_docs:
        if doc:
            pieces.append(np.asarray(doc, dtype=np.int32))
            pieces.append(np.asarray([separator], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
