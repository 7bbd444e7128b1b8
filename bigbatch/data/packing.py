"""Token streams -> fixed-length training sequences, with a held-out split made at the document level."""

from __future__ import annotations

import numpy as np

from bigbatch.data.tokenizer import CLS, PAD, SEP


def split_documents(n_docs: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices): a seeded shuffle, the first `eval_fraction` held out (at least one document)."""
    order = np.random.default_rng(seed).permutation(n_docs)
    n_eval = max(1, int(round(eval_fraction * n_docs)))
    if n_eval >= n_docs:
        n_eval = n_docs - 1
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def pack_bert(token_docs: list[list[int]], sentence_ends: list[list[int]], seq_len: int) -> np.ndarray:
    """RoBERTa's FULL-SENTENCES packing (Liu et al. 2019, section 4.2): each row is [CLS] + whole sentences, taken
    in order and across document boundaries with a [SEP] between documents, + [SEP], padded with [PAD] to `seq_len`.
    A sentence never straddles two rows unless it is longer than a row by itself; then it is cut into row-sized
    pieces. `sentence_ends[d]` holds the end offset of each sentence of document d in `token_docs[d]`.
    """
    body = seq_len - 2
    rows: list[list[int]] = []
    current: list[int] = []

    def flush() -> None:
        if current:
            rows.append(current.copy())
            current.clear()

    for doc, ends in zip(token_docs, sentence_ends):
        start = 0
        for end in ends:
            sentence = doc[start:end]
            start = end
            if not sentence:
                continue
            if len(current) + len(sentence) > body:
                flush()
            while len(sentence) > body:  # longer than a row: its own rows, cut where they fill
                rows.append(list(sentence[:body]))
                sentence = sentence[body:]
            current.extend(sentence)
        if current and len(current) < body:
            current.append(SEP)  # end of document (RoBERTa's extra separator)
    flush()
    out = np.full((len(rows), seq_len), PAD, dtype=np.int32)
    out[:, 0] = CLS
    for i, row in enumerate(rows):
        out[i, 1 : 1 + len(row)] = row
        out[i, 1 + len(row)] = SEP
    return out


def pack_gpt(token_docs: list[list[int]], seq_len: int) -> np.ndarray:
    """Documents concatenated with an end-of-document token ([SEP]) and cut into `seq_len` windows; the ragged tail
    (fewer than `seq_len` tokens) is dropped."""
    stream = _concat(token_docs, SEP)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len).astype(np.int32)


def _concat(token_docs: list[list[int]], separator: int) -> np.ndarray:
    pieces = []
    for doc in token_docs:
        if len(doc):
            pieces.append(np.asarray(doc, dtype=np.int32))
            pieces.append(np.asarray([separator], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
