"""tiny: the CPU demo. A 0.2M-parameter BERT (width 64, 2 layers, sequence 64, 2,000 SentencePiece pieces) pretrained
with LAMB at a global batch of 4,096 sequences on the English documentation text that ships inside Python.

    make demo                                           # 2 CPU ranks through the deepspeed launcher
    python recipes/tiny.py                              # one process
    deepspeed --num_gpus 2 --module bigbatch train tiny
"""

import sys

from bigbatch.config import (
    BatchConfig,
    ClusterConfig,
    DataConfig,
    DeepSpeedSection,
    ModelConfig,
    OptimizerConfig,
    Recipe,
    RunConfig,
    ScheduleConfig,
)

RECIPE = Recipe(
    name="tiny",
    model=ModelConfig(arch="bert", hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                      max_position=64, dropout=0.0),
    data=DataConfig(sources=("builtin:python-docs",), vocab_size=2000, seq_len=64, eval_fraction=0.05,
                    eval_samples=1024),
    # 5e-3 tuned at batch 256, carried to 4,096 by the LAMB paper's square-root rule: 2e-2.
    optimizer=OptimizerConfig(type="lamb", lr=5e-3, base_batch=256, lr_rule="sqrt", weight_decay=0.01),
    schedule=ScheduleConfig(steps=60, warmup=0.1, decay="poly", power=1.0),
    batch=BatchConfig(global_batch=4096, micro_batch=256),
    deepspeed=DeepSpeedSection(configs=("zero1.json", "fp32.json")),
    run=RunConfig(eval_every=10),
    cluster=ClusterConfig(nodes=1, gpus_per_node=2, gpu_memory="12GB"),  # 2 CPU ranks on the CI machine
)

if __name__ == "__main__":
    from bigbatch.cli import run_recipe

    sys.exit(run_recipe(__file__))
