"""Named model shapes, as litgpt and torchtitan keep theirs: a recipe says `model=shape("bert-large")`, and
`dataclasses.replace` on it says what the recipe changes.

Each shape is the published model's architecture (width, depth, heads, MLP width, positions, dropout); the vocabulary
is the data's (`data.vocab_size`). tests/test_shapes.py checks each against its published parameter count.
"""

from __future__ import annotations

import difflib

from bigbatch.config import ConfigError, ModelConfig

SHAPES: dict[str, ModelConfig] = {
    # Devlin et al. 2019, and google-research/bert's README: 12-layer, 768-hidden, 12-heads, 110M parameters
    "bert-base": ModelConfig(arch="bert", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                             max_position=512, dropout=0.1),
    # the same: 24-layer, 1024-hidden, 16-heads, 340M parameters
    "bert-large": ModelConfig(arch="bert", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                              max_position=512, dropout=0.1),
    # Radford et al. 2019, Table 2 (layers, width), and the released hparams.json (heads, context, dropout 0.1)
    "gpt2-124m": ModelConfig(arch="gpt2", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                             max_position=1024, dropout=0.1),
    "gpt2-355m": ModelConfig(arch="gpt2", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                             max_position=1024, dropout=0.1),
    "gpt2-1.5b": ModelConfig(arch="gpt2", hidden_size=1600, num_layers=48, num_heads=25, intermediate_size=6400,
                             max_position=1024, dropout=0.1),
    # TinyLlama 1.1B (Zhang et al. 2024): grouped-query attention with 4 key-value heads, SwiGLU 5,632
    "llama-1.1b": ModelConfig(arch="llama", hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                              intermediate_size=5632, max_position=2048, dropout=0.0),
}


def shape(name: str) -> ModelConfig:
    """The named shape; an unknown name raises a ConfigError listing the known ones."""
    if name not in SHAPES:
        hint = difflib.get_close_matches(name, SHAPES, n=1)
        extra = f"did you mean {hint[0]!r}? " if hint else ""
        raise ConfigError(f"model shape {name!r} is not known; {extra}known shapes: {', '.join(SHAPES)}.")
    return SHAPES[name]
