"""gpt2_xl: GPT-2 XL (1.5B).

A GPT-2-shaped decoder pretrained with LAMB at a large batch. Shapes from Radford et al. 2019; the base
LR is GPT-3's for this size at GPT-3's batch in tokens (Brown et al. 2020, Table 2.1; Adam), counted here in
sequences of 1,024 tokens, and carried to the global batch by the LAMB paper's square-root rule: a starting point
derived by rule, not a tuned result.
The batch ramps from 512 to 4,096 sequences over the first 2M samples (Megatron's --rampup-batch-size, about
5% of the run), the LR following the rule at each batch.

    bigbatch plan gpt2_xl                # memory on the cluster below
    bigbatch check gpt2_xl               # the DeepSpeed JSON it composes
    deepspeed --num_gpus 8 --module bigbatch train gpt2_xl
"""

import sys

from bigbatch.config import (BatchConfig, CheckpointConfig, ClusterConfig, DataConfig, DeepSpeedSection, ModelConfig,
                             OptimizerConfig, Recipe, RunConfig, ScheduleConfig)

RECIPE = Recipe(
    name="gpt2_xl",
    model=ModelConfig(arch="gpt2", hidden_size=1600, num_layers=48, num_heads=25,
                      intermediate_size=6400, max_position=1024, dropout=0.0),
    # OpenWebText from the hub; a SentencePiece tokenizer of 50257 pieces is trained on it at the start unless
    # data.tokenizer names one.
    data=DataConfig(sources=("hf:Skylion007/openwebtext",), vocab_size=50257, seq_len=1024, eval_fraction=0.001,
                    eval_samples=2048),
    # 2e-4 at 1,024 sequences (GPT-3 XL's 1M tokens) x sqrt(4096 / 1024) = 4e-4 at the full global batch
    optimizer=OptimizerConfig(type="lamb", lr=2e-4, base_batch=1024, lr_rule="sqrt", betas=(0.9, 0.95), eps=1e-8,
                              weight_decay=0.1, grad_clip=1.0),
    # 4,096 sequences x 1,024 tokens = 4.2M tokens a step at full batch; about 40B tokens
    schedule=ScheduleConfig(steps=9600, warmup=0.02, decay="cosine", min_lr_ratio=0.1),
    # micro-batch 4: every batch of the ramp must be a multiple of 4 x 128 GPUs (32 would fit in memory)
    batch=BatchConfig(global_batch=4096, micro_batch=4, ramp_start=512, ramp_increment=512,
                      ramp_samples=2_000_000),
    deepspeed=DeepSpeedSection(configs=("zero2.json", "bf16.json", "act_ckpt.json")),
    checkpoint=CheckpointConfig(every_steps=500, keep_last=3),
    run=RunConfig(eval_every=500, log_every=10, trust_ratio_every=100),
    cluster=ClusterConfig(nodes=16, gpus_per_node=8, gpu_memory="80GB"),  # 128 A100/H100 80GB
)

if __name__ == "__main__":
    from bigbatch.cli import run_recipe

    sys.exit(run_recipe(__file__))
