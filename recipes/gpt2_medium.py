"""gpt2_medium: GPT-2 medium (355M).

A GPT-2-shaped decoder pretrained with LAMB at a large batch. Shapes from Radford et al. 2019; the base
LR is GPT-3's for this size at GPT-3's batch in tokens (Brown et al. 2020, Table 2.1; Adam), counted here in
sequences of 1,024 tokens, and carried to the global batch by the LAMB paper's square-root rule: a starting point
derived by rule, not a tuned result.

    bigbatch plan gpt2_medium                # memory on the cluster below
    bigbatch check gpt2_medium               # the DeepSpeed JSON it composes
    deepspeed --num_gpus 8 --module bigbatch train gpt2_medium
"""

import sys

from bigbatch.config import (BatchConfig, CheckpointConfig, ClusterConfig, DataConfig, DeepSpeedSection, ModelConfig,
                             OptimizerConfig, Recipe, RunConfig, ScheduleConfig)

RECIPE = Recipe(
    name="gpt2_medium",
    model=ModelConfig(arch="gpt2", hidden_size=1024, num_layers=24, num_heads=16,
                      intermediate_size=4096, max_position=1024, dropout=0.0),
    # OpenWebText from the hub; a SentencePiece tokenizer of 50257 pieces is trained on it at the start unless
    # data.tokenizer names one.
    data=DataConfig(sources=("hf:Skylion007/openwebtext",), vocab_size=50257, seq_len=1024, eval_fraction=0.001,
                    eval_samples=2048),
    # 3e-4 at 512 sequences x sqrt(4096 / 512) = 8.5e-4 at the global batch
    optimizer=OptimizerConfig(type="lamb", lr=3e-4, base_batch=512, lr_rule="sqrt", betas=(0.9, 0.95), eps=1e-8,
                              weight_decay=0.1, grad_clip=1.0),
    # 4,096 sequences x 1,024 tokens = 4.2M tokens a step; 4,800 steps = 20B tokens
    schedule=ScheduleConfig(steps=4800, warmup=0.05, decay="cosine", min_lr_ratio=0.1),
    batch=BatchConfig(global_batch=4096, micro_batch=16),  # `bigbatch plan`: 32 is the largest that fits
    deepspeed=DeepSpeedSection(configs=("zero1.json", "bf16.json")),
    checkpoint=CheckpointConfig(every_steps=500, keep_last=3),
    run=RunConfig(eval_every=500, log_every=10, trust_ratio_every=100),
    cluster=ClusterConfig(nodes=8, gpus_per_node=8, gpu_memory="80GB"),  # 64 A100/H100 80GB
)

if __name__ == "__main__":
    from bigbatch.cli import run_recipe

    sys.exit(run_recipe(__file__))
