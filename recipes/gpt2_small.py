"""gpt2_small: GPT-2 small (124M).

A GPT-2-shaped decoder pretrained with LAMB at a large batch. Shapes from Radford et al. 2019; the base
LR is GPT-3's for this size at GPT-3's batch in tokens (Brown et al. 2020, Table 2.1; Adam), counted here in
sequences of 1,024 tokens, and carried to the global batch by the LAMB paper's square-root rule: a starting point
derived by rule, not a tuned result.

    bigbatch plan gpt2_small                # memory on the cluster below
    bigbatch check gpt2_small               # the DeepSpeed JSON it composes
    deepspeed --num_gpus 8 --module bigbatch train gpt2_small
"""

import dataclasses
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
    name="gpt2_small",
    model=dataclasses.replace(shape("gpt2-124m"), dropout=0.0),
    # OpenWebText from the hub; a SentencePiece tokenizer of 50257 pieces is trained on it at the start unless
    # data.tokenizer names one.
    data=DataConfig(sources=("hf:Skylion007/openwebtext",), vocab_size=50257, seq_len=1024, eval_fraction=0.001,
                    eval_samples=2048),
    # 6e-4 at 512 sequences x sqrt(4096 / 512) = 1.7e-3 at the global batch
    optimizer=OptimizerConfig(type="lamb", lr=6e-4, base_batch=512, lr_rule="sqrt", betas=(0.9, 0.95), eps=1e-8,
                              weight_decay=0.1, grad_clip=1.0),
    # 4,096 sequences x 1,024 tokens = 4.2M tokens a step; 2,400 steps = 10B tokens
    schedule=ScheduleConfig(steps=2400, warmup=0.05, decay="cosine", min_lr_ratio=0.1),
    # micro-batch and checkpointing: what fits this GPU and trains fastest (bigbatch plan shows the choice)
    batch=BatchConfig(global_batch=4096, micro_batch="auto"),
    deepspeed=DeepSpeedSection(configs=("zero1.json", "bf16.json"), activation_checkpointing="auto"),
    checkpoint=CheckpointConfig(every_steps=500, keep_last=3),
    run=RunConfig(eval_every=500, log_every=10, trust_ratio_every=100),
    # 32 A100/H100 80GB; memory: the smaller card (81,252 MiB), as the device reports it
    cluster=ClusterConfig(nodes=4, gpus_per_node=8, gpu_memory="A100-80GB"),
)

if __name__ == "__main__":
    from bigbatch.cli import run_recipe

    sys.exit(run_recipe(__file__))
