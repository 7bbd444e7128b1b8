"""bert_large: BERT-large (340M) pretrained with LAMB on the published mixed-batch schedule.

Numbers from NVIDIA's BERT LAMB recipe (DeepLearningExamples, PyTorch/LanguageModeling/BERT) and the LAMB paper
(You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", Table 2): phase 1 at
sequence length 128, global batch 65,536, LR 6e-3, warmup 28.43% of 7,038 steps; phase 2 at sequence length 512,
global batch 32,768, LR 4e-3, warmup 12.8% of 1,563 steps; polynomial decay with power 0.5. The paper reaches SQuAD
v1.1 F1 90.58 with this schedule in 8,599 steps. Those LRs are for a LAMB without the trust-ratio clamp (optax's
`lamb`): min_coeff 0, max_coeff inf.

    bigbatch plan bert_large            # memory on the cluster below
    bigbatch check bert_large           # the DeepSpeed JSON it composes
    deepspeed --num_gpus 8 --module bigbatch train bert_large     # one node (accumulation grows to keep the batch)
"""

import sys

from bigbatch.config import (
    BatchConfig,
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    DeepSpeedSection,
    OptimizerConfig,
    PhaseConfig,
    Recipe,
    RunConfig,
    ScheduleConfig,
)
from bigbatch.config.shapes import shape

RECIPE = Recipe(
    name="bert_large",
    model=shape("bert-large"),
    # English Wikipedia from the hub (BookCorpus is no longer distributed); a 30,522-piece tokenizer is trained on it
    # at the start unless data.tokenizer names one.
    data=DataConfig(sources=("hf:wikimedia/wikipedia:20231101.en",), vocab_size=30522, seq_len=128,
                    eval_fraction=0.002, eval_samples=8192),
    optimizer=OptimizerConfig(type="lamb", lr=6e-3, lr_rule="none", betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                              grad_clip=1.0, min_coeff=0.0, max_coeff=float("inf")),
    schedule=ScheduleConfig(steps=7038, warmup=0.2843, decay="poly", power=0.5),
    # micro-batch and checkpointing per phase: what fits this GPU and trains fastest (bigbatch plan shows the choice)
    batch=BatchConfig(global_batch=65536, micro_batch="auto"),
    phases=(PhaseConfig(global_batch=32768, seq_len=512, steps=1563, micro_batch="auto", lr=4e-3, warmup=0.128,
                        decay="poly", power=0.5),),
    deepspeed=DeepSpeedSection(configs=("zero1.json", "bf16.json"), activation_checkpointing="auto"),
    checkpoint=CheckpointConfig(every_steps=200, keep_last=3),
    run=RunConfig(eval_every=200, log_every=10, trust_ratio_every=50),
    # 64 A100/H100 80GB; memory: the smaller card (81,252 MiB), as the device reports it
    cluster=ClusterConfig(nodes=8, gpus_per_node=8, gpu_memory="A100-80GB"),
)

if __name__ == "__main__":
    from bigbatch.cli import run_recipe

    sys.exit(run_recipe(__file__))
