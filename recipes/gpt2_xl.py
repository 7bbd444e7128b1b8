"""gpt2_xl: GPT-2 XL (1.5B), on gpt2_small's recipe (LAMB, OpenWebText, cosine decay).

The batch ramps from 512 to 4,096 sequences over the first 2M samples (Megatron's --rampup-batch-size, about
5% of the run), the LR following the square-root rule at each batch.

    bigbatch plan gpt2_xl                # memory on the cluster below
    bigbatch check gpt2_xl               # the DeepSpeed JSON it composes
    deepspeed --num_gpus 8 --module bigbatch train gpt2_xl
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
    name="gpt2_xl",
    model=dataclasses.replace(shape("gpt2-1.5b"), dropout=SMALL.model.dropout),
    # GPT-3 XL's 2e-4 at 1,024 sequences (its 1M tokens) x sqrt(4096 / 1024) = 4e-4 at the full batch
    optimizer=dataclasses.replace(SMALL.optimizer, lr=2e-4, base_batch=1024),
    # 4,096 sequences x 1,024 tokens = 4.2M tokens a step at full batch; about 40B tokens
    schedule=dataclasses.replace(SMALL.schedule, steps=9600),
    batch=dataclasses.replace(SMALL.batch, ramp_start=512, ramp_increment=512, ramp_samples=2_000_000),
    # micro-batch "auto" (gpt2_small's) takes at most 4 on 128 GPUs: every ramp batch must be a multiple of micro x 128
    deepspeed=DeepSpeedSection(configs=("zero2.json", "bf16.json"), activation_checkpointing="auto"),
    # 128 A100/H100 80GB; memory: the smaller card (81,252 MiB), as the device reports it
    cluster=ClusterConfig(nodes=16, gpus_per_node=8, gpu_memory="A100-80GB"),
)

if __name__ == "__main__":
    from bigbatch.cli import run_recipe

    sys.exit(run_recipe(__file__))
