"""BERT masking (Devlin et al. 2019): 15% of positions predicted; of those 80% [MASK], 10% random, 10% unchanged.
With whole-word masking (Google's BERT release, 2019) a word's pieces are selected together: every piece takes the
selection draw of the first piece of its word, so the expected share of predicted tokens stays 15%.

The random draws are a pure function of (seed, epoch, sample index, position) through a counter-based hash, so a
sample is masked the same way whatever the world size, the micro-batch it lands in, or a resume in between.
"""

from __future__ import annotations

import numpy as np

from bigbatch.data.tokenizer import CLS, MASK, PAD, SEP

IGNORE = -100
_FIRST_REGULAR = MASK + 1  # random replacements never draw a special token


def hash_uniform(keys: np.ndarray) -> np.ndarray:
    """splitmix64 (Steele et al. 2014) of each key, as floats in [0, 1)."""
    with np.errstate(over="ignore"):
        z = keys + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def mask_tokens(
    tokens: np.ndarray,
    sample_ids: np.ndarray,
    epochs: np.ndarray,
    seed: int,
    vocab_size: int,
    probability: float = 0.15,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (input_ids, labels) for a (batch, seq) array; labels are IGNORE where nothing is predicted.

    `sample_ids` and `epochs` (one per row) key the draws; epoch -1 is used for the fixed held-out masking.
    `word_start` (a bool per vocabulary id: the piece begins a word) switches on whole-word masking.
    """
    batch, seq = tokens.shape
    with np.errstate(over="ignore"):
        epoch_keys = (np.asarray(epochs, dtype=np.int64) + 1).astype(np.uint64)
        base = (np.uint64(seed) * np.uint64(0x100000001B3) + epoch_keys) * np.uint64(0x9E3779B1)
        keys = (base + sample_ids.astype(np.uint64))[:, None] * np.uint64(seq) + np.arange(seq, dtype=np.uint64)
        keys = keys * np.uint64(3)
    pick, action, replace = hash_uniform(keys), hash_uniform(keys + np.uint64(1)), hash_uniform(keys + np.uint64(2))
    special = (tokens == PAD) | (tokens == CLS) | (tokens == SEP)
    if word_start is not None:
        starts = word_start[tokens] | special
        starts[:, 1:] |= special[:, :-1]  # a piece after [CLS] or [SEP] begins a word even if packing cut it
        first = np.maximum.accumulate(np.where(starts, np.arange(seq), 0), axis=1)  # first piece of each word
        pick = np.take_along_axis(pick, first, axis=1)
    selected = (pick < probability) & ~special
    labels = np.where(selected, tokens, IGNORE).astype(np.int64)
    inputs = tokens.astype(np.int64).copy()
    inputs[selected & (action < 0.8)] = MASK
    random_ids = _FIRST_REGULAR + (replace * (vocab_size - _FIRST_REGULAR)).astype(np.int64)
    swap = selected & (action >= 0.8) & (action < 0.9)
    inputs[swap] = random_ids[swap]
    return inputs, labels
