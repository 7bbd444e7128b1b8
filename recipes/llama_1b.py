"""llama_1b: a Llama-style 1.1B decoder (RMSNorm, rotary, SwiGLU, grouped-query attention).

The shape of TinyLlama (Zhang et al. 2024: width 2,048, 22 layers, 32 heads, 4 key-value heads, SwiGLU
5,632, sequence 2,048), built from a transformers LlamaConfig, pretrained with LAMB. Base LR 4e-4 at
1,024 sequences (TinyLlama's AdamW at 2M tokens), carried by the square-root rule: derived, not tuned.

    bigbatch plan llama_1b                # memory on the cluster below
    bigbatch check llama_1b               # the DeepSpeed JSON it composes
    deepspeed --num_gpus 8 --module bigbatch train llama_1b
"""

import sys

from bigbatch.config import (
    BatchConfig,
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    DeepSpeedSection,
    OptimizerConfig,
    Recipe,
    RunConfig,
    ScheduleConfig,
)
from bigbatch.config.shapes import shape

RECIPE = Recipe(
    name="llama_1b",
    model=shape("llama-1.1b"),
    # OpenWebText from the hub; a SentencePiece tokenizer of 32000 pieces is trained on it at the start unless
    # data.tokenizer names one.
    data=DataConfig(sources=("hf:Skylion007/openwebtext",), vocab_size=32000, seq_len=2048, eval_fraction=0.001,
                    eval_samples=2048),
    # 4e-4 at 1,024 sequences x sqrt(4096 / 1024) = 8e-4 at the global batch
    optimizer=OptimizerConfig(type="lamb", lr=4e-4, base_batch=1024, lr_rule="sqrt", betas=(0.9, 0.95), eps=1e-8,
                              weight_decay=0.1, grad_clip=1.0),
    # 4,096 sequences x 2,048 tokens = 8.4M tokens a step; 6,000 steps = 50B tokens
    schedule=ScheduleConfig(steps=6000, warmup=0.03, decay="cosine", min_lr_ratio=0.1),
    # micro-batch and checkpointing: what fits this GPU and trains fastest (bigbatch plan shows the choice)
    batch=BatchConfig(global_batch=4096, micro_batch="auto"),
    deepspeed=DeepSpeedSection(configs=("zero2.json", "bf16.json"), activation_checkpointing="auto"),
    checkpoint=CheckpointConfig(every_steps=500, keep_last=3),
    run=RunConfig(eval_every=500, log_every=10, trust_ratio_every=100),
    # 128 A100/H100 80GB; memory: the smaller card (81,252 MiB), as the device reports it
    cluster=ClusterConfig(nodes=16, gpus_per_node=8, gpu_memory="A100-80GB"),
)

if __name__ == "__main__":
    from bigbatch.cli import run_recipe

    sys.exit(run_recipe(__file__))
