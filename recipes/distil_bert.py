"""distil_bert: DistilBERT's student (Sanh et al. 2019), a 6-layer BERT of BERT-base's width, distilled from a
`bert_base` run on bert_base's data, schedule, LAMB and batch.

DistilBERT's loss weights (soft targets 5, masked LM 2, cosine of the last hidden states 1) at temperature 2, and its
start from every other teacher layer (0, 2, 4, 6, 8, 10).

    bigbatch check distil_bert --distill.teacher=runs/bert_base
    deepspeed --num_gpus 8 --module bigbatch train distil_bert --distill.teacher=runs/bert_base
"""

import dataclasses
import sys
from pathlib import Path

from bigbatch.config import DistillConfig
from bigbatch.config.files import load_recipe_file

BASE = load_recipe_file(Path(__file__).with_name("bert_base.py"))
RECIPE = dataclasses.replace(
    BASE,
    name="distil_bert",
    model=dataclasses.replace(BASE.model, num_layers=6),
    distill=DistillConfig(teacher="", temperature=2.0, alpha_kd=5.0, alpha_hard=2.0, alpha_hidden=1.0,
                          init="teacher_layers"),
)

if __name__ == "__main__":
    from bigbatch.cli import run_recipe

    sys.exit(run_recipe(__file__))
