"""What a distillation's teacher adds to each GPU's step (`bigbatch plan` on a recipe with distill.teacher): its
weights in the run's precision and the activations of a forward pass under no_grad, with no gradients and no optimizer
state, and its forward FLOPs. The shape is read from the teacher's recipe.json or config.json; no weights are loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bigbatch.config import ModelConfig, Recipe
from bigbatch.config.files import load_recipe_file
from bigbatch.models.distill import teacher_kind
from bigbatch.plan.memory import model_size, teacher_bytes
from bigbatch.plan.timing import forward_flops


def teacher_shape(spec: str) -> tuple[ModelConfig, int]:
    """(the teacher's shape, its vocabulary) from its run's recipe.json, or an export's (or hf: model's) config."""
    kind = teacher_kind(spec)
    if kind == "run":
        recipe = load_recipe_file(Path(spec) / "recipe.json")
        resolved = json.loads((Path(spec) / "recipe.json").read_text()).get("resolved", {})
        return recipe.model, int(resolved.get("vocab_size", recipe.data.vocab_size))
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(spec[3:], local_files_only=True) if kind == "hf" else \
        AutoConfig.from_pretrained(spec)
    shape = ModelConfig(arch=c.model_type, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                        num_heads=c.num_attention_heads, num_kv_heads=getattr(c, "num_key_value_heads", 0) or 0,
                        intermediate_size=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None)
                        or 4 * c.hidden_size, max_position=c.max_position_embeddings, pad_vocab_to_multiple=1)
    return shape, c.vocab_size


def teacher_cost(recipe: Recipe, micro_batch: int, grad_accum: int, precision: str) -> dict[str, Any]:
    """Per GPU: the teacher's parameters, weight bytes, peak forward activation bytes (one layer's live tensors and
    the head: under no_grad nothing is kept for a backward pass) and forward FLOPs per optimizer step."""
    shape, vocab = teacher_shape(recipe.distill.teacher)
    seq = recipe.data.seq_len
    weights, activations = teacher_bytes(shape, vocab, seq, micro_batch, precision, recipe.data.mlm_probability)
    forward = forward_flops(shape, vocab, seq, micro_batch, recipe.data.mlm_probability)
    flops = (forward.layers + forward.head) * grad_accum  # the forward alone: `.model` counts training (3x)
    return {"parameters": model_size(shape, vocab)[0], "weight_bytes": weights,
            "forward_activation_bytes": activations, "forward_flops_per_step": flops}
