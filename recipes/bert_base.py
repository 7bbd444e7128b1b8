"""bert_base: BERT-base (110M) on bert_large's schedule (LAMB, the published mixed-batch schedule, two phases).

The schedule and LRs are bert_large's, published for BERT-large (see recipes/bert_large.py for the sources);
NVIDIA's BERT-base LAMB runs use the same phase structure. Only the shape and the cluster differ (the micro-batches
are "auto", as bert_large's).

    bigbatch plan bert_base             # memory on the cluster below
    bigbatch check bert_base            # the DeepSpeed JSON it composes
    deepspeed --num_gpus 8 --module bigbatch train bert_base
"""

import dataclasses
import sys
from pathlib import Path

from bigbatch.config import ClusterConfig
from bigbatch.config.files import load_recipe_file
from bigbatch.config.shapes import shape

LARGE = load_recipe_file(Path(__file__).with_name("bert_large.py"))
RECIPE = dataclasses.replace(
    LARGE,
    name="bert_base",
    model=shape("bert-base"),
    # 32 A100/H100 80GB; memory: the smaller card (81,252 MiB), as the device reports it
    cluster=ClusterConfig(nodes=4, gpus_per_node=8, gpu_memory="A100-80GB"),
)

if __name__ == "__main__":
    from bigbatch.cli import run_recipe

    sys.exit(run_recipe(__file__))
