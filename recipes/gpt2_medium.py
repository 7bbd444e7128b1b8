"""gpt2_medium: GPT-2 medium (355M), on gpt2_small's recipe (LAMB, OpenWebText, cosine decay).

    bigbatch plan gpt2_medium                # memory on the cluster below
    bigbatch check gpt2_medium               # the DeepSpeed JSON it composes
    deepspeed --num_gpus 8 --module bigbatch train gpt2_medium
"""

import dataclasses
import sys
from pathlib import Path

from bigbatch.config import ClusterConfig, DeepSpeedSection
from bigbatch.config.files import load_recipe_file
from bigbatch.config.shapes import shape

SMALL = load_recipe_file(Path(__file__).with_name("gpt2_small.py"))
RECIPE = dataclasses.replace(
    SMALL,
    name="gpt2_medium",
    model=dataclasses.replace(shape("gpt2-355m"), dropout=SMALL.model.dropout),
    # GPT-3 medium's 3e-4 at 512 sequences x sqrt(4096 / 512) = 8.5e-4 at the global batch
    optimizer=dataclasses.replace(SMALL.optimizer, lr=3e-4, base_batch=512),
    # 4,096 sequences x 1,024 tokens = 4.2M tokens a step; 4,800 steps = 20B tokens
    schedule=dataclasses.replace(SMALL.schedule, steps=4800),
    deepspeed=DeepSpeedSection(configs=("zero1.json", "bf16.json"), activation_checkpointing="auto"),
    # 64 A100/H100 80GB; memory: the smaller card (81,252 MiB), as the device reports it
    cluster=ClusterConfig(nodes=8, gpus_per_node=8, gpu_memory="A100-80GB"),
)

if __name__ == "__main__":
    from bigbatch.cli import run_recipe

    sys.exit(run_recipe(__file__))
