"""bigbatch/shapes.py: each named shape has its published parameter count, counted on the meta device as `bigbatch
plan` does (tied embeddings once), at the published vocabulary without bigbatch's padding of it."""

from __future__ import annotations

import dataclasses

import pytest

from bigbatch.config import ConfigError
from bigbatch.config.shapes import SHAPES, shape
from bigbatch.models.build import build_model, count_parameters

# name: (vocabulary, parameters, relative tolerance, source). A layer fewer is 2.1% of GPT-2 1.5B and more of every
# other shape, so each tolerance fails a wrong depth; a wrong width or MLP width moves the count further.
PUBLISHED = {
    # google-research/bert README: "BERT-Base ... 110M parameters", "BERT-Large ... 340M parameters" (rounded;
    # BertForMaskedLM counts 109.5M and 335.2M: the pooler is not part of it, the MLM head is)
    "bert-base": (30522, 110e6, 0.015, "google-research/bert README"),
    "bert-large": (30522, 340e6, 0.015, "google-research/bert README"),
    # openai/gpt-2 names its checkpoints by size (download_model.py: 124M, 355M, 1558M); exact counts of those
    # checkpoints, tied input and output embedding counted once, at the released vocabulary of 50,257
    "gpt2-124m": (50257, 124_439_808, 0.005, "openai/gpt-2 124M checkpoint"),
    "gpt2-355m": (50257, 354_823_168, 0.005, "openai/gpt-2 355M checkpoint"),
    "gpt2-1.5b": (50257, 1_557_611_200, 0.005, "openai/gpt-2 1558M checkpoint"),
    # TinyLlama/TinyLlama-1.1B (Zhang et al. 2024), untied embeddings, vocabulary 32,000
    "llama-1.1b": (32000, 1_100_048_384, 0.005, "TinyLlama 1.1B checkpoint"),
}
# Published head counts (BERT README; GPT-2's hparams.json n_head; TinyLlama's config): the count cannot see them.
HEADS = {"bert-base": 12, "bert-large": 16, "gpt2-124m": 12, "gpt2-355m": 16, "gpt2-1.5b": 25, "llama-1.1b": 32}


def test_every_shape_has_a_published_figure():
    assert set(SHAPES) == set(PUBLISHED) == set(HEADS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_the_published_figure(name):
    import torch

    vocab, published, tolerance, _source = PUBLISHED[name]
    model_cfg = dataclasses.replace(shape(name), pad_vocab_to_multiple=1)
    with torch.device("meta"):
        n = count_parameters(build_model(model_cfg, vocab, pad_id=0))
    assert n == pytest.approx(published, rel=tolerance)
    assert shape(name).num_heads == HEADS[name]


def test_unknown_shape_is_one_sentence_with_a_hint():
    with pytest.raises(ConfigError, match=r"did you mean 'bert-large'\?.*known shapes: bert-base"):
        shape("bert-lage")
