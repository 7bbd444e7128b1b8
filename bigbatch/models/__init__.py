"""Models: transformers models built from a recipe's shape, never from downloaded weights (build), and fine-tuning an
export for classification (finetune)."""
