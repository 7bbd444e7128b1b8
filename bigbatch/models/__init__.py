"""Models: transformers models built from a recipe's shape, never from downloaded weights (build), fine-tuning an
export for classification (finetune), distillation (distill) and compression (compression)."""

import logging

# transformers imports torchao whenever it is installed (transformers/quantizers/auto.py). On a machine without CUDA,
# torchao then logs a load failure for each of its CUDA-only libraries and torch a deprecation note for each torchao
# enum; neither concerns the user, so only their errors are shown.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
